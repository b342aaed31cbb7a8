"""Rotary position embeddings: inverse frequencies per scaling type, and their application."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from moejax.config import RopeConfig
from moejax.errors import MoejaxError

SUPPORTED_SCALING = ("default", "linear", "llama3", "yarn")


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [head_dim // 2] float32, attention scaling applied to cos and sin)."""
    inv_freq = _default_inv_freq(rope.theta, head_dim)
    kind = rope.scaling_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(rope.param("factor"))).astype(np.float32), 1.0
    if kind == "llama3":
        factor = rope.param("factor")
        low_freq_factor = rope.param("low_freq_factor")
        high_freq_factor = rope.param("high_freq_factor")
        old_context = rope.param("original_max_position_embeddings")
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    raise MoejaxError(f"rope scaling type '{kind}' is not supported (supported: {', '.join(SUPPORTED_SCALING)})")


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    original = rope.param("original_max_position_embeddings", float(max_position_embeddings))
    factor = rope.param("factor", max_position_embeddings / original)

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.param("attention_factor", -1.0)
    if attention_factor < 0:
        mscale, mscale_all_dim = rope.param("mscale", 0.0), rope.param("mscale_all_dim", 0.0)
        if mscale and mscale_all_dim:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = rope.param("beta_fast", 32.0) or 32.0
    beta_slow = rope.param("beta_slow", 1.0) or 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.param("truncate", 1.0):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = _default_inv_freq(rope.theta, dim)
    interpolation = extrapolation / np.float32(factor)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions, inv_freq, attention_scaling: float, dtype):
    """cos, sin of shape [*positions.shape, head_dim], computed in float32 and cast to `dtype`."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * attention_scaling).astype(dtype), (jnp.sin(emb) * attention_scaling).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, heads, head_dim]; cos, sin [B, T, rotary_dim] (rotary_dim <= head_dim): the first rotary_dim dims
    of each head are rotated (rotate-half convention within them), the others pass through (partial rotary)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def apply_rope_interleaved(x, positions, inv_freq, attention_scaling: float):
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]) (DeepSeek's convention), in float32.

    x [B, T, heads, dim]; positions [B, T] int32; inv_freq [dim // 2] -> same shape and dtype as x.
    """
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    cos = (jnp.cos(angles) * attention_scaling)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_scaling)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
