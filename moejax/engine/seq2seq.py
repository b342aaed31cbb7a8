"""The step engine of encoder-decoder models (Switch Transformers, NLLB-MoE): sources in, targets out.

`Seq2SeqEngine` is the decoder models' `Engine` with sources as prompts: `prefill` runs the encoder on the
source (one program, `encdec_programs.encode_source`, which keeps the slot's cross-attention keys and values
on the device) and the decoder's first step from the decoder start token; `decode`, `release`, the
pipelined steps, the expert cache, its manager and statistics are the base class's. An optional forced
first token (NLLB's target language) replaces the first sampled one, as transformers' forced_bos_token_id.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from moejax.encdec_config import EncDecConfig
from moejax.engine import encdec_programs as programs
from moejax.engine.engine import Engine, Prompt
from moejax.engine.results import GenerationConfig, GenerationResult
from moejax.engine.slots import SamplingParams
from moejax.errors import MoejaxError, ParameterError
from moejax.models.capacity import capacity_for
from moejax.engine.buckets import next_power_of_two


class Seq2SeqEngine(Engine):
    """An encoder-decoder MoE model ready to generate; built by `moejax.load`.

    Step API: `prefill(slot, source_ids, sampling, target_lang=... or forced_bos_id=...)` encodes a source in
    a free slot and returns the target's first token; `decode()` and `release(slot)` as `Engine`'s. A source
    and its target hold up to max_seq_len tokens each. `routing(b)` after `generate`: experts
    [MoE layers, source + target tokens, k], the source's tokens first (the encoder's MoE layers route them,
    the decoder's hold E there) and then the target tokens fed to the decoder (the encoder's rows hold E).
    """

    cfg: EncDecConfig
    spec: programs.Seq2SeqSpec
    step_programs = {"encode": programs.encode_source, "prefill": programs.decoder_chunk, "decode": programs.decode_step}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._source_lengths: dict[int, int] = {}  # tokens of the source in each slot

    def _new_kv_caches(self):
        return programs.new_kv_caches(self.spec, self.slots + 1, self.max_seq_len, self.device)

    def _step_static(self, slots: list[int]) -> dict:
        return {"source_len": self._attend_len(max(self._source_lengths[s] for s in slots))}

    def _forced(self, slots: list[int], positions: np.ndarray):
        if self.routing_override is not None:
            raise MoejaxError("routing_override replays decoder models' routing: encoder-decoder engines do not take it")
        return None

    # -- inputs ------------------------------------------------------------------------------------
    def forced_token(self, target_lang: str | None = None, forced_bos_id: int | None = None) -> int | None:
        """The forced first target token: a language code looked up in the tokenizer, or an id (None: none)."""
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

    def _check_length(self, ids: list[int], what: str) -> None:
        """Sources (and teacher-forced targets) fill max_seq_len positions of their own."""
        if len(ids) > self.max_seq_len:
            raise MoejaxError(f"{what} has {len(ids)} tokens; this engine holds {self.max_seq_len} (max_seq_len)")

    def _check_room(self, n: int, prompt: list[int], max_new_tokens: int) -> None:
        if max_new_tokens > self.max_seq_len:
            raise MoejaxError(f"max_new_tokens {max_new_tokens} exceeds the engine's {self.max_seq_len} target positions "
                              f"(max_seq_len)")

    # -- programs ----------------------------------------------------------------------------------
    def _encode(self, slot: int, source: list[int], want_output: bool = False):
        """Runs the encoder on `source` in slot `slot` -> (routing [L, S, k], guesses or None, resident,
        encoder output [S, D] or None)."""
        n = len(source)
        tokens = np.full(min(next_power_of_two(n, 16), self.max_seq_len), self.cfg.pad_token_id, np.int32)
        tokens[:n] = source
        inputs = self._inputs()
        args = (self.params, *self._expert_args(inputs), self.kv, jnp.int32(slot), tokens, jnp.int32(n),
                jnp.int32(capacity_for(self.cfg, n)))
        routing, guesses, resident, self.cache, self.slab, self.kv, out = \
            self._program("encode", dict(spec=self.spec, want_output=want_output), args)(*args)
        self._source_lengths[slot] = n
        return (np.asarray(routing)[:, :n], None if guesses is None else np.asarray(guesses)[:, :n], np.asarray(resident),
                None if out is None else np.asarray(out)[:n])

    def _decoder_chunk(self, slot: int, target: list[int], forced: int | None, want_logits: bool):
        """Feeds `target` to slot `slot`'s decoder from position 0 -> (new token, routing [L, T, k], guesses or
        None, resident, logits [T, V] or None)."""
        n = len(target)
        tokens = np.full(1 if n == 1 else min(next_power_of_two(n, 16), self.max_seq_len), self.cfg.pad_token_id, np.int32)
        tokens[:n] = target
        inputs = self._inputs()
        args = (self.params, *self._expert_args(inputs), self.kv, self.state, jnp.int32(slot), tokens, jnp.int32(0),
                jnp.int32(n), jnp.int32(-1 if forced is None else forced), jnp.int32(capacity_for(self.cfg, n)))
        static = dict(spec=self.spec, attend_len=self._attend_len(len(tokens)),
                      source_len=self._attend_len(self._source_lengths[slot]), want_logits=want_logits)
        token, routing, guesses, resident, self.cache, self.slab, self.kv, self.state, logits = \
            self._program("prefill", static, args)(*args)
        return (int(token), np.asarray(routing)[:, :n], None if guesses is None else np.asarray(guesses)[:, :n],
                np.asarray(resident), None if logits is None else np.asarray(logits)[:n])

    # -- the step API ------------------------------------------------------------------------------
    def prefill(self, slot: int, source_ids: Sequence[int], sampling: SamplingParams | None = None, *,
                target_lang: str | None = None, forced_bos_id: int | None = None, task: str | None = None,
                max_new_tokens: int | None = None) -> int:
        """Encodes a source in free slot `slot` and returns the target's first token (None sampling: greedy):
        the forced one (target_lang: a language code of the tokenizer, or forced_bos_id) if given, else the
        decoder's choice after its start token. task, max_new_tokens: as for `Engine.prefill`."""
        forced = self.forced_token(target_lang, forced_bos_id)
        source = self._checked(source_ids, "source")
        sequence = self._begin(slot, sampling, 1, task, max_new_tokens)
        routing, guesses, resident, _ = self._encode(slot, source)
        self._observe(routing, resident)
        token, first, first_guesses, resident, _ = self._decoder_chunk(slot, [self.cfg.decoder_start_token_id], forced,
                                                                       want_logits=False)
        self._observe(first, resident)
        sequence.routing += [routing, first]
        sequence.guesses += [g for g in (guesses, first_guesses) if g is not None]
        self._sequences[slot] = sequence
        return token

    def generate(self, sources: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                 target_lang: str | None = None, forced_bos_id: int | None = None,
                 tasks: Sequence[str | None] | None = None, **overrides) -> GenerationResult:
        """Generates a target for each source (text or token ids) of any lengths, as many at a time as there
        are slots; each target's tokens are those of its source alone.

        target_lang (a language code of the tokenizer) or forced_bos_id forces the first target token. Other
        keywords as for `Engine.generate` (`tasks`, GenerationConfig fields, sampling keywords).
        """
        return super().generate(sources, config, tasks=tasks, target_lang=target_lang, forced_bos_id=forced_bos_id,
                                **overrides)

    def _generation(self, prompts, config=None, *, target_lang: str | None = None, forced_bos_id: int | None = None,
                    **kwargs):
        forced = self.forced_token(target_lang, forced_bos_id)  # refused before any slot is taken
        return super()._generation(prompts, config, prefill_options={"forced_bos_id": forced}, **kwargs)

    # -- forward -----------------------------------------------------------------------------------
    def _free_slot(self, what: str) -> int:
        free = sorted(set(range(self.slots)) - set(self._sequences))
        if not free:
            raise MoejaxError(f"{what} needs a free slot")
        return free[0]

    def encoder_outputs(self, sources: Prompt | Sequence[Prompt]) -> list[np.ndarray]:
        """The encoder's output [len_i, D] per source (after its final norm), each source encoded alone."""
        ids = self.encode(sources)
        slot = self._free_slot("encoder_outputs")
        return [self._encode(slot, source, want_output=True)[3] for source in ids]

    def logits(self, sources: Prompt | Sequence[Prompt], decoder_inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced logits [len_i, V] f32 of decoder_inputs[i] (starting with the decoder start token,
        which the caller includes) given sources[i], each pair alone in a free slot."""
        ids = self.encode(sources)
        targets = [self._checked(target, f"decoder input {n}") for n, target in enumerate(decoder_inputs)]
        if len(targets) != len(ids):
            raise MoejaxError(f"{len(ids)} sources but {len(targets)} decoder inputs")
        slot = self._free_slot("logits")
        out = []
        for source, target in zip(ids, targets, strict=True):
            self._encode(slot, source)
            out.append(self._decoder_chunk(slot, target, None, want_logits=True)[4])
        return out
