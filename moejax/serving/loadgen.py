"""A load generator for the serving loop: Poisson arrivals of prompts drawn from a task mix, each request
with its task's SLOs, run in real time; per-request records and a summary (SLO attainment, TTFT and TPOT
percentiles, goodput, output tokens/s).

The target is injected: `submit(request, on_output) -> handle` (`ServingLoop.submit`, or a fake in the
tests); `on_output(Output)` is called for every Output, from any thread. Times are seconds on `clock`
(default `time.monotonic`, the clock of `Request.arrival`); TTFT and TPOT are measured here, at the
callbacks, not taken from the loop.

    mix = read_task_mix("../shared/data/prompts/tasks.jsonl")
    arrivals = draw_arrivals(mix, rate=4.0, seed=0, count=64, encode=tokenizer.encode)
    slos = slos_from_calibration(calibrate(loop.submit, calibration_arrivals(mix, 2, 0, tokenizer.encode)))
    result = run_load(loop.submit, arrivals, slos)
    print(result.summary["attainment_pct"])

A task mix is a JSONL file, one object a line with a "task" and a "prompt" (text) and optionally a
"reference" (text: the expected answer); other fields are ignored. A request's `max_tokens` is its
reference's token count clipped to [min_tokens, max_tokens] (the whole cap without a reference), so
tasks differ in output length as they do in use; with `ignore_eos` (the default: random-weight models
never stop on their own) a request generates exactly that many tokens.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError, ParameterError
from moejax.jsonl import json_objects
from moejax.serving.requests import SLO, Output, QueueFull, Request, RequestRefused, ShuttingDown

Submit = Callable[[Request, Callable[[Output], None]], object]
COMPLETED = ("stop", "length")  # the finish reasons of a complete answer
REFUSED = ("refused", "queue_full", "shutting_down", "expired")  # outcomes of a request never started


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
    task: str
    prompt: str
    reference: str | None = None


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One request of a workload: when it arrives (seconds after the run starts) and what it asks."""

    at_s: float
    task: str
    prompt_ids: tuple[int, ...]
    max_tokens: int


def read_task_mix(path: str | Path) -> list[TaskPrompt]:
    """The prompts of a task-mix JSONL file (see the module docstring); one-line errors name file and line."""
    path = Path(path)
    prompts = []
    for n, item in json_objects(path, "the task mix"):
        for field in ("task", "prompt"):
            if not isinstance(item.get(field), str) or not item[field]:
                raise MoejaxError(f"{path}:{n}: '{field}' must be a non-empty string")
        reference = item.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise MoejaxError(f"{path}:{n}: 'reference' must be a string")
        prompts.append(TaskPrompt(item["task"], item["prompt"], reference))
    if not prompts:
        raise MoejaxError(f"{path}: the task mix holds no prompts")
    return prompts


def poisson_arrivals(rate: float, *, seed: int, count: int | None = None, duration_s: float | None = None) -> np.ndarray:
    """Arrival times float64 [n] in seconds from 0, increasing: a Poisson process of `rate` requests/s
    (exponential gaps of mean 1/rate, the first gap included), `count` of them or those before
    `duration_s`, whichever ends first (at least one of the two)."""
    if not rate > 0:
        raise ParameterError("{rate} must be > 0 requests/s (got {value})", value=rate)
    if count is None and duration_s is None:
        raise ParameterError("give {count} or {duration_s} (or both)")
    if count is not None and count < 1:
        raise ParameterError("{count} must be >= 1 (got {value})", value=count)
    rng = np.random.default_rng(seed)
    if count is None:
        count = int(rate * duration_s + 10 * np.sqrt(rate * duration_s) + 10)  # more than the duration holds
    times = np.cumsum(rng.exponential(1.0 / rate, count))
    return times if duration_s is None else times[times < duration_s]


def output_tokens(reference_ids: Sequence[int] | None, min_tokens: int, max_tokens: int) -> int:
    """A request's max_tokens: its reference's token count in [min_tokens, max_tokens] (max_tokens without one)."""
    if reference_ids is None:
        return max_tokens
    return int(min(max(len(reference_ids), min_tokens), max_tokens))


def _arrival(item: TaskPrompt, at_s: float, encode: Callable[[str], Sequence[int]], max_prompt: int | None,
             min_tokens: int, max_tokens: int) -> Arrival:
    ids = tuple(encode(item.prompt))[:max_prompt]
    reference = None if item.reference is None else encode(item.reference)
    return Arrival(float(at_s), item.task, ids, output_tokens(reference, min_tokens, max_tokens))


