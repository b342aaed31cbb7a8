"""Wide decode steps run as layer programs with whole layers staged by the host (`engine.layer_stream`): the same
tokens, routing and cache counters as the fused step program, the tokens of the all-resident engine and of a
sequence run alone."""

import jax
import numpy as np
import pytest

from moejax.cards import load_card
from moejax.engine.layer_stream import LayerStream
from moejax.errors import ParameterError
from scripts.bench_prefetch import RoutingReplay
from scripts.benchlib import build_random_engine, pinned_stacks, random_dense_params, tiny_widths
from test_bench_scripts import random_trace


@pytest.fixture(scope="module")
def model():
    cfg = tiny_widths(load_card("deepseek-v2-lite", num_layers=7))  # a dense layer, then 6 MoE layers of 64 experts
    return cfg, random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0])


_RUNS = {}  # runs that several tests compare with, made once


def run(model, mode, batch=16, replayed=True, **options):
    """`run_once`, remembered."""
    key = (mode, batch, replayed, tuple(sorted(options.items())))
    if key not in _RUNS:
        _RUNS[key] = run_once(model, mode, batch, replayed, **options)
    return _RUNS[key]


def run_once(model, mode, batch=16, replayed=True, **options):
    """`batch` prompts decoded together (16 rows need ~51 of a layer's 64 experts: wide at whole_layer_from 39)."""
    cfg, dense, stacks = model
    if mode == "cached":
        options = {"expert_budget": "0.7", **options}  # 268 slots: 4.2 of the 6 MoE layers
    engine = build_random_engine(cfg, mode, dense, stacks, slots=batch, max_seq_len=48, prefill_chunk=8, **options)
    if replayed:
        trace = random_trace(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, seq_lens=[40] * 16, seed=5)
        replay = RoutingReplay(trace)
        for slot in range(batch):
            replay.assign(slot, slot)
        engine.routing_override = replay
    prompts = [[1 + b, 2 + b, 3, 4, 5][: 2 + b % 4] for b in range(batch)]
    result = engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
    return engine, result


def test_layer_programs_give_the_fused_steps_tokens_and_counts(model):
    """Decode steps of 16 rows and prompt chunks of 8 tokens (wide: up to 48 of 64 experts); replayed routing (the
    router's own: the next test). The logits of prompts run as layer programs are the fused chunk's too."""
    fused_engine, fused = run(model, "cached", layer_stream="off")
    engine, streamed = run(model, "cached")
    assert fused_engine.layer_stream is None and isinstance(engine.layer_stream, LayerStream)
    assert engine.spec.whole_layer_from == 39
    _, resident = run(model, "resident")
    assert streamed.tokens == fused.tokens == resident.tokens
    _, alone = run(model, "cached", batch=1)  # one program a step: never wide
    assert alone.tokens[0] == streamed.tokens[0]
    for b in range(16):
        np.testing.assert_array_equal(engine.routing(b)[0], fused_engine.routing(b)[0])
    assert LayerStream.programs_compiled() >= 4  # begin, dense, a MoE layer with and without a staged copy, end
    stats = streamed.stats["layer_stream"]
    assert stats["steps"] == 9 and stats["chunks"] == 16 and stats["layers_staged"] > 0 and stats["most_at_once"] <= 2
    assert stats["bytes_staged"] == stats["layers_staged"] * model[0].num_experts * engine.expert_bytes
    assert streamed.stats["per_layer"] == fused.stats["per_layer"] and streamed.stats["total"] == fused.stats["total"]
    assert fused.stats["total"]["streamed"] > 0  # some layer steps copied their layer whole
    prompts = [[7, 8, 9, 10, 11, 12], [3, 4]]  # prompt chunks of 8 tokens (6 and 2 real) run as layer programs too
    for want, got in zip(fused_engine.logits(prompts), engine.logits(prompts), strict=True):
        np.testing.assert_array_equal(got, want)


def test_with_the_lookahead_and_trace_prefetchers_too(model):
    """The lookahead's guesses (made in each layer program, for the next) and the staged trace picks (installed by
    the first program) leave tokens, guesses and counters as the fused step's."""
    options = dict(replayed=False, prefetch="trace+lookahead")
    fused_engine, fused = run(model, "cached", layer_stream="off", **options)
    engine, streamed = run(model, "cached", **options)
    assert streamed.stats["layer_stream"]["layers_staged"] > 0 and streamed.tokens == fused.tokens
    assert streamed.stats["total"] == fused.stats["total"] and streamed.stats["total"]["prefetch_issued"] > 0
    for b in range(16):
        guesses = engine.routing(b)[1]
        assert guesses is not None and (guesses >= 0).any()
        np.testing.assert_array_equal(guesses, fused_engine.routing(b)[1])


