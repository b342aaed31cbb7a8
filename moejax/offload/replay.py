"""The expert cache replayed on known routing, without a model: the engine's per-step cache code
(`device_cache`) in the engine's order, for the policy lab and for tests that hold the engine to it.

A step is what one engine step does to the cache: the host's staged prefetches when it begins, then per MoE
layer the distinct experts its tokens chose (`access`) and, with the lookahead, up to `lookahead` of the
experts the next layer's router guessed (`install`). `replay_step` runs one step on the JAX backend (the
CPU in the lab); `Replayer` drives steps with the host-side `OffloadManager` on the engine's schedule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.offload import device_cache as dc
from moejax.offload.manager import OffloadManager


@functools.partial(jax.jit, static_argnames=("policy", "num_experts", "lookahead"), donate_argnums=(0,))
def replay_step(state: dc.CacheState, ids, guess_ids, staged_keys, priorities, *, policy: str, num_experts: int,
                lookahead: int = 0):
    """One step: ids int32 [L, N, k] (each MoE layer's choices for the step's N tokens; ids outside [0, E) are
    none), guess_ids int32 [L, N, k] or None (row m: MoE layer m + 1's router applied one layer early),
    staged_keys int32 [P] or None, priorities (the `priority` policy's) or None. -> state."""
    E, L = num_experts, ids.shape[0]
    size = min(ids.shape[1] * ids.shape[2], E)
    if staged_keys is not None:
        state, _, _ = dc.install(state, staged_keys, policy=policy, num_experts=E, layer=-1, priorities=priorities,
                                 staged=True)
    for m in range(L):
        distinct = dc.distinct_experts(ids[m], None, E, size)
        state, _, _, pinned = dc.access(state, m, distinct, policy=policy, num_experts=E, priorities=priorities)
        if lookahead and guess_ids is not None and m + 1 < L:
            keys = dc.guessed_keys(guess_ids[m], None, m + 1, E, lookahead)
            state, _, _ = dc.install(state, keys, policy=policy, num_experts=E, layer=m, priorities=priorities,
                                     pinned=pinned)
    return state


class Replayer:
    """Replays sequences with a host-side manager, on the schedule of the engine's `generate` for one prompt:
    the prompt's chunks (at most `prefill_chunk` tokens each) are each read before the next is dispatched;
    decode step 1 takes the manager's inputs after the prompt, step 2 the same scores (the staged keys go
    once), and step t >= 3 is dispatched after step t - 2 is read and before step t - 1 is."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int, manager: OffloadManager, lookahead: int = 0,
                 prefill_chunk: int = 512):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.manager, self.lookahead, self.prefill_chunk = manager, lookahead, prefill_chunk
        self.state = dc.empty_state(num_layers, num_experts, capacity)

    def _step(self, ids: np.ndarray, guesses: np.ndarray | None) -> np.ndarray:
        inputs = self.manager.next_inputs()
        guess = None if guesses is None else jnp.asarray(guesses, jnp.int32)
        self.state = replay_step(self.state, jnp.asarray(ids, jnp.int32), guess, inputs.staged_keys, inputs.priorities,
                                 policy=self.manager.device_policy, num_experts=self.num_experts, lookahead=self.lookahead)
        return np.asarray(self.state.table >= 0)

    def _observe(self, ids: np.ndarray, resident: np.ndarray) -> None:
        E = self.num_experts
        counts = np.stack([np.bincount(row[(row >= 0) & (row < E)], minlength=E)[:E] for row in ids.reshape(len(ids), -1)])
        self.manager.observe(counts, resident)

    def sequence(self, experts: np.ndarray, prompt_len: int, guesses: np.ndarray | None = None, task: str | None = None) -> None:
        """experts int [L, T, k]: a sequence's routing, its first `prompt_len` tokens the prompt, then one token
        per decode step; guesses [L, T, k]: the lookahead's (None: no lookahead)."""
        self.manager.start_sequence(task)
        cut = lambda a, start, stop: None if a is None else a[:, start:stop]  # noqa: E731
        for start in range(0, prompt_len, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, prompt_len)
            self._observe(experts[:, start:stop], self._step(experts[:, start:stop], cut(guesses, start, stop)))
        decoded = []  # (routing, resident after) of decode steps not yet observed
        for t, position in enumerate(range(prompt_len, experts.shape[1]), start=1):
            if t >= 3:
                self._observe(*decoded.pop(0))
            resident = self._step(experts[:, position : position + 1], cut(guesses, position, position + 1))
            decoded.append((experts[:, position : position + 1], resident))
        for step in decoded:
            self._observe(*step)
        self.manager.end_sequence(np.asarray(experts), task)

    def counters(self) -> np.ndarray:
        return np.asarray(self.state.counters)