def draw_arrivals(mix: Sequence[TaskPrompt], rate: float, *, seed: int, encode: Callable[[str], Sequence[int]],
                  count: int | None = None, duration_s: float | None = None, max_prompt: int | None = None,
                  min_tokens: int = 4, max_tokens: int = 64) -> list[Arrival]:
    """A workload: Poisson arrivals (`poisson_arrivals`), each a prompt drawn uniformly from `mix` (so tasks
    come in the file's proportions), encoded by `encode` and cut to its first `max_prompt` tokens. The same
    arguments give the same workload."""
    times = poisson_arrivals(rate, seed=seed, count=count, duration_s=duration_s)
    picks = np.random.default_rng([seed, 1]).integers(len(mix), size=len(times))
    return [_arrival(mix[p], t, encode, max_prompt, min_tokens, max_tokens) for t, p in zip(times, picks)]


def calibration_arrivals(mix: Sequence[TaskPrompt], per_task: int, seed: int, encode: Callable[[str], Sequence[int]],
                         max_prompt: int | None = None, min_tokens: int = 4, max_tokens: int = 64) -> list[Arrival]:
    """`per_task` prompts of each task (drawn with `seed`), all at time 0: run them one at a time (`calibrate`)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for task in dict.fromkeys(item.task for item in mix):
        items = [item for item in mix if item.task == task]
        picks = rng.choice(len(items), size=min(per_task, len(items)), replace=False)
        chosen += [_arrival(items[p], 0.0, encode, max_prompt, min_tokens, max_tokens) for p in picks]
    return chosen


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request; times in seconds from the start of its run."""

    id: str
    task: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    slo: SLO
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0
    outcome: str = "unfinished"  # a finish reason, or one of REFUSED, or 'unfinished' (not done at the deadline)
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two)."""
        if self.tokens < 2 or self.last_token_s is None:
            return None
        return (self.last_token_s - self.first_token_s) / (self.tokens - 1)

    @property
    def slo_met(self) -> bool:
        """A complete answer within both objectives (no TPOT to miss with a single token)."""
        if self.outcome not in COMPLETED or self.ttft_s is None:
            return False
        ttft_ok = self.slo.ttft_s is None or self.ttft_s <= self.slo.ttft_s
        tpot_ok = self.slo.tpot_s is None or self.tpot_s is None or self.tpot_s <= self.slo.tpot_s
        return ttft_ok and tpot_ok

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row.pop("slo")
        row.update(slo_ttft_s=self.slo.ttft_s, slo_tpot_s=self.slo.tpot_s, ttft_s=self.ttft_s, tpot_s=self.tpot_s,
                   slo_met=self.slo_met)
        return row


@dataclasses.dataclass
class LoadResult:
    records: list[RequestRecord]
    summary: dict


def run_load(submit: Submit, arrivals: Sequence[Arrival], slos: Mapping[str, SLO] | None = None, *,
             ignore_eos: bool = True, drain_timeout_s: float = 120.0, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep, poll_s: float = 0.002) -> LoadResult:
    """Submits each arrival at its time (real time on `clock`; greedy requests with their task's SLO from
    `slos`) and waits until every request has finished, at most `drain_timeout_s` after the last arrival;
    requests still running then are cancelled (if their handle has `cancel`) and recorded as 'unfinished'.
    A refused submission (RequestRefused, QueueFull, ShuttingDown) is recorded as such, not retried."""
    slos = slos or {}
    lock = threading.Lock()
    records, handles, pending = [], [], set()
    closed = False  # past the deadline: later Outputs are ignored (the records are final)
    start = clock()

    def listener(record: RequestRecord) -> Callable[[Output], None]:
        def on_output(output: Output) -> None:
            now = clock() - start
            with lock:
                if closed:
                    return
                if output.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = now
                    record.last_token_s = now
                    record.tokens += len(output.token_ids)
                if output.finish_reason is not None:
                    record.tokens = max(record.tokens, output.completion_tokens)
                    record.finish_s, record.outcome, record.error = now, output.finish_reason, output.error
                    pending.discard(record.id)
        return on_output

    for arrival in arrivals:
        wait = start + arrival.at_s - clock()
        if wait > 0:
            sleep(wait)
        slo = slos.get(arrival.task, SLO())
        request = Request(arrival.prompt_ids, max_tokens=arrival.max_tokens, ignore_eos=ignore_eos, task=arrival.task,
                          slo=slo, arrival=clock())
        record = RequestRecord(request.id, arrival.task, request.arrival - start, len(arrival.prompt_ids),
                               arrival.max_tokens, slo)
        records.append(record)
        with lock:
            pending.add(record.id)
        try:
            handles.append(submit(request, listener(record)))
        except (RequestRefused, QueueFull, ShuttingDown) as err:
            outcome = {RequestRefused: "refused", QueueFull: "queue_full", ShuttingDown: "shutting_down"}[type(err)]
            with lock:
                pending.discard(record.id)
                record.outcome, record.error, record.finish_s = outcome, str(err), clock() - start
    deadline = clock() + drain_timeout_s
    while clock() < deadline:
        with lock:
            if not pending:
                break
        sleep(poll_s)
    with lock:
        closed, unfinished = True, set(pending)
    for handle in handles:
        if getattr(handle, "request", None) is not None and handle.request.id in unfinished and hasattr(handle, "cancel"):
            handle.cancel()
    with lock:
        return LoadResult(records, summarize(records))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (NumPy's linear interpolation), None of no values."""
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else None


