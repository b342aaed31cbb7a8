"""Scheduling policies of the serving loop: which waiting requests take free KV slots first, which running ones
give theirs up, and which requests are refused because their time-to-first-token objective cannot be met.

Policies see requests as `Entry` snapshots and the engine's speed as `StepTimes`; the math is in pure
functions over them, so it can be checked on synthetic request sets without an engine.

  fcfs  first come, first served; never preempts or refuses.
  slo   eMoE's scheduler. Each waiting request's slack is its deadline (arrival + TTFT objective; for a
        preempted request, when its next token is due under its TPOT objective) minus now minus the time
        to prefill it. Requests with a deadline and at most `urgent_s` of slack go first, least slack first;
        then the others by highest response ratio (waited + cost) / cost, where cost is the expected
        service time (prefill + the task's expected output length, learned from finished requests, times
        the decode step) weighed up by the share of its experts that the running batch does not use (the
        trace collection's expert profile of its task; zero without a collection); last, requests that
        already missed their deadline, oldest first. An urgent request that no slot frees for in time
        preempts the running request with the most slack. A request whose TTFT objective cannot be met
        even so (`ttft_estimate_s`: behind the queued requests due before it, and the running requests
        that cannot be preempted) is refused, and so is a queued one whose TTFT objective passes before it
        gets a slot (`expired`). A free slot is taken only by a request whose prompt fits
        the running requests' TPOT objectives (`admissible`): every prompt chunk prefilled between two
        decode steps pauses the whole running batch, so a prompt is admitted only when each request that
        will be decoding meanwhile has that much slack left over the rest of its output (`pause_budget_s`),
        and, where the decode step grows with the batch (an offloading engine's step moves the union of the
        batch's experts; the loop measures the step per batch size), also the slower steps it shares with
        them; one that does not fit waits and shorter ones behind it may go first. All of it on the
        measured step times made `margin` slower (steps vary about their measure).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math

import numpy as np

from moejax.engine.buckets import padded_prompt_tokens
from moejax.errors import ParameterError
from moejax.serving.requests import SLO


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """The engine's measured speed: seconds per decode step of the running batch and per position a prefill
    chunk computes (chunks are padded: `engine.buckets.padded_prompt_tokens`), and the prompt tokens per chunk
    (a decode step of the running batch follows each chunk). decode_by_batch: ((decoding requests, seconds per
    decode step), ...) as measured per batch size, sorted (empty: unknown); an offloading engine's step moves
    the union of its tokens' experts, so it grows with the batch (`decode_step_at`)."""

    decode_step_s: float
    prefill_token_s: float
    prefill_chunk: int = 512
    decode_by_batch: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):  # from JSON: lists of [batch, seconds]
        object.__setattr__(self, "decode_by_batch", tuple(sorted((int(n), float(t)) for n, t in self.decode_by_batch)))

    def at_batch(self, batch: int) -> StepTimes:
        """These times with decode_step_s the step of `batch` decoding requests (`decode_step_at`)."""
        return dataclasses.replace(self, decode_step_s=decode_step_at(self, batch))

    def scaled(self, factor: float) -> StepTimes:
        """These times, every step's seconds (decode and prefill) times `factor`."""
        return StepTimes(self.decode_step_s * factor, self.prefill_token_s * factor, self.prefill_chunk,
                         tuple((n, t * factor) for n, t in self.decode_by_batch))


def decode_step_at(times: StepTimes, batch: int) -> float:
    """Seconds per decode step of `batch` decoding requests: linear between the batch sizes measured around it;
    the nearest measured one's outside them (a size never measured is never judged slower than the largest one
    measured, so admission can reach it and measure it); `decode_step_s` if none was measured. A larger batch
    is never judged faster than a smaller one (more rows never make a step cheaper: a measure that says so is
    noise, so each size counts at least the slowest smaller size measured)."""
    table = times.decode_by_batch
    if not table:
        return times.decode_step_s
    sizes = [n for n, _ in table]
    return float(np.interp(batch, sizes, np.maximum.accumulate([t for _, t in table])))


