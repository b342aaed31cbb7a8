"""Decoder-only MoE transformer shared by Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss.

Families differ only through `ModelConfig` fields (biases, q/k norms, shared expert,
sliding windows, dense layers, attention sinks, the router's bias and softmax, the experts'
activation). A model's weights are three pytrees:

- `globals`: {'embed': {'embedding': [V, D]}, 'final_norm': {'weight': [D]},
  'lm_head': {'kernel': [D, V]}} (no lm_head when embeddings are tied);
- `layers[i]`: the Flax params of `decoder_layer(cfg, i)`: norms, attention, router,
  shared expert or dense MLP, everything except routed experts;
- `experts[i]`: layer i's routed experts, a tuple of E per-expert dicts {'gate': [D, F],
  'up': [D, F], 'down': [F, D]} (with `expert_bias` also 'gate_bias' [F], 'up_bias' [F],
  'down_bias' [D]) or one stacked dict with a leading [E] axis on each, or None for a dense
  layer. The runtime may hold them elsewhere.

A layer runs as `attend` (norm, attention, KV update), `route` (norm, router, top-k), the
expert accumulation (`models.moe`), and `finish` (shared expert, residual), so a runtime
can place the expert step wherever its weights are.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.models.layers import Attention, GatedMLP, RMSNorm, Router, param_dtype
from moejax.models.mla import LatentAttention, latent_cache_shapes
from moejax.models.moe import ClampedSwiGLU, device_routed_experts, route


class DecoderLayer(nn.Module):
    """One layer; `moe` and `window` (not the layer index) shape it, so layers alike share compiled code. window:
    None, an int, or an int32 scalar array (inside a scan over layers whose windows differ, `layers.attention_mask`)."""

    cfg: ModelConfig
    moe: bool
    window: int | None

    def setup(self):
        cfg, dtype = self.cfg, param_dtype(self.cfg)
        self.input_norm = RMSNorm(cfg.rms_norm_eps, dtype)
        self.attn = (LatentAttention if cfg.is_mla else Attention)(cfg, self.window)
        self.post_norm = RMSNorm(cfg.rms_norm_eps, dtype)
        if self.moe:
            self.router = Router(cfg.hidden_size, cfg.num_experts, cfg.router_correction_bias, dtype, cfg.router_bias)
            if cfg.has_shared_expert:
                self.shared_expert = GatedMLP(cfg.shared_expert_intermediate_size, cfg.hidden_act, dtype)
            if cfg.has_shared_expert and cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Dense(1, use_bias=False, param_dtype=dtype)
        else:
            self.mlp = GatedMLP(cfg.dense_intermediate_size, cfg.hidden_act, dtype)

    def attend(self, x, kv_cache, positions, slot_ids=None, attend_len: int | None = None, layer_index=None):
        """Residual stream after attention: x [B, T, D] -> (h [B, T, D], kv_cache) (slot_ids, attend_len,
        layer_index: see `layers.Attention`)."""
        out, kv_cache = self.attn(self.input_norm(x), kv_cache, positions, slot_ids, attend_len, layer_index)
        return x + out, kv_cache

    def router_logits(self, h):
        """MoE input and router scores: h [B, T, D] -> (moe_in [N, D], router logits [N, E])."""
        moe_in = self.post_norm(h).reshape(-1, h.shape[-1])
        return moe_in, self.router(moe_in)

    def route(self, h):
        """MoE input and routing: h [B, T, D] -> (moe_in [N, D], weights [N, k] f32, ids [N, k] int32)."""
        moe_in, logits = self.router_logits(h)
        weights, ids = self.choose(logits)
        return moe_in, weights, ids

    def choose(self, logits):
        """The configured router (`moe.route`) on logits [N, E] -> (weights [N, k] f32, ids [N, k] int32)."""
        cfg = self.cfg
        return route(logits, cfg.top_k, cfg.norm_topk_prob, **cfg.router_options, correction_bias=self.router.bias())

    def finish(self, h, moe_in, routed):
        """Adds the routed output (acc [N, D] f32) and the shared expert to the residual h [B, T, D]."""
        out = routed.astype(h.dtype)
        if self.cfg.has_shared_expert and self.cfg.shared_expert_gate:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(moe_in)) * self.shared_expert(moe_in)
        elif self.cfg.has_shared_expert:
            out = out + self.shared_expert(moe_in)
        return h + out.reshape(h.shape)

    def dense_mlp(self, h):
        """The whole feed-forward half of a dense (non-MoE) layer."""
        return h + self.mlp(self.post_norm(h))

    def __call__(self, x, kv_cache, positions, experts=None):
        """The whole layer with routing on the device (reference path, also used to init params)."""
        out, kv_cache, _ = self.with_router_logits(x, kv_cache, positions, experts)
        return out, kv_cache

    def with_router_logits(self, x, kv_cache, positions, experts=None):
        """`__call__` that also returns the router logits [N, E] (None for a dense layer), e.g. for training."""
        h, kv_cache = self.attend(x, kv_cache, positions)
        if not self.moe:
            return self.dense_mlp(h), kv_cache, None
        moe_in, logits = self.router_logits(h)
        weights, ids = self.choose(logits)
        if experts is None:
            routed = jnp.zeros(moe_in.shape, jnp.float32)
        else:
            routed = device_routed_experts(moe_in, ids, weights, experts, expert_activation(self.cfg))
        return self.finish(h, moe_in, routed), kv_cache, logits


def expert_activation(cfg):
    """What the routed experts of `cfg` (a ModelConfig or an EncDecConfig) apply to their gate and up projections
    (`models.moe.gated_activation`): the activation's name, or gpt-oss's clamped SwiGLU."""
    limit = getattr(cfg, "swiglu_limit", None)  # encoder-decoder configs have none
    return cfg.hidden_act if limit is None else ClampedSwiGLU(cfg.swiglu_alpha, limit)


def decoder_layer(cfg: ModelConfig, i: int) -> DecoderLayer:
    """The module of layer i."""
    return DecoderLayer(cfg, cfg.moe_layers[i], cfg.sliding_windows[i])


class EmbedHead(nn.Module):
    """Token embedding in, final norm and vocabulary projection out."""

    cfg: ModelConfig

    def setup(self):
        cfg, dtype = self.cfg, param_dtype(self.cfg)
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dtype)
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, param_dtype=dtype)

    def embed_tokens(self, tokens):
        """tokens [B, T] int32 -> [B, T, D]."""
        return self.embed(tokens)

    def logits(self, x):
        """x [..., D] -> logits [..., V] float32."""
        x = self.final_norm(x)
        out = self.embed.attend(x) if self.cfg.tie_word_embeddings else self.lm_head(x)
        return out.astype(jnp.float32)

    def __call__(self, tokens):
        return self.logits(self.embed_tokens(tokens))


def kv_cache_shapes(cfg: ModelConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's cache pair: K and V [B, S, KV, head_dim] each, or for latent attention
    (latent [B, S, kv_lora_rank], rotated key [B, S, qk_rope_head_dim]) (`models.mla`)."""
    if cfg.is_mla:
        return latent_cache_shapes(cfg, batch, length)
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return shape, shape


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
    """Bytes of all layers' KV caches for `batch` rows of `length` positions."""
    return cfg.num_layers * sum(int(np.prod(s)) for s in kv_cache_shapes(cfg, batch, length)) * cfg.dtype_bytes


