"""The load generator (`moejax.serving.loadgen`): its arrival process and task-mix drawing, and its SLO
accounting checked by hand on a fake serving loop with known delays that runs on virtual time."""

import heapq
import itertools
import json

import numpy as np
import pytest

from moejax.errors import MoejaxError
from moejax.serving.loadgen import (
    Arrival, calibrate, calibration_arrivals, draw_arrivals, poisson_arrivals, read_task_mix, run_load,
    service_rate, slos_from_calibration,
)
from moejax.serving.requests import SLO, Output, QueueFull, RequestRefused


class VirtualTime:
    """A clock that moves only in `sleep`, firing the events due on the way, each at its time."""

    def __init__(self):
        self.now, self.events, self.order = 0.0, [], itertools.count()

    def clock(self) -> float:
        return self.now

    def at(self, when: float, event) -> None:
        heapq.heappush(self.events, (when, next(self.order), event))

    def sleep(self, seconds: float) -> None:
        target = self.now + max(seconds, 0.0)
        while self.events and self.events[0][0] <= target:
            self.now, _, event = heapq.heappop(self.events)
            event()
        self.now = target


class FakeLoop:
    """Serves every request alone at once: its first token `ttft` after submission, then one every `tpot`
    (delays by task); tasks in `refuse` raise that exception; tasks in `stuck` never finish."""

    def __init__(self, time: VirtualTime, delays: dict, refuse: dict | None = None, stuck: tuple = ()):
        self.time, self.delays, self.refuse, self.stuck = time, delays, refuse or {}, stuck
        self.cancelled = []

    def submit(self, request, on_output):
        if request.task in self.refuse:
            raise self.refuse[request.task]
        handle = Handle(request, self)
        if request.task in self.stuck:
            return handle
        ttft, tpot = self.delays[request.task]
        n, start = request.max_tokens, self.time.now
        for i in range(n):
            self.time.at(start + ttft + i * tpot, lambda: on_output(Output(request.id, (7,))))
        self.time.at(start + ttft + (n - 1) * tpot,
                     lambda: on_output(Output(request.id, finish_reason="length", completion_tokens=n)))
        return handle


class Handle:
    def __init__(self, request, loop):
        self.request, self.loop = request, loop

    def cancel(self):
        self.loop.cancelled.append(self.request.id)


def arrival(at_s, task, max_tokens):
    return Arrival(at_s, task, (1, 2, 3), max_tokens)


def test_poisson_arrivals_count_rate_and_seed():
    times = poisson_arrivals(20.0, seed=3, count=4000)
    assert len(times) == 4000 and np.all(np.diff(times) > 0) and times[0] > 0
    assert np.mean(np.diff(times, prepend=0.0)) == pytest.approx(1 / 20, rel=0.05)
    np.testing.assert_array_equal(times, poisson_arrivals(20.0, seed=3, count=4000))
    assert not np.array_equal(times[:10], poisson_arrivals(20.0, seed=4, count=10))
    within = poisson_arrivals(20.0, seed=3, duration_s=100.0)
    assert within.max() < 100.0 and abs(len(within) - 2000) < 4 * np.sqrt(2000)
    assert len(poisson_arrivals(20.0, seed=3, count=50, duration_s=100.0)) == 50
    with pytest.raises(MoejaxError, match="rate"):
        poisson_arrivals(0.0, seed=0, count=3)


