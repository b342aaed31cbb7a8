"""The generation loop: prompts in, tokens, text, timing and runtime statistics out."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moejax.config import ModelConfig
from moejax.errors import MoejaxError, ParameterError
from moejax.runtime.buckets import batch_bucket, cache_bucket, prompt_bucket
from moejax.engine.compilation import compile_seconds, run_clock
from moejax.runtime.executors import Executor
from moejax.engine.results import GenerationConfig, GenerationResult, Timing, generation_config
from moejax.runtime.sampling import sample
from moejax.tokenizer import Tokenizer


Prompt = str | Sequence[int]


class Engine:
    """A loaded model ready to generate; built by `moejax.load`."""

    def __init__(self, cfg: ModelConfig, executor: Executor, tokenizer: Tokenizer | None = None, path: Path | None = None):
        self.cfg, self.executor, self.tokenizer, self.path = cfg, executor, tokenizer, path

    # -- inputs -------------------------------------------------------------------------
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
                    raise MoejaxError("this checkpoint has no tokenizer.json: give the prompts as token ids")
                ids = self.tokenizer.encode(prompt)
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise MoejaxError(f"prompt {n} is empty")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise MoejaxError(f"prompt {n}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            out.append(ids)
        return out

    def _check_length(self, longest: int, max_new_tokens: int) -> None:
        limit = self.cfg.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise MoejaxError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"{limit} positions (max_position_embeddings)"
            )

    # -- forward ------------------------------------------------------------------------
    def logits(self, prompts: Prompt | Sequence[Prompt]) -> list[np.ndarray]:
        """Full-sequence logits [len_i, V] float32 per prompt, all prompts in one padded batch."""
        ids = self.encode(prompts)
        lengths = np.array([len(p) for p in ids])
        self._check_length(int(lengths.max()), 0)
        batch, length = batch_bucket(len(ids)), prompt_bucket(int(lengths.max()))
        tokens, positions, valid = _prefill_inputs(ids, batch, length, self._pad_id)
        # The cache size generation would use, so logits and prefill share compiled layers.
        kv = self.executor.new_kv_caches(batch, cache_bucket(length))
        self.executor.start_sequences(batch, len(ids))
        logits, _ = self.executor.step(tokens, kv, positions, valid, None)
        logits = np.asarray(logits)
        self.executor.end_sequences()
        return [logits[b, : lengths[b]] for b in range(len(ids))]

    @property
    def _pad_id(self) -> int:
        return self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

    def stop_ids(self, config: GenerationConfig) -> set[int]:
        stops = set(config.stop_token_ids)
        bad = [t for t in stops if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ParameterError("{stop_token_ids}: token id {token} is outside the vocabulary [0, {vocab})",
                                 token=min(bad), vocab=self.cfg.vocab_size)
        if not config.ignore_eos:
            stops |= set(self.cfg.eos_token_ids)
        return stops

    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                 tasks: Sequence[str | None] | None = None, **overrides) -> GenerationResult:
        """Generates for a batch of prompts (text or token ids) of any lengths.

        tasks: an optional label per prompt (for the trace prefetcher and the recorded activation
        matrices). `overrides` are GenerationConfig fields or sampling keywords, e.g.
        `generate("Hi", max_new_tokens=8, temperature=0.8, top_p=0.9)`.
        Afterwards `executor.routing(b)` gives prompt b's routing, token by token.
        """
        return _finished(self._generation(prompts, config, tasks=tasks, **overrides))

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **kwargs) -> Iterator[str]:
        """Generates for one prompt and yields its text as it grows: a piece per new token (held back
        while it ends inside a multi-byte character). Keyword arguments: as for `generate`.

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
                    tasks: Sequence[str | None] | None = None,
                    **overrides) -> Generator[list[list[int]], None, GenerationResult]:
        """`generate` a step at a time: yields the new tokens of every prompt after each step, and
        returns the GenerationResult. Its times are the steps': what the caller does in between is not counted."""
        config = generation_config(config, overrides)
        compile_start = compile_seconds()
        ids = self.encode(prompts)
        n = len(ids)
        lengths = np.array([len(p) for p in ids] + [1] * (batch_bucket(n) - n), np.int32)
        self._check_length(int(lengths.max()), config.max_new_tokens)
        batch = batch_bucket(n)
        tokens, positions, valid = _prefill_inputs(ids, batch, prompt_bucket(int(lengths.max())), self._pad_id)
        kv = self.executor.new_kv_caches(batch, cache_bucket(int(lengths.max()) + config.max_new_tokens))
        stops = self.stop_ids(config)
        key = jax.random.PRNGKey(config.seed)
        row_ids = np.arange(batch, dtype=np.int32)
        finished = np.arange(batch) >= n
        generated: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n

        with self._sequences(batch, n, tasks):
            start = run_clock()
            logits, kv = self.executor.step(tokens, kv, positions, valid, lengths - 1)
            prefill_stats = self.executor.stats().get("total")
            step_times = []
            for step in range(config.max_new_tokens):
                if step > 0:
                    step_start = run_clock()
                    logits, kv = self.executor.step(
                        next_tokens[:, None], kv, (lengths + step - 1)[:, None], ~finished[:, None], np.zeros(batch, np.int32)
                    )
                next_tokens = np.asarray(sample(logits, key, step, row_ids, config.sampling))
                if step == 0:
                    ttft = run_clock() - start
                else:
                    step_times.append(run_clock() - step_start)
                record_tokens(next_tokens, finished, generated, reasons, stops)
                yield generated
                if finished.all():
                    break
        return self._result(generated, reasons, ttft, step_times, compile_seconds() - compile_start, prefill_stats)

    @contextlib.contextmanager
    def _sequences(self, batch: int, sequences: int, tasks: Sequence[str | None] | None) -> Iterator[None]:
        """The executor's generation of `sequences` prompts in `batch` rows, with fresh counters; it ends
        however the block is left (an error, a stream abandoned)."""
        self.executor.reset_stats()
        self.executor.start_sequences(batch, sequences, tasks)
        try:
            yield
        finally:
            self.executor.end_sequences()

    def _result(self, generated: list[list[int]], reasons: list[str], ttft: float, step_times: list[float],
                compile_s: float, prefill_stats: dict | None = None) -> GenerationResult:
        """The GenerationResult of a finished loop (times in seconds, compilation apart; prefill_stats:
        counters after the prompt)."""
        total = ttft + sum(step_times)
        text = [self.tokenizer.decode(t) for t in generated] if self.tokenizer else None
        n_tokens = sum(len(t) for t in generated)
        timing = Timing(
            ttft_s=ttft,
            tpot_s=float(np.median(step_times)) if step_times else 0.0,
            tokens_per_s=n_tokens / total if total > 0 else 0.0,
            total_s=total,
            decode_steps=len(step_times),
            compile_s=compile_s,
        )
        stats = self.executor.stats()
        if prefill_stats is not None:
            stats["prefill"] = prefill_stats  # totals after the prompt; decode = total - prefill
        return GenerationResult(generated, text, reasons, timing, stats)


def _finished(generation: Generator[Any, None, GenerationResult]) -> GenerationResult:
    """Runs a `_generation` to its end; -> its result."""
    while True:
        try:
            next(generation)
        except StopIteration as done:
            return done.value


def record_tokens(next_tokens, finished, generated: list[list[int]], reasons: list[str], stops: set[int]) -> None:
    """Appends each unfinished sequence's new token and marks the sequences it stops (in place)."""
    for b in np.flatnonzero(~finished):
        token = int(next_tokens[b])
        generated[b].append(token)
        if token in stops:
            finished[b], reasons[b] = True, "stop"


def _prefill_inputs(ids: list[list[int]], batch: int, length: int, pad_id: int):
    """Right-padded tokens, positions and validity [batch, length]; rows beyond len(ids) are dummies."""
    tokens = np.full((batch, length), pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for b, prompt in enumerate(ids):
        tokens[b, : len(prompt)] = prompt
        valid[b, : len(prompt)] = True
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return tokens, positions, valid
