"""Sequence-to-sequence generation: sources in, targets (tokens, text, timing, stats) out.

The decoder starts from the config's decoder start token; an optional forced first token (NLLB's
target language) replaces the first sampled one, as transformers' `forced_bos_token_id` does.
Sources of different lengths share a right-padded batch; the decoder self-attention has a KV cache
and each decoder layer's cross-attention K/V is computed once per batch.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import jax
import numpy as np

from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError, ParameterError
from moejax.models.capacity import capacity_for
from moejax.models.encdec import RouteInputs
from moejax.runtime.buckets import batch_bucket, cache_bucket, prompt_bucket
from moejax.engine.compilation import compile_seconds, run_clock
from moejax.runtime.encdec_executors import EncDecExecutor, EncoderState
from moejax.runtime.engine import (
    Engine,
    GenerationConfig,
    GenerationResult,
    Prompt,
    _finished,
    _prefill_inputs,
    generation_config,
    record_tokens,
)
from moejax.runtime.sampling import sample


class Seq2SeqEngine(Engine):
    """A loaded encoder-decoder model ready to generate; built by `moejax.load`.

    `encode` (validation of sources, text or ids) and `stop_ids` are the decoder engine's.
    """

    cfg: EncDecConfig
    executor: EncDecExecutor

    @property
    def collection(self):
        """The EAM collection the trace prefetcher and the activation policy read (None without them)."""
        runner = self.executor.runner
        return runner.collection if runner is not None else None

    # -- inputs -------------------------------------------------------------------------
    def forced_token(self, target_lang: str | None = None, forced_bos_id: int | None = None) -> int | None:
        """The forced first target token: a language code looked up in the tokenizer, or an id."""
        if target_lang is not None and forced_bos_id is not None:
            raise ParameterError("give {target_lang} or {forced_bos_id}, not both")
        if target_lang is not None:
            if self.tokenizer is None:
                raise ParameterError("{target_lang} needs the checkpoint's tokenizer.json: give {forced_bos_id} instead")
            token = self.tokenizer.token_id(target_lang)
            if token is None:
                raise ParameterError("{target_lang} {value!r} is not a token of {path}", value=target_lang,
                                     path=self.tokenizer.path)
            return token
        if forced_bos_id is not None and not 0 <= forced_bos_id < self.cfg.vocab_size:
            raise ParameterError("{forced_bos_id} {value} is outside the vocabulary [0, {vocab})", value=forced_bos_id,
                                 vocab=self.cfg.vocab_size)
        return forced_bos_id

    def _route(self, valid, counted, group_tokens: int) -> RouteInputs:
        """Routing inputs: `valid` tokens get experts; in capacity routing every token transformers
        routes does (`counted`: padding and finished rows too, which compete for capacity in later
        layers and steps)."""
        capacity = self.cfg.routing == "capacity"
        return RouteInputs(counted if capacity else valid, counted, np.int32(capacity_for(self.cfg, group_tokens)))

    def _encode_batch(self, sources: list[list[int]]) -> tuple[EncoderState, int]:
        """Encodes right-padded sources; -> (encoder state, padded batch size)."""
        cfg, n = self.cfg, len(sources)
        longest = max(len(s) for s in sources)
        batch = batch_bucket(n)
        tokens, _, valid = _prefill_inputs(sources, batch, prompt_bucket(longest), self._pad_id)
        # Capacity groups count what transformers sees: n rows padded to the longest source, and the
        # padding itself only where the router does not ignore it.
        counted = np.zeros_like(valid)
        counted[:n, :longest] = True
        if not cfg.route_padding_tokens:
            counted &= valid
        group_tokens = n * longest if cfg.capacity_group == "batch" else longest
        return self.executor.encode(tokens, valid, self._route(valid, counted, group_tokens)), batch

    # -- forward ------------------------------------------------------------------------
    def encoder_outputs(self, sources: Prompt | Sequence[Prompt]) -> list[np.ndarray]:
        """The encoder's output [len_i, D] per source (after its final norm), all in one padded batch."""
        ids = self.encode(sources)
        state, _ = self._encode_batch(ids)
        out = np.asarray(state.enc_out)
        return [out[b, : len(s)] for b, s in enumerate(ids)]

    def logits(self, sources: Prompt | Sequence[Prompt], decoder_inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced logits [len_i, V] f32 of decoder_inputs[i] (starting with the decoder start
        token, which the caller includes) given sources[i]; one padded batch."""
        ids = self.encode(sources)
        targets = self.encode([list(t) for t in decoder_inputs])
        if len(targets) != len(ids):
            raise MoejaxError(f"{len(ids)} sources but {len(targets)} decoder inputs")
        state, batch = self._encode_batch(ids)
        longest = max(len(t) for t in targets)
        length = prompt_bucket(longest)
        tokens, positions, valid = _prefill_inputs(targets, batch, length, self._pad_id)
        counted = np.zeros_like(valid)
        counted[: len(ids), :longest] = True
        group = len(ids) * longest if self.cfg.capacity_group == "batch" else longest
        kv = self.executor.new_kv_caches(batch, length)
        logits, _ = self.executor.decode(tokens, kv, state, positions, self._route(valid, counted, group), None)
        logits = np.asarray(logits)
        return [logits[b, : len(t)] for b, t in enumerate(targets)]

    def generate(self, sources: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                 target_lang: str | None = None, forced_bos_id: int | None = None, **kwargs) -> GenerationResult:
        """Generates a target for each source (text or token ids) of any lengths.

        target_lang (a language code of the tokenizer) or forced_bos_id forces the first target token.
        Other keywords as for Engine.generate (`tasks`, GenerationConfig fields, sampling keywords).
        """
        return _finished(self._generation(sources, config, target_lang=target_lang, forced_bos_id=forced_bos_id, **kwargs))

    def _generation(
        self,
        sources: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        target_lang: str | None = None,
        forced_bos_id: int | None = None,
        tasks: Sequence[str | None] | None = None,
        **overrides,
    ) -> Generator[list[list[int]], None, GenerationResult]:
        """`generate` a step at a time, as Engine._generation."""
        config = generation_config(config, overrides)
        compile_start = compile_seconds()
        forced = self.forced_token(target_lang, forced_bos_id)
        ids = self.encode(sources)
        n = len(ids)
        stops = self.stop_ids(config)
        key = jax.random.PRNGKey(config.seed)

        with self._sequences(batch_bucket(n), n, tasks):
            start = run_clock()
            state, batch = self._encode_batch(ids)
            kv = self.executor.new_kv_caches(batch, cache_bucket(config.max_new_tokens))
            rows = np.arange(batch, dtype=np.int32)
            real = rows < n
            finished = ~real
            inputs = np.full(batch, self.cfg.decoder_start_token_id, np.int32)
            generated: list[list[int]] = [[] for _ in range(n)]
            reasons = ["length"] * n
            step_times = []
            for step in range(config.max_new_tokens):
                step_start = run_clock()
                route = self._route(~finished[:, None], real[:, None], n if self.cfg.capacity_group == "batch" else 1)
                positions = np.full((batch, 1), step, np.int32)
                logits, kv = self.executor.decode(inputs[:, None], kv, state, positions, route, np.zeros(batch, np.int32))
                if step == 0 and forced is not None:
                    next_tokens = np.full(batch, forced, np.int32)
                else:
                    next_tokens = np.asarray(sample(logits, key, step, rows, config.sampling))
                if step == 0:
                    ttft = run_clock() - start
                else:
                    step_times.append(run_clock() - step_start)
                # Sequences already finished are fed the pad token, as transformers does.
                inputs = np.where(finished, self._pad_id, next_tokens).astype(np.int32)
                record_tokens(next_tokens, finished, generated, reasons, stops)
                yield generated
                if finished.all():
                    break
        return self._result(generated, reasons, ttft, step_times, compile_seconds() - compile_start)
