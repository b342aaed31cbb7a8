"""Next-token selection on the device: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.engine.slots import SamplingParams


def filter_logits(logits, top_k: int, top_p: float):
    """Sets logits outside the top-k and outside the top-p nucleus to -inf. logits [B, V] f32."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token if the mass before it is below top_p (so the top token is always kept).
        keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@functools.partial(jax.jit, static_argnames=("params",))
def sample(logits, key, step, row_ids, params: SamplingParams):
    """logits [B, V] f32 -> tokens [B] int32.

    Each row draws from its own key (seed, row id, step), so a prompt's sample does not depend
    on which other prompts share its batch.
    """
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(row_ids)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
