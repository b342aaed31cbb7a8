"""The serving loop (continuous batching over the step API) and its scheduling policies.

A request's tokens are those it gets alone through the step API (`solo`, the obviously-right twin), whatever
else the loop runs beside it, whenever it arrives, however its prompt is chunked, and after a preemption.
Engines of 4 slots with prompts prefilled 8 tokens a chunk: resident and the smallest cache (one layer's
experts shared by every slot). The policies' math is checked on synthetic request sets.
"""

import functools
import math
import threading
import time

import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax import SamplingParams, checkpoint
from moejax.errors import MoejaxError, ParameterError
from moejax.serving import scheduler as sched
from moejax.serving.loop import ServingLoop
from moejax.serving.requests import SLO, QueueFull, Request, RequestRefused, ShuttingDown
from moejax.serving.scheduler import Entry, SLOScheduler, StepTimes, TaskLengths
from moejax.serving.text import TextStream, first_stop, held_back

SLOTS, MAX_SEQ_LEN, CHUNK = 4, 64, 8
MODES = ["resident", "smallest-cache"]
SEEDED = SamplingParams(greedy=False, temperature=0.9, top_k=20, seed=7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(("mixtral", "basic"), tmp_path_factory.mktemp("serving"))[2]


@functools.lru_cache(maxsize=None)
def load(ckpt, mode="resident"):
    options = dict(slots=SLOTS, max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK)
    if mode == "resident":
        return moejax.load(ckpt, **options)
    cfg = checkpoint.load_config(ckpt)
    return moejax.load(ckpt, "cached", expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B", **options)


def solo(engine, prompt, tokens: int, sampling=None) -> list[int]:
    """A prompt's first `tokens` tokens with the engine to itself (the step API, no loop)."""
    out = [engine.prefill(0, prompt, sampling)]
    while len(out) < tokens:
        out.append(engine.decode()[0])
    engine.release(0)
    return out


class Log:
    """Every Output of a loop in the order the loop sent them (on_output runs on the loop's thread)."""

    def __init__(self):
        self.events, self.cond = [], threading.Condition()

    def __call__(self, output):
        with self.cond:
            self.events.append((output.request_id, output.token_ids, output.finish_reason))
            self.cond.notify_all()

    def mark(self, label: str):
        with self.cond:
            self.events.append((label, (), None))

    def wait_tokens(self, request_id: str, count: int, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(len(t) for r, t, _ in self.events if r == request_id) < count:
                assert self.cond.wait(deadline - time.monotonic()), f"{request_id}: no {count} tokens in time"


def test_prefill_a_chunk_at_a_time(ckpt):
    """begin_prefill + prefill_step: a 20-token prompt in 3 chunks of 8, its first token after the last; a slot
    mid-prefill is busy, takes no decode rows, and can be released."""
    engine = load(ckpt)
    prompt, other = random_prompts(engine.cfg.vocab_size, [20, 5], seed=2)
    expected = solo(engine, prompt, 3)
    first_other = engine.prefill(0, other)
    engine.begin_prefill(1, prompt)
    with pytest.raises(MoejaxError, match="slot 1 is busy"):
        engine.begin_prefill(1, prompt)
    assert engine.prefilling == [1] and engine.occupied == [0]
    assert [engine.prefill_step(1), engine.prefill_step(1)] == [None, None]
    assert list(engine.decode()) == [0]  # the slot mid-prefill takes no decode row
    tokens = [engine.prefill_step(1)]
    tokens += [engine.decode()[1] for _ in range(2)]
    assert tokens == expected and engine.prefilling == [] and first_other is not None
    engine.release(1)
    engine.begin_prefill(1, prompt)
    engine.prefill_step(1)
    engine.release(1)  # mid-prefill
    with pytest.raises(MoejaxError, match="slot 1 has no prompt being prefilled"):
        engine.prefill_step(1)
    with pytest.raises(ParameterError, match="sampled must be >= 0"):
        engine.begin_prefill(1, prompt, sampled=-1)
    engine.release(0)
    assert engine.occupied == engine.prefilling == []


@pytest.mark.parametrize("mode", MODES)
def test_requests_get_their_solo_tokens_batched_and_arriving_at_different_times(ckpt, mode):
    """Five requests (greedy and seeded, one with a 30-token prompt prefilled in 4 chunks) through 4 slots:
    the last waits for a free one, two arrive while others decode. Each gets its solo tokens; the long
    prompt's chunks run between decode steps of the running requests, which keep producing tokens."""
    engine = load(ckpt, mode)
    prompts = random_prompts(engine.cfg.vocab_size, [9, 5, 30, 6, 11], seed=3)
    sampling = [None, SEEDED, SamplingParams(greedy=False, temperature=1.2, top_p=0.9, seed=8), None, SEEDED]
    lengths = [12, 12, 6, 9, 7]
    expected = [solo(engine, p, n, s) for p, n, s in zip(prompts, lengths, sampling, strict=True)]
    requests = [Request(p, max_tokens=n, sampling=s, ignore_eos=True) for p, n, s in zip(prompts, lengths, sampling,
                                                                                         strict=True)]
    log = Log()
    with ServingLoop(engine, max_batch=SLOTS) as loop:
        handles = [loop.submit(r, log) for r in requests[:2]]
        log.wait_tokens(requests[0].id, 3)
        log.mark("long prompt submitted")
        handles += [loop.submit(r, log) for r in requests[2:]]
        results = [h.result(timeout=120) for h in handles]
        metrics = loop.metrics()
        assert metrics["running"] == 0
    # decode steps measured per batch size (the sizes depend on the threads' timing; several decode at once)
    by_batch = metrics["step_times"]["decode_by_batch"]
    assert set(by_batch) <= {1, 2, 3, 4} and max(by_batch) >= 2 and all(t > 0 for t in by_batch.values())
    assert engine.occupied == [] and engine.prefilling == []
    for n, result in enumerate(results):
        assert (list(result.token_ids), result.finish_reason) == (expected[n], "length"), n
    streamed = [t for r, tokens, _ in log.events if r == requests[1].id for t in tokens]
    assert streamed == expected[1]  # one Output per token, the last with the finish reason
    start = log.events.index(("long prompt submitted", (), None))
    first_long = next(i for i, (r, _, _) in enumerate(log.events) if r == requests[2].id)
    between = [r for r, _, _ in log.events[start:first_long]]
    assert between.count(requests[0].id) >= 3 and between.count(requests[1].id) >= 3


@pytest.mark.parametrize("mode", ["on-demand", "dense-offload", "activation-trace"])
def test_every_offload_mode_serves_the_resident_tokens(ckpt, mode):
    """Offloading changes no token through the loop: batched requests in every mode (the smallest cache with
    the activation policy and the trace prefetcher, whose collection gives the slo scheduler expert profiles)
    get the resident engine's solo tokens."""
    resident = load(ckpt)
    prompts = random_prompts(resident.cfg.vocab_size, [5, 12, 7], seed=9)
    sampling = [None, SEEDED, None]
    expected = [solo(resident, p, 6, s) for p, s in zip(prompts, sampling, strict=True)]
    options = dict(slots=SLOTS, max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK)
    if mode == "activation-trace":
        cfg = resident.cfg
        engine = moejax.load(ckpt, "cached", expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B",
                             cache_policy="activation", prefetch="trace", **options)
    else:
        engine = moejax.load(ckpt, mode, **options)
    with ServingLoop(engine, scheduler="slo") as loop:
        for _ in range(2):  # the second round runs with what the first taught the trace collection
            handles = [loop.submit(Request(p, max_tokens=6, sampling=s, task="t")) for p, s in zip(prompts, sampling,
                                                                                                   strict=True)]
            assert [list(h.result(timeout=60).token_ids) for h in handles] == expected
    stats = loop.metrics()["engine"]
    assert stats["mode"] == ("cached" if mode == "activation-trace" else mode) and stats["bytes_h2d"] > 0


def test_text_stream_holds_back_possible_stop_strings_and_partial_characters():
    pieces = {1: "ab", 2: "c", 3: "\ufffd", 4: "d", 5: "e"}

    class Tokens:  # token 3 then 4 decode to one character "é"; alone, 3 is an incomplete one
        def decode(self, ids):
            return "".join(pieces[t] for t in ids).replace("\ufffdd", "é")

    stream = TextStream(Tokens(), stop=("cé!", "xyz"))
    assert stream.add(1) == ("ab", False)
    assert stream.add(2) == ("", False)  # "c" may begin "cé!"
    assert stream.add(3) == ("", False)  # an incomplete character
    assert stream.add(4) == ("", False)  # "cé" may still become "cé!"
    assert stream.add(5) == ("cée", False)
    assert stream.flush() == "" and stream.sent == "abcée"
    stopping = TextStream(Tokens(), stop=("ce", "bc"))
    assert stopping.add(1) == ("a", False)
    assert stopping.add(2) == ("", True) and stopping.sent == "a"  # "abc" holds "bc": text ends before it
    assert first_stop("xx--yy--", ("--", "yy")) == 2 and first_stop("abc", ("d",)) is None
    assert held_back("hello wor", ("world",)) == 3 and held_back("hello", ("world",)) == 0


def test_stop_strings_stop_ids_max_tokens_and_cancel(ckpt, monkeypatch):
    """A stop string ends the text before it (held back while it might be one); a stop token id ends the
    tokens with it; max_tokens cuts; a cancelled running request frees its slot for the next one, and a
    cancelled waiting one never runs."""
    engine = load(ckpt)
    letters = "abcdefghijklmnopqrstuvwxyz"

    class Letters:
        def decode(self, ids):
            return "".join(letters[t % 26] for t in ids)

    monkeypatch.setattr(engine, "tokenizer", Letters())
    prompt = random_prompts(engine.cfg.vocab_size, [7], seed=5)[0]
    alone = solo(engine, prompt, 20)
    text = Letters().decode(alone)
    stop = text[6:8]
    cut = first_stop(text, (stop,))
    stop_id = alone[4]
    first_id = alone.index(stop_id)
    with ServingLoop(engine, max_batch=1) as loop:
        by_string = loop.submit(Request(prompt, max_tokens=20, stop=(stop, "zzzz")))
        pieces = "".join(o.text for o in by_string)
        by_id = loop.submit(Request(prompt, max_tokens=20, stop_token_ids=(stop_id,)))
        by_length = loop.submit(Request(prompt, max_tokens=3))
        results = [h.result(timeout=60) for h in (by_string, by_id, by_length)]
    assert (results[0].text, results[0].finish_reason, pieces) == (text[:cut], "stop", text[:cut])
    assert list(results[0].token_ids) == alone[: cut + len(stop)]
    assert (list(results[1].token_ids), results[1].finish_reason) == (alone[: first_id + 1], "stop")
    assert results[1].text == text[:first_id]  # the stop token's text is not part of the output
    assert (list(results[2].token_ids), results[2].text, results[2].finish_reason) == (alone[:3], text[:3], "length")

    log = Log()
    with ServingLoop(engine, max_batch=1) as loop:
        long = loop.submit(Request(prompt, max_tokens=40), log)
        queued = loop.submit(Request(prompt, max_tokens=40))
        log.wait_tokens(long.request.id, 2)
        queued.cancel()
        long.cancel()
        after = loop.submit(Request(prompt, max_tokens=5))
        assert list(after.result(timeout=60).token_ids) == alone[:5]  # it got the freed slot
        cancelled = long.result(timeout=60)
        assert cancelled.finish_reason == "cancelled" and 2 <= len(cancelled.token_ids) < 40
        assert list(cancelled.token_ids) == alone[: len(cancelled.token_ids)]
        assert queued.result(timeout=60).token_ids == () and queued.result().finish_reason == "cancelled"
        assert loop.metrics()["requests"]["finished"]["cancelled"] == 2

        def hang_up(output):  # a front end whose client is gone
            if output.token_ids:
                raise ConnectionError("client went away")

        gone = loop.submit(Request(prompt, max_tokens=40), hang_up).result(timeout=60)
        assert gone.finish_reason == "cancelled" and len(gone.token_ids) < 40
    assert engine.occupied == []


def test_shutdown_drains_or_cancels(ckpt):
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [4, 6, 5, 8, 3, 7], seed=6)
    loop = ServingLoop(engine, max_batch=2).start()
    handles = [loop.submit(Request(p, max_tokens=4)) for p in prompts]
    loop.shutdown(drain=True, timeout=120)
    assert [len(h.result(timeout=0).token_ids) for h in handles] == [4] * 6  # nothing lost or cut short
    metrics = loop.metrics()
    assert (metrics["prompt_tokens"], metrics["generated_tokens"]) == (sum(map(len, prompts)), 24)
    assert metrics["requests"]["finished"]["length"] == 6 and metrics["queue_depth"] == metrics["running"] == 0
    for name, count in (("ttft_s", 6), ("tpot_s", 6)):
        buckets = metrics[name]["buckets"]
        assert buckets[-1] == ["+Inf", count] == ["+Inf", metrics[name]["count"]], name
        assert [c for _, c in buckets] == sorted(c for _, c in buckets) and metrics[name]["sum"] > 0
    with pytest.raises(ShuttingDown):
        loop.submit(Request(prompts[0]))
    loop = ServingLoop(engine, max_batch=2).start()
    handles = [loop.submit(Request(p, max_tokens=30)) for p in prompts]
    loop.shutdown(drain=False, timeout=120)
    assert {h.result(timeout=0).finish_reason for h in handles} == {"cancelled"}
    assert engine.occupied == []


def test_queue_full_and_refused_requests_name_the_field(ckpt):
    engine = load(ckpt)
    vocab = engine.cfg.vocab_size
    loop = ServingLoop(engine, max_queue=2)  # not started: nothing leaves the queue
    queued = [loop.submit(Request([1, 2, 3])) for _ in range(2)]
    with pytest.raises(QueueFull) as full:
        loop.submit(Request([1, 2, 3]))
    assert full.value.retry_after_s > 0
    cases = {"prompt": Request([1, vocab]), "max_tokens": Request([1] * 40, max_tokens=25),
             "stop_token_ids": Request([1], stop_token_ids=(-1,)), "stop": Request([1], stop=("x",))}
    for field, request in cases.items():
        with pytest.raises(RequestRefused) as refused:
            loop.submit(request)
        assert refused.value.field == field, str(refused.value)
    with pytest.raises(RequestRefused, match=r"prompt has 64 tokens; this engine holds 64") as refused:
        loop.submit(Request([1] * MAX_SEQ_LEN, max_tokens=1))
    assert refused.value.field == "prompt"
    metrics = loop.metrics()
    assert (metrics["requests"]["refused"], metrics["requests"]["queue_full"], metrics["queue_depth"]) == (5, 1, 2)
    loop.shutdown(drain=False, timeout=60)
    assert {h.result(timeout=0).finish_reason for h in queued} == {"cancelled"}
    for bad in (dict(max_batch=0), dict(max_batch=SLOTS + 1), dict(max_queue=0), dict(scheduler="lifo")):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            ServingLoop(engine, **bad)


def test_a_loop_given_step_times_refuses_by_them_from_the_first_request(ckpt):
    """A fresh loop has measured nothing and refuses nothing; given an earlier loop's step times, the slo policy
    refuses a request whose TTFT objective they say cannot be met, before any turn has run."""
    engine, hopeless = load(ckpt), Request([1, 2, 3], max_tokens=2, slo=SLO(ttft_s=0.01))
    slow = StepTimes(decode_step_s=10.0, prefill_token_s=1.0, prefill_chunk=CHUNK)
    fresh, given = (ServingLoop(engine, scheduler="slo", step_times=times) for times in (None, slow))  # not started
    assert fresh.step_times is None and given.step_times == slow
    queued = fresh.submit(hopeless)
    with pytest.raises(RequestRefused, match="slo.ttft_s 0.01 s cannot be met") as refused:
        given.submit(hopeless)
    assert refused.value.field == "slo" and given.metrics()["requests"]["refused"] == 1
    for loop in (fresh, given):
        loop.shutdown(drain=False, timeout=60)
    assert queued.result(timeout=0).finish_reason == "cancelled"


def test_the_slo_loop_refuses_a_queued_request_once_its_ttft_objective_passed(ckpt):
    """Queued past its TTFT objective (here: before the loop started), a request ends 'expired' with the reason,
    counted; a request without the objective is served as usual."""
    loop = ServingLoop(load(ckpt), scheduler="slo")  # not started: nothing leaves the queue
    late = loop.submit(Request([1, 2, 3], max_tokens=2, slo=SLO(ttft_s=0.01)))
    plain = loop.submit(Request([1, 2, 3], max_tokens=2))
    time.sleep(0.05)
    loop.start()
    result = late.result(timeout=60)
    assert result.finish_reason == "expired" and result.token_ids == ()
    assert result.error.startswith("slo.ttft_s 0.01 s passed while the request waited for a slot")
    assert plain.result(timeout=60).finish_reason == "length"
    loop.shutdown(timeout=60)
    assert loop.metrics()["requests"]["finished"]["expired"] == 1


def test_an_engine_error_fails_its_requests_and_the_loop_serves_on(ckpt, monkeypatch):
    """An exception while prefilling one prompt ends only that request with 'error'; one in a decode step ends
    the requests in it; the loop then serves the next ones with their solo tokens."""
    engine = load(ckpt)
    good, bad = random_prompts(engine.cfg.vocab_size, [6, 9], seed=7)
    expected = solo(engine, good, 6)
    prompts = {}
    begin, step, decode = engine.begin_prefill, engine.prefill_step, engine.decode

    def recording_begin(slot, ids, *args, **kwargs):
        prompts[slot] = list(ids)
        return begin(slot, ids, *args, **kwargs)

    def failing_step(slot):
        if prompts[slot] == bad:
            raise RuntimeError("injected prefill failure")
        return step(slot)

    monkeypatch.setattr(engine, "begin_prefill", recording_begin)
    monkeypatch.setattr(engine, "prefill_step", failing_step)
    with ServingLoop(engine) as loop:
        handles = [loop.submit(Request(p, max_tokens=6)) for p in (good, bad, good)]
        results = [h.result(timeout=60) for h in handles]
        assert [r.finish_reason for r in results] == ["length", "error", "length"]
        assert results[1].error == "injected prefill failure"
        assert list(results[0].token_ids) == list(results[2].token_ids) == expected

        calls = []

        def failing_decode():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected decode failure")
            return decode()

        monkeypatch.setattr(engine, "decode", failing_decode)
        handles = [loop.submit(Request(good, max_tokens=6)) for _ in range(2)]
        assert {(h.result(timeout=60).finish_reason, h.result().error) for h in handles} == {
            ("error", "injected decode failure")}
        assert list(loop.submit(Request(good, max_tokens=6)).result(timeout=60).token_ids) == expected
        assert loop.metrics()["requests"]["finished"]["error"] == 3
    assert engine.occupied == []


@pytest.mark.parametrize("sampling", [None, SEEDED], ids=["greedy", "seeded"])
def test_slo_preemption_continues_identically(ckpt, sampling):
    """With one slot, an urgent request (its TTFT objective due before the running request would end, at the
    fixed step times given) preempts the running one, which later re-prefills its prompt and sent tokens and
    goes on with exactly the tokens it would have produced uninterrupted."""
    engine = load(ckpt)
    long_prompt, urgent_prompt = random_prompts(engine.cfg.vocab_size, [7, 9], seed=8)
    expected = solo(engine, long_prompt, 20, sampling), solo(engine, urgent_prompt, 4)
    scheduler = SLOScheduler(times=StepTimes(decode_step_s=1.0, prefill_token_s=1e-3, prefill_chunk=CHUNK))
    log = Log()
    with ServingLoop(engine, scheduler=scheduler, max_batch=1) as loop:
        running = loop.submit(Request(long_prompt, max_tokens=20, sampling=sampling), log)
        log.wait_tokens(running.request.id, 3)
        urgent = loop.submit(Request(urgent_prompt, max_tokens=4, slo=SLO(ttft_s=10.0)), log)
        results = running.result(timeout=60), urgent.result(timeout=60)
        assert loop.metrics()["requests"]["preempted"] == 1
    assert [list(r.token_ids) for r in results] == list(expected)
    order = [r for r, _, _ in log.events]
    assert order.index(urgent.request.id) < len(order) - 1 - order[::-1].index(running.request.id)
    assert [t for r, tokens, _ in log.events if r == running.request.id for t in tokens] == expected[0]


# -- the policies on synthetic request sets ----------------------------------------------------------------
TIMES = StepTimes(decode_step_s=0.1, prefill_token_s=0.001, prefill_chunk=100)


def entry(name, arrival=0.0, prompt=10, max_tokens=50, **kwargs):
    return Entry(id=name, arrival=arrival, prefill_tokens=prompt, max_tokens=max_tokens, **kwargs)


def test_task_lengths_and_profiles():
    lengths = TaskLengths(default=40)
    assert lengths.expected(entry("a", max_tokens=30)) == 30 and lengths.expected(entry("a", task="x")) == 40
    for n in (4, 8):
        lengths.observe("x", n)
    assert lengths.mean("x") == 6 and lengths.expected(entry("a", task="x", generated=9)) == 10
    eams = np.array([[[3, 1, 0, 0]], [[1, 3, 0, 0]], [[0, 0, 2, 2]]])  # 3 sequences, 1 layer, 4 experts, top-1
    profiles = sched.task_profiles(eams, ["x", "x", "y"], top_k=1)
    np.testing.assert_allclose(profiles["x"], [[0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(profiles["y"], [[0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(profiles[None], [[1 / 3, 1 / 3, 1 / 6, 1 / 6]])
    assert sched.unshared_fraction(profiles["x"], [profiles["x"]]) == pytest.approx(0.5)
    assert sched.unshared_fraction(profiles["y"], [profiles["x"]]) == 1.0
    assert sched.unshared_fraction(None, [profiles["x"]]) == 0.0 and sched.unshared_fraction(profiles["x"], []) == 1.0


def test_start_delay_simulates_slots_freeing():
    assert sched.start_delay_s([], [5.0, 1.0], slots=3) == 0.0  # a free slot
    assert sched.start_delay_s([], [5.0, 1.0], slots=2) == 1.0
    assert sched.start_delay_s([2.0], [5.0, 1.0], slots=2) == 3.0  # behind one that takes the first free slot
    assert sched.start_delay_s([2.0, 2.0], [5.0, 1.0], slots=2) == 5.0


def test_slo_order_by_slack_then_cost_with_aging_and_expert_sharing():
    lengths = TaskLengths(default=50)
    lengths.observe("short", 5)
    now = 100.0
    urgent = entry("urgent", arrival=99.0, slo=SLO(ttft_s=1.5))  # slack 0.5 - prefill 0.11
    later = entry("later", arrival=99.5, slo=SLO(ttft_s=30.0))
    short = entry("short", arrival=99.5, task="short")
    plain = entry("plain", arrival=99.0)
    missed = entry("missed", arrival=90.0, slo=SLO(ttft_s=1.0))
    order = sched.slo_order([plain, missed, short, later, urgent], [], now, TIMES, lengths, urgent_s=1.0)
    assert [e.id for e in order] == ["urgent", "short", "plain", "later", "missed"]
    old = entry("old", arrival=0.0)  # waited 100 s: its response ratio beats a short job's
    assert [e.id for e in sched.slo_order([short, old], [], now, TIMES, lengths, 1.0)] == ["old", "short"]
    assert [e.id for e in SLOScheduler().order([short, old], [], now, TIMES)] == ["old", "short"]
    assert [e.id for e in sched.Scheduler().order([short, old, plain], [], now, None)] == ["old", "plain", "short"]

    x, y = np.array([[0.5, 0.5, 0, 0]]), np.array([[0, 0, 0.5, 0.5]])
    running = [entry("r", profile=x, first_token_at=99.0, generated=3)]
    same = entry("same", arrival=99.0, profile=x)
    other = entry("other", arrival=99.0, profile=y)
    assert [e.id for e in sched.slo_order([other, same], running, now, TIMES, lengths, 1.0)] == ["same", "other"]
    unloaded = [e.id for e in sched.slo_order([other, same], running, now, TIMES, lengths, 1.0, load_weight=0.0)]
    assert unloaded == ["other", "same"]  # equal costs: the given order stays


def test_admission_control_refuses_what_cannot_meet_its_ttft():
    scheduler = SLOScheduler(default_output_tokens=20)
    now = 100.0
    running = [entry(f"r{i}", arrival=90.0, first_token_at=91.0, generated=5, slo=SLO(tpot_s=0.2)) for i in range(2)]
    # Each running request holds its slot ~1.5 s more (15 tokens of 0.1 s): a 1 s TTFT cannot be met in 2 slots.
    tight = entry("tight", arrival=now, slo=SLO(ttft_s=1.0))
    reason = scheduler.refusal(tight, [], running, 2, now, TIMES)
    assert reason is not None and reason.startswith("slo.ttft_s 1 s cannot be met")
    assert scheduler.refusal(tight, [], running, 3, now, TIMES) is None  # a free slot
    assert scheduler.refusal(entry("loose", arrival=now, slo=SLO(ttft_s=2.0)), [], running, 2, now, TIMES) is None
    # Due before it, and each holding a slot until it ends (its TPOT objective leaves no time to be preempted):
    queue = [entry(f"q{i}", arrival=99.0, slo=SLO(ttft_s=1.2, tpot_s=0.01)) for i in range(2)]
    assert scheduler.refusal(entry("loose", arrival=now, slo=SLO(ttft_s=2.0)), queue, running, 2, now, TIMES) is not None
    preemptible_queue = [entry(f"q{i}", arrival=99.0, slo=SLO(ttft_s=1.2)) for i in range(2)]  # hold only to a token
    assert scheduler.refusal(entry("loose", arrival=now, slo=SLO(ttft_s=2.0)), preemptible_queue, running, 2, now,
                             TIMES) is None
    later = [entry(f"l{i}", arrival=99.0, slo=SLO(ttft_s=9.0, tpot_s=0.01)) for i in range(2)]  # due after it
    assert scheduler.refusal(entry("loose", arrival=now, slo=SLO(ttft_s=2.0)), later, running, 2, now, TIMES) is None
    assert scheduler.refusal(tight, [], running, 2, now, None) is None  # nothing measured yet
    assert sched.Scheduler().refusal(tight, queue, running, 2, now, TIMES) is None  # fcfs admits all
    preemptible = [entry("p", arrival=90.0, first_token_at=91.0, generated=5)]  # no TPOT objective
    assert scheduler.refusal(tight, [], preemptible, 1, now, TIMES) is None  # it may take p's slot


def test_slo_expires_queued_requests_past_their_ttft_objective():
    """`slo` refuses a queued request once its TTFT objective has passed (never one that has sent tokens, a
    preempted one waiting to resume, nor one without the objective); fcfs and `expire=False` never do."""
    now = 100.0
    late = entry("late", arrival=98.0, slo=SLO(ttft_s=1.5))
    due = entry("due", arrival=99.0, slo=SLO(ttft_s=1.5))
    resumed = entry("resumed", arrival=90.0, first_token_at=91.0, generated=3, slo=SLO(ttft_s=1.5, tpot_s=0.1))
    plain = entry("plain", arrival=0.0)
    expired = SLOScheduler().expired([late, due, resumed, plain], now)
    assert [(e.id, reason.startswith("slo.ttft_s 1.5 s passed while the request waited")) for e, reason in expired] \
        == [("late", True)]
    assert SLOScheduler(expire=False).expired([late], now) == [] and sched.Scheduler().expired([late], now) == []


def test_slo_plans_with_the_step_times_made_slower_by_its_margin():
    """A prompt whose pause spends a running request's TPOT budget to within a few percent is admitted at the
    measured step times (margin 0) and waits under the default margin (10%: steps vary about their measure)."""
    times = StepTimes(decode_step_s=0.01, prefill_token_s=1e-4, prefill_chunk=64)
    assert times.scaled(2.0) == StepTimes(0.02, 2e-4, 64) and times.scaled(1.0) == times
    # 20 tokens expected, 10 sent, 0.02 s a token: at t = 90.18 its budget is 0.1 s (10 steps of 0.01 s).
    decoding = entry("d", arrival=89.0, first_token_at=90.0, generated=10, max_tokens=20, slo=SLO(tpot_s=0.02))
    prompt = entry("prompt", arrival=90.0, prompt=900, max_tokens=20)  # 15 chunks of 64: a 0.096 s pause
    exact = SLOScheduler(default_output_tokens=20, margin=0.0)
    assert [e.id for e in exact.admit([prompt], [decoding], 4, 90.18, times)] == ["prompt"]
    assert SLOScheduler(default_output_tokens=20).admit([prompt], [decoding], 4, 90.18, times) == []

    class Spy(SLOScheduler):  # every decision plans on the measured times made slower once, not twice
        def _order(self, waiting, running, now, planned):
            seen.append(planned)
            return super()._order(waiting, running, now, planned)

    seen, spy = [], Spy(default_output_tokens=20)
    spy.admit([prompt], [decoding], 4, 90.18, times)
    spy.preempt([prompt], [decoding], 0, 90.18, times)
    spy.order([prompt], [decoding], 90.18, times)
    assert len(seen) == 3 and all(planned == times.scaled(1.1) for planned in seen)


def test_preemption_picks_the_running_request_with_most_slack():
    lengths = TaskLengths(default=50)
    now = 100.0
    urgent = entry("urgent", arrival=99.5, slo=SLO(ttft_s=2.0))  # 1.39 s of slack
    tight = entry("tight", arrival=90, first_token_at=91.0, generated=5, slo=SLO(tpot_s=0.2))
    free = entry("free", arrival=95, first_token_at=96.0, generated=5)
    victim = sched.preemption_victim(urgent, [tight, free], now, TIMES, lengths)
    assert victim is free
    assert sched.preemption_victim(urgent, [tight], now, TIMES, lengths) is None  # tight has no time to spare
    ending = entry("ending", arrival=95, first_token_at=96.0, generated=5, max_tokens=8)  # done in 0.3 s
    assert sched.preemption_victim(urgent, [ending, free], now, TIMES, lengths) is None  # wait for it instead
    assert sched.preemption_victim(urgent, [entry("f", first_token_at=96.0, generated=5, preemptions=1)], now, TIMES,
                                   lengths) is None
    assert sched.preemption_victim(entry("calm", arrival=now), [free], now, TIMES, lengths) is None  # no deadline
    assert math.isinf(sched.running_slack_s(free, now, 50, TIMES))
    scheduler = SLOScheduler()
    assert scheduler.preempt([urgent], [tight, free], 0, now, TIMES) == [free]
    assert scheduler.preempt([urgent], [tight, free], 1, now, TIMES) == []  # a slot is free


def test_prompts_are_admitted_only_within_the_running_requests_pause_budgets():
    lengths = TaskLengths(default=20)
    times = StepTimes(decode_step_s=0.01, prefill_token_s=1e-3, prefill_chunk=64)  # a 64-token chunk: 0.064 s
    now = 100.0
    # 20 tokens expected, 10 sent, 0.02 s allowed per token: the last due at 90 + 19 x 0.02 = 90.38 s; at
    # t = 90.18, 10 more steps of 0.01 s leave 0.1 s of pause.
    decoding = entry("d", arrival=89.0, first_token_at=90.0, generated=10, max_tokens=20, slo=SLO(tpot_s=0.02))
    long, short = entry("long", prompt=128), entry("short", prompt=64)  # pauses 0.128 s, 0.064 s
    assert sched.pause_budget_s(decoding, 90.18, times, lengths) == pytest.approx(0.1)
    chosen = sched.admissible([long, short], [decoding], 4, 90.18, times, lengths)
    assert [e.id for e in chosen] == ["short"]  # the long prompt waits, the short one fits
    # A request admitted in the same turn is decoding while the next prompts run: its budget counts too.
    first = entry("first", prompt=16, max_tokens=3, slo=SLO(tpot_s=0.05))  # (3 - 1) x (0.05 - 0.01) = 0.08 s
    assert [e.id for e in sched.admissible([first, long, short], [], 4, now, times, lengths)] == ["first", "short"]
    # Prompt chunks already admitted spend the budgets first.
    prefilling = entry("p", prompt=64, prefill_left=64)
    assert sched.admissible([short], [decoding, prefilling], 4, 90.18, times, lengths) == []
    # ... but not a request's own: one still prefilling 640 tokens has (20 - 1) x (0.02 - 0.01) = 0.19 s for later ones.
    own = entry("own", prompt=640, prefill_left=640, max_tokens=20, slo=SLO(tpot_s=0.02))
    assert [e.id for e in sched.admissible([long, short], [own], 4, now, times, lengths)] == ["long"]
    assert [e.id for e in sched.admissible([long, short], [], 1, now, times, lengths)] == ["long"]  # nobody to pause
    assert sched.pause_budget_s(entry("no tpot"), now, times, lengths) == math.inf
    scheduler = SLOScheduler(default_output_tokens=20)
    assert [e.id for e in scheduler.admit([long, short], [decoding], 4, 90.18, times)] == ["short"]
    assert [e.id for e in scheduler.admit([long, short], [decoding], 4, 90.18, None)] == ["short", "long"]  # unmeasured
    assert [e.id for e in sched.Scheduler().admit([long, short], [decoding], 1, 90.18, times)] == ["long"]


def test_decode_step_times_by_batch_size():
    """The measured step of a batch size, linear between measured sizes, the nearest one's outside them, the
    overall step without any, never less than a smaller size's; JSON's lists of pairs come back sorted
    tuples."""
    flat = StepTimes(0.05, 1e-3, 64)
    assert sched.decode_step_at(flat, 7) == 0.05 and flat.at_batch(7) == flat
    grown = StepTimes(0.05, 1e-3, 64, [[4, 0.1], [1, 0.04], [2, 0.06]])
    assert grown.decode_by_batch == ((1, 0.04), (2, 0.06), (4, 0.1))
    steps = [sched.decode_step_at(grown, n) for n in (0, 1, 2, 3, 4, 16)]
    assert steps == pytest.approx([0.04, 0.04, 0.06, 0.08, 0.1, 0.1])
    noisy = StepTimes(0.05, 1e-3, 64, [[1, 0.04], [2, 0.08], [3, 0.003], [6, 0.12]])  # batch 3: a turn's noise
    steps = [sched.decode_step_at(noisy, n) for n in (2, 3, 4, 6)]
    assert steps == pytest.approx([0.08, 0.08, 0.09333, 0.12], rel=1e-3)  # never below a smaller batch's
    three = grown.at_batch(3)
    assert three.decode_step_s == pytest.approx(0.08) and three.decode_by_batch == grown.decode_by_batch


def test_the_loop_times_a_decode_step_over_turns_by_the_batch_of_the_step_it_read(ckpt):
    """Decode turns' seconds over the steps they read, summed over turns, count for the batch size of the step
    read (the engine runs steps ahead), only where neither the turn nor the PIPELINE_DEPTH (2) turns before
    prefilled (the ones after a prefill chunk waited for it or found their step done). A turn that waited for
    two steps (reading the engine's counters waits for the step in flight too) and the next, whose step was then
    done, give about a step each between them, where the next turn alone would say the step takes no time."""
    engine = load(ckpt)
    loop = ServingLoop(engine)
    engine.last_step_rows = 3
    loop._measure(0.3, positions=0, decoded=2, steps_read=1)  # the loop's first turns: nothing prefilled before
    assert loop._decode_by_batch == {}
    loop._measure(0.3, positions=0, decoded=2, steps_read=1)
    loop._measure(0.3, positions=0, decoded=2, steps_read=1)  # two decoding now, the step read had three
    assert loop._decode_by_batch == {3: 0.3}
    loop._measure(0.6, positions=0, decoded=2, steps_read=1)  # waited for the step in flight too
    loop._measure(0.0, positions=0, decoded=2, steps_read=1)  # its step was done
    assert loop._decode_by_batch[3] == pytest.approx(0.3, rel=0.1)
    before = loop._decode_by_batch
    loop._measure(0.5, positions=16, decoded=2, steps_read=1)  # a prefill turn
    loop._measure(0.9, positions=0, decoded=2, steps_read=1)  # behind that prefill's chunk
    loop._measure(0.001, positions=0, decoded=2, steps_read=1)  # its step done while the prompt's last chunk ran
    assert loop._decode_by_batch == before
    engine.last_step_rows = 2
    loop._measure(0.2, positions=0, decoded=2, steps_read=1)
    assert loop._decode_by_batch == {**before, 2: 0.2}
    assert loop.step_times.decode_by_batch == tuple(sorted({**before, 2: 0.2}.items()))


def test_admission_weighs_the_decode_steps_a_larger_batch_slows():
    """Where a decode step grows with the batch (an offloading engine moves the union of the batch's experts),
    a request is admitted only if the running requests can afford the growth over the steps they share with it,
    besides its prompt's pause; with flat step times the same request fits."""
    lengths = TaskLengths(default=20)
    flat = StepTimes(decode_step_s=0.01, prefill_token_s=1e-4, prefill_chunk=64)  # a 16-token prompt: 6.4 ms
    grows = StepTimes(0.01, 1e-4, 64, ((1, 0.01), (2, 0.02)))
    # 20 tokens expected, 10 sent, 0.02 s a token: at t = 90.18 its budget is 0.1 s (10 steps of 0.01 s).
    decoding = entry("d", arrival=89.0, first_token_at=90.0, generated=10, max_tokens=20, slo=SLO(tpot_s=0.02))
    short = entry("short", prompt=16, max_tokens=20)  # 20 expected steps: it shares the other's last 10
    assert [e.id for e in sched.admissible([short], [decoding], 4, 90.18, flat, lengths)] == ["short"]
    assert sched.admissible([short], [decoding], 4, 90.18, grows, lengths) == []  # 10 x 0.01 s more > 0.1 - 0.0064
    brief = entry("brief", prompt=16, max_tokens=5)  # 5 shared steps: 0.05 s of growth + 6.4 ms of prompt fit
    assert [e.id for e in sched.admissible([short, brief], [decoding], 4, 90.18, grows, lengths)] == ["brief"]
    # an admitted request's own budget is at the step of the batch it joins: (20 - 1) x (0.03 - 0.02) = 0.19 s,
    # short of the 20 x 0.01 s a second request would add to its steps
    roomy = StepTimes(0.01, 1e-4, 64, ((1, 0.02), (2, 0.03)))
    own = entry("own", prompt=16, max_tokens=20, slo=SLO(tpot_s=0.03))
    assert [e.id for e in sched.admissible([own, short], [], 4, 100.0, roomy, lengths)] == ["own"]


def test_simulated_decode_steps_follow_the_batch_size():
    """The simulated engine's decode step is the measured one of its batch size: two requests decoding
    together take the batch-2 step per token."""
    from moejax.serving.loadgen import Arrival
    from moejax.serving.simulate import simulate

    times = StepTimes(0.01, 0.0, 16, ((1, 0.01), (2, 0.05)))  # prompts take no time
    arrivals = [Arrival(0.0, "t", (1, 2, 3), 6), Arrival(0.0, "t", (4, 5, 6), 6)]
    records = simulate(arrivals, None, "fcfs", times, slots=2).records
    assert [r.tpot_s for r in records] == pytest.approx([0.05, 0.05])
    alone = simulate(arrivals[:1], None, "fcfs", times, slots=2).records[0]
    assert alone.tpot_s == pytest.approx(0.01)
    # Steps that vary (`variation`): each a lognormal factor of the measured time, the same for the same seed.
    long = [Arrival(0.0, "t", (1, 2, 3), 400)]
    varied = [simulate(long, None, "fcfs", times, slots=2, variation=0.3, seed=s).records[0].tpot_s for s in (1, 1, 2)]
    assert varied[0] == varied[1] != varied[2]
    assert varied[0] != pytest.approx(0.01, rel=1e-3) and varied[0] == pytest.approx(0.01 * np.exp(0.3**2 / 2), rel=0.1)


def test_simulated_serving_slo_keeps_tpot_objectives_fcfs_does_not():
    """The loop's turns in virtual time (`serving.simulate`) with the step times of the shipped model on an H100
    (decode step 0.84 ms, 0.11 ms a prompt position, chunks of 128): at twice the rate one slot serves, prompt
    chunks between decode steps cost fcfs's running requests their TPOT objectives, `slo` admits a prompt only
    where the running requests can afford its pause, and refuses queued requests whose TTFT objective passed
    (fcfs meets 3% of the objectives here, slo 65.0%; 52.5% with neither the expiry nor the 10% margin)."""
    from moejax.serving.loadgen import Arrival, poisson_arrivals
    from moejax.serving.simulate import simulate

    times = StepTimes(decode_step_s=0.00084, prefill_token_s=0.000112, prefill_chunk=128)
    rng = np.random.default_rng(0)
    tasks = {"chat": (40, 24), "summarize": (200, 12)}  # prompt tokens, output tokens
    slos = {"chat": SLO(ttft_s=0.03, tpot_s=0.003), "summarize": SLO(ttft_s=0.08, tpot_s=0.003)}
    names = list(tasks)
    arrivals = [Arrival(float(t), names[i % 2], tuple(range(tasks[names[i % 2]][0])), tasks[names[i % 2]][1])
                for i, t in enumerate(poisson_arrivals(60.0, seed=1, count=200))]
    rng.shuffle(arrivals)  # simulate sorts by arrival time
    fcfs = simulate(arrivals, slos, "fcfs", times, slots=16, max_queue=256).summary
    slo = simulate(arrivals, slos, SLOScheduler(), times, slots=16, max_queue=256).summary
    # slo refuses what cannot meet its TTFT objective (on arrival, or in the queue once it passed: 'expired')
    assert fcfs["completed"] == 200 and slo["completed"] + slo["refused"] == 200
    assert slo["outcomes"]["expired"] > 0
    assert slo["attainment_pct"] >= fcfs["attainment_pct"] + 20
    assert slo["tpot_p99_s"] <= 0.003 < fcfs["tpot_p50_s"]
    again = simulate(arrivals, slos, SLOScheduler(), times, slots=16, max_queue=256).summary
    assert again == slo  # virtual time: the same run twice
    # One request alone: its first token after its prompt's chunks, then one a decode step.
    alone = simulate(arrivals[:1], slos, "fcfs", times, slots=16).records[0]
    prompt, tokens = len(arrivals[0].prompt_ids), arrivals[0].max_tokens
    positions = sched.padded_prompt_tokens(prompt, 128)
    assert alone.ttft_s == pytest.approx(positions * times.prefill_token_s)
    assert alone.tpot_s == pytest.approx(times.decode_step_s) and alone.tokens == tokens


def test_simulated_serving_refuses_a_policy_that_admits_nothing():
    from moejax.serving.loadgen import Arrival
    from moejax.serving.simulate import simulate

    class Idle(sched.Scheduler):
        name = "idle"

        def admit(self, waiting, running, free_slots, now, times):
            return []

    arrivals = [Arrival(0.0, "t", (1, 2, 3), 4)]
    with pytest.raises(ParameterError, match=r"^scheduler 'idle' admitted none of 1 waiting requests into 2 free"):
        simulate(arrivals, None, Idle(), StepTimes(0.01, 1e-3, 16), slots=2)