def write_mix(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def encode(text):
    return [ord(c) % 50 for c in text]


def test_draw_arrivals_follow_the_task_mix(tmp_path):
    mix = read_task_mix(write_mix(tmp_path / "mix.jsonl", [
        {"task": "a", "prompt": "first a prompt", "reference": "xy", "id": 0},
        {"task": "a", "prompt": "second", "reference": "a much longer answer"},
        {"task": "a", "prompt": "third a"},
        {"task": "b", "prompt": "only b", "reference": "abcd"},
    ]))
    arrivals = draw_arrivals(mix, 10.0, seed=0, count=2000, encode=encode, max_prompt=5, min_tokens=3, max_tokens=6)
    assert arrivals == draw_arrivals(mix, 10.0, seed=0, count=2000, encode=encode, max_prompt=5, min_tokens=3, max_tokens=6)
    assert [a.at_s for a in arrivals] == pytest.approx(poisson_arrivals(10.0, seed=0, count=2000).tolist())
    share_b = sum(a.task == "b" for a in arrivals) / len(arrivals)
    assert share_b == pytest.approx(0.25, abs=0.04)
    expected = {("a", tuple(encode("first a prompt")[:5]), 3), ("a", tuple(encode("second")[:5]), 6),
                ("a", tuple(encode("third a")[:5]), 6), ("b", tuple(encode("only b")[:5]), 4)}
    assert {(a.task, a.prompt_ids, a.max_tokens) for a in arrivals} == expected
    calibration = calibration_arrivals(mix, 2, seed=0, encode=encode)
    assert sorted(a.task for a in calibration) == ["a", "a", "b"] and all(a.at_s == 0 for a in calibration)


@pytest.mark.parametrize("line, message", [
    ("not json", r"mix.jsonl:2: not JSON"),
    ('{"task": "a"}', r"mix.jsonl:2: 'prompt' must be a non-empty string"),
    ('[1, 2]', r"mix.jsonl:2: a line must be a JSON object"),
])
def test_bad_task_mix_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "mix.jsonl"
    path.write_text('{"task": "a", "prompt": "p"}\n' + line + "\n")
    with pytest.raises(MoejaxError, match=message):
        read_task_mix(path)
    with pytest.raises(MoejaxError, match="cannot read"):
        read_task_mix(tmp_path / "missing.jsonl")


DELAYS = {"fast": (0.1, 0.05), "slow": (0.5, 0.2), "stutter": (0.1, 0.5)}
SLOS = {"fast": SLO(0.2, 0.1), "slow": SLO(0.4, 0.3), "stutter": SLO(1.0, 0.3), "refused": SLO(1.0, 1.0)}


def test_slo_accounting_by_hand():
    """fast@0 (3 tokens) meets both; slow@1 misses TTFT (0.5 > 0.4); stutter@2 misses TPOT (0.5 > 0.3);
    refused@3 counts as missed; fast@4 with one token has no TPOT and meets its TTFT: 2 of 5 = 40%."""
    time = VirtualTime()
    loop = FakeLoop(time, DELAYS, refuse={"refused": RequestRefused("cannot meet its SLO", field="slo")})
    arrivals = [arrival(0, "fast", 3), arrival(1, "slow", 4), arrival(2, "stutter", 3), arrival(3, "refused", 2),
                arrival(4, "fast", 1)]
    result = run_load(loop.submit, arrivals, SLOS, clock=time.clock, sleep=time.sleep)
    records = result.records
    assert [r.slo_met for r in records] == [True, False, False, False, True]
    assert [r.ttft_s for r in records[:3]] == pytest.approx([0.1, 0.5, 0.1]) and records[3].ttft_s is None
    assert [r.tpot_s for r in records[:3]] == pytest.approx([0.05, 0.2, 0.5]) and records[4].tpot_s is None
    assert [r.tokens for r in records] == [3, 4, 3, 0, 1]
    assert records[3].outcome == "refused" and "SLO" in records[3].error
    s = result.summary
    assert s["requests"] == 5 and s["completed"] == 4 and s["refused"] == 1 and s["slo_met"] == 2
    assert s["outcomes"] == {"length": 4, "refused": 1}
    assert s["attainment_pct"] == pytest.approx(40.0)
    # TTFTs 0.1, 0.5, 0.1, 0.1: p99 at rank 0.99 x 3 = 2.97 of the sorted values, 0.1 + 0.97 x 0.4.
    assert s["ttft_p50_s"] == pytest.approx(0.1) and s["ttft_p99_s"] == pytest.approx(0.488)
    # TPOTs 0.05, 0.2, 0.5: p99 at rank 1.98, 0.2 + 0.98 x 0.3.
    assert s["tpot_p50_s"] == pytest.approx(0.2) and s["tpot_p99_s"] == pytest.approx(0.494)
    assert s["duration_s"] == pytest.approx(4.1)  # fast@4's last token
    assert s["arrival_rps"] == pytest.approx(5 / 4)
    assert s["goodput_rps"] == pytest.approx(2 / 4.1) and s["goodput_tokens_per_s"] == pytest.approx(4 / 4.1)
    assert s["output_tokens_per_s"] == pytest.approx(11 / 4.1)
    assert records[0].as_dict()["slo_met"] is True and records[0].as_dict()["slo_ttft_s"] == 0.2


def test_full_queue_and_unfinished_requests_count_as_missed():
    time = VirtualTime()
    loop = FakeLoop(time, DELAYS, refuse={"refused": QueueFull("queue full", retry_after_s=1.0)}, stuck=("slow",))
    arrivals = [arrival(0, "fast", 2), arrival(0.5, "refused", 2), arrival(1, "slow", 2)]
    result = run_load(loop.submit, arrivals, SLOS, clock=time.clock, sleep=time.sleep, drain_timeout_s=5.0)
    assert [r.outcome for r in result.records] == ["length", "queue_full", "unfinished"]
    assert loop.cancelled == [result.records[2].id]
    assert result.summary["attainment_pct"] == pytest.approx(100 / 3) and result.summary["refused"] == 1


def test_calibration_gives_each_task_its_unloaded_times_and_slos():
    time = VirtualTime()
    loop = FakeLoop(time, DELAYS)
    arrivals = [arrival(5, "fast", 3), arrival(0, "slow", 2), arrival(9, "slow", 4)]
    calibration = calibrate(loop.submit, arrivals, clock=time.clock, sleep=time.sleep)
    assert calibration["fast"] == pytest.approx({"ttft_s": 0.1, "tpot_s": 0.05, "latency_s": 0.2, "requests": 1})
    assert calibration["slow"] == pytest.approx({"ttft_s": 0.5, "tpot_s": 0.2, "latency_s": 0.9, "requests": 2})
    slos = slos_from_calibration(calibration, ttft_factor=4, tpot_factor=2)
    assert slos["slow"].ttft_s == pytest.approx(2.0) and slos["slow"].tpot_s == pytest.approx(0.4)
    assert service_rate(calibration) == pytest.approx(1 / 0.55)  # mean of 0.2 and 0.9 s (0.7 and 1.1)
    assert service_rate(calibration, [arrival(0, "fast", 1)] * 3) == pytest.approx(5.0)
    with pytest.raises(MoejaxError, match="slow.*refused"):
        calibrate(FakeLoop(time, DELAYS, refuse={"slow": RequestRefused("refused")}).submit, arrivals,
                  clock=time.clock, sleep=time.sleep)