# Before anything is measured: orders requests by these; refuses nothing.
NOMINAL_TIMES = StepTimes(decode_step_s=0.01, prefill_token_s=1e-4)


@dataclasses.dataclass(frozen=True, eq=False)  # one entry per request: equal only to itself
class Entry:
    """A request as the scheduler sees it. prefill_tokens: what admitting it prefills (its prompt, plus the
    tokens it generated before a preemption); generated: tokens it has sent; first_token_at: when its first
    token came (None before); profile: float [L, E], the probability that a decode step of it uses each
    expert (None: unknown); preemptions: times it gave its slot up."""

    id: str
    arrival: float
    prefill_tokens: int
    max_tokens: int
    generated: int = 0
    task: str | None = None
    slo: SLO = SLO()
    first_token_at: float | None = None
    profile: np.ndarray | None = None
    preemptions: int = 0
    prefill_left: int = 0  # a running request's prompt tokens not yet prefilled


class TaskLengths:
    """Expected output tokens per task: the running mean of its finished requests' output lengths, else
    `default` (capped by each request's max_tokens)."""

    def __init__(self, default: float = 128.0):
        self.default = default
        self._totals: dict[str | None, tuple[float, int]] = {}

    def observe(self, task: str | None, tokens: int) -> None:
        total, count = self._totals.get(task, (0.0, 0))
        self._totals[task] = (total + tokens, count + 1)

    def mean(self, task: str | None) -> float:
        total, count = self._totals.get(task, (0.0, 0))
        return total / count if count else self.default

    def expected(self, entry: Entry) -> float:
        """Expected output tokens of the request in all (at least those it sent, at most max_tokens)."""
        return min(max(self.mean(entry.task), entry.generated + 1), entry.max_tokens)


# -- pure policy math ------------------------------------------------------------------------------
def prefill_s(entry: Entry, times: StepTimes, batch_running: bool) -> float:
    """Seconds until the request's first token (next token, resumed) once admitted: its prompt tokens, and a
    decode step of the running batch after each chunk when there is one."""
    chunks = math.ceil(entry.prefill_tokens / times.prefill_chunk)
    positions = padded_prompt_tokens(entry.prefill_tokens, times.prefill_chunk)
    return positions * times.prefill_token_s + (chunks * times.decode_step_s if batch_running else 0.0)


def remaining_service_s(entry: Entry, expected_tokens: float, times: StepTimes, prefilled: bool) -> float:
    """Seconds the request still holds a slot: its prefill (unless done) and a decode step per expected token
    still to come (the first comes from the prefill)."""
    decodes = max(expected_tokens - max(entry.generated, 1), 0.0)
    return (0.0 if prefilled else prefill_s(entry, times, True)) + decodes * times.decode_step_s


def deadline(entry: Entry) -> float:
    """When the request's next token is due: arrival + TTFT objective before its first token, then first token
    + TPOT objective per later token; inf without the objective."""
    if entry.first_token_at is None:
        return entry.arrival + entry.slo.ttft_s if entry.slo.ttft_s is not None else math.inf
    if entry.slo.tpot_s is None:
        return math.inf
    return entry.first_token_at + entry.slo.tpot_s * entry.generated


def ttft_passed(entry: Entry, now: float) -> bool:
    """Whether a request that has sent nothing yet is past its TTFT objective (False without one)."""
    return entry.first_token_at is None and entry.slo.ttft_s is not None and now > entry.arrival + entry.slo.ttft_s


def waiting_slack_s(entry: Entry, now: float, times: StepTimes) -> float:
    """Deadline of a waiting request's next token minus now minus the time to prefill it (inf: no objective)."""
    return deadline(entry) - now - prefill_s(entry, times, True)


