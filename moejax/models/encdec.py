"""Encoder-decoder MoE transformer shared by Switch Transformers and NLLB-MoE.

The families differ only through `EncDecConfig` fields (norm kind, relative-bias or sinusoidal
positions, biases, attention scaling, embedding and logit scales, routing). A model's weights are
three pytrees, indexed by the global layer number g (encoder layers first, then decoder layers):

- `globals`: embedding tables ('shared' and/or 'encoder_embed', 'decoder_embed': {'embedding':
  [V, D]}), 'lm_head' {'kernel': [D, V]} when untied, 'encoder_norm' / 'decoder_norm', and for
  relative positions 'encoder_relative_bias' / 'decoder_relative_bias' {'embedding': [buckets, H]};
- `layers[g]`: the Flax params of `encdec_layer(cfg, g)`: norms, attention(s), router or dense FFN;
- `experts[g]`: layer g's routed experts stacked {'up': [E, D, F], 'down': [E, F, D]} (+ 'up_bias'
  [E, F], 'down_bias' [E, D] with biases), or None for a dense layer.

A MoE layer runs as attention (`encoder_attend`, or `decoder_attend` with its KV cache and the
precomputed cross-attention K/V), `route` (norm, router, top-k; -> moe_in [N, D], weights [N, k]
f32, ids [N, k] int32), the expert accumulation (`models.moe`) and `finish` (residual), so a
runtime can place the expert step wherever the expert weights are.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.encdec_config import EncDecConfig
from moejax.models.capacity import capacity_route
from moejax.models.decoder import normal_init
from moejax.models.layers import ACTIVATIONS, RMSNorm, attention_mask
from moejax.models.moe import device_routed_experts, route
from moejax.models.positions import relative_bucket_table, sinusoidal_positions


class RouteInputs(NamedTuple):
    """Per-call routing context. valid [B, T] bool: tokens whose output is used (only they get
    experts). counted [B, T] bool and capacity int32 []: capacity routing only (see models.capacity)."""

    valid: jax.Array
    counted: jax.Array
    capacity: jax.Array


def _dtype(cfg: EncDecConfig):
    return jnp.dtype(cfg.dtype)


class LayerNorm(nn.Module):
    """Mean-centred norm with weight and bias over the last axis, computed in float32 and cast back."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * weight + bias).astype(x.dtype)


