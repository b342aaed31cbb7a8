"""Continuous batching: one background thread owns the engine and serves a stream of requests.

Each turn of the loop ends finished and cancelled requests (their KV slots free at once), lets the scheduler
preempt running requests and admit waiting ones into free slots, runs prompt chunks (up to `prefill_chunk`
prompt tokens a turn, so a long prompt is prefilled over several turns while the running requests keep
decoding), and runs one decode step for every decoding request. Each new token goes out as an `Output` at
once, to the request's `on_output` callback and its handle's iterator.

Per MoE layer a step computes the union of the experts its tokens chose, each moved once for all of them
when offloaded (the engine's step programs): batching more requests shares the expert transfers.

A preempted request releases its slot and later prefills its prompt and the tokens it already sent, drawing
its next token with the random number it would have drawn (`Engine.begin_prefill(sampled=)`): its output
goes on as if uninterrupted, greedy or seeded, up to the float rounding of a prefill against decode steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time

from moejax.engine.buckets import prefill_chunk_size
from moejax.engine.compilation import run_clock
from moejax.engine.engine import PIPELINE_DEPTH, Engine
from moejax.engine.slots import SamplingParams
from moejax.errors import ParameterError
from moejax.predictors.base import step_profile
from moejax.serving.requests import FINISH_REASONS, Output, QueueFull, Request, RequestRefused, ShuttingDown
from moejax.serving.scheduler import Entry, Scheduler, StepTimes, make_scheduler, task_profiles
from moejax.serving.text import TextStream

log = logging.getLogger("moejax")

# Fixed histogram buckets (upper bounds, seconds) of the metrics' TTFT and TPOT samples.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SMOOTHING = 0.2  # weight of the newest sample in the step-time averages
STATS_EVERY_S = 1.0  # reading the engine's counters waits for the step in flight: at most this often
PROFILES_EVERY_S = 1.0  # expert profiles from the trace collection are recomputed at most this often


class RequestHandle:
    """What `ServingLoop.submit` returns: iterate it for the request's Outputs as they come (blocking; ends
    after the one with finish_reason set), `result()` for everything joined, `cancel()` to stop it."""

    def __init__(self, request: Request, loop: ServingLoop):
        self.request = request
        self._loop = loop
        self._outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: Output | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Ends the request with finish_reason 'cancelled' (if it has not ended) and frees its slot."""
        self.cancelled = True
        self._loop._wake()

    def __iter__(self):
        while True:
            output = self._outputs.get()
            yield output
            if output.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Output:
        """The whole request once it ended: every token id, the whole text, finish_reason, counts and times.
        Raises TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.id} has not finished after {timeout} s")
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclasses.dataclass(eq=False)
class _Job:
    """The loop's state of one request."""

    request: Request
    handle: RequestHandle
    on_output: object
    stops: frozenset
    text: TextStream | None
    order: int  # submission order
    ids: list = dataclasses.field(default_factory=list)  # tokens sent
    slot: int | None = None
    prefill_left: int = 0  # prompt tokens still to prefill (0: decoding)
    first_token_at: float | None = None
    last_token_at: float | None = None
    preemptions: int = 0
    profile: object = None  # the predictor's expert profile of the request [L, E] (None: the task's)


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def add(self, value: float) -> None:
        self.counts[sum(value > b for b in self.bounds)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        cumulative = list(itertools.accumulate(self.counts))
        return {"buckets": [[b, c] for b, c in zip([*self.bounds, "+Inf"], cumulative, strict=True)],
                "sum": self.sum, "count": cumulative[-1]}


class ServingLoop:
    """Serves requests on `engine` from a background thread (see the module's docstring).

    scheduler: 'fcfs', 'slo' or a `scheduler.Scheduler`; max_queue: most requests waiting for a slot (more:
    QueueFull); max_batch: most requests holding KV slots at once (default and at most: engine.slots);
    predictor: an expert predictor (`moejax.predictors`) whose prediction from a request's prompt, made on
    the thread that submits it, is the request's expert profile for the scheduler (instead of its task's
    profile from the trace collection); step_times: the engine's speed measured before (`loop.step_times` of
    an earlier loop on the same engine), so that the `slo` policy orders and refuses by it from the first request
    instead of after the first measured turns (the loop goes on measuring).

        with ServingLoop(engine, scheduler="slo").start() as loop:
            handle = loop.submit(Request(prompt_ids=ids, max_tokens=32))
            for output in handle: ...
    """

    def __init__(self, engine: Engine, *, scheduler: str | Scheduler = "fcfs", max_queue: int = 64,
                 max_batch: int | None = None, predictor=None, step_times: StepTimes | None = None):
        if not isinstance(engine, Engine) or not hasattr(engine, "begin_prefill") or type(engine).prefill is not Engine.prefill:
            raise ParameterError("{engine} must be a decoder-only moejax Engine (moejax.load); encoder-decoder "
                                 "engines are not served yet")
        max_batch = engine.slots if max_batch is None else max_batch
        if not 1 <= max_batch <= engine.slots:
            raise ParameterError("{max_batch} must be in 1..{slots} (the engine's slots), got {value}",
                                 slots=engine.slots, value=max_batch)
        if max_queue < 1:
            raise ParameterError("{max_queue} must be >= 1 (got {value})", value=max_queue)
        self.engine, self.scheduler = engine, make_scheduler(scheduler)
        if predictor is not None:
            predictor.check_model(len(engine.cfg.moe_layer_ids), engine.cfg.num_experts)
        self.predictor = predictor
        self.max_queue, self.max_batch = max_queue, max_batch
        self._cond = threading.Condition()
        self._waiting: list[_Job] = []
        self._running: dict[int, _Job] = {}  # slot -> job
        self._order = itertools.count()
        self._accepting, self._stopping, self._failed = True, False, None
        self._thread: threading.Thread | None = None
        self._times = step_times
        self._prefill_token_s = None if step_times is None else step_times.prefill_token_s
        # decode turns' (seconds, steps read), decayed (`_measure`): overall and by batch size
        self._decode_sums = None if step_times is None else (step_times.decode_step_s, 1.0)
        self._sums_by_batch = {} if step_times is None else {n: (t, 1.0) for n, t in step_times.decode_by_batch}
        self._quiet_turns = 0  # turns in a row without prefill chunks, before this one (`_measure`)
        self._profiles: dict = {}
        self._profiles_at = -float("inf")
        self._engine_stats: dict = {}
        self._stats_at = -float("inf")
        self._counts = {"finished": dict.fromkeys(FINISH_REASONS, 0), "refused": 0, "queue_full": 0, "preempted": 0}
        self._tokens = {"prompt": 0, "generated": 0}
        self._ttft, self._tpot = _Histogram(TTFT_BUCKETS_S), _Histogram(TPOT_BUCKETS_S)

    # -- the public side (any thread) ------------------------------------------------------------------
    def start(self) -> ServingLoop:
        with self._cond:
            if self._thread is None:
                self.engine.reset_stats()
                self._refresh_stats(force=True)  # metrics() has the engine's keys from the start
                self._thread = threading.Thread(target=self._serve, name="moejax-serving", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> ServingLoop:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=exc[0] is None)

    def submit(self, request: Request, on_output=None) -> RequestHandle:
        """Queues a request -> its handle. on_output(Output) is called from the loop's thread for every Output
        (it must not block). Raises RequestRefused (bad or too long, or an SLO that cannot be met), QueueFull,
        ShuttingDown."""
        if not isinstance(request, Request):
            raise ParameterError("{request} must be a moejax.serving.requests.Request (got {value})",
                                 value=type(request).__name__)
        profile = None
        if self.predictor is not None and self.scheduler.wants_profiles():  # here, off the loop's thread
            profile = step_profile(self.predictor, request.prompt_ids)
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the serving loop is shutting down and admits no new request")
            try:
                self._validate(request)
                if len(self._waiting) >= self.max_queue:
                    self._counts["queue_full"] += 1
                    raise QueueFull(f"{len(self._waiting)} requests wait already (max_queue {self.max_queue})",
                                    retry_after_s=self._retry_after_s())
                now = time.monotonic()
                reason = self.scheduler.refusal(self._entry(request, profile=profile), self._entries(self._waiting),
                                                self._entries(self._running.values()), self.max_batch, now,
                                                self._times)
                if reason is not None:
                    raise RequestRefused(reason, field="slo")
            except RequestRefused:
                self._counts["refused"] += 1
                raise
            handle = RequestHandle(request, self)
            stops = set(request.stop_token_ids) | (set() if request.ignore_eos else set(self.engine.cfg.eos_token_ids))
            tokenizer = self.engine.tokenizer
            job = _Job(request, handle, on_output, frozenset(stops),
                       TextStream(tokenizer, request.stop) if tokenizer is not None else None, next(self._order),
                       profile=profile)
            self._waiting.append(job)
            self._cond.notify_all()
        return handle

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops admitting requests; drain: finishes every admitted and queued request, else cancels them; then
        joins the loop's thread (at most `timeout` seconds)."""
        with self._cond:
            self._accepting = False
            if not drain:
                for job in [*self._waiting, *self._running.values()]:
                    job.handle.cancelled = True
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None and self._waiting:
            self.start()
        if self._thread is not None and self._thread is not threading.current_thread():  # (an on_output may call it)
            self._thread.join(timeout)

    @property
    def step_times(self) -> StepTimes | None:
        """The engine's speed as this loop measured it (or was given it); None before it measured a decode step
        and a prefill."""
        with self._cond:
            return self._times

    def metrics(self) -> dict:
        """A snapshot of the loop's counters.

        requests: {'finished': {reason: count} for stop / length / cancelled / error / expired, 'refused'
        (RequestRefused raised by submit), 'queue_full' (QueueFull raised), 'preempted' (slots given up, resumed
        later)}; queue_depth: requests waiting; running: requests holding a slot; max_batch, max_queue, scheduler;
        prompt_tokens / generated_tokens: totals over admitted requests (a resumed request's prompt counts
        once); ttft_s, tpot_s: histograms of finished requests' time to first token and mean time per later
        token, Prometheus style: {'buckets': [[upper bound s, cumulative count], ..., ['+Inf', count]], 'sum',
        'count'}; step_times: the measured decode step and prefill seconds per prompt token (None before);
        engine: the expert cache's counters since start (`offload.stats.cache_stats` totals: hit_rate,
        bytes_h2d, misses, prefetch_precision, ...; with mode, policy and host_wait_s, the seconds the loop
        waited for step results; per_device: under expert parallelism each device's pairs, hit_rate,
        bytes_h2d, ..., else []), refreshed at most every second; approximate_routing: whether the engine's
        experts are predicted instead of routed (`approximate_routing`).
        """
        with self._cond:
            times = self._times
            return {
                "requests": {"finished": dict(self._counts["finished"]),
                             **{k: self._counts[k] for k in ("refused", "queue_full", "preempted")}},
                "queue_depth": len(self._waiting),
                "running": len(self._running),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "scheduler": self.scheduler.name,
                "prompt_tokens": self._tokens["prompt"],
                "generated_tokens": self._tokens["generated"],
                "ttft_s": self._ttft.snapshot(),
                "tpot_s": self._tpot.snapshot(),
                "step_times": None if times is None else {"decode_step_s": times.decode_step_s,
                                                          "prefill_token_s": times.prefill_token_s,
                                                          "decode_by_batch": dict(times.decode_by_batch)},
                "engine": dict(self._engine_stats),
                "approximate_routing": self.approximate_routing,
            }

    @property
    def approximate_routing(self) -> bool:
        """Whether the engine routes approximately (a routing override marked `approximate`, as --routing
        predicted's): its outputs may differ from the model's."""
        return bool(getattr(self.engine.routing_override, "approximate", False))

    # -- checks --------------------------------------------------------------------------------------
    def _validate(self, request: Request) -> None:
        engine, vocab = self.engine, self.engine.cfg.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestRefused(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", field="prompt")
        prompt = len(request.prompt_ids)
        if prompt >= engine.max_seq_len:
            raise RequestRefused(f"prompt has {prompt} tokens; this engine holds {engine.max_seq_len} per sequence "
                                 f"(max_seq_len), one of them for a new token", field="prompt")
        if prompt + request.max_tokens > engine.max_seq_len:
            raise RequestRefused(f"max_tokens {request.max_tokens} + the prompt's {prompt} tokens exceed the engine's "
                                 f"{engine.max_seq_len} positions per sequence (max_seq_len)", field="max_tokens")
        bad = [t for t in request.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestRefused(f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                 field="stop_token_ids")
        if request.stop and engine.tokenizer is None:
            raise RequestRefused("stop strings need text, but this checkpoint has no tokenizer.json: use "
                                 "stop_token_ids", field="stop")
        if request.sampling is not None and not isinstance(request.sampling, SamplingParams):
            raise RequestRefused("sampling must be a moejax SamplingParams", field="sampling")

    def _retry_after_s(self) -> float:
        """Seconds until a running request is expected to end and a waiting one to take its slot."""
        times = self._times or StepTimes(0.1, 0.0)
        remaining = [max(job.request.max_tokens - len(job.ids), 1) for job in self._running.values()]
        return max(min(remaining, default=1) * times.decode_step_s, times.decode_step_s)

    # -- scheduler views -------------------------------------------------------------------------------
    def _entry(self, request: Request, job: _Job | None = None, profile=None) -> Entry:
        """The scheduler's view of a request (job: its state in the loop, None for a new one; profile: its
        predicted expert profile, for a new one)."""
        sent = len(job.ids) if job is not None else 0
        profile = job.profile if job is not None else profile
        if profile is None:
            profile = self._profiles.get(request.task, self._profiles.get(None))
        return Entry(id=request.id, arrival=request.arrival, prefill_tokens=len(request.prompt_ids) + sent,
                     max_tokens=request.max_tokens, generated=sent, task=request.task, slo=request.slo,
                     first_token_at=job.first_token_at if job is not None else None,
                     profile=profile,
                     preemptions=job.preemptions if job is not None else 0,
                     prefill_left=job.prefill_left if job is not None and job.slot is not None else 0)

    def _entries(self, jobs) -> list[Entry]:
        return [self._entry(job.request, job) for job in jobs]

    # -- the loop's thread -----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            with self._cond:
                idle = not (self._waiting or self._running or self._stopping)
            if idle:  # the steps still in flight finish, and the counters are read, while nothing waits
                self._settle()
            with self._cond:
                while not (self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._running:
                    break
            try:
                self._turn()
            except Exception as err:  # noqa: BLE001 - a bug of the loop: no handle may wait forever
                log.exception("serving loop: unexpected error")
                self._failed = _message(err)
                for job in list(self._running.values()):
                    self._finish(job, "error", _message(err))
        self._settle()

    def _settle(self) -> None:
        if self._failed is None:
            self.engine.finish_pending()
            self._refresh_stats(force=True)

    def _turn(self) -> None:
        """One turn: ends cancelled requests, schedules, prefills a chunk's worth, runs a decode step."""
        start, read = run_clock(), self.engine.steps_read
        self._end_cancelled()
        self._schedule()
        positions = self._prefill()
        decoded = self._decode()
        self._refresh_profiles()
        self._refresh_stats()
        self._measure(run_clock() - start, positions, decoded, self.engine.steps_read - read)

    def _measure(self, seconds: float, positions: int, decoded: int, steps_read: int) -> None:
        """Learns the step times from a turn's seconds (all of it, its host work too: what a running request
        waits between tokens; compilation apart). Decode turns where neither they nor the PIPELINE_DEPTH turns
        before prefilled give the decode step: their seconds over the steps they read, overall and at the batch
        size of the step read. Summed over turns, because one turn's time is not one step's: the engine keeps
        PIPELINE_DEPTH steps in flight, and a turn that waits for all of them (reading the engine's counters
        for the statistics) leaves the next turns' steps done before they read them, so single turns measure
        two steps or none. (After a prefill chunk, a turn reads a step queued behind it, and a prompt's last
        chunk, whose token is read at once, waits for the steps queued before it: those turns are left out.) A
        turn with prefill chunks gives what is left of it after a decode step, the seconds per prefilled
        position."""
        steady = self._quiet_turns >= PIPELINE_DEPTH
        self._quiet_turns = 0 if positions else self._quiet_turns + 1
        if decoded and not positions:
            if steady:
                rows = self.engine.last_step_rows
                self._decode_sums = _decayed(self._decode_sums, seconds, steps_read)
                self._sums_by_batch[rows] = _decayed(self._sums_by_batch.get(rows), seconds, steps_read)
        elif positions and (self._decode_s is not None or not decoded):
            spent = seconds - (self._decode_by_batch.get(decoded, self._decode_s) if decoded else 0.0)
            self._prefill_token_s = _smoothed(self._prefill_token_s, max(spent, 0.0) / positions)
        if self._decode_s is not None and self._prefill_token_s is not None:
            with self._cond:
                self._times = StepTimes(self._decode_s, self._prefill_token_s, self.engine.prefill_chunk,
                                        tuple(self._decode_by_batch.items()))

    @property
    def _decode_s(self) -> float | None:
        """The measured decode step's seconds (None before any)."""
        return _ratio(self._decode_sums)

    @property
    def _decode_by_batch(self) -> dict[int, float]:
        """{batch size: the measured decode step's seconds}."""
        return {n: t for n, sums in self._sums_by_batch.items() if (t := _ratio(sums)) is not None}

    def _end_cancelled(self) -> None:
        with self._cond:
            waiting = [job for job in self._waiting if job.handle.cancelled]
            self._waiting = [job for job in self._waiting if not job.handle.cancelled]
        for job in waiting:
            self._finish(job, "cancelled")
        for job in [job for job in self._running.values() if job.handle.cancelled]:
            self._finish(job, "cancelled")

    def _schedule(self) -> None:
        if self._failed is not None:
            with self._cond:
                failed, self._waiting = self._waiting, []
            for job in failed:
                self._finish(job, "error", f"the engine is unusable after an earlier error: {self._failed}")
            return
        if not self._waiting:
            return
        now = time.monotonic()
        with self._cond:
            queued, held = list(self._waiting), list(self._running.values())
        waiting, running = self._entries(queued), self._entries(held)
        job_of = {id(entry): job for entry, job in zip([*waiting, *running], [*queued, *held], strict=True)}
        expired = self.scheduler.expired(waiting, now)
        for entry, reason in expired:
            job = job_of[id(entry)]
            with self._cond:
                self._waiting.remove(job)
            self._finish(job, "expired", reason)
        if expired:
            gone = {id(entry) for entry, _ in expired}
            waiting = [entry for entry in waiting if id(entry) not in gone]
            if not waiting:
                return
        victims, admitted = self.scheduler.plan(waiting, running, self.max_batch - len(running), now, self._times)
        for victim in victims:
            self._preempt(job_of[id(victim)])
        for entry in admitted:
            self._admit(job_of[id(entry)])

    def _admit(self, job: _Job) -> None:
        request, engine = job.request, self.engine
        slot = min(set(range(engine.slots)) - set(self._running))
        ids = [*request.prompt_ids, *job.ids]
        with self._cond:
            self._waiting.remove(job)
            self._running[slot] = job
        job.slot, job.prefill_left = slot, len(ids)
        if not job.ids and not job.preemptions:
            self._tokens["prompt"] += len(request.prompt_ids)
        try:
            engine.begin_prefill(slot, ids, request.sampling, task=request.task,
                                 max_new_tokens=request.max_tokens - len(job.ids), sampled=len(job.ids))
        except Exception as err:  # noqa: BLE001 - the request fails, the loop goes on
            job.slot = None
            with self._cond:
                del self._running[slot]
            self._finish(job, "error", _message(err))

    def _preempt(self, job: _Job) -> None:
        self.engine.release(job.slot, keep_routing=False)
        with self._cond:
            del self._running[job.slot]
            self._waiting.append(job)
            self._counts["preempted"] += 1
        job.slot, job.prefill_left = None, 0
        job.preemptions += 1

    def _prefill(self) -> int:
        """Prompt chunks of the admitted requests, oldest first, up to `prefill_chunk` tokens in all -> the
        positions they computed (chunks are padded)."""
        budget, positions, size = self.engine.prefill_chunk, 0, self.engine.prefill_chunk
        for job in sorted((j for j in self._running.values() if j.prefill_left), key=lambda j: j.order):
            while job.prefill_left and budget > 0:
                chunk = min(job.prefill_left, size)
                try:
                    token = self.engine.prefill_step(job.slot)
                except Exception as err:  # noqa: BLE001
                    self._engine_error(err, [job])
                    return 0
                job.prefill_left -= chunk
                budget -= chunk
                positions += prefill_chunk_size(chunk, size)
                if token is not None:
                    self._deliver(job, token)
        return positions

    def _decode(self) -> int:
        """A decode step of every decoding request -> how many it decoded (0: none ran)."""
        if not self.engine.occupied:
            return 0
        decoding = [job for job in self._running.values() if not job.prefill_left]
        try:
            produced = self.engine.decode()
        except Exception as err:  # noqa: BLE001
            self._engine_error(err, decoding)
            return 0
        for slot, token in produced.items():
            job = self._running.get(slot)
            if job is not None:
                self._deliver(job, token)
        return max(len(decoding), 1)

    def _engine_error(self, err: Exception, jobs: list[_Job]) -> None:
        """An engine call failed: its requests end with 'error'; if the engine's state was lost with it (its
        donated buffers), every running request does, and so does every later one."""
        log.warning("serving loop: engine error: %s", _message(err))
        lost = _engine_state_lost(self.engine)
        if lost:
            self._failed = _message(err)
            jobs = list(self._running.values())
        for job in jobs:
            self._finish(job, "error", _message(err))

    def _deliver(self, job: _Job, token: int) -> None:
        now = time.monotonic()
        job.ids.append(token)
        self._tokens["generated"] += 1
        if job.first_token_at is None:
            job.first_token_at = now
        job.last_token_at = now
        reason, piece = None, None
        if token in job.stops:
            reason, piece = "stop", job.text.flush() if job.text else None
        elif job.text is not None:
            piece, stopped = job.text.add(token)
            reason = "stop" if stopped else None
        if reason is None and len(job.ids) >= job.request.max_tokens:
            reason = "length"
        if reason is None:
            self._emit(job, Output(job.request.id, (token,), piece))
        else:
            self._finish(job, reason, token=token, piece=piece)

    def _finish(self, job: _Job, reason: str, error: str | None = None, *, token: int | None = None,
                piece: str | None = None) -> None:
        """Ends a request: frees its slot, sends its last Output and completes its handle."""
        if job.slot is not None:
            try:
                self.engine.release(job.slot, keep_routing=False)
            except Exception as err:  # noqa: BLE001 - the slot was already gone with the engine's state
                log.warning("serving loop: releasing slot %d: %s", job.slot, _message(err))
            with self._cond:
                self._running.pop(job.slot, None)
            job.slot = None
        if job.text is not None and reason != "stop":  # nothing more can complete a stop string
            piece = (piece or "") + job.text.flush()
        request, n = job.request, len(job.ids)
        ttft = None if job.first_token_at is None else job.first_token_at - request.arrival
        tpot = (job.last_token_at - job.first_token_at) / (n - 1) if n > 1 else None
        with self._cond:
            self._counts["finished"][reason] += 1
            if ttft is not None:
                self._ttft.add(ttft)
            if tpot is not None:
                self._tpot.add(tpot)
        if reason in ("stop", "length"):
            self.scheduler.finished(request.task, n)
        times = dict(prompt_tokens=len(request.prompt_ids), completion_tokens=n, ttft_s=ttft, tpot_s=tpot)
        last = Output(request.id, () if token is None else (token,), piece, reason, error, **times)
        text = job.text.sent if job.text is not None else None
        job.handle._result = Output(request.id, tuple(job.ids), text, reason, error, **times)
        self._emit(job, last)
        job.handle._done.set()

    def _emit(self, job: _Job, output: Output) -> None:
        job.handle._outputs.put(output)
        if job.on_output is None:
            return
        try:
            job.on_output(output)
        except Exception as err:  # noqa: BLE001 - a front end's callback must not stop the loop
            log.warning("serving loop: on_output of %s raised %s: cancelling it", job.request.id, _message(err))
            job.handle.cancelled = True

    def _refresh_profiles(self) -> None:
        collection = self.engine.collection
        if collection is None or not self.scheduler.wants_profiles():
            return
        now = time.monotonic()
        if now - self._profiles_at >= PROFILES_EVERY_S:
            self._profiles = task_profiles(collection.eams, collection.tasks, self.engine.cfg.top_k)
            self._profiles_at = now

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._failed is not None or not (force or now - self._stats_at >= STATS_EVERY_S):
            return
        stats = self.engine.stats()
        parallel = stats.get("expert_parallel")
        self._engine_stats = {"mode": stats["mode"], "policy": stats["policy"], "prefetch": stats["prefetch"],
                              "host_wait_s": stats["host_wait_s"], **stats["total"],
                              "per_device": parallel["per_device"] if parallel else []}
        self._stats_at = now


def _smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else (1 - SMOOTHING) * average + SMOOTHING * sample


def _decayed(sums: tuple[float, float] | None, seconds: float, steps: int) -> tuple[float, float]:
    """(seconds, steps) sums with a new turn's added and the older ones weighed down by 1 - SMOOTHING."""
    if sums is None:
        return seconds, float(steps)
    return (1 - SMOOTHING) * sums[0] + seconds, (1 - SMOOTHING) * sums[1] + steps


def _ratio(sums: tuple[float, float] | None) -> float | None:
    """Seconds per step of (seconds, steps) sums; None before a step was read."""
    return None if sums is None or sums[1] <= 0 else sums[0] / sums[1]


def _message(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if not str(err) else str(err)


def _engine_state_lost(engine: Engine) -> bool:
    """Whether a buffer the engine threads through its steps was deleted (donated to a step that failed)."""
    import jax

    leaves = jax.tree_util.tree_leaves((engine.kv, engine.state, engine.cache, engine.slab))
    return any(leaf.is_deleted() for leaf in leaves if isinstance(leaf, jax.Array))


def serving_cache_policy(offload: str, cache_policy: str | None, max_batch: int) -> str | None:
    """`serve`'s expert cache policy: --cache-policy where given; else, for a cached engine serving batches,
    'activation'. A batch's step can need more experts than the cache holds, and LRU then evicts the experts the
    next layers are about to use: replaying DeepSeek-V2-Lite's routing at a 25% budget, LRU hit nothing from batch
    4 up where the activation policy (layer distance and use probability) hit 22-32% (BENCHMARKS.md, "Serving
    many requests"). None: the engine's default."""
    if cache_policy is None and offload == "cached" and max_batch > 1:
        return "activation"
    return cache_policy