def running_slack_s(entry: Entry, now: float, expected_tokens: float, times: StepTimes) -> float:
    """How far a running request could be delayed and still meet its TPOT objective over its expected output
    (inf without one)."""
    if entry.slo.tpot_s is None or entry.first_token_at is None:
        return math.inf
    due = entry.first_token_at + entry.slo.tpot_s * (expected_tokens - 1)
    return due - now - max(expected_tokens - entry.generated, 0) * times.decode_step_s


def prefill_pause_s(tokens: int, times: StepTimes) -> float:
    """Seconds prefilling `tokens` prompt tokens adds between the running batch's decode steps (its chunks'
    positions; the decode steps after each chunk are the batch's own)."""
    return padded_prompt_tokens(tokens, times.prefill_chunk) * times.prefill_token_s


def pause_budget_s(entry: Entry, now: float, times: StepTimes, lengths: TaskLengths) -> float:
    """How long prompt chunks may still pause a running request, over the rest of its output, and its TPOT
    objective hold: its slack (`running_slack_s`) once decoding; for one still prefilling, the slack it will
    have at its first token, (expected tokens - 1) x (TPOT objective - decode step). inf without a TPOT
    objective."""
    if entry.slo.tpot_s is None:
        return math.inf
    expected = lengths.expected(entry)
    if entry.first_token_at is None:
        return max(expected - 1, 0) * (entry.slo.tpot_s - times.decode_step_s)
    return running_slack_s(entry, now, expected, times)


def admissible(ordered: list[Entry], running: list[Entry], free_slots: int, now: float, times: StepTimes,
               lengths: TaskLengths) -> list[Entry]:
    """Of the waiting requests in admission order, those to admit now (at most free_slots): each only if what
    it costs every request that will be decoding meanwhile fits that request's pause budget (`pause_budget_s`
    at the batch's step time: the decoding ones, less the prompt chunks already admitted, and the requests
    admitted before it), so that new requests never cost running ones their TPOT objective. The cost: its
    prefill's pause, and where the decode step grows with the batch (`StepTimes.decode_by_batch`), the growth
    over the decode steps both are expected to share. One that does not fit waits, and the next ones are tried
    (a shorter prompt or output may fit)."""
    step = times.at_batch(len(running))
    own = [prefill_pause_s(r.prefill_left, step) if r.prefill_left else 0.0 for r in running]
    queued = sum(own)  # a request's own prompt chunks do not pause it
    budgets = [pause_budget_s(r, now, step, lengths) - (queued - mine) for r, mine in zip(running, own)]
    steps_left = [max(lengths.expected(r) - r.generated, 0.0) for r in running]
    chosen: list[Entry] = []
    for entry in ordered:
        if len(chosen) == free_slots:
            break
        batch = len(running) + len(chosen)
        growth = max(decode_step_at(times, batch + 1) - decode_step_at(times, batch), 0.0)
        pause = prefill_pause_s(entry.prefill_tokens, step)
        mine = max(lengths.expected(entry) - entry.generated, 0.0)
        costs = [pause + growth * min(left, mine) for left in steps_left]
        if any(b < c for b, c in zip(budgets, costs)):
            continue
        budgets = [b - c for b, c in zip(budgets, costs)]
        chosen.append(entry)
        budgets.append(pause_budget_s(entry, now, times.at_batch(batch + 1), lengths))
        steps_left.append(mine)
    return chosen


def unshared_fraction(profile: np.ndarray | None, running: list[np.ndarray]) -> float:
    """The expected share of a request's expert uses per step [L, E] that the running batch's requests do
    not already make (0: all shared; 1: none, or nothing runs); 0 without a profile."""
    if profile is None or not profile.sum():
        return 0.0
    used = 1.0 - np.prod([1.0 - p for p in running], axis=0) if running else np.zeros_like(profile)
    return float((profile * (1.0 - used)).sum() / profile.sum())


