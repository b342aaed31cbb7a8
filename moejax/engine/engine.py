"""The step-level engine: sequences in KV slots, `prefill` / `decode` / `release`, and `generate` as a loop.

The engine owns the device state (weights, the expert cache and slab, the KV caches of `slots` sequences
allocated once, the per-slot `SlotState`) and threads it through the step programs
(`engine.decoder_programs`), donating it to each. A decode step's input tokens and positions live on
the device, so the host dispatches the next step before it reads the last one's tokens: `decode` keeps
one step in flight ahead of the tokens it returns, and reads each step's tokens and routing after the
fact, for the caller, the statistics, the routing record and the host-side expert manager.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.engine import decoder_programs as programs
from moejax.engine.compilation import compile_seconds, run_clock
from moejax.engine.layer_stream import LayerStream, build as build_layer_stream
from moejax.engine.results import GenerationConfig, GenerationResult, Timing, generation_config, record_token
from moejax.engine.slots import SamplingParams, SlotState, new_slot_state, sampling_row
from moejax.errors import MoejaxError, ParameterError, is_integer, plural
from moejax.models.decoder import kv_cache_shapes
from moejax.offload import device_cache as dc
from moejax.offload.host_cache import TieredHost
from moejax.offload.manager import OffloadManager, StepInputs
from moejax.offload.stats import cache_stats
from moejax.engine.buckets import next_power_of_two, prefill_chunk_size

log = logging.getLogger(__name__)
PIPELINE_DEPTH = 2  # decode steps dispatched ahead of the tokens returned (the one being read + one more)
Prompt = str | Sequence[int]


@dataclasses.dataclass
class _Sequence:
    """Host bookkeeping of one occupied slot."""

    epoch: int  # tells a slot's sequences apart: a step's token for an older one is dropped
    length: int  # tokens in the KV cache once every dispatched step has run
    limit: int | None  # most decode tokens to dispatch (None: until the slot's KV cache is full)
    task: str | None
    dispatched: int = 0
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    routing: list = dataclasses.field(default_factory=list)  # [L, n, k] per step, n real tokens
    guesses: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Prefill:
    """A prompt being prefilled a chunk at a time: its ids, how many are done, tokens drawn before (a resumed
    sequence's)."""

    sequence: _Sequence
    ids: list[int]
    sampled: int
    done: int = 0


@dataclasses.dataclass
class _Step:
    rows: list[tuple[int, int]]  # (slot, epoch) per row; padding rows absent
    tokens: jax.Array
    routing: jax.Array
    guesses: jax.Array | None
    resident: jax.Array


class Engine:
    """A decoder-only MoE model ready to generate; built by `moejax.load`.

    Step API: `prefill(slot, token_ids, sampling)` puts a prompt in a free slot and returns its first new
    token; `decode()` returns the next token of every occupied slot; `release(slot)` frees it. A slot's
    tokens do not depend on what the other slots hold. `generate` and `stream` are loops over them.
    `begin_prefill` + `prefill_step` run `prefill` a chunk at a time (a serving loop decodes in between).
    """

    # The step programs by kind (a subclass for another model kind names its own, and may add kinds).
    step_programs = {"decode": programs.decode_step, "prefill": programs.prefill_chunk}

    def __init__(self, cfg: ModelConfig, params, manager: OffloadManager | None, spec: programs.ProgramSpec,
                 *, cache: dc.CacheState, slab: dict, host: tuple, slots: int, max_seq_len: int, device,
                 tokenizer=None, path: Path | None = None, prefill_chunk: int = 512, expert_bytes: int = 0,
                 stats_info: dict | None = None):
        self.cfg, self.params, self.spec, self.manager = cfg, params, spec, manager
        self.cache, self.slab, self.host = cache, slab, host
        self.slots, self.max_seq_len, self.device = slots, max_seq_len, device
        self.tokenizer, self.path = tokenizer, path
        self.expert_bytes, self.stats_info = expert_bytes, stats_info or {}
        self.prefill_chunk = prefill_chunk
        self.kv = self._new_kv_caches()
        self.state: SlotState = new_slot_state(slots, device)
        self._sequences: dict[int, _Sequence] = {}  # slots in the decode steps
        self._prefills: dict[int, _Prefill] = {}  # slots whose prompt is being prefilled
        self._epochs = [0] * slots
        self._inflight: collections.deque[_Step] = collections.deque()
        self._finished: list[tuple[np.ndarray, np.ndarray | None]] = []  # routing of released sequences, in order
        self._unobserved: list[tuple[np.ndarray, np.ndarray]] = []  # steps read, not yet observed (`decode`)
        self._compiled: dict = {}
        self.host_wait_s = 0.0
        # decode steps whose tokens have been read, and the sequences the last one decoded (a serving loop times
        # a turn that read one step: `serving.loop`)
        self.steps_read, self.last_step_rows = 0, 0
        # Benchmarks replay known routing through the engine: override(slots [rows] (-1: padding), positions
        # int [rows, T]) -> the experts int32 [MoE layers, rows * T, k] each MoE layer uses instead of its router's,
        # or a pair (those, the lookahead's guesses of the same shape: `decoder_programs.forward`'s forced_ids).
        self.routing_override: Callable[[list[int], np.ndarray], np.ndarray | tuple] | None = None
        # wide steps as layer programs, the host staging whole layers (`engine.layer_stream`); None: one program each
        self.layer_stream: LayerStream | None = None
        self.layer_stream_option = "off"  # `moejax.load`'s layer_stream (`use_layer_stream`)
        # missed experts computed on the host (`offload.cpu_experts`), kept after the steps stop sending them any,
        # and why they stopped (`_check_host_experts`)
        self.host_experts, self.host_experts_losing = spec.cpu_experts, None

    # -- inputs ------------------------------------------------------------------------------------
    def encode(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        """Validated token ids, one list per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not prompts:
            raise MoejaxError("no prompts given")
        out = []
        for n, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise MoejaxError("this checkpoint has no tokenizer.json: pass token ids")
                ids = self.tokenizer.encode(prompt)
            else:
                ids = prompt
            out.append(self._checked(ids, f"prompt {n}"))
        return out

    def _checked(self, ids: Sequence[int], what: str) -> list[int]:
        """`ids` as a list of ints, checked: integers (1.5 or True is no token id), within the vocabulary, and
        room for a new token."""
        try:
            ids = list(ids)
        except TypeError:
            raise MoejaxError(f"{what} must be a list of token ids, got {ids!r}") from None
        wrong = [t for t in ids if not is_integer(t)]
        if wrong:
            raise MoejaxError(f"{what}: token id {wrong[0]!r} is not an integer")
        ids = [int(t) for t in ids]
        if not ids:
            raise MoejaxError(f"{what} is empty")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise MoejaxError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        self._check_length(ids, what)
        return ids

    def _check_length(self, ids: list[int], what: str) -> None:
        if len(ids) >= self.max_seq_len:
            raise MoejaxError(f"{what} has {len(ids)} tokens; this engine holds {self.max_seq_len} per sequence "
                              f"(max_seq_len), one of them for a new token")

    # -- programs ----------------------------------------------------------------------------------
    def _program(self, kind: str, static: dict, args: tuple):
        """The compiled program for (kind, static arguments), compiled on first use (ahead of time: a call of
        a compiled program checks less than a jitted function's)."""
        # Optional inputs and the rows or tokens of a step change the program.
        key = (kind, tuple(sorted(static.items())), tuple(a is None for a in args),
               tuple(np.shape(a) for a in args if isinstance(a, np.ndarray)))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self.step_programs[kind].lower(*args, **static).compile()
        return compiled

    def _new_kv_caches(self):
        """The KV caches of every slot and the scratch slot, allocated once (donated to each step)."""
        return _new_kv(self.cfg, self.slots + 1, self.max_seq_len, self.device)

    def _step_static(self, slots: list[int]) -> dict:
        """Static arguments of a decode step over `slots` besides its spec and attention length (none here)."""
        return {}

    def _expert_args(self, inputs):
        return (self.cache, self.slab, self.host, inputs.staged_keys, inputs.priorities)

    def _inputs(self, tokens: tuple[int, int] | None = None, owners: list | None = None):
        return self.manager.next_inputs(tokens, owners) if self.manager is not None else _NO_INPUTS

    def _forced(self, slots: list[int], positions: np.ndarray):
        """The routing_override's experts for a step (on the device; with its guesses if it gives a pair), or None."""
        if self.routing_override is None:
            return None
        forced = self.routing_override(slots, positions)
        if isinstance(forced, tuple):  # (experts, the lookahead's guesses)
            return jax.device_put(tuple(np.asarray(f, np.int32) for f in forced), self.device)
        return jax.device_put(np.asarray(forced, np.int32), self.device)

    def _attend_len(self, longest: int) -> int:
        return min(next_power_of_two(longest, 64), self.max_seq_len)

    # -- the step API ------------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: Sequence[int], sampling: SamplingParams | None = None, *,
                task: str | None = None, max_new_tokens: int | None = None) -> int:
        """Puts a prompt in free slot `slot` and returns its first new token (None sampling: greedy).

        task: a label for the trace collection; max_new_tokens: stop dispatching decode steps for this slot
        after that many tokens (the first included), so no step is spent past it.
        """
        self.begin_prefill(slot, token_ids, sampling, task=task, max_new_tokens=max_new_tokens)
        token = None
        try:
            while token is None:
                token = self.prefill_step(slot)
        except BaseException:
            self._prefills.pop(slot, None)  # the slot stays free, as before the call
            raise
        return token

    def begin_prefill(self, slot: int, token_ids: Sequence[int], sampling: SamplingParams | None = None, *,
                      task: str | None = None, max_new_tokens: int | None = None, sampled: int = 0) -> None:
        """Claims free slot `slot` for a prompt that `prefill_step(slot)` then computes a chunk at a time (a
        serving loop interleaves the chunks with decode steps of the other slots); arguments as for `prefill`.
        sampled: tokens this sequence already drew (it resumes: token_ids are its prompt and those tokens),
        so its next token draws the random number it would have drawn without the interruption.
        Until its last chunk has run, the slot takes no part in decode steps."""
        ids = self._checked(token_ids, "prompt")
        if sampled < 0:
            raise ParameterError("{sampled} must be >= 0 (got {value})", value=sampled)
        sequence = self._begin(slot, sampling, len(ids), task, max_new_tokens)
        if self.manager is not None:
            self.manager.expect_prompt((slot, sequence.epoch), ids)
        if hasattr(self.routing_override, "prompt"):  # an override that follows sequences (predicted routing)
            self.routing_override.prompt(ids, slot)
        self._prefills[slot] = _Prefill(sequence, ids, sampled)

    def prefill_step(self, slot: int) -> int | None:
        """Runs the next chunk of the prompt begun in slot `slot`: -> its first new token after the last chunk
        (the slot then joins the decode steps), else None."""
        prefill = self._prefills.get(slot)
        if prefill is None:
            raise MoejaxError(f"slot {slot} has no prompt being prefilled: begin_prefill first")
        self._observe_read()
        ids, start = prefill.ids, prefill.done
        end = min(start + self.prefill_chunk, len(ids))
        final = end == len(ids)
        if final and prefill.sampled:  # the chunk program draws at the slot's index and sets it to 1
            self.state = _set_sampled(self.state, jnp.int32(slot), jnp.int32(prefill.sampled))
        inputs = self._inputs((start, end), [(slot, prefill.sequence.epoch)])
        token, ids_used, guesses, resident, _ = self._run_chunk(slot, ids[start:end], start, final, False, inputs)
        prefill.done = end
        sequence = prefill.sequence
        sequence.routing.append(np.asarray(ids_used)[:, : end - start])
        if guesses is not None:
            sequence.guesses.append(np.asarray(guesses)[:, : end - start])
        self._observe(sequence.routing[-1], np.asarray(resident))
        if not final:
            return None
        if prefill.sampled:
            self.state = _set_sampled(self.state, jnp.int32(slot), jnp.int32(prefill.sampled + 1))
        del self._prefills[slot]
        self._sequences[slot] = sequence
        self._follow(slot, sequence.epoch, int(token))
        return int(token)

    def _run_chunk(self, slot: int, chunk: list[int], start: int, final: bool, want_logits: bool, inputs):
        """Runs prompt tokens `chunk` (at most prefill_chunk) at positions start.. of slot `slot` through the
        prefill program (padded to its size bucket), updating the device state -> (token, experts, guesses,
        resident, logits): the program's outputs, padded."""
        size = prefill_chunk_size(len(chunk), self.prefill_chunk)
        tokens = np.zeros(size, np.int32)
        tokens[: len(chunk)] = chunk
        forced = self._forced([slot], start + np.arange(size)[None])
        args = (self.params, *self._expert_args(inputs), self.kv, self.state, jnp.int32(slot), tokens,
                jnp.int32(start), jnp.int32(len(chunk)), jnp.bool_(final), forced)
        static = dict(spec=self.spec, attend_len=self._attend_len(start + size), want_logits=want_logits)
        if self.layer_stream is not None and self.layer_stream.applies(size):
            step = self.layer_stream.prefill(*args, **static)
        else:
            step = self._program("prefill", static, args)(*args)
        token, experts, guesses, resident, self.cache, self.slab, self.kv, self.state, logits = step
        return token, experts, guesses, resident, logits

    @property
    def prefilling(self) -> list[int]:
        """Slots whose prompt `prefill_step` has not finished."""
        return sorted(self._prefills)

    def _begin(self, slot: int, sampling: SamplingParams | None, length: int, task: str | None,
               max_new_tokens: int | None) -> _Sequence:
        """Claims free slot `slot` for a new sequence whose KV cache will hold `length` tokens after its prefill:
        resets its state row with these sampling parameters -> the host bookkeeping (registered by the caller)."""
        if not 0 <= slot < self.slots:
            raise MoejaxError(f"slot {slot} is not one of this engine's slots 0..{self.slots - 1}")
        if slot in self._sequences or slot in self._prefills:
            raise MoejaxError(f"slot {slot} is busy: release it first")
        self.state = _begin_slot(self.state, jnp.int32(slot), *sampling_row(sampling or SamplingParams()))
        self._epochs[slot] += 1
        if self.manager is not None and not self._sequences and not self._prefills:
            self.manager.start_sequence(task)
        return _Sequence(self._epochs[slot], length, None if max_new_tokens is None else max_new_tokens - 1, task)

    def decode(self) -> dict[int, int]:
        """The next token of every occupied slot: {slot: token} (empty when no slot is occupied).

        Up to PIPELINE_DEPTH steps are in flight: the GPU computes the next step while the caller uses these
        tokens. A step run as layer programs (`layer_stream`) is dispatched by the host layer by layer, so its
        dispatch returns only as its last layers run: it is dispatched only once no other step is in flight (each
        token is returned as soon as its step ends, not behind the dispatches of the next ones), and instead of
        it the first layers it will stage are copied while the caller uses the tokens (`LayerStream.prestage`).
        Such a step's predecessor is then read before it is dispatched, not after; its routing reaches the host-side
        manager only once the next step's inputs are made (`_observe_read`), as when it is read after, so the
        prefetchers and policies decide as with one program a step."""
        wanting = lambda: [s for s, q in self._sequences.items() if not q.queue and self._can_dispatch(q)]  # noqa: E731
        while wanting() or any(not q.queue and self._in_flight(s) for s, q in self._sequences.items()):
            while len(self._inflight) < PIPELINE_DEPTH and self._dispatchable() and \
                    not (self._inflight and self._next_step_streams()):
                self._dispatch()
            if not self._inflight:
                break
            self._read(self._inflight.popleft(), observe=not self._next_step_streams())
        if self._next_step_streams():
            if not self._inflight:
                self.layer_stream.prestage()
        else:
            while len(self._inflight) < PIPELINE_DEPTH and self._dispatchable():
                self._dispatch()  # the GPU computes the next step while the caller uses these tokens
        return {s: q.queue.popleft() for s, q in self._sequences.items() if q.queue}

    def _next_step_streams(self) -> bool:
        """Whether the next decode step (of the slots that can take one) runs as layer programs."""
        if self.layer_stream is None or not self._dispatchable():
            return False
        return self.layer_stream.applies(next_power_of_two(sum(map(self._can_dispatch, self._sequences.values()))))

    def release(self, slot: int, keep_routing: bool = True, learn: bool = True) -> None:
        """Frees slot `slot` (its prompt may be mid-prefill); its sequence's routing joins the trace collection
        (unless not `learn`) and, with keep_routing, the record `routing(b)` reads after `generate` (a serving
        loop, which never reads it, passes False so that it does not grow)."""
        self._observe_read()
        prefill = self._prefills.pop(slot, None)
        sequence = prefill.sequence if prefill is not None else self._sequences.pop(slot, None)
        if sequence is None:
            raise MoejaxError(f"slot {slot} holds no sequence")
        experts = _concat(sequence.routing, self.cfg.top_k)
        if keep_routing:
            guesses = _concat(sequence.guesses, self.cfg.top_k) if sequence.guesses else None
            self._finished.append((experts, guesses))
        if self.manager is not None:
            self.manager.forget((slot, sequence.epoch))
            if learn:
                self.manager.end_sequence(experts, sequence.task)

    def warm_up(self, prompt_tokens: int = 16, *, longest: int | None = None) -> None:
        """Compiles the programs a server meets first by running them on dummy prompts: the prefill of a
        prompt of up to `prompt_tokens` tokens and a decode step of every power-of-two row count up to
        `slots`. With `longest`, every program of sequences up to that many tokens instead (`warm_up_lengths`:
        each prompt chunk size at each attention length, each decode row count at each attention length);
        otherwise longer prompts and sequences compile their own on first use. Greedy: a sampled request's
        programs compile on its first use. Every slot must be free; the dummy sequences leave nothing behind:
        not in the trace collection, not in the statistics."""
        if self._sequences or self._prefills:
            raise MoejaxError(f"warm_up needs every slot free, but slots {sorted({*self._sequences, *self._prefills})} "
                              "hold sequences")
        def release_all():
            for slot in self.occupied:
                self.release(slot, keep_routing=False, learn=False)

        try:
            for length in [prompt_tokens] if longest is None else self.warm_up_lengths(longest):
                prompt = [0] * max(1, min(length, self.max_seq_len - self.slots - 2))
                for slot in range(self.slots):  # a decode step over 1, 2, ..., slots rows
                    self.prefill(slot, prompt)
                    self.decode()
                release_all()
        finally:
            release_all()
            self.finish_pending()
            self.reset_stats()

    def warm_up_lengths(self, longest: int) -> list[int]:
        """Prompt lengths whose `warm_up` runs compile the programs of every sequence of up to `longest` tokens:
        per attention length (`_attend_len` buckets), a prompt short enough that a decode step of each row
        count 1..slots stays in that bucket, and per (chunk size, attention length) of a prompt's chunks, a
        prompt that has it. Lengths past what a warm-up prompt may be (max_seq_len - slots - 2) are left out."""
        most = self.max_seq_len - self.slots - 2
        longest = min(longest, self.max_seq_len)
        programs = {}  # program -> the first prompt length that compiles it
        for length in range(1, min(longest, most) + 1):
            for start in range(0, length, self.prefill_chunk):
                size = prefill_chunk_size(min(self.prefill_chunk, length - start), self.prefill_chunk)
                programs.setdefault(("prefill", size, self._attend_len(start + size)), length)
        for bucket in {self._attend_len(n) for n in range(2, longest + 1)}:  # the decode steps' attention lengths
            fits = (n for n in range(1, most + 1) if self._attend_len(n + 1) == self._attend_len(n + self.slots) == bucket)
            first = next(fits, None)
            if first is not None:
                programs.setdefault(("decode", bucket), first)
        return sorted(set(programs.values()))

    @property
    def occupied(self) -> list[int]:
        return sorted(self._sequences)

    def _can_dispatch(self, sequence: _Sequence) -> bool:
        under_limit = sequence.limit is None or sequence.dispatched < sequence.limit
        return under_limit and sequence.length < self.max_seq_len

    def _in_flight(self, slot: int) -> bool:
        return any(s == slot for step in self._inflight for s, _ in step.rows)

    def _dispatchable(self) -> bool:
        return any(self._can_dispatch(q) for q in self._sequences.values())

    def _dispatch(self) -> None:
        ready = [s for s, q in self._sequences.items() if self._can_dispatch(q)]
        ready.sort(key=lambda s: (len(self._sequences[s].queue), s))
        chosen = sorted(ready)
        rows = next_power_of_two(len(chosen))
        slot_ids = np.full(rows, self.slots, np.int32)  # padding rows use the scratch slot
        slot_ids[: len(chosen)] = chosen
        active = np.arange(rows) < len(chosen)
        longest = max(self._sequences[s].length for s in chosen) + 1
        inputs = self._inputs(owners=[(s, self._sequences[s].epoch) for s in chosen])
        self._observe_read()
        forced = self._forced([int(s) if a else -1 for s, a in zip(slot_ids, active)],
                              np.array([[self._sequences[s].length] if a else [0] for s, a in zip(slot_ids, active)]))
        args = (self.params, *self._expert_args(inputs), self.kv, self.state, slot_ids, active, forced)
        static = dict(spec=self.spec, attend_len=self._attend_len(longest), **self._step_static(chosen))
        if self.layer_stream is not None and self.layer_stream.applies(rows):
            step = self.layer_stream.decode(*args, spec=self.spec, attend_len=static["attend_len"])
        else:
            step = self._program("decode", static, args)(*args)
        tokens, routing, guesses, resident, self.cache, self.slab, self.kv, self.state = step
        for array in (tokens, routing, guesses, resident):
            if array is not None:
                array.copy_to_host_async()
        rows_info = []
        for s in chosen:
            sequence = self._sequences[s]
            sequence.length += 1
            sequence.dispatched += 1
            rows_info.append((s, sequence.epoch))
        self._inflight.append(_Step(rows_info, tokens, routing, guesses, resident))

    def _read(self, step: _Step, observe: bool = True) -> None:
        """A dispatched step's tokens and routing to its sequences; its routing observed now, or with
        `_observe_read` (observe False)."""
        start = time.perf_counter()
        tokens = np.asarray(step.tokens)
        self.host_wait_s += time.perf_counter() - start
        self.steps_read, self.last_step_rows = self.steps_read + 1, len(step.rows)
        routing = np.asarray(step.routing)
        guesses = None if step.guesses is None else np.asarray(step.guesses)
        for row, (slot, epoch) in enumerate(step.rows):
            sequence = self._sequences.get(slot)
            if sequence is None or sequence.epoch != epoch:
                continue  # released since the step was dispatched
            sequence.queue.append(int(tokens[row]))
            self._follow(slot, epoch, int(tokens[row]))
            sequence.routing.append(routing[:, row : row + 1])
            if guesses is not None:
                sequence.guesses.append(guesses[:, row : row + 1])
        self._unobserved.append((routing[:, : len(step.rows)], np.asarray(step.resident)))
        if observe:
            self._observe_read()

    def _observe_read(self) -> None:
        """Observes the steps read and not yet observed (`_read`), in order."""
        while self._unobserved:
            self._observe(*self._unobserved.pop(0))

    def _follow(self, slot: int, epoch: int, token: int) -> None:
        """A sequence's new token, for the predictors that follow it (run-ahead, predicted routing)."""
        if self.manager is not None:
            self.manager.extend((slot, epoch), token)
        if hasattr(self.routing_override, "extend"):
            self.routing_override.extend(slot, token)

    def _observe(self, routing: np.ndarray, resident: np.ndarray) -> None:
        """Hands a finished step's routing [L, n, k] (real tokens) to the host-side manager (and the disk tier's
        host cache, after raising a failed expert read of the step)."""
        tier = self.host if isinstance(self.host, TieredHost) else None
        if tier is not None:
            tier.raise_failure()
        self._check_host_experts()
        if self.layer_stream is not None:
            self.layer_stream.observe(resident)
        if self.manager is None:
            return
        E = self.cfg.num_experts
        flat = routing.reshape(routing.shape[0], -1)
        counts = np.stack([np.bincount(row[(row >= 0) & (row < E)], minlength=E)[:E] for row in flat])
        self.manager.observe(counts, resident)
        if tier is not None:
            tier.cache.observe(counts, self.manager.staged_next)

    def _check_host_experts(self) -> None:
        """`cpu_experts='auto'`: once the host's experts cost the steps more than their copies would have
        (`HostExperts.losing`: the device waited for the host longer than the link would have taken), every miss is
        copied from the next step on (programs without host experts, compiled then; the layer programs too, where
        the engine was loaded with them), and a warning says why. On the CPU backend, where host and device share
        the cores and nothing overlaps, only the warning. Not through the disk tier: there the host's waits include
        disk reads that a copy would pay too."""
        host = self.spec.cpu_experts
        if host is None or self.host_experts_losing is not None or isinstance(self.host, TieredHost):
            return
        reason = host.losing()
        if reason is None:
            return
        self.host_experts_losing = reason
        if not host.overlap:
            log.warning(f"cpu_experts: {reason}; compare with --cpu-experts off")
            return
        log.warning(f"cpu_experts: {reason}: every missed expert is copied from here on")
        self.spec = dataclasses.replace(self.spec, cpu_experts=None)
        self.use_layer_stream(self.layer_stream_option)

    def use_layer_stream(self, option: str) -> None:
        """`moejax.load`'s layer_stream: with 'auto', wide steps run as layer programs from now on where the spec
        and the device allow (`layer_stream.build`; kept if already running)."""
        self.layer_stream_option = option
        if self.layer_stream is None and option == "auto":
            self.layer_stream = build_layer_stream(self.spec, self.host, self.device)

    def finish_pending(self) -> None:
        """Waits for the steps in flight and drops their tokens (the slots they were for are gone)."""
        while self._inflight:
            self._read(self._inflight.popleft())

    # -- loops over the step API -------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                 tasks: Sequence[str | None] | None = None, **overrides) -> GenerationResult:
        """Generates for prompts (text or token ids) of any lengths, as many at a time as there are slots.

        tasks: an optional label per prompt (for the trace prefetcher and the recorded activation matrices).
        `overrides` are GenerationConfig fields or sampling keywords, e.g.
        `generate("Hi", max_new_tokens=8, temperature=0.8, top_p=0.9)`. Afterwards `routing(b)` gives
        prompt b's routing, token by token.
        """
        generation = self._generation(prompts, config, tasks=tasks, **overrides)
        while True:
            try:
                next(generation)
            except StopIteration as done:
                return done.value

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **kwargs) -> Iterator[str]:
        """Generates for one prompt and yields its text as it grows: a piece per new token (held back while
        it ends inside a multi-byte character). Keyword arguments: as for `generate`.

            for piece in engine.stream("Once upon a time", max_new_tokens=32, temperature=0.8):
                print(piece, end="", flush=True)
        """
        if self.tokenizer is None:
            raise MoejaxError("stream() yields text but this checkpoint has no tokenizer.json: use generate()")
        count = len(self.encode(prompt))
        if count != 1:
            raise MoejaxError(f"stream() takes one prompt, not {count}: generate() takes a batch")
        shown = text = ""
        for generated in self._generation(prompt, config, **kwargs):
            text = self.tokenizer.decode(generated[0])
            if text != shown and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        if text != shown:
            yield text[len(shown):]

    def _generation(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                    tasks: Sequence[str | None] | None = None, prefill_options: dict | None = None,
                    **overrides) -> Generator[list[list[int]], None, GenerationResult]:
        """`generate` a step at a time: yields every prompt's new tokens after each step and returns the
        GenerationResult. Its times are the steps', compilation apart: what the caller does in between is
        not counted. However it is left (an error, a stream abandoned), its slots are released.
        prefill_options: more keywords for every `prefill` (a subclass's)."""
        config = generation_config(config, overrides)
        compile_start = compile_seconds()
        ids = self.encode(prompts)
        for n, prompt in enumerate(ids):
            self._check_room(n, prompt, config.max_new_tokens)
        tasks = list(tasks) if tasks is not None else [None] * len(ids)
        if len(tasks) != len(ids):
            raise ParameterError("{tasks} gives {labels} for {prompts}", labels=plural(len(tasks), "label"),
                                 prompts=plural(len(ids), "prompt"))
        stops = self.stop_ids(config)
        if self._sequences or self._prefills:
            busy = sorted([*self._sequences, *self._prefills])
            raise MoejaxError(f"generate needs every slot free, but slots {busy} hold sequences: release them")
        self.reset_stats()
        self._finished.clear()
        generated: list[list[int]] = [[] for _ in ids]
        reasons = ["length"] * len(ids)
        owner: dict[int, int] = {}  # slot -> prompt
        waiting = collections.deque(range(len(ids)))
        finished_order: list[int] = []
        step_times: list[float] = []
        clock = lambda: run_clock() - start  # noqa: E731

        def accept(slot: int, token: int) -> None:
            b = owner[slot]
            reason = record_token(generated[b], token, stops, config.max_new_tokens)
            if reason is not None:
                reasons[b] = reason
                self.release(slot)
                finished_order.append(b)
                del owner[slot]

        def admit() -> None:
            while waiting and len(owner) < self.slots:
                b = waiting.popleft()
                slot = min(set(range(self.slots)) - set(owner))
                sampling = dataclasses.replace(config.sampling, seed=(config.seed * 65537 + b) % 2**32)
                token = self.prefill(slot, ids[b], sampling, task=tasks[b], max_new_tokens=config.max_new_tokens,
                                     **(prefill_options or {}))
                owner[slot] = b
                accept(slot, token)

        start = run_clock()
        try:
            admit()
            ttft = clock()
            prefill_stats = self.stats()["total"]
            yield generated
            while owner or waiting:
                step_start = run_clock()
                produced = self.decode()
                step_times.append(run_clock() - step_start)
                for slot, token in produced.items():
                    if slot in owner:
                        accept(slot, token)
                admit()
                yield generated
            total = clock()
        finally:
            for slot in list(owner):
                self.release(slot)
                finished_order.append(owner.pop(slot))
            self.finish_pending()
        by_prompt = {b: self._finished[n] for n, b in enumerate(finished_order)}
        self._last_routing = [by_prompt[b] for b in range(len(ids))]
        n_tokens = sum(len(t) for t in generated)
        timing = Timing(ttft_s=ttft, tpot_s=float(np.median(step_times)) if step_times else 0.0,
                        tokens_per_s=n_tokens / total if total > 0 else 0.0, total_s=total, decode_steps=len(step_times),
                        compile_s=compile_seconds() - compile_start)
        text = [self.tokenizer.decode(t) for t in generated] if self.tokenizer else None
        stats = self.stats()
        stats["prefill"] = prefill_stats  # totals after the prompts first admitted; decode = total - prefill
        return GenerationResult(generated, text, reasons, timing, stats)

    def _check_room(self, n: int, prompt: list[int], max_new_tokens: int) -> None:
        """Refuses prompt n when its sequence would not fit a slot."""
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise MoejaxError(f"prompt {n}: {len(prompt)} tokens + {max_new_tokens} new tokens exceed the "
                              f"engine's {self.max_seq_len} positions per sequence (max_seq_len)")

    def logits(self, prompts: Prompt | Sequence[Prompt]) -> list[np.ndarray]:
        """Full-sequence logits [len_i, V] float32 per prompt (each prefilled alone in a free slot)."""
        ids = self.encode(prompts)
        free = sorted(set(range(self.slots)) - set(self._sequences) - set(self._prefills))
        if not free:
            raise MoejaxError("logits needs a free slot")
        slot, out = free[0], []
        for prompt in ids:
            self.state = _begin_slot(self.state, jnp.int32(slot), *sampling_row(SamplingParams()))
            rows = []
            for start in range(0, len(prompt), self.prefill_chunk):
                chunk = prompt[start : start + self.prefill_chunk]
                logits = self._run_chunk(slot, chunk, start, True, True, self._inputs())[-1]
                rows.append(np.asarray(logits)[: len(chunk)])
                if isinstance(self.host, TieredHost):
                    self.host.raise_failure()
            out.append(np.concatenate(rows))
        return out

    def routing(self, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt b of the last `generate`: its experts int16 [MoE layers, T, k] (prompt and new tokens, in
        order) and, when the engine computes them (the lookahead prefetcher, or `record_guesses`), what the
        router of each MoE layer picked one layer early (-1 for the first MoE layer), else None."""
        routing = getattr(self, "_last_routing", None)
        if routing is None or not 0 <= b < len(routing):
            raise MoejaxError(f"no routing recorded for prompt {b}: run generate first")
        experts, guesses = routing[b]
        if guesses is None:
            return experts, None
        lookahead = np.full_like(experts, -1)
        lookahead[1:] = guesses[:-1]  # row m of the guesses is made at layer m, for layer m + 1
        return experts, lookahead

    def use_predictor(self, predictor, predict_every: int = 1) -> None:
        """Runs `predictor` (`moejax.predictors`, trained on this model's traces) on a host thread ahead of
        the steps: the experts it predicts for a step's tokens are fetched when the step begins (offload
        'cached' with prefetch 'predictor'). Lossless: outputs do not change. `close()` stops the thread.
        predict_every: a per-request (emoe) predictor runs for one prompt in this many (`RunAhead`)."""
        from moejax.predictors.run_ahead import RunAhead

        if self.manager is None or self.manager.prefetch != "predictor":
            raise ParameterError("a predictor prefetches with {offload} cached and {prefetch} predictor")
        predictor.check_model(len(self.cfg.moe_layer_ids), self.cfg.num_experts)
        run_ahead = RunAhead(predictor, predict_every)
        self.manager.close()
        self.manager.run_ahead = run_ahead

    def close(self) -> None:
        """Stops the engine's helper threads (the run-ahead predictor); the engine stays usable without them."""
        if self.manager is not None:
            self.manager.close()
            self.manager.run_ahead = None
        if isinstance(self.host, TieredHost):
            self.host.cache.close()

    def record_guesses(self) -> None:
        """Makes the steps also compute each MoE layer's guess of the next one's routing (for `routing`),
        prefetching or not."""
        self.spec = dataclasses.replace(self.spec, guesses=True)

    @property
    def collection(self):
        """The EAM collection the trace prefetcher and the activation policy read (None without them)."""
        return self.manager.collection if self.manager is not None else None

    def stop_ids(self, config: GenerationConfig) -> set[int]:
        stops = set(config.stop_token_ids)
        bad = [t for t in stops if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ParameterError("{stop_token_ids}: token id {token} is outside the vocabulary [0, {vocab})",
                                 token=min(bad), vocab=self.cfg.vocab_size)
        if not config.ignore_eos:
            stops |= set(self.cfg.eos_token_ids)
        return stops

    # -- statistics --------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._observe_read()
        self.cache = dc.reset_counters(self.cache)
        self.host_wait_s = 0.0
        if isinstance(self.host, TieredHost):
            self.host.cache.reset_stats()
        if self.host_experts is not None:
            self.host_experts.reset()
        if self.layer_stream is not None:
            self.layer_stream.reset()

    def stats(self) -> dict:
        """Counters since the last reset: see `offload.stats.cache_stats`."""
        self._observe_read()
        stats = cache_stats(self.spec, np.asarray(self.cache.counters), self.expert_bytes, self.cache.num_slots,
                            self.manager, self.host_wait_s, self.stats_info)
        if isinstance(self.host, TieredHost):
            stats["host_tier"] = self.host.cache.stats()
        if self.host_experts is not None:  # missed experts computed on the host (until `_check_host_experts` stops it)
            stats["cpu_experts"] = {**self.host_experts.stats(), "losing": self.host_experts_losing,
                                    "stopped": self.spec.cpu_experts is None}
        if self.layer_stream is not None:  # wide steps run as layer programs
            stats["layer_stream"] = self.layer_stream.stats()
        return stats


_NO_INPUTS = StepInputs()


@functools.partial(jax.jit, donate_argnums=(0,))
def _begin_slot(state: SlotState, slot, temperature, top_k, top_p, seed) -> SlotState:
    """A slot's row reset for a new sequence with these sampling parameters."""
    return state.replace(length=state.length.at[slot].set(0), sampled=state.sampled.at[slot].set(0),
                         temperature=state.temperature.at[slot].set(temperature), top_k=state.top_k.at[slot].set(top_k),
                         top_p=state.top_p.at[slot].set(top_p), seed=state.seed.at[slot].set(jnp.uint32(seed)))


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_sampled(state: SlotState, slot, count) -> SlotState:
    """A slot's count of tokens drawn (the index of its next random number) set to `count`."""
    return state.replace(sampled=state.sampled.at[slot].set(count))


def _new_kv(cfg: ModelConfig, rows: int, length: int, device):
    """Per layer segment (k, v) [its layers, rows, length, KV heads, head_dim] (latent attention: its
    `models.decoder.kv_cache_shapes` pair with a leading layers axis), each its own buffer (they are donated)."""
    def zeros(count, shape):
        return jnp.zeros((count, *shape), cfg.dtype, device=device)

    shapes = kv_cache_shapes(cfg, rows, length)
    return [tuple(zeros(segment.count, shape) for shape in shapes) for segment in programs.layer_segments(cfg)]


def _concat(parts: list[np.ndarray], top_k: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0, top_k), np.int16)
    return np.concatenate(parts, axis=1).astype(np.int16)
