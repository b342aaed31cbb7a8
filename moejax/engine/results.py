"""What generation takes and gives: `GenerationConfig` (with the sampling keywords), `Timing`, `GenerationResult`."""

from __future__ import annotations

import dataclasses
from typing import Any

from moejax.engine.slots import SamplingParams
from moejax.errors import MoejaxError, ParameterError, is_integer


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to generate. `stop_token_ids` stop in addition to the model's EOS tokens."""

    max_new_tokens: int = 32
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not is_integer(self.max_new_tokens):
            raise ParameterError("{max_new_tokens} must be an integer (got {value!r})", value=self.max_new_tokens)
        if not is_integer(self.seed):
            raise ParameterError("{seed} must be an integer (got {value!r})", value=self.seed)
        if self.max_new_tokens < 1:
            raise ParameterError("{max_new_tokens} must be >= 1 (got {value})", value=self.max_new_tokens)


SAMPLING_KEYWORDS = tuple(field.name for field in dataclasses.fields(SamplingParams) if field.name != "seed")


def generation_config(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    """`config` (default: GenerationConfig()) with `overrides` applied: GenerationConfig fields, or the
    SamplingParams fields greedy, temperature, top_k, top_p (any of the last three samples, unless
    greedy=True is given too, which is an error)."""
    config = config or GenerationConfig()
    sampling = {name: overrides.pop(name) for name in SAMPLING_KEYWORDS if name in overrides}
    fields = [field.name for field in dataclasses.fields(GenerationConfig)]
    unknown = [name for name in overrides if name not in fields]
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}: generation takes the GenerationConfig "
                        f"fields ({', '.join(fields)}) and the sampling keywords ({', '.join(SAMPLING_KEYWORDS)})")
    config = dataclasses.replace(config, **overrides)
    if not sampling:
        return config
    filters = [name for name in SAMPLING_KEYWORDS if name != "greedy" and name in sampling]
    if sampling.get("greedy") and filters:
        raise MoejaxError(f"greedy=True takes the likeliest token and ignores {', '.join(filters)}: "
                          "leave greedy out (or pass greedy=False) to sample")
    sampling.setdefault("greedy", False)
    return dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, **sampling))


@dataclasses.dataclass
class Timing:
    """Seconds, compilation apart. ttft_s: start to the first new token on the host; tpot_s: the
    median decode step; tokens_per_s: new tokens / total_s; total_s: all steps, the first included;
    compile_s: time spent making XLA programs (tracing, lowering, compiling, or loading them from the
    persistent cache), which the other figures leave out: the call took about total_s + compile_s."""

    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    total_s: float
    decode_steps: int
    compile_s: float

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(repr=False)
class GenerationResult:
    """What `generate` returns; one entry per prompt, in order.

    tokens: the new token ids (a stop token, when reached, is the last).
    text: their decoded text, or None when the checkpoint has no tokenizer.
    finish_reasons: 'stop' (a stop or EOS token came) or 'length' (max_new_tokens reached).
    timing: speed figures in seconds, compilation apart (Timing).
    stats: the expert runtime's counters: cache hits and misses, bytes copied to the device,
        prefetches (`total`, `per_layer`, `prefill`; README, "Offloading experts").
    """

    tokens: list[list[int]]
    text: list[str] | None
    finish_reasons: list[str]
    timing: Timing
    stats: dict[str, Any]

    def __repr__(self) -> str:
        outputs = ", ".join(_shortened(out) for out in (self.text if self.text is not None else self.tokens))
        return (f"GenerationResult([{outputs}], finish_reasons={self.finish_reasons}, "
                f"ttft {self.timing.ttft_s * 1e3:.1f} ms, tpot {self.timing.tpot_s * 1e3:.2f} ms)")

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "text": self.text,
            "finish_reasons": self.finish_reasons,
            "timing": self.timing.to_json(),
            "stats": self.stats,
        }


def _shortened(output: str | list[int], width: int = 60) -> str:
    """The repr of one prompt's text or tokens, cut to about `width` characters."""
    shown = repr(output)
    if len(shown) <= width:
        return shown
    if isinstance(output, str):
        return repr(output[: width - 5] + "...")
    return repr(output[: width // 6])[:-1] + ", ...]"


def record_token(generated: list[int], token: int, stops: set[int], max_new_tokens: int) -> str | None:
    """Appends `token` to a sequence's new tokens; -> why the sequence is done ('stop' or 'length'), or None."""
    generated.append(token)
    if token in stops:
        return "stop"
    return "length" if len(generated) >= max_new_tokens else None