def kv_bytes_per_token(cfg: ModelConfig) -> dict[str, int]:
    """KV cache bytes of one token over all layers as held ('cached') and as full per-head keys and
    values ('full_heads'); they differ for latent attention."""
    v_dim = cfg.v_head_dim if cfg.is_mla else cfg.head_dim
    full = cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + v_dim) * cfg.dtype_bytes
    return {"cached": kv_cache_bytes(cfg, 1, 1), "full_heads": full}


def empty_kv_caches(cfg: ModelConfig, batch: int, length: int):
    k_shape, v_shape = kv_cache_shapes(cfg, batch, length)
    return [(jnp.zeros(k_shape, cfg.dtype), jnp.zeros(v_shape, cfg.dtype)) for _ in range(cfg.num_layers)]


def init_params(cfg: ModelConfig, key, std: float = 0.02):
    """Random weights: (globals, layers, experts), experts stacked per MoE layer.

    Norm weights are ones and everything else normal(0, std), as transformers initialises.
    """
    dtype = param_dtype(cfg)
    keys = jax.random.split(key, 2 * cfg.num_layers + 1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    kv = empty_kv_caches(cfg, 1, 1)[0]
    positions = jnp.zeros((1, 1), jnp.int32)

    globals_ = normal_init(EmbedHead(cfg).init(keys[0], tokens)["params"], keys[0], std, dtype)
    layers, experts = [], []
    for i in range(cfg.num_layers):
        params = decoder_layer(cfg, i).init(keys[1 + i], jnp.zeros((1, 1, cfg.hidden_size), dtype), kv, positions)
        layers.append(normal_init(params["params"], keys[1 + i], std, dtype))
        experts.append(random_experts(cfg, keys[1 + cfg.num_layers + i], std) if cfg.moe_layers[i] else None)
    return globals_, layers, experts


def normal_init(params, key, std: float, dtype):
    """Params with norm weights ('weight') one, biases zero and everything else normal(0, std) in dtype."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    subkeys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), subkey in zip(leaves, subkeys, strict=True):
        name = str(path[-1].key)
        if name == "weight" or name == "bias":
            out.append(jnp.ones_like(leaf) if name == "weight" else jnp.zeros_like(leaf))
        else:
            out.append((jax.random.normal(subkey, leaf.shape, jnp.float32) * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Shape of each weight of one routed expert."""
    d, f = cfg.hidden_size, cfg.expert_intermediate_size
    biases = {"gate_bias": (f,), "up_bias": (f,), "down_bias": (d,)} if cfg.expert_bias else {}
    return {"gate": (d, f), "up": (d, f), "down": (f, d), **biases}


def random_experts(cfg: ModelConfig, key, std: float = 0.02) -> dict:
    """One layer's stacked experts drawn from normal(0, std) in the model dtype."""
    shapes = expert_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    return {
        name: (jax.random.normal(k, (cfg.num_experts, *shape), jnp.float32) * std).astype(cfg.dtype)
        for (name, shape), k in zip(shapes.items(), keys, strict=True)
    }


def _forward_layers(cfg: ModelConfig, globals_, layers, experts, tokens, kv_caches, positions):
    """-> (hidden [B, T, D] before the final norm, kv_caches, router logits [N, E] of each MoE layer)."""
    x = EmbedHead(cfg).apply({"params": globals_}, tokens, method=EmbedHead.embed_tokens)
    new_caches, router_logits = [], []
    for i in range(cfg.num_layers):
        x, kv, logits = decoder_layer(cfg, i).apply(
            {"params": layers[i]}, x, kv_caches[i], positions, experts[i], method=DecoderLayer.with_router_logits
        )
        new_caches.append(kv)
        if logits is not None:
            router_logits.append(logits)
    return x, new_caches, router_logits


def forward_hidden(cfg: ModelConfig, globals_, layers, experts, tokens, kv_caches, positions):
    """All layers with routing on the device: tokens [B, T] -> (hidden [B, T, D] before the final norm, kv_caches)."""
    x, kv_caches, _ = _forward_layers(cfg, globals_, layers, experts, tokens, kv_caches, positions)
    return x, kv_caches


def forward(cfg: ModelConfig, globals_, layers, experts, tokens, kv_caches, positions):
    """Whole model: tokens [B, T] -> (logits [B, T, V] f32, kv_caches)."""
    x, kv_caches = forward_hidden(cfg, globals_, layers, experts, tokens, kv_caches, positions)
    return EmbedHead(cfg).apply({"params": globals_}, x, method=EmbedHead.logits), kv_caches


def forward_with_router_logits(cfg: ModelConfig, globals_, layers, experts, tokens, kv_caches, positions):
    """`forward` that also returns the router logits: (logits [B, T, V] f32, kv_caches, router_logits).

    router_logits has one [B * T, E] array per MoE layer, in layer order (rows in [B, T] order),
    in the weights' dtype: what training's load-balancing loss and routing statistics need.
    """
    x, kv_caches, router_logits = _forward_layers(cfg, globals_, layers, experts, tokens, kv_caches, positions)
    return EmbedHead(cfg).apply({"params": globals_}, x, method=EmbedHead.logits), kv_caches, router_logits


def _parameter_sizes(tree) -> list[int]:
    """The element count of each leaf but the routers' correction biases (transformers holds them as buffers, and
    published parameter counts leave them out)."""
    return [int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if str(getattr(path[-1], "key", "")) != "e_score_correction_bias"]


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts and bytes, from the shapes the modules create (no weights built)."""
    count = lambda tree: sum(_parameter_sizes(tree))  # noqa: E731
    tokens = jnp.zeros((1, 1), jnp.int32)
    kv = empty_kv_caches(cfg, 1, 1)[0]
    positions = jnp.zeros((1, 1), jnp.int32)
    x = jnp.zeros((1, 1, cfg.hidden_size), cfg.dtype)
    key = jax.random.PRNGKey(0)
    dense = count(jax.eval_shape(EmbedHead(cfg).init, key, tokens))
    per_kind: dict[tuple, int] = {}  # layers of one (moe, window) kind have the same parameters
    for i in range(cfg.num_layers):
        kind = (cfg.moe_layers[i], cfg.sliding_windows[i])
        if kind not in per_kind:
            per_kind[kind] = count(jax.eval_shape(decoder_layer(cfg, i).init, key, x, kv, positions))
        dense += per_kind[kind]
    n_moe = sum(cfg.moe_layers)
    experts = n_moe * cfg.num_experts * cfg.expert_params
    return {
        "total": dense + experts,
        "dense": dense,
        "experts": experts,
        "active_per_token": dense + n_moe * cfg.top_k * cfg.expert_params,
        "one_expert": cfg.expert_params,
        "dense_bytes": dense * cfg.dtype_bytes,
        "one_expert_bytes": cfg.expert_bytes,
        "all_experts_bytes": experts * cfg.dtype_bytes,
    }
