"""The jitted per-layer functions every executor is built from.

Static arguments are the config and the layer's shape (`moe`, `window`), never its index, so
all layers alike share one compiled function per input shape. KV caches are donated and
updated in place. Expert weights are always arguments: `accumulate` takes a tuple of
per-expert dicts or PackedExperts (`models.moe`), so the runtime can pass whichever experts it
holds on the device; a new tuple length compiles once and is then reused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.models.decoder import DecoderLayer, EmbedHead, forward_hidden
from moejax.models.moe import accumulate_experts, device_routed_experts
from moejax.runtime.store import has_pinned_host

_LAYER_STATIC = ("cfg", "moe", "window")


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed(cfg: ModelConfig, globals_, tokens):
    """tokens [B, T] int32 -> hidden [B, T, D]."""
    return EmbedHead(cfg).apply({"params": globals_}, tokens, method=EmbedHead.embed_tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head(cfg: ModelConfig, globals_, x, select):
    """Logits f32: [B, V] at position select[b] of each row, or [B, T, V] when select is None."""
    if select is not None:
        x = x[jnp.arange(x.shape[0]), select]
    return EmbedHead(cfg).apply({"params": globals_}, x, method=EmbedHead.logits)


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC, donate_argnames=("kv_cache",))
def layer_device_routed(cfg: ModelConfig, moe: bool, window, params, experts, x, kv_cache, positions):
    """A whole layer with its stacked experts on the device: -> (x, kv_cache, topk ids [N, k] or None)."""
    layer = DecoderLayer(cfg, moe, window)
    variables = {"params": params}
    h, kv_cache = layer.apply(variables, x, kv_cache, positions, method=DecoderLayer.attend)
    if not moe:
        return layer.apply(variables, h, method=DecoderLayer.dense_mlp), kv_cache, None
    moe_in, weights, ids = layer.apply(variables, h, method=DecoderLayer.route)
    routed = device_routed_experts(moe_in, ids, weights, experts, cfg.hidden_act)
    return layer.apply(variables, h, moe_in, routed, method=DecoderLayer.finish), kv_cache, ids


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC, donate_argnames=("kv_cache",))
def attend_and_route(cfg: ModelConfig, moe: bool, window, params, x, kv_cache, positions, next_params=None):
    """First half of a MoE layer: -> (h [B, T, D], kv_cache, moe_in [N, D], weights [N, k], ids [N, k], routing).

    routing int32, in pinned host memory, is what the host reads: ids [N, k], or with `next_params` (the
    next MoE layer's parameters, at least its 'post_norm' and 'router') [N, 2k]: ids, then that layer's
    router applied to h, a guess of its routing for the lookahead prefetcher (computed in the same
    call: one dispatch less per layer). The program writes it to host memory itself, which the host
    sees sooner than a copy after the program: on the H200, 0.17 ms less per layer with no expert
    copies in flight, 0.34 / 0.69 ms less behind 6 / 18 (scripts/probe_dispatch.py).
    """
    return _attend_and_route(cfg, moe, window, params, x, kv_cache, positions, next_params)


def _attend_and_route(cfg: ModelConfig, moe: bool, window, params, x, kv_cache, positions, next_params):
    layer = DecoderLayer(cfg, moe, window)
    variables = {"params": params}
    h, kv_cache = layer.apply(variables, x, kv_cache, positions, method=DecoderLayer.attend)
    moe_in, weights, ids = layer.apply(variables, h, method=DecoderLayer.route)
    routing = ids
    if next_params is not None:
        _, _, guess = DecoderLayer(cfg, True, None).apply({"params": next_params}, h, method=DecoderLayer.route)
        routing = jnp.concatenate([ids, guess], axis=-1)
    return h, kv_cache, moe_in, weights, ids, to_host_memory(routing)


def to_host_memory(x):
    """x placed in the host's pinned memory as the program's output, where the backend has that memory
    (call inside a jitted function: what the host reads back, it then sees as soon as the program ends)."""
    return jax.device_put(x, jax.memory.Space.Host) if has_pinned_host(jax.devices()[0]) else x


@functools.partial(jax.jit, static_argnames=("act",))
def accumulate(moe_in, ids, weights, expert_ids, experts, acc, act: str):
    """One wave of experts (a tuple of per-expert dicts or PackedExperts, ids increasing) added into acc [N, D] f32."""
    return accumulate_experts(moe_in, ids, weights, expert_ids, experts, acc, act)


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC)
def accumulate_and_finish(cfg: ModelConfig, moe: bool, window, params, h, moe_in, ids, weights, expert_ids, experts, acc):
    """The last wave of experts plus the shared expert and residual: -> x [B, T, D]."""
    return _accumulate_and_finish(cfg, moe, window, params, h, moe_in, ids, weights, expert_ids, experts, acc)


def _accumulate_and_finish(cfg: ModelConfig, moe: bool, window, params, h, moe_in, ids, weights, expert_ids, experts, acc):
    acc = accumulate_experts(moe_in, ids, weights, expert_ids, experts, acc, cfg.hidden_act)
    return DecoderLayer(cfg, moe, window).apply({"params": params}, h, moe_in, acc, method=DecoderLayer.finish)


@functools.partial(jax.jit, static_argnames=("cfg", "window", "next_window"), donate_argnames=("next_kv_cache",))
def finish_and_attend(cfg: ModelConfig, window, next_window, params, h, moe_in, ids, weights, expert_ids, experts, acc,
                      next_params, next_kv_cache, positions, lookahead_params=None):
    """`accumulate_and_finish` of a MoE layer, then `attend_and_route` of the MoE layer right after it,
    as one program: -> what `attend_and_route` returns for the next layer.

    One dispatch per MoE layer instead of two; the host needs nothing between them. lookahead_params:
    the parameters of the MoE layer after the next one (its norm and router suffice), as
    `attend_and_route`'s `next_params`.
    """
    x = _accumulate_and_finish(cfg, True, window, params, h, moe_in, ids, weights, expert_ids, experts, acc)
    # The barrier keeps XLA from fusing across the layer boundary, where it would skip rounding x to
    # its dtype (excess precision): the result then equals the two separate calls'.
    x = jax.lax.optimization_barrier(x)
    return _attend_and_route(cfg, True, next_window, next_params, x, next_kv_cache, positions, lookahead_params)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("kv_caches",))
def whole_model(cfg: ModelConfig, globals_, layers, experts, tokens, kv_caches, positions, select):
    """The whole model as one XLA program (the reference and upper bound)."""
    x, kv_caches = forward_hidden(cfg, globals_, layers, experts, tokens, kv_caches, positions)
    return head(cfg, globals_, x, select), kv_caches