def task_profiles(eams: np.ndarray, tasks: list[str | None], top_k: int) -> dict[str | None, np.ndarray]:
    """Per task (None: all entries), the probability [L, E] that one token uses each expert, from EAMs
    [n, L, E] of finished sequences (their token counts): top_k times the expert's share of the layer's
    choices, at most 1."""
    def profile(rows: np.ndarray) -> np.ndarray:
        shares = rows / np.maximum(rows.sum(axis=2, keepdims=True), 1)
        return np.minimum(top_k * shares.mean(axis=0), 1.0)

    if not len(eams):
        return {}
    profiles = {None: profile(eams)}
    for task in {t for t in tasks if t is not None}:
        profiles[task] = profile(eams[[t == task for t in tasks]])
    return profiles


def start_delay_s(ahead: list[float], running: list[float], slots: int) -> float:
    """Seconds until a slot is free for a request that waits behind requests `ahead` (each holding a slot for
    its service seconds, in order) with `running` requests' remaining seconds in `slots` slots."""
    free_at = sorted(running)[:slots] + [0.0] * max(slots - len(running), 0)
    heapq.heapify(free_at)
    for service in ahead:
        heapq.heappush(free_at, heapq.heappop(free_at) + service)
    return free_at[0]


def slo_order(waiting: list[Entry], running: list[Entry], now: float, times: StepTimes, lengths: TaskLengths,
              urgent_s: float, load_weight: float = 1.0) -> list[Entry]:
    """Waiting requests in the `slo` policy's admission order (see the module's docstring)."""
    batch = [r.profile for r in running if r.profile is not None]

    def key(entry: Entry):
        slack = waiting_slack_s(entry, now, times)
        if 0 <= slack <= urgent_s:
            return (0, slack)
        if slack < 0:
            return (2, entry.arrival)
        cost = remaining_service_s(entry, lengths.expected(entry), times, prefilled=False)
        cost *= 1.0 + load_weight * unshared_fraction(entry.profile, batch)
        return (1, -(now - entry.arrival + cost) / max(cost, 1e-9))

    return sorted(waiting, key=key)


def preemption_victim(entry: Entry, running: list[Entry], now: float, times: StepTimes, lengths: TaskLengths,
                      max_preemptions: int = 1) -> Entry | None:
    """The running request `entry` (waiting, with no free slot) should take the slot of, or None.

    Only when `entry` can still meet its deadline but no running request is expected to finish in time; the
    victim is the decoding request with the most slack (no TPOT objective: unlimited), if that slack outlasts
    the pause (prefilling `entry`, then re-prefilling the victim), and it was preempted fewer than
    `max_preemptions` times."""
    slack = waiting_slack_s(entry, now, times)
    if not 0 <= slack < math.inf:
        return None
    remaining = [remaining_service_s(r, lengths.expected(r), times, prefilled=r.first_token_at is not None)
                 for r in running]
    if not running or min(remaining) <= slack:
        return None
    candidates = [(running_slack_s(r, now, lengths.expected(r), times), r) for r in running
                  if r.first_token_at is not None and r.preemptions < max_preemptions]
    if not candidates:
        return None
    victim_slack, victim = max(candidates, key=lambda c: c[0])
    pause = prefill_s(entry, times, True) + prefill_s(
        dataclasses.replace(victim, prefill_tokens=victim.prefill_tokens + victim.generated), times, True)
    return victim if victim_slack > pause else None


def slot_hold_s(entry: Entry, now: float, times: StepTimes, lengths: TaskLengths, max_preemptions: int,
                prefilled: bool) -> float:
    """Seconds a request keeps its slot from an urgent one: until its first (next) token, and then until it
    ends unless it may be preempted (it has time to spare and gave its slot up fewer than max_preemptions
    times)."""
    to_first = 0.0 if prefilled else prefill_s(entry, times, True)
    expected = lengths.expected(entry)
    started = dataclasses.replace(entry, first_token_at=entry.first_token_at or now + to_first,
                                  generated=max(entry.generated, 1))
    if entry.preemptions < max_preemptions and running_slack_s(started, now + to_first, expected, times) > 0:
        return to_first
    return remaining_service_s(entry, expected, times, prefilled)


