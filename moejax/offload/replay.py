"""The expert cache replayed on known routing, without a model: the engine's per-step cache code
(`device_cache`) in the engine's order, for the policy lab and for tests that hold the engine to it.

A step is what one engine step does to the cache: the host's staged prefetches when it begins, then per MoE
layer the distinct experts its tokens chose (`access`) and, with the lookahead, up to `lookahead` of the
experts the next layer's router guessed (`install`). A sequence runs as the engine's `generate` runs one
prompt (`sequence_steps`): the prompt in chunks of at most `prefill_chunk` tokens, a step each, then one step
per new token.

`Replayer` drives steps and the host-side `OffloadManager` on the engine's schedule. With the trace prefetcher,
which reads what is resident after each step, that is one jitted call per step (`replay_step`); otherwise the
steps' inputs depend on the routing alone (the activation scores) or on nothing (lru, lfu, fifo, lifo, Belady),
and up to SCAN_STEPS single-token steps go in one call (`replay_steps`, a `lax.scan`). Belady's MIN runs as the
`priority` policy with tables from the known future (`BeladyFuture`). All of it runs on the JAX backend of the
manager's device (the CPU in the lab).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.offload import device_cache as dc
from moejax.offload.manager import OffloadManager
from moejax.engine.buckets import next_power_of_two

SCAN_STEPS = 256  # most single-token steps per `replay_steps` call (and Belady's tables per block)
PIPELINE_DEPTH = 2  # decode steps in flight, as in the engine: step t is dispatched before step t - 1 is read
NEVER = 1e30  # Belady's next use of a key no later step needs


def _step(state: dc.CacheState, ids, guess_ids, staged_keys, priorities, *, policy: str, num_experts: int,
          lookahead: int, whole_from: int | None) -> dc.CacheState:
    E, L = num_experts, ids.shape[0]
    size = min(ids.shape[1] * ids.shape[2], E)
    if staged_keys is not None:
        state, _, _ = dc.install(state, staged_keys, policy=policy, num_experts=E, layer=-1, priorities=priorities,
                                 staged=True)

    def layer_step(m, state):
        distinct = dc.distinct_experts(ids[m], None, E, size)
        whole = dc.copies_whole(state, m, distinct, E, whole_from)
        state, _, _, pinned = dc.access(state, m, distinct, policy=policy, num_experts=E, priorities=priorities,
                                        whole=whole)
        if lookahead and guess_ids is not None:
            keys = dc.guessed_keys(guess_ids[m], None, m + 1, E, lookahead)
            keys = jnp.where(m + 1 < L, keys, -1)  # the last MoE layer has no next one to guess
            state, _, _ = dc.install(state, keys, policy=policy, num_experts=E, layer=m, priorities=priorities,
                                     pinned=pinned)
        return state

    return lax.fori_loop(0, L, layer_step, state)


@functools.partial(jax.jit, static_argnames=("policy", "num_experts", "lookahead", "whole_from"), donate_argnums=(0,))
def replay_step(state: dc.CacheState, ids, guess_ids, staged_keys, priorities, *, policy: str, num_experts: int,
                lookahead: int = 0, whole_from: int | None = None) -> tuple[dc.CacheState, jax.Array]:
    """One step: ids int32 [L, N, k] (each MoE layer's choices for the step's N tokens; ids outside [0, E) are
    none), guess_ids int32 [L, N, k] or None (row m: MoE layer m + 1's router applied one layer early),
    staged_keys int32 [P] or None, priorities (the `priority` policy's, fields [L, E]) or None; whole_from: the
    engine's `whole_layer_from` (a layer step missing that many copies the whole layer, `device_cache.access`).
    -> (state, resident bool [L * E] after the step), as the engine's steps return them."""
    state = _step(state, ids, guess_ids, staged_keys, priorities, policy=policy, num_experts=num_experts,
                  lookahead=lookahead, whole_from=whole_from)
    return state, state.table >= 0


@functools.partial(jax.jit, static_argnames=("policy", "num_experts", "lookahead", "whole_from"), donate_argnums=(0,))
def replay_steps(state: dc.CacheState, ids, guess_ids, priorities, *, policy: str, num_experts: int,
                 lookahead: int = 0, whole_from: int | None = None) -> dc.CacheState:
    """Steps one after the other with nothing staged: ids int32 [n, L, N, k], guess_ids [n, L, N, k] or None,
    priorities with fields [n, L, E] (each step's tables) or None. A step whose ids are all none changes
    nothing (padding). -> state."""

    def body(state, step):
        step_ids, step_guesses, step_priorities = step
        return _step(state, step_ids, step_guesses, None, step_priorities, policy=policy, num_experts=num_experts,
                     lookahead=lookahead, whole_from=whole_from), None

    return lax.scan(body, state, (ids, guess_ids, priorities))[0]


def sequence_steps(length: int, prompt_len: int, prefill_chunk: int) -> list[tuple[int, int]]:
    """A sequence's steps as token ranges [start, stop): its first `prompt_len` tokens in chunks of at most
    `prefill_chunk`, then one token per decode step."""
    prompt_len = min(prompt_len, length)
    chunks = [(start, min(start + prefill_chunk, prompt_len)) for start in range(0, prompt_len, prefill_chunk)]
    return chunks + [(t, t + 1) for t in range(prompt_len, length)]


def schedule(seq_lens, prompt_lens, prefill_chunk: int) -> np.ndarray:
    """The steps of sequences run one after the other (tokens concatenated), as bounds int64 [n + 1]: step i
    runs tokens bounds[i]:bounds[i + 1]."""
    starts = np.concatenate([[0], np.cumsum(seq_lens)])
    stops = [start + stop for s, start in enumerate(starts[:-1])
             for _, stop in sequence_steps(int(seq_lens[s]), int(prompt_lens[s]), prefill_chunk)]
    return np.asarray([0] + stops, np.int64)


def prefill_chunk_tokens(capacity: int, num_experts: int, top_k: int, requested: int = 512) -> int:
    """Tokens per prompt chunk: `requested`, or as many as the cache can hold the experts of (a layer step
    of n tokens may need n * top_k distinct experts) when it holds fewer than one layer's."""
    return max(1, requested if capacity >= num_experts else capacity // top_k)


def _padded(array: np.ndarray, axis: int, size: int, fill) -> np.ndarray:
    """`array` padded with `fill` to `size` along `axis`."""
    if array.shape[axis] == size:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, size - array.shape[axis])
    return np.pad(array, pad, constant_values=fill)


class BeladyFuture:
    """Belady's MIN as the `priority` policy's tables, from the known routing of every step the replay runs.

    experts int [L, T, k] (ids outside [0, E): none); bounds int [n + 1]: step i runs tokens bounds[i]:bounds[i + 1].
    While step s runs, the next use of key (l, e) is the first step s' whose tokens choose e at layer l:
    s' >= s in `ahead` (what the device reads for the layers after the one in progress), s' > s in `behind`,
    as (s' - s) L + l layer steps from the start of step s (exact in float32 below 2^24), NEVER without one.
    The device evicts the largest: the key needed farthest ahead. Tables are made SCAN_STEPS steps at a time.
    """

    def __init__(self, experts: np.ndarray, bounds: np.ndarray, num_experts: int):
        self.experts, self.bounds, self.num_experts = experts, np.asarray(bounds, np.int64), num_experts
        self.num_layers, self.num_steps = experts.shape[0], len(bounds) - 1
        blocks = -(-self.num_steps // SCAN_STEPS)
        self._after: list[np.ndarray] = [None] * blocks  # per block: absolute time s' L + l of the next use after it
        after = np.full((self.num_layers, num_experts), np.inf)
        for block in reversed(range(blocks)):
            self._after[block] = after
            after = np.minimum(after, self._use_times(block).min(axis=0))
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _steps(self, block: int) -> range:
        return range(block * SCAN_STEPS, min((block + 1) * SCAN_STEPS, self.num_steps))

    def _use_times(self, block: int) -> np.ndarray:
        """float64 [m, L, E]: s L + l where step s of the block uses (l, e), else inf."""
        steps, L, E = self._steps(block), self.num_layers, self.num_experts
        lo, hi = self.bounds[steps.start], self.bounds[steps.stop]
        step_of_token = np.repeat(np.arange(len(steps)), np.diff(self.bounds[steps.start : steps.stop + 1]))
        ids = self.experts[:, lo:hi].astype(np.int64)
        used = np.zeros((len(steps), L, E + 1), bool)
        used[step_of_token[None, :, None], np.arange(L)[:, None, None], np.where((ids >= 0) & (ids < E), ids, E)] = True
        times = np.arange(steps.start, steps.stop)[:, None] * L + np.arange(L)[None, :]
        return np.where(used[..., :E], times[:, :, None].astype(np.float64), np.inf)

    def _block_tables(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if block not in self._cache:
            if len(self._cache) >= 2:  # steps are asked for in order: the oldest block is done
                del self._cache[min(self._cache)]
            after = self._after[block]
            ahead = np.minimum(np.minimum.accumulate(self._use_times(block)[::-1], axis=0)[::-1], after)
            behind = np.concatenate([ahead[1:], after[None]])
            start = (np.arange(len(self._steps(block))) + block * SCAN_STEPS)[:, None, None] * self.num_layers
            relative = lambda t: np.where(np.isinf(t), NEVER, t - start).astype(np.float32)  # noqa: E731
            self._cache[block] = relative(ahead), relative(behind)
        return self._cache[block]

    def tables(self, first: int, count: int) -> dc.Priorities:
        """Steps first..first + count - 1's tables: fields float32 [count, L, E] (numpy)."""
        parts, step = [], first
        while step < first + count:
            block = step // SCAN_STEPS
            ahead, behind = self._block_tables(block)
            lo, hi = step - block * SCAN_STEPS, min(first + count - block * SCAN_STEPS, len(ahead))
            parts.append((ahead[lo:hi], behind[lo:hi]))
            step = block * SCAN_STEPS + hi
        return dc.Priorities(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))


class Replayer:
    """Replays steps of known routing with a host-side manager, on one cache of `capacity` slots.

    `sequence` runs one sequence on the schedule of the engine's `generate` for one prompt: the prompt's
    chunks are each read (their routing handed to the manager) before the next is dispatched; decode step 1
    takes the manager's inputs after the prompt, step 2 the same scores (the staged keys go once), and step
    t >= 3 is dispatched after step t - 2 is read and before step t - 1 is. `run` replays steps when the
    manager gives them nothing (`manager.learns` false).

    lookahead: experts installed per MoE layer from the next layer's guess (the engine's
    `prefetch_per_layer`; 0: none); future: Belady's tables for the steps this replayer runs, in order,
    which replace the manager's policy (the device runs `priority` with them); whole_layer_from: the engine's
    (`ProgramSpec.whole_layer_from`; None: misses always moved one by one).
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int, manager: OffloadManager, *, lookahead: int = 0,
                 prefill_chunk: int = 512, future: BeladyFuture | None = None, whole_layer_from: int | None = None):
        self.num_layers, self.num_experts, self.whole_layer_from = num_layers, num_experts, whole_layer_from
        self.manager, self.lookahead, self.prefill_chunk, self.future = manager, lookahead, prefill_chunk, future
        self.policy = "priority" if future is not None else manager.device_policy
        self.state = jax.device_put(dc.empty_state(num_layers, num_experts, capacity), manager.device)
        self.steps_done = 0

    def _dispatch(self, ids: np.ndarray, guesses: np.ndarray | None, staged_keys, priorities) -> jax.Array:
        """One step of ids [L, n, k] (guesses [L, n, k] or None); n > 1 is padded as the engine pads a prompt chunk.
        -> resident bool [L * E] after it (on the device: read when the step is observed)."""
        n = ids.shape[1]
        size = n if n == 1 else min(next_power_of_two(n, 16), max(n, self.prefill_chunk))
        guess = None if guesses is None or not self.lookahead else _padded(np.asarray(guesses, np.int32), 1, size, -1)
        if self.future is not None:
            tables = self.future.tables(self.steps_done, 1)
            priorities = jax.device_put(dc.Priorities(tables.ahead[0], tables.behind[0]), self.manager.device)
        self.state, resident = replay_step(self.state, _padded(np.asarray(ids, np.int32), 1, size, self.num_experts),
                                           guess, staged_keys, priorities, policy=self.policy,
                                           num_experts=self.num_experts, lookahead=self.lookahead,
                                           whole_from=self.whole_layer_from)
        self.steps_done += 1
        return resident

    def _observe(self, ids: np.ndarray, resident) -> None:
        """Hands the manager a step's token counts [L, E] (of ids [L, n, k]) and what was resident after it
        (None for a manager that does not read it)."""
        L, E = self.num_layers, self.num_experts
        ids = ids.reshape(L, -1)
        flat = (np.arange(L)[:, None] * (E + 1) + np.where((ids >= 0) & (ids < E), ids, E)).reshape(-1)
        counts = np.bincount(flat, minlength=L * (E + 1)).reshape(L, E + 1)[:, :E]
        self.manager.observe(counts, None if resident is None else np.asarray(resident))

    def sequence(self, experts: np.ndarray, prompt_len: int, guesses: np.ndarray | None = None, task: str | None = None,
                 predicted: np.ndarray | None = None) -> None:
        """experts int [L, T, k]: a sequence's routing (its first `prompt_len` tokens the prompt, then one token
        per decode step); guesses [L, T, k]: what each MoE layer's router guessed for the next one (row m: for
        layer m + 1; None: no lookahead); task: its label for the manager's collection; predicted: the
        predictor's probabilities [T, L, E] for the manager's predictor prefetcher.

        A manager that does not read what is resident (no trace prefetcher) gives each step inputs that the
        routing alone decides: they are all taken first, on the same schedule, and the steps then run many
        per call."""
        self.manager.start_sequence(task, predicted)
        plan = not self.manager.reads_residency
        steps = sequence_steps(experts.shape[1], prompt_len, self.prefill_chunk)
        planned = []  # with `plan`: each step's priorities
        in_flight = []  # decode steps dispatched and not yet read: (routing, resident after)
        for start, stop in steps:
            decode = start >= prompt_len
            if decode and len(in_flight) == PIPELINE_DEPTH:
                self._observe(*in_flight.pop(0))
            inputs = self.manager.next_inputs((start, stop))
            if plan:
                planned.append(inputs.priorities)
                resident = None
            else:
                resident = self._dispatch(experts[:, start:stop], None if guesses is None else guesses[:, start:stop],
                                          inputs.staged_keys, inputs.priorities)
            step = (experts[:, start:stop], resident)
            if decode:
                in_flight.append(step)
            else:
                self._observe(*step)
        for step in in_flight:
            self._observe(*step)
        self.manager.end_sequence(np.asarray(experts), task)
        if plan:
            bounds = np.asarray([0] + [stop for _, stop in steps])
            self._steps(experts, bounds, guesses, None if self.manager.scores is None else planned)

    def run(self, experts: np.ndarray, bounds: np.ndarray, guesses: np.ndarray | None = None,
            advance: Callable[[int], None] | None = None) -> None:
        """Steps bounds[i]:bounds[i + 1] of routing experts [L, T, k] (guesses as for `sequence`), in order,
        without the manager, which must give steps nothing; `advance(tokens)` is told the progress."""
        if self.manager.learns:
            raise ValueError("Replayer.run: the manager's inputs depend on the steps: replay with `sequence`")
        self._steps(experts, bounds, guesses, None, advance)

    def _steps(self, experts: np.ndarray, bounds: np.ndarray, guesses: np.ndarray | None, priorities: list | None,
               advance: Callable[[int], None] | None = None) -> None:
        """Steps bounds[i]:bounds[i + 1] with nothing staged and priorities[i] (None: none, or Belady's): runs
        of single-token steps go SCAN_STEPS per call (the last call of a run padded to a power of two with
        steps that change nothing), longer ones one call each."""
        sizes = np.diff(bounds)
        i = 0
        while i < len(sizes):
            if sizes[i] > 1:
                lo, hi = bounds[i], bounds[i + 1]
                self._dispatch(experts[:, lo:hi], None if guesses is None else guesses[:, lo:hi], None,
                               None if priorities is None else priorities[i])
                count = 1
            else:
                count = 1 + int(np.argmin(np.append(sizes[i + 1 : i + SCAN_STEPS] == 1, False)))
                self._scan(experts, guesses, int(bounds[i]), count, None if priorities is None else priorities[i : i + count])
            if advance is not None:
                advance(int(bounds[i + count] - bounds[i]))
            i += count

    def _scan(self, experts: np.ndarray, guesses: np.ndarray | None, first_token: int, count: int,
              priorities: list | None) -> None:
        """`count` single-token steps, one per token from `first_token`, with priorities [count] (or None)."""
        size = min(next_power_of_two(count, 8), SCAN_STEPS)
        tokens = slice(first_token, first_token + count)

        def as_steps(routing: np.ndarray, fill: int) -> np.ndarray:  # [L, T, k] -> the steps' [size, L, 1, k]
            return _padded(np.asarray(np.swapaxes(routing[:, tokens], 0, 1)[:, :, None, :], np.int32), 0, size, fill)

        def as_tables(ahead: np.ndarray, behind: np.ndarray) -> dc.Priorities:  # [count, L, E] -> [size, L, E]
            return jax.device_put(dc.Priorities(_padded(ahead, 0, size, 0), _padded(behind, 0, size, 0)), self.manager.device)

        ids = as_steps(experts, self.num_experts)
        guess = None if guesses is None or not self.lookahead else as_steps(guesses, -1)
        tables = None
        if self.future is not None:
            future = self.future.tables(self.steps_done, count)
            tables = as_tables(future.ahead, future.behind)
        elif priorities is not None:
            tables = as_tables(np.stack([np.asarray(p.ahead) for p in priorities]),
                               np.stack([np.asarray(p.behind) for p in priorities]))
        self.state = replay_steps(self.state, ids, guess, tables, policy=self.policy, num_experts=self.num_experts,
                                  lookahead=self.lookahead, whole_from=self.whole_layer_from)
        self.steps_done += count

    def counters(self) -> np.ndarray:
        """int [L, len(device_cache.COUNTERS)]: the cache's counters so far, per MoE layer."""
        return np.asarray(self.state.counters)
