"""Positions of the encoder-decoder families: T5 relative-position buckets and fairseq sinusoids."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def relative_bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's relative-position bucket of each relative position in [-max_distance, max_distance]
    (index rel + max_distance); beyond that range the bucket no longer changes.

    Computed on the host in float32 exactly as transformers computes it, so the integer buckets
    agree even where the logarithm lands on a bucket boundary.
    """
    rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    scaled = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)
    )
    large = np.minimum(max_exact + (scaled * np.float32(num_buckets - max_exact)).astype(np.int64), num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def sinusoidal_positions(tokens, start, pad_id: int, dim: int):
    """fairseq/M2M100 sinusoidal embeddings [B, T, dim] f32 for tokens [B, T] from position start [B].

    Non-pad tokens count positions from pad_id + 1 + start; pad tokens get the zero row (index pad_id).
    """
    not_pad = tokens != pad_id
    index = jnp.where(not_pad, pad_id + start[:, None] + jnp.cumsum(not_pad, axis=1), pad_id)
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
    angles = index.astype(jnp.float32)[..., None] * freq
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 0), (0, 1)))
    return jnp.where(not_pad[..., None], emb, 0.0)