def make_norm(cfg: EncDecConfig):
    if cfg.norm == "rms":
        return RMSNorm(cfg.norm_eps, _dtype(cfg))
    return LayerNorm(cfg.norm_eps, _dtype(cfg))


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose keys and values are computed by the caller (cache, cross K/V)."""

    cfg: EncDecConfig

    def setup(self):
        cfg = self.cfg
        dense = lambda n: nn.Dense(n, use_bias=cfg.attention_bias, param_dtype=_dtype(cfg))  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = dense(cfg.inner_size), dense(cfg.inner_size), dense(cfg.inner_size)
        self.o_proj = dense(cfg.hidden_size)

    def keys_values(self, x):
        """x [B, S, D] -> (k, v) each [B, S, H, head_dim]."""
        shape = (*x.shape[:2], self.cfg.num_heads, self.cfg.head_dim)
        return self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)

    def __call__(self, x, k, v, mask, bias):
        """x [B, T, D]; k, v [B, S, H, hd]; mask [B, T or 1, S] bool; bias [B or 1, H, T, S] f32 or None."""
        cfg = self.cfg
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)
        scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(x.dtype), preferred_element_type=jnp.float32)
        if cfg.scale_attention:
            scores = scores * (cfg.head_dim**-0.5)
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(x.dtype)).reshape(batch, length, cfg.inner_size)
        return self.o_proj(out)


class FeedForward(nn.Module):
    """act(x @ up + b) @ down + b: the dense FFN of non-MoE layers (same shape as one expert)."""

    cfg: EncDecConfig
    size: int

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=self.cfg.ffn_bias, param_dtype=_dtype(self.cfg), name=name)  # noqa: E731
        return dense(x.shape[-1], "down")(ACTIVATIONS[self.cfg.hidden_act](dense(self.size, "up")(x)))


class EncDecLayer(nn.Module):
    """One encoder or decoder layer; shaped by (is_decoder, moe, ffn_size), never by its index."""

    cfg: EncDecConfig
    is_decoder: bool
    moe: bool
    ffn_size: int

    def setup(self):
        cfg = self.cfg
        self.self_norm = make_norm(cfg)
        self.self_attn = MultiHeadAttention(cfg)
        if self.is_decoder:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = MultiHeadAttention(cfg)
        self.ffn_norm = make_norm(cfg)
        if self.moe:
            # Routers run in float32 in both families ("selective precision").
            self.router = nn.Dense(cfg.num_experts, use_bias=cfg.router_bias, dtype=jnp.float32, param_dtype=_dtype(cfg))
        else:
            self.ffn = FeedForward(cfg, self.ffn_size)

    def encoder_attend(self, x, src_valid, bias):
        """Self-attention over the source: x [B, S, D], src_valid [B, S] bool -> h [B, S, D]."""
        normed = self.self_norm(x)
        k, v = self.self_attn.keys_values(normed)
        return x + self.self_attn(normed, k, v, src_valid[:, None, :], bias)

    def cross_keys_values(self, enc_out):
        """The cross-attention K/V of this decoder layer: enc_out [B, S, D] -> (k, v) [B, S, H, hd]."""
        return self.cross_attn.keys_values(enc_out)

    def decoder_attend(self, y, kv_cache, positions, bias, cross_kv, src_valid, slot_ids=None, attend_len=None,
                       layer_index=None):
        """Causal self-attention (writing this call's K/V into the cache at `positions`), then
        cross-attention: y [B, T, D]; kv_cache (k, v) [B, L, H, hd]; positions [B, T] int32;
        cross_kv (k, v) [B, S, H, hd]; src_valid [B, S] bool.

        With `slot_ids` (int32 [B]) the cache holds the engine's slots and layers, [layers, slots, L, H, hd]:
        row b writes and reads layer `layer_index`'s cache row slot_ids[b], attending over its first
        `attend_len` (static) positions (as `layers.Attention`)."""
        normed = self.self_norm(y)
        k, v = self.self_attn.keys_values(normed)
        k_cache, v_cache = kv_cache
        rows = (jnp.arange(y.shape[0]) if slot_ids is None else slot_ids)[:, None]
        where = (rows, positions) if slot_ids is None else (layer_index, rows, positions)
        k_cache = k_cache.at[where].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[where].set(v.astype(v_cache.dtype), mode="drop")
        k_seen, v_seen = k_cache, v_cache
        if slot_ids is not None:
            seen = (layer_index, slot_ids, slice(None, attend_len))
            k_seen, v_seen = k_cache[seen], v_cache[seen]
        mask = attention_mask(positions, k_seen.shape[1], None)
        h = y + self.self_attn(normed, k_seen, v_seen, mask, bias)
        cross_k, cross_v = cross_kv
        h = h + self.cross_attn(self.cross_norm(h), cross_k, cross_v, src_valid[:, None, :], None)
        return h, (k_cache, v_cache)

    def route(self, h, route_in: RouteInputs):
        """h [B, T, D] -> (moe_in [N, D], weights [N, k] f32, ids [N, k] int32); tokens not valid
        and pairs dropped for capacity get weight 0 and id E."""
        cfg = self.cfg
        batch, length, dim = h.shape
        moe_in = self.ffn_norm(h).reshape(-1, dim)
        logits = self.router(moe_in)
        if cfg.routing == "capacity":
            logits = logits.reshape(batch, length, cfg.num_experts)
            weights, ids = capacity_route(cfg, logits, route_in.counted, route_in.capacity)
        else:
            weights, ids = route(logits, cfg.top_k, cfg.norm_topk_prob)
        valid = route_in.valid.reshape(-1, 1)
        return moe_in, jnp.where(valid, weights, 0.0), jnp.where(valid, ids, cfg.num_experts)

    def finish(self, h, routed):
        """Adds the routed output (acc [N, D] f32) to the residual h [B, T, D]."""
        return h + (routed * self.cfg.expert_output_scale).astype(h.dtype).reshape(h.shape)

    def dense_ffn(self, h):
        """The whole feed-forward half of a dense (non-MoE) layer."""
        return h + self.ffn(self.ffn_norm(h))

    def feed_forward(self, h, route_in: RouteInputs, experts):
        """The feed-forward half with the routing resolved on the device: -> (x, ids [N, k] or None)."""
        if not self.moe:
            return self.dense_ffn(h), None
        moe_in, weights, ids = self.route(h, route_in)
        routed = device_routed_experts(moe_in, ids, weights, experts, self.cfg.hidden_act)
        return self.finish(h, routed), ids

    def __call__(self, x, route_in):
        """Runs every submodule once on a dummy context, to create the parameters."""
        batch, length, _ = x.shape
        valid = jnp.ones((batch, length), bool)
        if self.is_decoder:
            cache = (jnp.zeros((batch, length, self.cfg.num_heads, self.cfg.head_dim), x.dtype),) * 2
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            h, _ = self.decoder_attend(x, cache, positions, None, self.cross_keys_values(x), valid)
        else:
            h = self.encoder_attend(x, valid, None)
        if not self.moe:
            return self.dense_ffn(h)
        moe_in, _, _ = self.route(h, route_in)
        return self.finish(h, jnp.zeros(moe_in.shape, jnp.float32))


def encdec_layer(cfg: EncDecConfig, layer: int) -> EncDecLayer:
    """The module of global layer `layer`."""
    return EncDecLayer(cfg, cfg.is_decoder_layer(layer), cfg.moe_layers[layer], cfg.ffn_size(layer))


class EncDecGlobals(nn.Module):
    """Embeddings in, position biases, final norms and the vocabulary projection out."""

    cfg: EncDecConfig

    def setup(self):
        cfg, dtype = self.cfg, _dtype(self.cfg)
        embed = lambda: nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dtype)  # noqa: E731
        if set(cfg.own_tables) != {"encoder_embed", "decoder_embed", "lm_head"}:
            self.shared = embed()
        if "encoder_embed" in cfg.own_tables:
            self.encoder_embed = embed()
        if "decoder_embed" in cfg.own_tables:
            self.decoder_embed = embed()
        if "lm_head" in cfg.own_tables:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, param_dtype=dtype)
        self.encoder_norm = make_norm(cfg)
        self.decoder_norm = make_norm(cfg)
        if cfg.position == "relative":
            self.encoder_relative_bias = nn.Embed(cfg.relative_buckets, cfg.num_heads, param_dtype=dtype)
            self.decoder_relative_bias = nn.Embed(cfg.relative_buckets, cfg.num_heads, param_dtype=dtype)

    def _table(self, name: str) -> nn.Embed:
        return getattr(self, name) if name in self.cfg.own_tables else self.shared

    def _embed(self, table: str, tokens, start):
        cfg = self.cfg
        x = self._table(table)(tokens) * cfg.embed_scale
        if cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(tokens, start, cfg.pad_token_id, cfg.hidden_size).astype(x.dtype)
        return x

    def embed_source(self, tokens):
        """tokens [B, S] int32 -> [B, S, D]."""
        return self._embed("encoder_embed", tokens, jnp.zeros(tokens.shape[0], jnp.int32))

    def embed_target(self, tokens, positions):
        """tokens [B, T] at positions [B, T] (consecutive per row) -> [B, T, D]."""
        return self._embed("decoder_embed", tokens, positions[:, 0])

    def _bias(self, table: nn.Embed, rel, bidirectional: bool):
        cfg = self.cfg
        lookup = jnp.asarray(relative_bucket_table(bidirectional, cfg.relative_buckets, cfg.relative_max_distance))
        buckets = lookup[jnp.clip(rel, -cfg.relative_max_distance, cfg.relative_max_distance) + cfg.relative_max_distance]
        return jnp.moveaxis(table(buckets).astype(jnp.float32), -1, -3)

    def encoder_bias(self, length: int):
        """Relative-position bias [1, H, S, S] f32 of the encoder, or None."""
        if self.cfg.position != "relative":
            return None
        pos = jnp.arange(length)
        return self._bias(self.encoder_relative_bias, (pos[None, :] - pos[:, None])[None], True)

    def decoder_bias(self, positions, kv_length: int):
        """Relative-position bias [B, H, T, L] f32 of decoder queries at positions [B, T] over L cache slots, or None."""
        if self.cfg.position != "relative":
            return None
        rel = jnp.arange(kv_length)[None, None, :] - positions[:, :, None]
        return self._bias(self.decoder_relative_bias, rel, False)

    def encoder_final(self, x):
        return self.encoder_norm(x)

    def logits(self, y):
        """Decoder hidden y [..., D] -> logits [..., V] float32."""
        y = self.decoder_norm(y) * self.cfg.logit_scale
        out = self.lm_head(y) if "lm_head" in self.cfg.own_tables else self.shared.attend(y)
        return out.astype(jnp.float32)

    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        self.encoder_bias(tokens.shape[1])
        self.decoder_bias(positions, tokens.shape[1])
        self.encoder_final(self.embed_source(tokens))
        return self.logits(self.embed_target(tokens, positions))


# -- whole-model functions (reference path, parameter creation and counting) --------------------


def apply_globals(cfg: EncDecConfig, globals_, method, *args):
    return EncDecGlobals(cfg).apply({"params": globals_}, *args, method=getattr(EncDecGlobals, method))


def apply_layer(cfg: EncDecConfig, layer: int, params, method, *args):
    return encdec_layer(cfg, layer).apply({"params": params}, *args, method=getattr(EncDecLayer, method))


def encode(cfg: EncDecConfig, globals_, layers, experts, tokens, src_valid, route_in: RouteInputs):
    """All encoder layers with routing on the device: tokens [B, S], src_valid [B, S] bool (real
    tokens) -> (enc_out [B, S, D], {g: ids})."""
    x = apply_globals(cfg, globals_, "embed_source", tokens)
    bias = apply_globals(cfg, globals_, "encoder_bias", tokens.shape[1])
    routing = {}
    for g in cfg.encoder_layer_ids:
        h = apply_layer(cfg, g, layers[g], "encoder_attend", x, src_valid, bias)
        x, ids = apply_layer(cfg, g, layers[g], "feed_forward", h, route_in, experts[g])
        if ids is not None:
            routing[g] = ids
    return apply_globals(cfg, globals_, "encoder_final", x), routing


def cross_keys_values(cfg: EncDecConfig, layers, enc_out):
    """Every decoder layer's cross-attention (k, v) [B, S, H, hd], in decoder order."""
    return [apply_layer(cfg, g, layers[g], "cross_keys_values", enc_out) for g in cfg.decoder_layer_ids]


def decode(cfg: EncDecConfig, globals_, layers, experts, tokens, positions, kv_caches, cross_kv, src_valid, route_in):
    """All decoder layers: tokens [B, T] at positions -> (hidden [B, T, D] before the final norm, kv_caches, {g: ids}).

    kv_caches and cross_kv are lists in decoder order; src_valid [B, S] bool masks source padding.
    """
    y = apply_globals(cfg, globals_, "embed_target", tokens, positions)
    bias = apply_globals(cfg, globals_, "decoder_bias", positions, kv_caches[0][0].shape[1])
    new_caches, routing = [], {}
    for j, g in enumerate(cfg.decoder_layer_ids):
        h, kv = apply_layer(cfg, g, layers[g], "decoder_attend", y, kv_caches[j], positions, bias, cross_kv[j], src_valid)
        y, ids = apply_layer(cfg, g, layers[g], "feed_forward", h, route_in, experts[g])
        new_caches.append(kv)
        if ids is not None:
            routing[g] = ids
    return y, new_caches, routing


def kv_cache_shape(cfg: EncDecConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    """Shape of one decoder layer's self-attention K (and V) cache: [B, L, H, head_dim]."""
    return (batch, length, cfg.num_heads, cfg.head_dim)


def expert_shapes(cfg: EncDecConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Shape of each weight of one routed expert of layer `layer`."""
    d, f = cfg.hidden_size, cfg.ffn_size(layer)
    shapes = {"up": (d, f), "down": (f, d)}
    if cfg.ffn_bias:
        shapes.update(up_bias=(f,), down_bias=(d,))
    return shapes


def _dummy_route(batch: int, length: int) -> RouteInputs:
    ones = jnp.ones((batch, length), bool)
    return RouteInputs(ones, ones, jnp.asarray(1, jnp.int32))


def _layer_init_args(cfg: EncDecConfig):
    return jnp.zeros((1, 1, cfg.hidden_size), cfg.dtype), _dummy_route(1, 1)


def random_layer_params(cfg: EncDecConfig, layer: int, key, std: float = 0.02) -> dict:
    """Random dense weights of one layer: norm weights one, biases zero, the rest normal(0, std)."""
    params = encdec_layer(cfg, layer).init(key, *_layer_init_args(cfg))["params"]
    return normal_init(params, key, std, cfg.dtype)


def random_globals(cfg: EncDecConfig, key, std: float = 0.02) -> dict:
    params = EncDecGlobals(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    return normal_init(params, key, std, cfg.dtype)


def random_experts(cfg: EncDecConfig, layer: int, key, std: float = 0.02) -> dict:
    """Layer `layer`'s stacked experts in the model dtype: matrices normal(0, std), biases zero."""
    shapes = expert_shapes(cfg, layer)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes)), strict=True))
    out = {}
    for name, shape in shapes.items():
        full = (cfg.num_experts, *shape)
        value = jnp.zeros(full) if name.endswith("bias") else jax.random.normal(keys[name], full, jnp.float32) * std
        out[name] = value.astype(cfg.dtype)
    return out


