"""What a serving client hands the engine and gets back: `Request`, `SLO`, `Output`, and the refusals.

The contract between the serving loop (`serving.loop`, which owns the engine in a thread), its
scheduling policies (`serving.scheduler`) and the front ends (the HTTP server, benchmarks, notebooks).
Times are seconds on `time.monotonic()`'s clock.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from moejax.engine.slots import SamplingParams
from moejax.errors import MoejaxError, ParameterError

FINISH_REASONS = ("stop", "length", "cancelled", "error", "expired")  # expired: refused while queued (`slo`)
_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class SLO:
    """Service-level objectives of a request: time to its first token and time per output token after it,
    in seconds (None: no objective)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ParameterError("{" + name + "} must be > 0 seconds (got {value})", value=value)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    prompt_ids: the prompt's token ids (a front end tokenizes text and applies chat templates first).
    max_tokens: most new tokens. sampling: per-request sampling, with its own seed (None: greedy).
    stop: strings that end the output when its decoded text contains one (the text stops before it);
    stop_token_ids: token ids that end it (in addition to the model's EOS unless ignore_eos).
    task: a label (the trace collection's, and the `slo` scheduler's per-task output-length estimate).
    slo: the request's objectives (the `slo` scheduler orders and admits by them).
    id: unique; arrival: when the request came (defaults: a counter and now).
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingParams | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    task: str | None = None
    slo: SLO = SLO()
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = dataclasses.field(default_factory=time.monotonic)

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.prompt_ids:
            raise ParameterError("{prompt_ids} is empty: a request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ParameterError("{max_tokens} must be >= 1 (got {value})", value=self.max_tokens)
        if any(not s for s in self.stop):
            raise ParameterError("{stop} holds an empty string, which would stop every output at once")


@dataclasses.dataclass(frozen=True)
class Output:
    """What a request produced since its last Output (the serving loop sends one per new token, and a
    last one with `finish_reason` set).

    token_ids: the new token ids; text: the new text (None without a tokenizer; held back while it may
    be the start of a stop string or ends inside a multi-byte character); finish_reason: None while the
    request runs, else one of FINISH_REASONS; error: the message when finish_reason is 'error' or
    'expired' (the `slo` scheduler refused it while it waited for a slot: its TTFT objective had passed).
    At the end, prompt_tokens / completion_tokens count the request's tokens, and ttft_s / tpot_s are
    its measured times (arrival to first token; mean time per later token).
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None


class QueueFull(MoejaxError):
    """The waiting queue holds `max_queue` requests: try again later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRefused(MoejaxError):
    """A request that cannot be served as asked: too long for the context, a bad token id or sampling
    value, or (admission control) an SLO it cannot meet. `field` names what is wrong (HTTP 400)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ShuttingDown(MoejaxError):
    """The serving loop is draining and admits no new request (HTTP 503)."""
