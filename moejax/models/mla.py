"""Multi-head latent attention (DeepSeek-V2/V3) with a KV cache of compressed latents.

Per token the cache holds the normed KV latent c [kv_lora_rank] and the rotated key part k_rope
[qk_rope_head_dim] that all heads share: (kv_lora_rank + qk_rope_head_dim) elements per layer, against
num_heads * (qk_head_dim + v_head_dim) for full keys and values. Each call expands the latents it attends
over into per-head keys and values through kv_b_proj (`expanded`), or, for calls of one query token per row
(decode), folds kv_b_proj into the query and the output instead (`absorbed`): per head h the scores
q_nope_h . (c Wk_h) are (Wk_h q_nope_h) . c and the output sum_s p_s (c_s Wv_h) is (sum_s p_s c_s) Wv_h, so
attention runs over the latents themselves and nothing of size S x heads is made. The two differ by float
rounding only (tests/test_deepseek.py holds them together).

For head h: k_h = [c @ Wk_h, k_rope], v_h = c @ Wv_h, q_h = [q_nope_h, rope(q_rope_h)], scores scaled by
qk_head_dim^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2 when the rope is scaled.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.models.layers import RMSNorm, attention_mask, param_dtype, write_kv_cache
from moejax.models.rope import apply_rope_interleaved, inverse_frequencies

# DeepSeek's latent norms use their own epsilon, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under a scaled rope that sets mscale_all_dim."""
    scale = cfg.head_dim**-0.5
    mscale_all_dim = cfg.rope.param("mscale_all_dim", 0.0) if cfg.rope.scaling_type != "default" else 0.0
    factor = cfg.rope.param("factor", 1.0) if mscale_all_dim else 1.0
    if factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def latent_cache_shapes(cfg: ModelConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's cache pair: (latent [B, S, kv_lora_rank], rotated key [B, S, qk_rope_head_dim])."""
    return (batch, length, cfg.kv_lora_rank), (batch, length, cfg.qk_rope_head_dim)


class LatentAttention(nn.Module):
    """MLA with the call signature of `layers.Attention`; the cache pair is (latent, rotated key).

    absorb: fold kv_b_proj into the query and output (True), expand the latents (False), or absorb exactly when
    each row has one query token (None).
    """

    cfg: ModelConfig
    window: int | None
    absorb: bool | None = None

    @nn.compact
    def __call__(self, x, kv_cache, positions, slot_ids=None, attend_len: int | None = None, layer_index=None):
        """x [B, T, D]; kv_cache (latent [B, S, R], k_rope [B, S, P]); positions [B, T] int32.

        slot_ids, attend_len and layer_index address the cache as in `layers.Attention` (latent [slots, S, R]
        or [layers, slots, S, R]). -> (out [B, T, D], kv_cache).
        """
        cfg = self.cfg
        dtype = param_dtype(cfg)
        batch, length, _ = x.shape
        heads, nope, rope_dim, v_dim = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        def proj(n, name):
            return nn.Dense(n, use_bias=False, param_dtype=dtype, name=name)

        if cfg.q_lora_rank:
            q_latent = RMSNorm(LATENT_NORM_EPS, dtype, name="q_a_norm")(proj(cfg.q_lora_rank, "q_a_proj")(x))
            q = proj(heads * cfg.head_dim, "q_b_proj")(q_latent)
        else:
            q = proj(heads * cfg.head_dim, "q_proj")(x)
        q = q.reshape(batch, length, heads, cfg.head_dim)
        compressed = proj(cfg.kv_lora_rank + rope_dim, "kv_a_proj")(x)
        latent = RMSNorm(LATENT_NORM_EPS, dtype, name="kv_a_norm")(compressed[..., : cfg.kv_lora_rank])

        inv_freq, scaling = inverse_frequencies(cfg.rope, rope_dim, cfg.max_position_embeddings)
        q_rope = apply_rope_interleaved(q[..., nope:], positions, inv_freq, scaling)
        k_rope = apply_rope_interleaved(compressed[..., None, cfg.kv_lora_rank:], positions, inv_freq, scaling)[:, :, 0]

        kv_cache, (latent_seen, rope_seen) = write_kv_cache(kv_cache, (latent, k_rope), positions, slot_ids, attend_len,
                                                             layer_index)

        kv_b = Kernel((cfg.kv_lora_rank, heads * (nope + v_dim)), dtype, name="kv_b_proj")().reshape(
            cfg.kv_lora_rank, heads, nope + v_dim)
        w_k, w_v = kv_b[..., :nope], kv_b[..., nope:]
        absorb = length == 1 if self.absorb is None else self.absorb
        if absorb:
            q_latent = jnp.einsum("bthd,rhd->bthr", q[..., :nope], w_k)
            scores = jnp.einsum("bthr,bsr->bhts", q_latent, latent_seen, preferred_element_type=jnp.float32)
        else:
            k_nope = jnp.einsum("bsr,rhd->bshd", latent_seen, w_k)
            scores = jnp.einsum("bthd,bshd->bhts", q[..., :nope], k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthd,bsd->bhts", q_rope, rope_seen, preferred_element_type=jnp.float32)
        scores = scores * softmax_scale(cfg)
        mask = attention_mask(positions, latent_seen.shape[1], self.window)[:, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        if absorb:
            out = jnp.einsum("bthr,rhd->bthd", jnp.einsum("bhts,bsr->bthr", probs, latent_seen), w_v)
        else:
            out = jnp.einsum("bhts,bshd->bthd", probs, jnp.einsum("bsr,rhd->bshd", latent_seen, w_v))
        out = out.reshape(batch, length, heads * v_dim)
        return proj(x.shape[-1], "o_proj")(out), kv_cache


class Kernel(nn.Module):
    """A bare [in, out] weight stored as a Dense layer's ('kernel'), for use in pieces."""

    shape: tuple[int, int]
    dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.lecun_normal(), self.shape, self.dtype)
