"""Per-slot generation state on the device, and next-token sampling with each row's own parameters.

The engine holds `slots` sequences at once; each has a row of `SlotState` (plus one scratch row at the
end that padding rows of a step read and write). A step program reads a slot's last token and length
from here and writes the new ones, so consecutive steps chain on the device without the host.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import numpy as np
import jax
import jax.numpy as jnp

from moejax.errors import ParameterError, is_integer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a sequence picks its tokens: greedy (argmax; the rest is ignored) or sampled at `temperature`
    among the `top_k` likeliest tokens (0: all) within the `top_p` probability mass (1.0: all), from the
    random stream of `seed`."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ParameterError("{temperature} must be a finite number > 0 (got {value}); for argmax decoding use "
                                 "{greedy} instead of 0", value=self.temperature)
        if not is_integer(self.top_k) or self.top_k < 0:
            raise ParameterError("{top_k} must be an integer >= 0 (got {value})", value=self.top_k)
        if not 0 < self.top_p <= 1:
            raise ParameterError("{top_p} must be in (0, 1] (got {value})", value=self.top_p)


@flax.struct.dataclass
class SlotState:
    """One row per slot, plus a scratch row last."""

    last_token: jax.Array  # int32: the token the next decode step feeds
    length: jax.Array  # int32: tokens in the slot's KV cache (the next token's position)
    temperature: jax.Array  # float32: 0 for greedy
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    sampled: jax.Array  # int32: tokens sampled so far (the next one's index in its random stream)


def new_slot_state(slots: int, device) -> SlotState:
    n = slots + 1
    zeros = lambda dtype: jnp.zeros(n, dtype, device=device)  # noqa: E731
    return SlotState(zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.float32), zeros(jnp.int32),
                     jnp.ones(n, jnp.float32, device=device), zeros(jnp.uint32), zeros(jnp.int32))


def sampling_row(params: SamplingParams) -> tuple:
    """(temperature, top_k, top_p, seed) as the slot state stores them (temperature 0: greedy)."""
    # numpy scalars: a Python int seed over 2**31 would overflow a jitted function's default int32; a top_k
    # past int32 keeps every token, as any top_k of at least the vocabulary does
    return (np.float32(0.0 if params.greedy else params.temperature), np.int32(min(params.top_k, 2**31 - 1)),
            np.float32(params.top_p), np.uint32(params.seed % 2**32))


def _filtered(logits, top_k, top_p):
    """logits [R, V] f32 with each row's tokens outside its top-k and its top-p nucleus set to -inf."""
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    in_top_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    descending = jnp.where(in_top_k, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the likelier tokens
    kept = in_top_k & (before < top_p[:, None])  # the likeliest token is always kept
    threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_rows(logits, temperature, top_k, top_p, seed, index):
    """Next tokens int32 [R] from logits [R, V] f32, each row with its own parameters; a sampled row
    draws from the key (seed, index): its tokens do not depend on the other rows."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed, index)
        draws = jax.vmap(jax.random.categorical)(keys, _filtered(scaled, top_k, top_p)).astype(jnp.int32)
        return jnp.where(temperature > 0, draws, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