def summarize(records: Sequence[RequestRecord]) -> dict:
    """Counts by outcome; SLO attainment (% of ALL requests that finished complete within both SLOs: a
    refused, failed, cancelled or unfinished request counts as missed); p50/p99 TTFT and TPOT over the
    requests that have them; the arrival rate (requests / the last arrival time); over the run's duration
    (from 0 to its last finish or arrival): goodput (SLO-meeting requests/s and their output tokens/s) and
    output tokens/s of all requests."""
    n = len(records)
    duration = max([r.finish_s or 0.0 for r in records] + [r.arrival_s for r in records] + [0.0])
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    met = [r for r in records if r.slo_met]
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    tpots = [r.tpot_s for r in records if r.tpot_s is not None]
    rate = lambda amount: amount / duration if duration > 0 else None  # noqa: E731
    last_arrival = max([r.arrival_s for r in records], default=0.0)
    return {
        "requests": n, "outcomes": outcomes,
        "completed": sum(r.outcome in COMPLETED for r in records),
        "refused": sum(r.outcome in REFUSED for r in records),
        "slo_met": len(met), "attainment_pct": 100.0 * len(met) / n if n else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
        "duration_s": duration, "arrival_rps": n / last_arrival if last_arrival > 0 else None,
        "goodput_rps": rate(len(met)), "goodput_tokens_per_s": rate(sum(r.tokens for r in met)),
        "output_tokens_per_s": rate(sum(r.tokens for r in records)),
    }


def calibrate(submit: Submit, arrivals: Sequence[Arrival], **run_options) -> dict[str, dict]:
    """The unloaded engine's times per task: each arrival run alone, one after the other (no SLOs) ->
    {task: {'ttft_s', 'tpot_s', 'latency_s', 'requests'}} (medians over the task's requests)."""
    by_task: dict[str, list[RequestRecord]] = {}
    for arrival in arrivals:
        record = run_load(submit, [dataclasses.replace(arrival, at_s=0.0)], **run_options).records[0]
        if record.outcome not in COMPLETED:
            raise MoejaxError(f"calibration request of task '{arrival.task}' ended '{record.outcome}'"
                              + (f": {record.error}" if record.error else ""))
        by_task.setdefault(arrival.task, []).append(record)

    def median(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    return {task: {"ttft_s": median([r.ttft_s for r in rs]), "tpot_s": median([r.tpot_s for r in rs]),
                   "latency_s": median([r.finish_s - r.arrival_s for r in rs]), "requests": len(rs)}
            for task, rs in by_task.items()}


DEFAULT_TTFT_FACTOR = 5.0
DEFAULT_TPOT_FACTOR = 3.0


def slos_from_calibration(calibration: Mapping[str, dict], ttft_factor: float = DEFAULT_TTFT_FACTOR,
                          tpot_factor: float = DEFAULT_TPOT_FACTOR) -> dict[str, SLO]:
    """Per task: TTFT SLO = ttft_factor x its unloaded TTFT, TPOT SLO = tpot_factor x its unloaded TPOT
    (none where calibration measured none). The defaults (5x, 3x) leave room for queueing and batching but
    not for a request stuck behind a long queue."""
    for name, value in (("ttft_factor", ttft_factor), ("tpot_factor", tpot_factor)):
        if not value > 0:
            raise ParameterError("{" + name + "} must be > 0 (got {value})", value=value)
    scaled = lambda value, factor: None if value is None else value * factor  # noqa: E731
    return {task: SLO(scaled(c["ttft_s"], ttft_factor), scaled(c["tpot_s"], tpot_factor)) for task, c in calibration.items()}


def service_rate(calibration: Mapping[str, dict], arrivals: Sequence[Arrival] | None = None) -> float:
    """Requests/s the unloaded engine serves one at a time: 1 / the mean of the tasks' median latencies
    (weighted by the tasks' shares of `arrivals` when given, else equally): offered loads are multiples of it."""
    tasks = [a.task for a in arrivals] if arrivals else list(calibration)
    known = [calibration[t]["latency_s"] for t in tasks if t in calibration]
    if not known:
        raise MoejaxError("no calibrated task among the arrivals")
    return 1.0 / float(np.mean(known))
