"""The serving loop's turns in virtual time, for trying scheduling policies offline.

`simulate` replays a workload (`loadgen.Arrival`s with their tasks' SLOs) through a model of
`serving.loop.ServingLoop` whose engine takes fixed times: a decode step of n decoding requests
`decode_step_at(times, n)` (the measured `decode_by_batch`, else `decode_step_s`), a prefill chunk
`prefill_token_s` per position it computes (chunks padded as the engine pads them). Each turn does what the loop's
does, in the same order: new arrivals are refused or queued (`Scheduler.refusal`, a full queue), queued requests
past their TTFT objective may be refused (`Scheduler.expired`), the policy preempts and admits (`Scheduler.plan`:
preempt, then admit), prompt chunks of the admitted requests run oldest first up to `prefill_chunk` tokens (a
request whose prompt ends gets its first token), then one decode step of every decoding request. The policies are
the real ones, given the step times as measured times; so a policy can be judged on a GPU's measured step times
(`scripts/bench_serve.py` records them) without the GPU, in milliseconds, and exactly reproducibly. What it leaves
out: the loop's thread running beside the arrivals (here they are taken at turn boundaries, judged at their
arrival time) and compilation; step times vary only as `variation` draws them.

    result = simulate(arrivals, slos, "slo", StepTimes(0.00084, 0.000112, 128), slots=16)
    print(result.summary["attainment_pct"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from moejax.engine.buckets import prefill_chunk_size
from moejax.errors import ParameterError
from moejax.serving.loadgen import Arrival, LoadResult, RequestRecord, summarize
from moejax.serving.requests import SLO
from moejax.serving.scheduler import Entry, Scheduler, StepTimes, decode_step_at, make_scheduler


@dataclasses.dataclass(eq=False)
class _Job:
    record: RequestRecord
    order: int
    prompt_tokens: int
    generated: int = 0
    first_token_at: float | None = None
    prefill_left: int = 0
    preemptions: int = 0
    slot: int | None = None

    def entry(self) -> Entry:
        r = self.record
        return Entry(id=r.id, arrival=r.arrival_s, prefill_tokens=self.prompt_tokens + self.generated,
                     max_tokens=r.max_tokens, generated=self.generated, task=r.task, slo=r.slo,
                     first_token_at=self.first_token_at, preemptions=self.preemptions, prefill_left=self.prefill_left)


def simulate(arrivals: Sequence[Arrival], slos: Mapping[str, SLO] | None, scheduler: str | Scheduler,
             times: StepTimes, *, slots: int, max_queue: int = 64, variation: float = 0.0,
             seed: int = 0) -> LoadResult:
    """The workload served by a loop of `slots` KV slots under `scheduler` (a name or a Scheduler, which it
    updates as the loop would) with the engine's `times` -> records and summary as `loadgen.run_load` gives
    them (seconds from 0; every request ends: refused, queue_full, expired or length). variation: each
    decode step and prompt chunk takes its time in `times` times a lognormal factor of that sigma (drawn
    with `seed`), as measured steps vary; the policy still sees `times`."""
    if slots < 1 or max_queue < 1:
        raise ParameterError("{slots} and {max_queue} must be >= 1 (got {slots_value}, {queue_value})",
                             slots_value=slots, queue_value=max_queue)
    if variation < 0:
        raise ParameterError("{variation} must be >= 0 (got {value})", value=variation)
    rng = np.random.default_rng(seed)
    spread = (lambda: 1.0) if not variation else (lambda: float(rng.lognormal(0.0, variation)))  # noqa: E731
    policy = make_scheduler(scheduler)
    slos = slos or {}
    pending = sorted(arrivals, key=lambda a: a.at_s)
    records = [RequestRecord(f"sim-{i}", a.task, a.at_s, len(a.prompt_ids), a.max_tokens, slos.get(a.task, SLO()))
               for i, a in enumerate(pending)]
    waiting: list[_Job] = []
    running: dict[int, _Job] = {}
    now, next_arrival = 0.0, 0

    def entries(jobs):
        return [job.entry() for job in jobs]

    def deliver(job: _Job) -> None:
        job.generated += 1
        record = job.record
        record.tokens = job.generated
        if job.first_token_at is None:
            job.first_token_at = record.first_token_s = now
        record.last_token_s = now
        if job.generated >= record.max_tokens:
            record.outcome, record.finish_s = "length", now
            del running[job.slot]
            policy.finished(record.task, job.generated)

    while next_arrival < len(pending) or waiting or running:
        if not waiting and not running:
            now = max(now, pending[next_arrival].at_s)
        while next_arrival < len(pending) and pending[next_arrival].at_s <= now:  # submit()
            arrival, record = pending[next_arrival], records[next_arrival]
            job = _Job(record, next_arrival, len(arrival.prompt_ids))
            next_arrival += 1
            if len(waiting) >= max_queue:
                record.outcome = "queue_full"
                continue
            if policy.refusal(job.entry(), entries(waiting), entries(running.values()), slots,
                              arrival.at_s, times) is not None:
                record.outcome = "refused"
                continue
            waiting.append(job)
        if waiting:  # _schedule()
            queued, held = list(waiting), list(running.values())
            waiting_entries, running_entries = entries(queued), entries(held)
            job_of = {id(e): j for e, j in zip([*waiting_entries, *running_entries], [*queued, *held], strict=True)}
            expired = policy.expired(waiting_entries, now)
            for entry, _ in expired:
                job = job_of[id(entry)]
                waiting.remove(job)
                job.record.outcome, job.record.finish_s = "expired", now
            gone = {id(entry) for entry, _ in expired}
            waiting_entries = [e for e in waiting_entries if id(e) not in gone]
        if waiting:
            victims, admitted = policy.plan(waiting_entries, running_entries, slots - len(running), now, times)
            for victim in victims:
                job = job_of[id(victim)]
                del running[job.slot]
                job.slot, job.prefill_left = None, 0
                job.preemptions += 1
                waiting.append(job)
            for entry in admitted:
                job = job_of[id(entry)]
                waiting.remove(job)
                job.slot = min(set(range(slots)) - set(running))
                job.prefill_left = job.prompt_tokens + job.generated
                running[job.slot] = job
        if waiting and not running:  # the loop would wait forever: no turn would ever change anything
            raise ParameterError("{scheduler} {name!r} admitted none of {count} waiting requests into {free} free "
                                 "slots", name=policy.name, count=len(waiting), free=slots)
        budget, size = times.prefill_chunk, times.prefill_chunk  # _prefill()
        for job in sorted((j for j in running.values() if j.prefill_left), key=lambda j: j.order):
            while job.prefill_left and budget > 0:
                chunk = min(job.prefill_left, size)
                now += prefill_chunk_size(chunk, size) * times.prefill_token_s * spread()
                job.prefill_left -= chunk
                budget -= chunk
                if not job.prefill_left:
                    deliver(job)
        decoding = [j for j in running.values() if not j.prefill_left]  # _decode()
        if decoding:
            now += decode_step_at(times, len(decoding)) * spread()
            for job in sorted(decoding, key=lambda j: j.slot):
                deliver(job)
    return LoadResult(records, summarize(records))