def ttft_estimate_s(entry: Entry, waiting: list[Entry], running: list[Entry], slots: int, now: float,
                    times: StepTimes, lengths: TaskLengths, max_preemptions: int) -> float:
    """Expected seconds from a new request's arrival to its first token under the `slo` policy: it waits for
    the queued requests due no later than it (earliest deadline first) and for the running ones, each holding
    its slot as long as `slot_hold_s` says, then for its prefill."""
    due = deadline(entry)
    ahead = sorted((w for w in waiting if deadline(w) <= due), key=deadline)
    hold = functools.partial(slot_hold_s, now=now, times=times, lengths=lengths, max_preemptions=max_preemptions)
    busy = [hold(r, prefilled=r.first_token_at is not None) for r in running]
    delay = start_delay_s([hold(a, prefilled=False) for a in ahead], busy, slots)
    return now - entry.arrival + delay + prefill_s(entry, times, bool(running))


# -- the policies ----------------------------------------------------------------------------------
class Scheduler:
    """First come, first served (the interface every policy implements)."""

    name = "fcfs"

    def order(self, waiting: list[Entry], running: list[Entry], now: float, times: StepTimes | None) -> list[Entry]:
        """The waiting requests in the order they take free slots."""
        return sorted(waiting, key=lambda e: e.arrival)

    def admit(self, waiting: list[Entry], running: list[Entry], free_slots: int, now: float,
              times: StepTimes | None) -> list[Entry]:
        """The waiting requests to admit now, at most free_slots, in order: the first of `order`."""
        return self.order(waiting, running, now, times)[:free_slots]

    def plan(self, waiting: list[Entry], running: list[Entry], free_slots: int, now: float,
             times: StepTimes | None) -> tuple[list[Entry], list[Entry]]:
        """One turn's scheduling, as the serving loop (and `serving.simulate`) carries it out: (the running
        requests to preempt, the waiting ones to admit into the slots free once they have gone)."""
        victims = self.preempt(waiting, running, free_slots, now, times)
        free = free_slots + len(victims)
        if free == 0:
            return victims, []
        staying = [r for r in running if all(r is not v for v in victims)]
        return victims, self.admit(waiting, staying, free, now, times)

    def preempt(self, waiting: list[Entry], running: list[Entry], free_slots: int, now: float,
                times: StepTimes | None) -> list[Entry]:
        """Running requests to give their slots up (to be resumed later)."""
        return []

    def refusal(self, entry: Entry, waiting: list[Entry], running: list[Entry], slots: int, now: float,
                times: StepTimes | None) -> str | None:
        """Why a new request must be refused (its SLO cannot be met), or None to queue it."""
        return None

    def expired(self, waiting: list[Entry], now: float) -> list[tuple[Entry, str]]:
        """Queued requests to refuse now, each with the reason (their SLO can no longer be met)."""
        return []

    def finished(self, task: str | None, output_tokens: int) -> None:
        """A request that ran to its end (stop or length) produced output_tokens."""

    def wants_profiles(self) -> bool:
        """Whether entries should carry expert profiles (computing them costs the loop time)."""
        return False