def init_params(cfg: EncDecConfig, key, std: float = 0.02):
    """Random weights of a whole model: (globals, layers, experts), experts stacked per MoE layer.

    For benchmark shapes too large to build at once, use random_globals / random_layer_params /
    random_experts layer by layer.
    """
    keys = jax.random.split(key, 2 * cfg.num_layers + 1)
    layers = [random_layer_params(cfg, g, keys[1 + g], std) for g in range(cfg.num_layers)]
    experts = [
        random_experts(cfg, g, keys[1 + cfg.num_layers + g], std) if cfg.moe_layers[g] else None
        for g in range(cfg.num_layers)
    ]
    return random_globals(cfg, keys[0], std), layers, experts


def parameter_counts(cfg: EncDecConfig) -> dict[str, int]:
    """Exact parameter counts and bytes from the shapes the modules create (no weights built)."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    key = jax.random.PRNGKey(0)
    dense = count(jax.eval_shape(EncDecGlobals(cfg).init, key, jnp.zeros((1, 1), jnp.int32)))
    for g in range(cfg.num_layers):
        dense += count(jax.eval_shape(encdec_layer(cfg, g).init, key, *_layer_init_args(cfg)))
    experts = sum(cfg.num_experts * cfg.layer_expert_params(g) for g in cfg.moe_layer_ids)
    active = sum(cfg.top_k * cfg.layer_expert_params(g) for g in cfg.moe_layer_ids)
    return {
        "total": dense + experts,
        "dense": dense,
        "experts": experts,
        "active_per_token": dense + active,
        "one_expert": cfg.expert_params,
        "dense_bytes": dense * cfg.dtype_bytes,
        "one_expert_bytes": cfg.expert_bytes,
        "all_experts_bytes": experts * cfg.dtype_bytes,
    }
