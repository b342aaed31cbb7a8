"""Training objective of a decoder MoE: next-token cross-entropy plus the router load-balancing loss.

Load-balancing loss (Switch Transformer style, applied per MoE layer and averaged over layers):
with router probabilities p = softmax(router logits) [N, E] and the top-k choices of each token,

    f_e = (number of (token, slot) choices of expert e) / (N * k)   fraction of routed work
    P_e = mean over tokens of p[:, e]                               mean router probability
    loss = E * sum_e f_e * P_e

It is 1 when both are uniform and grows as routing concentrates; only P_e carries a gradient.
(transformers' Mixtral `load_balancing_loss_func` sums f over the k slots, i.e. k times this.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.models.decoder import empty_kv_caches, forward_with_router_logits


def expert_load(router_logits, top_k: int):
    """f: the fraction of the N * k routing choices that go to each expert. [N, E] -> [E] f32."""
    _, ids = jax.lax.top_k(router_logits.astype(jnp.float32), top_k)
    counts = jax.nn.one_hot(ids, router_logits.shape[-1], dtype=jnp.float32).sum(axis=(0, 1))
    return counts / ids.size


def load_balancing_loss(router_logits, top_k: int):
    """E * sum_e f_e * P_e for one layer's router logits [N, E]; 1.0 when perfectly balanced."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    load = jax.lax.stop_gradient(expert_load(router_logits, top_k))
    return router_logits.shape[-1] * jnp.sum(load * probs.mean(axis=0))


def cast_params(params, dtype):
    """The (globals, layers, experts) pytree with every array cast to `dtype` (None entries kept)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)


def lm_losses(cfg: ModelConfig, params, tokens):
    """Losses of a batch of token windows tokens [B, T + 1] int32 (inputs [:, :-1], targets [:, 1:]).

    params: (globals, layers, experts) in any float dtype; the computation runs in `cfg.dtype`
    (logits, norms, softmaxes and routing in float32 as in inference). Returns
    (cross-entropy, mean load-balancing loss over MoE layers, expert load [moe_layers, E]).
    """
    globals_, layers, experts = cast_params(params, cfg.dtype)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, length = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    kv_caches = empty_kv_caches(cfg, batch, length)
    logits, _, router_logits = forward_with_router_logits(cfg, globals_, layers, experts, inputs, kv_caches, positions)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))
    balance = jnp.mean(jnp.stack([load_balancing_loss(r, cfg.top_k) for r in router_logits]))
    load = jnp.stack([expert_load(r, cfg.top_k) for r in router_logits])
    return cross_entropy, balance, load