class SLOScheduler(Scheduler):
    """eMoE's SLO-aware policy (the module's docstring). urgent_s: slack below which a request with a deadline
    is urgent (default: 16 decode steps); load_weight: how much an unshared expert profile raises a request's
    cost; default_output_tokens: a task's expected output length before any of its requests finished;
    max_preemptions: times one request may be preempted; margin: the policy plans with the measured step times
    that much slower (0.1: 10%), since steps vary about their measure and a plan that spends a TPOT objective
    exactly misses it half the time; expire: a queued request whose TTFT objective has passed before it got a
    slot is refused then (`expired`: finish reason 'expired'), rather than served too late at the cost of the
    others; times: fixed StepTimes instead of the measured ones (tests, simulations; the margin applies too)."""

    name = "slo"

    def __init__(self, *, urgent_s: float | None = None, load_weight: float = 1.0, default_output_tokens: float = 128.0,
                 max_preemptions: int = 1, margin: float = 0.1, expire: bool = True, times: StepTimes | None = None):
        if load_weight < 0:
            raise ParameterError("{load_weight} must be >= 0 (got {value})", value=load_weight)
        if not 0 <= margin < 10:
            raise ParameterError("{margin} must be in [0, 10) (got {value})", value=margin)
        self.urgent_s, self.load_weight, self.max_preemptions = urgent_s, load_weight, max_preemptions
        self.margin, self.expire = margin, expire
        self.lengths = TaskLengths(default_output_tokens)
        self.fixed_times = times

    def _times(self, times: StepTimes | None) -> StepTimes:
        return (self.fixed_times or times or NOMINAL_TIMES).scaled(1.0 + self.margin)

    def _urgent_s(self, times: StepTimes) -> float:
        return self.urgent_s if self.urgent_s is not None else 16 * times.decode_step_s

    def order(self, waiting, running, now, times):
        return self._order(waiting, running, now, self._times(times))

    def _order(self, waiting, running, now, planned: StepTimes):
        """`order` on times already made `margin` slower (`_times`)."""
        return slo_order(waiting, running, now, planned, self.lengths, self._urgent_s(planned), self.load_weight)

    def preempt(self, waiting, running, free_slots, now, times):
        times = self._times(times)
        victims: list[Entry] = []
        for entry in self._order(waiting, running, now, times)[free_slots:]:
            left = [r for r in running if all(r is not v for v in victims)]
            victim = preemption_victim(entry, left, now, times, self.lengths, self.max_preemptions)
            if victim is None:
                break  # later entries are less urgent
            victims.append(victim)
        return victims

    def admit(self, waiting, running, free_slots, now, times):
        if times is None and self.fixed_times is None:  # nothing measured yet: no pause can be judged
            return super().admit(waiting, running, free_slots, now, times)
        times = self._times(times)
        return admissible(self._order(waiting, running, now, times), running, free_slots, now, times, self.lengths)

    def refusal(self, entry, waiting, running, slots, now, times):
        if entry.slo.ttft_s is None or (times is None and self.fixed_times is None):
            return None
        expected = ttft_estimate_s(entry, waiting, running, slots, now, self._times(times), self.lengths,
                                   self.max_preemptions)
        if expected <= entry.slo.ttft_s:
            return None
        return (f"slo.ttft_s {entry.slo.ttft_s:g} s cannot be met: about {expected:.3g} s to the first token with "
                f"{len(waiting)} requests queued and {len(running)} running")

    def expired(self, waiting, now):
        if not self.expire:
            return []
        return [(e, f"slo.ttft_s {e.slo.ttft_s:g} s passed while the request waited for a slot (queued "
                    f"{now - e.arrival:.3g} s): refused") for e in waiting if ttft_passed(e, now)]

    def finished(self, task, output_tokens):
        self.lengths.observe(task, output_tokens)

    def wants_profiles(self) -> bool:
        return self.load_weight > 0


SCHEDULERS = {"fcfs": Scheduler, "slo": SLOScheduler}


def make_scheduler(scheduler: str | Scheduler) -> Scheduler:
    """A policy by name (`SCHEDULERS`) or the instance given."""
    if isinstance(scheduler, Scheduler):
        return scheduler
    if scheduler not in SCHEDULERS:
        raise ParameterError.not_one_of("scheduler", scheduler, SCHEDULERS)
    return SCHEDULERS[scheduler]()