def test_guesses_recorded_after_load_come_from_the_layer_programs_too(model):
    """`record_guesses` (as `moejax trace` calls it) changes the engine's spec after load: the layer programs follow it
    and record each step's guesses (they once kept the old spec, and `routing` failed on the missing rows)."""
    engine, _ = run(model, "cached")
    engine.record_guesses()
    result = engine.generate([[1, 2, 3], [4, 5]] * 8, max_new_tokens=4, ignore_eos=True)
    assert result.stats["layer_stream"]["steps"] > 0
    for b in range(16):
        experts, guesses = engine.routing(b)
        assert guesses is not None and guesses.shape == experts.shape and (guesses >= 0).any()


def test_each_streamed_step_returns_its_tokens_before_the_next_is_dispatched(model):
    """A step of layer programs is dispatched only once none is in flight, so `decode` returns each step's tokens
    right after it (one program a step keeps two in flight), and leaves the copies of the next step's first staged
    layers under way."""
    run(model, "cached")  # compiled
    cfg, dense, stacks = model
    engine = build_random_engine(cfg, "cached", dense, stacks, slots=16, max_seq_len=48, prefill_chunk=8,
                                 expert_budget="0.7")
    for slot in range(16):
        engine.prefill(slot, [1 + slot, 2, 3])
    prestaged = 0
    for call in range(1, 4):
        assert len(engine.decode()) == 16
        assert engine.layer_stream.steps == call and not engine._inflight
        assert list(engine.layer_stream._prestaged) == engine.layer_stream.staged_layers()[:2]
        prestaged += len(engine.layer_stream._prestaged)
    assert prestaged > 0


def test_the_step_api_in_any_order_gives_the_fused_steps_tokens(model):
    """Prompts begun, prefilled, decoded and released in a serving loop's order: the layer programs' tokens are the
    fused steps' (the steps read before a streamed one is dispatched, and the prefill chunks run between)."""
    tokens = []
    for layer_stream in ("off", "auto"):
        engine, _ = run(model, "cached", layer_stream=layer_stream)
        produced, streamed = [], engine.layer_stream.steps if engine.layer_stream else 0
        for slot in range(12):
            engine.prefill(slot, [3 + slot, 5, 7])
        produced += [engine.decode(), engine.decode()]
        for slot in range(4):
            engine.release(slot, keep_routing=False)
            engine.begin_prefill(slot, [9, slot + 1, 4, 4])
            produced.append(engine.prefill_step(slot))
        produced += [engine.decode() for _ in range(3)]
        for slot in range(12):
            engine.release(slot, keep_routing=False)
        tokens.append(produced)
    assert engine.layer_stream.steps >= streamed + 5  # every decode step of 12 rows ran as layer programs
    assert tokens[1] == tokens[0] and len(tokens[0][0]) == 12


def test_the_steps_read_the_staged_copies(model, monkeypatch):
    """Staging each layer's successor instead changes the tokens: the layer steps computed out of the staged copies."""
    _, right = run(model, "cached")
    stage = LayerStream._stage
    monkeypatch.setattr(LayerStream, "_stage", lambda self, m: stage(self, (m + 1) % len(self.host)))
    _, wrong = run_once(model, "cached")
    assert wrong.tokens != right.tokens


def test_narrow_steps_stay_one_program(model):
    """A batch of 2 needs at most 12 experts a layer: never wide, never layer programs."""
    engine, result = run(model, "cached", batch=2)
    assert result.stats["layer_stream"]["steps"] == 0 and engine.spec.whole_layer_from == 39


def test_only_cached_single_device_engines_stream_and_bad_values_are_named(model):
    cfg, dense, stacks = model
    resident = build_random_engine(cfg, "resident", dense, stacks, slots=2, max_seq_len=32, prefill_chunk=8)
    assert resident.layer_stream is None and "layer_stream" not in resident.stats()
    with pytest.raises(ParameterError, match="layer_stream.*'sometimes'"):
        build_random_engine(cfg, "cached", dense, stacks, slots=2, max_seq_len=32, prefill_chunk=8,
                            layer_stream="sometimes")


def test_a_device_without_room_for_two_staged_layers_is_named():
    """`room_problem`: two layers' stacks must fit past what is placed and the workspace (512 MiB at least)."""
    from moejax.engine.layer_stream import room_problem

    class Device:
        def __init__(self, free):
            self.free = free

        def memory_stats(self):
            return {"bytes_limit": 8 * 2**30, "bytes_in_use": 8 * 2**30 - self.free}

    host = ({"w": np.zeros((4, 2**20), np.float32)},) * 3  # 16 MiB a layer
    assert room_problem(Device(2**30), host) is None
    problem = room_problem(Device(512 * 2**20 + 2**20), host)
    assert problem.startswith("2 staged layers take 0.03 GiB, and 0.00 GiB are free"), problem
