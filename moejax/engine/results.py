"""What generation takes and gives: `GenerationConfig`, `Timing`, `GenerationResult`."""

from __future__ import annotations

import dataclasses
from typing import Any

from moejax.engine.slots import SamplingParams
from moejax.errors import MoejaxError

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "seed")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to generate. `stop_token_ids` stop in addition to the model's EOS tokens (unless ignore_eos);
    prompt b samples from seed (seed, b)."""

    max_new_tokens: int = 32
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MoejaxError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")

    @classmethod
    def with_overrides(cls, config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
        """`config` (default: the defaults) with fields replaced by `overrides`: GenerationConfig fields or
        SamplingParams fields (temperature, top_k, top_p, greedy; a temperature alone means sampling)."""
        config = config or cls()
        sampling = {k: overrides.pop(k) for k in list(overrides) if k in SAMPLING_FIELDS}
        if sampling:
            if "greedy" not in sampling and "temperature" in sampling:
                sampling["greedy"] = False
            config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, **sampling))
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MoejaxError(f"unknown generation options {unknown}: use GenerationConfig fields or {list(SAMPLING_FIELDS)}")
        if "stop_token_ids" in overrides:
            overrides["stop_token_ids"] = tuple(overrides["stop_token_ids"])
        return dataclasses.replace(config, **overrides)


@dataclasses.dataclass
class Timing:
    """Seconds, compilation excluded: ttft from the start to the first new token on the host, tpot the
    median decode step, tokens_per_s over the whole run; compile_s the compilation the run waited for."""

    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    total_s: float
    decode_steps: int
    compile_s: float = 0.0

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(repr=False)
class GenerationResult:
    """The outcome of `generate`: new token ids per prompt (a stop token, when reached, is the last),
    their text (None without a tokenizer), why each stopped ('stop' or 'length'), timing and the
    engine's statistics (`offload.stats.cache_stats`)."""

    tokens: list[list[int]]
    text: list[str] | None
    finish_reasons: list[str]
    timing: Timing
    stats: dict[str, Any]

    def __repr__(self) -> str:
        total = self.stats.get("total", {})
        return (f"GenerationResult({len(self.tokens)} prompts, {sum(map(len, self.tokens))} new tokens, "
                f"{self.timing.tokens_per_s:.1f} tokens/s, hit rate {total.get('hit_rate', 1.0):.3f})")

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "text": self.text, "finish_reasons": self.finish_reasons,
                "timing": self.timing.to_json(), "stats": self.stats}


def record_token(generated: list[int], token: int, stops: set[int], max_new_tokens: int) -> tuple[bool, str | None]:
    """Appends `token`; -> (whether the sequence is done, 'stop' or 'length' when it is)."""
    generated.append(token)
    if token in stops:
        return True, "stop"
    if len(generated) >= max_new_tokens:
        return True, "length"
    return False, None
