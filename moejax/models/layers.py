"""Building blocks shared by the model families: norms, the gated MLP, attention with a KV cache."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from moejax.config import ModelConfig
from moejax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

# Names as in transformers' ACT2FN: "gelu" is the exact (erf) form there.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def param_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32 and cast back."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * normed.astype(x.dtype)


class Router(nn.Module):
    """Router logits: x [N, D] -> [N, E] (x @ kernel [D, E], + bias [E] with `logit_bias`, gpt-oss). With
    `correction_bias` it also holds e_score_correction_bias [E] float32, added to the scores for choosing experts
    only (`moe.route`)."""

    hidden_size: int
    num_experts: int
    correction_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    logit_bias: bool = False

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.hidden_size, self.num_experts), self.dtype)
        if self.logit_bias:
            self.logit_bias_param = self.param("bias", nn.initializers.zeros, (self.num_experts,), self.dtype)
        if self.correction_bias:
            self.e_score_correction_bias = self.param("e_score_correction_bias", nn.initializers.zeros,
                                                      (self.num_experts,), jnp.float32)

    def __call__(self, x):
        logits = x @ self.kernel
        return logits + self.logit_bias_param if self.logit_bias else logits

    def bias(self):
        """The correction bias [E], or None."""
        return self.e_score_correction_bias if self.correction_bias else None


class GatedMLP(nn.Module):
    """act(x @ gate) * (x @ up) @ down: the dense MLP and the shared expert."""

    intermediate_size: int
    act: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, param_dtype=self.dtype, name=name)  # noqa: E731
        hidden = ACTIVATIONS[self.act](dense(self.intermediate_size, "gate_proj")(x))
        hidden = hidden * dense(self.intermediate_size, "up_proj")(x)
        return dense(x.shape[-1], "down_proj")(hidden)


def attention_mask(q_positions, kv_length: int, window):
    """Boolean [B, T, S]: query at position p sees cache slot j iff j <= p (and j > p - window). window: None,
    an int, or an int32 scalar array (a layer's window passed into a scan over layers with different ones).

    The KV cache is indexed by position (prompts are right-padded), so causality alone also hides
    the padding of shorter prompts and stale slots beyond a sequence's current length.
    """
    kv_positions = jnp.arange(kv_length, dtype=jnp.int32)[None, None, :]
    q = q_positions[:, :, None]
    allowed = kv_positions <= q
    if window is not None:
        allowed &= kv_positions > q - window
    return allowed


def softmax_with_sinks(scores, sinks):
    """Softmax over the last axis of scores [B, KV, G, T, S] f32 whose denominator also holds exp(sink) of each
    head (sinks [KV, G]): attention that may put weight on no position at all (gpt-oss)."""
    sink = sinks.astype(jnp.float32)[None, :, :, None, None]
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    weights = jnp.exp(scores - top)
    return weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top))


def write_kv_cache(caches: tuple, new: tuple, positions, slot_ids=None, attend_len: int | None = None,
                   layer_index=None) -> tuple[tuple, tuple]:
    """Writes each of `new` ([B, T, ...], one per cache) into its cache at `positions` [B, T] of each row's slot
    (`slot_ids` [B]; None: row b is cache row b), in layer `layer_index` of stacked caches when given; positions
    past the cache are dropped, except in a call of one token of one row, whose position must lie inside it
    (`_write_position`). -> (the updated caches, what the step attends over: with slot_ids, the rows'
    first attend_len positions; else the whole caches)."""
    rows = (jnp.arange(positions.shape[0]) if slot_ids is None else slot_ids)[:, None]
    if positions.shape == (1, 1):  # one token of one row (batch-1 decode): an in-place update, no scatter
        prefix = (rows[0, 0],) if layer_index is None else (layer_index, rows[0, 0])
        caches = tuple(_write_position(cache, value, prefix, positions[0, 0]) for cache, value in zip(caches, new))
    else:
        where = (rows, positions) if layer_index is None else (layer_index, rows, positions)
        caches = tuple(cache.at[where].set(value.astype(cache.dtype), mode="drop") for cache, value in zip(caches, new))
    if slot_ids is None:
        return caches, caches
    seen = (slot_ids, slice(None, attend_len)) if layer_index is None else (layer_index, slot_ids, slice(None, attend_len))
    return caches, tuple(cache[seen] for cache in caches)


def _write_position(cache, value, prefix: tuple, position):
    """cache [..., S, ...] with value [1, 1, ...] written at index prefix + (position,), as one dynamic-update-slice
    that XLA makes in place. The position must lie inside the cache (the engine stops a sequence at its cache's
    length): one past it would land on the last position. A scatter that drops such a write, or a read of the
    position to write it back unchanged, makes XLA copy the whole cache at every layer (tests/test_count_step_ops.py)."""
    start = (*prefix, jnp.minimum(position, cache.shape[len(prefix)] - 1)) + (0,) * (cache.ndim - len(prefix) - 1)
    return lax.dynamic_update_slice(cache, value.astype(cache.dtype).reshape((1,) * (len(prefix) + 1) + value.shape[2:]),
                                    start)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an in-place KV cache update (and, with
    `cfg.attention_sinks`, a learned sink logit per head: param 'sinks' [heads])."""

    cfg: ModelConfig
    window: int | None

    @nn.compact
    def __call__(self, x, kv_cache, positions, slot_ids=None, attend_len: int | None = None, layer_index=None):
        """x [B, T, D]; kv_cache (k, v) each [B, S, KV, head_dim]; positions [B, T] int32.

        Writes this call's keys and values at their positions and returns (out [B, T, D], kv_cache).
        With `slot_ids` (int32 [B]) the cache has one row per engine slot ([slots, S, KV, head_dim]): row b
        of x reads and writes cache row slot_ids[b], attending over its first `attend_len` (static) positions;
        with `layer_index` too, the cache holds several layers ([layers, slots, S, KV, head_dim]) and this
        call uses layer `layer_index`'s.
        """
        cfg = self.cfg
        dtype = param_dtype(cfg)
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(n, name, bias):
            return nn.Dense(n, use_bias=bias, param_dtype=dtype, name=name)

        q = proj(heads * head_dim, "q_proj", cfg.qkv_bias)(x)
        k = proj(kv_heads * head_dim, "k_proj", cfg.qkv_bias)(x)
        v = proj(kv_heads * head_dim, "v_proj", cfg.qkv_bias)(x)
        if cfg.qk_norm == "full":
            q = RMSNorm(cfg.rms_norm_eps, dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dtype, name="k_norm")(k)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.reshape(batch, length, heads, head_dim)
        k = k.reshape(batch, length, kv_heads, head_dim)
        v = v.reshape(batch, length, kv_heads, head_dim)
        if cfg.qk_norm == "head":
            q = RMSNorm(cfg.rms_norm_eps, dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dtype, name="k_norm")(k)

        inv_freq, scaling = inverse_frequencies(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings)
        cos, sin = rope_cos_sin(positions, inv_freq, scaling, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        kv_cache, (k_seen, v_seen) = write_kv_cache(kv_cache, (k, v), positions, slot_ids, attend_len, layer_index)

        groups = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, groups, head_dim)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k_seen, preferred_element_type=jnp.float32)
        scores = scores * (head_dim**-0.5)
        mask = attention_mask(positions, k_seen.shape[1], self.window)[:, None, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        if cfg.attention_sinks:
            sinks = self.param("sinks", nn.initializers.zeros, (heads,), dtype)
            probs = softmax_with_sinks(scores, sinks.reshape(kv_heads, groups)).astype(x.dtype)
        else:
            probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v_seen).reshape(batch, length, heads * head_dim)
        out = proj(x.shape[-1], "o_proj", cfg.o_bias)(out)
        return out, kv_cache
