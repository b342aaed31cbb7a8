"""Compact expert formats (int8 / int4, `models.quantized`, `offload.expert_format`) and CPU compute of missed
experts (`offload.cpu_experts`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import moejax
from moejax import checkpoint
from moejax.cli import main as moejax_cli
from moejax.convert.export import export
from moejax.engine.loading import build_engine
from moejax.errors import MoejaxError, ParameterError
from moejax.models.moe import experts_from_slab, routed_experts
from moejax.models.quantized import GROUP_SIZE, dequantize, quantize
from moejax.offload.config import OffloadConfig
from moejax.offload.cpu_experts import CostModel, HostExperts, host_experts, split_misses
from moejax.offload.expert_format import ExpertFormat
from moejax.offload.stats import summary_line

SHIPPED = moejax.SHIPPED_CHECKPOINT
PROMPT = [5, 17, 300, 42, 99, 7, 1000, 3, 250, 12, 64, 900, 31, 8, 77, 2048]


def reference_quantize(w, levels, group):
    """Independent reference: a plain loop over groups and columns, float64."""
    rows, cols = w.shape
    out = np.zeros_like(w, dtype=np.float64)
    for g in range(rows // group):
        for c in range(cols):
            block = w[g * group:(g + 1) * group, c].astype(np.float64)
            scale = np.float32(np.abs(block).max() / levels)
            codes = np.clip(np.round(block / scale), -levels, levels) if scale > 0 else np.zeros(group)
            out[g * group:(g + 1) * group, c] = codes * scale
    return out


@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int4", 7)])
def test_quantize_round_trip_matches_a_plain_loop(fmt, levels):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2 * GROUP_SIZE, 5)).astype(np.float32)
    w[:GROUP_SIZE, 0] = 0.0  # an all-zero group
    codes, scales = quantize(w, fmt, np.float32)
    assert scales.shape == (2, 5) and codes.shape == ((2 * GROUP_SIZE, 5) if fmt == "int8" else (GROUP_SIZE, 5))
    back = np.asarray(dequantize(codes, scales))
    np.testing.assert_allclose(back, reference_quantize(w, levels, GROUP_SIZE), rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(back - w) <= np.repeat(scales, GROUP_SIZE, axis=0) / 2 + 1e-6)
    np.testing.assert_array_equal(dequantize(codes, scales, np, np.float32), back)  # the host's NumPy twin
    if fmt == "int4":  # row 2i in byte row i's low nibble, row 2i + 1 in its high nibble, offset by 8
        code = lambda r, c: int(np.rint(w[r, c] / scales[r // GROUP_SIZE, c]))  # noqa: E731
        assert codes[3, 2] == (code(6, 2) + 8) | ((code(7, 2) + 8) << 4)


@pytest.mark.parametrize("how", ["union", "grouped", "ragged", "capacity"])
def test_every_expert_compute_dequantizes_a_compact_slab(how):
    """Each expert compute on an int4 slab gives the bits it gives on the slab's dequantized float weights."""
    rng = np.random.default_rng(2)
    S, D, F, N = 5, 64, 64, 6
    slab = {name: rng.standard_normal((S,) + shape).astype(np.float32)
            for name, shape in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D)))}
    compact = ExpertFormat("int4", "float32").convert(slab, "test")
    floats = {name: dequantize(compact[name], compact[name + "_scale"]) for name in slab}
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(S, 2, replace=False) for _ in range(N)]), jnp.int32)
    weights = jnp.full((N, 2), 0.5, jnp.float32)
    distinct = jnp.arange(S, dtype=jnp.int32)
    run = lambda slab: routed_experts(how, x, ids, weights, distinct, distinct[::-1], slab, capacity=N)  # noqa: E731
    np.testing.assert_array_equal(run({n: jnp.asarray(w) for n, w in compact.items()}), run(floats))
    assert not np.allclose(run(floats), run({n: jnp.asarray(w) for n, w in slab.items()}), atol=1e-3)


def test_compact_bytes_and_budgets():
    shapes = {"gate": ((4096, 14336), np.dtype(jnp.bfloat16)), "up": ((4096, 14336), np.dtype(jnp.bfloat16)),
              "down": ((14336, 4096), np.dtype(jnp.bfloat16))}
    params = 3 * 4096 * 14336
    assert ExpertFormat("bf16", "bfloat16").expert_bytes(shapes) == 2 * params
    assert ExpertFormat("int8", "bfloat16").expert_bytes(shapes) == params + 2 * params // GROUP_SIZE
    assert ExpertFormat("int4", "bfloat16").expert_bytes(shapes) == params // 2 + 2 * params // GROUP_SIZE


@pytest.fixture(scope="module")
def logits_by_format():
    """Prefill logits of the shipped model per format (resident), and int8 in cached mode at 25%."""
    out, stats = {}, {}
    for fmt, mode in (("bf16", "resident"), ("int8", "resident"), ("int4", "resident"), ("int8", "cached"),
                      ("int4", "on-demand")):
        engine = moejax.load(SHIPPED, mode, slots=1, max_seq_len=32, expert_format=fmt,
                             **({"expert_budget": "0.25"} if mode == "cached" else {}))
        out[fmt, mode] = engine.logits([PROMPT])[0]
        stats[fmt, mode] = engine.stats()
    return out, stats


def test_formats_through_the_engine(logits_by_format):
    """int8 keeps the bf16 model's next-token choice at >= 14 of 16 prompt positions and its logits within 10% of
    their range (int4: looser); a format gives the same bits resident and cached; the stats say the format and
    count compact bytes, and a 25% budget holds more compact experts."""
    logits, stats = logits_by_format
    ref = logits["bf16", "resident"]
    spread = ref.max() - ref.min()
    errors = {fmt: np.abs(logits[fmt, "resident"] - ref).max() / spread for fmt in ("int8", "int4")}
    agree = {fmt: (logits[fmt, "resident"].argmax(-1) == ref.argmax(-1)).sum() for fmt in ("int8", "int4")}
    assert 0 < errors["int8"] < 0.1 and errors["int8"] < errors["int4"] < 0.3, errors
    assert agree["int8"] >= 14, agree
    np.testing.assert_array_equal(logits["int8", "cached"], logits["int8", "resident"])
    np.testing.assert_array_equal(logits["int4", "on-demand"], logits["int4", "resident"])
    cached = stats["int8", "cached"]
    assert cached["expert_format"] == "int8" and cached["expert_format_approximate"] and cached["expert_group_size"] == 64
    assert summary_line(cached, 1).endswith("; experts int8: approximate")
    assert stats["bf16", "resident"]["expert_format"] == "bf16" and not stats["bf16", "resident"]["expert_format_approximate"]
    assert cached["expert_bytes"] == 38016 < 73728 // 1.9  # 3 x 192 x 64 int8 codes + bf16 scales
    assert cached["capacity_experts"] == int(0.25 * 128 * 73728) // 38016  # the fraction is of the bf16 bytes
    assert cached["total"]["bytes_h2d"] == cached["total"]["misses"] * 38016


def test_compact_checkpoint_round_trip(tmp_path, logits_by_format, capsys):
    """export -> convert --expert-format int8 -> a checkpoint that says int8 (info), loads int8 without the flag
    and gives the logits of load-time int8; only int8 (asking bf16 of it is refused)."""
    hf, compact = tmp_path / "hf", tmp_path / "compact"
    assert moejax_cli(["export", str(SHIPPED), str(hf), "--quiet"]) == 0
    assert moejax_cli(["convert", str(hf), str(compact), "--expert-format", "int8", "--quiet"]) == 0
    capsys.readouterr()
    assert moejax_cli(["info", str(compact), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expert_format"] == "int8"
    assert checkpoint.load_expert(compact, 0, 0)["gate"].dtype == np.int8
    engine = moejax.load(compact, slots=1, max_seq_len=32)
    assert engine.stats()["expert_format"] == "int8"
    np.testing.assert_array_equal(engine.logits([PROMPT])[0], logits_by_format[0]["int8", "resident"])
    with pytest.raises(ParameterError, match="stores int8 experts"):
        moejax.load(compact, expert_format="bf16")
    with pytest.raises(MoejaxError, match="stored int8 .* export the one it was converted from"):
        export(compact, tmp_path / "again", show_progress=False)
    cfg = checkpoint.load_config(SHIPPED)
    original, restored = (checkpoint.load_stacked_experts(c, cfg, 0) for c in (SHIPPED, compact))
    assert restored["gate"].dtype == original["gate"].dtype  # whole-model readers get float weights back
    original, restored = original["gate"].astype(np.float32), restored["gate"].astype(np.float32)
    # half an int8 step, plus the bf16 rounding of the dequantized weight
    assert 0 < np.abs(restored - original).max() <= np.abs(original).max() * (1 / 254 + 2**-8)


def test_bad_formats_are_refused_in_one_line(capsys):
    with pytest.raises(ParameterError, match="expert_format 'int3' is not one of bf16, int8, int4"):
        moejax.load(SHIPPED, expert_format="int3")
    assert moejax_cli(["generate", "--prompt", "x", "--expert-format", "int3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moejax: error: --expert-format 'int3' is not one of bf16, int8, int4")
    fmt = ExpertFormat("int8", "bfloat16")
    codes, scales = quantize(np.ones((64, 8), np.float32), "int8", jnp.bfloat16)
    with pytest.raises(MoejaxError, match=r"^ckpt: MoE layer 2: compact expert weight 'down' has no scale 'down_scale'$"):
        fmt.convert({"gate": codes, "gate_scale": scales, "down": codes}, "ckpt: MoE layer 2")
    with pytest.raises(ParameterError, match="input dimension 100, not a multiple of the quantization group size 64"):
        fmt.check({"gate": ((100, 8), np.float32)})
    with pytest.raises(ParameterError, match="cpu_experts 'auto' .* needs offload cached, not 'resident'"):
        moejax.load(SHIPPED, cpu_experts="auto")
    with pytest.raises(ParameterError, match="cpu_experts 'auto-float32' widens float experts, not compact ones"):
        moejax.load(SHIPPED, "cached", expert_budget="0.5", expert_format="int8", cpu_experts="auto-float32")
    with pytest.raises(ParameterError, match="cpu_experts 'auto-float32' keeps a float32 copy .* use 'auto'"):
        moejax.load(SHIPPED, "cached", expert_budget="0.5", host_budget="0.5", cpu_experts="auto-float32")
    assert not (SHIPPED / "expert_files").exists()  # refused before the disk tier wrote a file
    stack = {"gate": np.zeros((2, 64, 8), np.float32), "up": np.zeros((2, 64, 8), np.float32),
             "down": np.zeros((2, 8, 64), np.float32)}
    with pytest.raises(ParameterError, match=r"^cpu_cost: unknown fields link \(fields: "):
        host_experts((stack,), [stack], "silu", 1, {"link": 1e9}, 8)


def test_cost_model_choice_on_synthetic_bandwidths():
    # Mixtral expert (352 MB) over a 50 GB/s link: 7.05 ms; host 1 ms + 2 ms per token -> up to 3 tokens
    model = CostModel(352_321_536, 50e9, 1e-3, 2e-3)
    assert model.host_token_limit() == 3 and model.host_s(3) < model.copy_s() < model.host_s(4)
    assert CostModel(352_321_536, 50e9, 8e-3, 1e-4).host_token_limit() == 0  # the host's fixed cost alone loses
    assert CostModel(352_321_536, 5e9, 1e-3, 1e-3).host_token_limit() == 69  # a slow link: 70.5 ms
    # Inside the program: of a layer's misses, the host takes the ones it is fastest at while that shortens the
    # later of host and link (working at once); hits stay on the device.
    E = 6
    table = jnp.array([-1] * E + [0, -1, -1, -1, -1, 1], jnp.int32)  # layer 1: experts 0 and 5 resident
    ids = jnp.array([[0, 1], [1, 2], [2, 3], [2, 4], [3, 5], [4, 1]], jnp.int32)  # tokens 1, 3, 3, 2, 2, 1
    weights = jnp.full((6, 2), 0.5, jnp.float32)
    distinct = jnp.arange(E, dtype=jnp.int32)

    def split(copy_s, fixed_s, per_token_s, most_tokens=8, round_trip_s=0.0, layer_copy_s=None, whole=None):
        cost = CostModel(1000, 1000 / copy_s, fixed_s, per_token_s, round_trip_s, layer_copy_s)
        return split_misses(table, 1, distinct, ids, weights, None, E, cost, most_tokens, whole)

    # misses 1, 2, 3, 4 (tokens 3, 3, 2, 2); host 1 s a token, link 3 s: 3, 4 on the host (4 s) beat any other split
    device_distinct, device_weights, on_host = split(3.0, 0.0, 1.0)
    np.testing.assert_array_equal(on_host, [False, False, False, True, True, False])
    np.testing.assert_array_equal(device_distinct, [0, 1, 2, 5, 6, 6])
    np.testing.assert_array_equal(device_weights[2:4], [[0.5, 0], [0.5, 0]])
    assert split(3.0, 0.0, 1.0, most_tokens=1)[2].sum() == 0  # no miss routed few enough tokens
    assert split(100.0, 0.0, 1.0)[2].sum() == 4 and split(1.0, 5.0, 0.0)[2].sum() == 0  # slow link; slow host
    # host 1.4 s an expert, link 1 s: two each way (2.8 s; ties taken by id) beat all four copied (4 s)
    np.testing.assert_array_equal(split(1.0, 1.4, 0.0)[2], [False, True, True, False, False, False])
    # ... unless the callbacks' round trip, paid once by a layer that sends anything, eats the gain
    assert split(1.0, 1.4, 0.0, round_trip_s=2.7)[2].sum() == 0  # one on the host: 4.1 s against 4
    np.testing.assert_array_equal(split(1.0, 1.4, 0.0, round_trip_s=0.1)[2], [False, True, True, False, False, False])
    assert CostModel(352_321_536, 50e9, 1e-3, 2e-3, round_trip_s=4e-3).host_token_limit() == 1  # 3 ms a token left
    # A wide step that would copy its whole layer: the host taking none costs that copy, not four fetches
    two_each = [False, True, True, False, False, False]
    np.testing.assert_array_equal(split(1.0, 1.4, 0.0, layer_copy_s=3.5, whole=jnp.bool_(True))[2], two_each)
    assert split(1.0, 1.4, 0.0, layer_copy_s=2.0, whole=jnp.bool_(True))[2].sum() == 0  # the copy's 2 s beat 2.8
    np.testing.assert_array_equal(split(1.0, 1.4, 0.0, layer_copy_s=2.0, whole=jnp.bool_(False))[2], two_each)
    # without a measured copy, a layer's E copies of one expert (6 s)
    np.testing.assert_array_equal(split(1.0, 1.4, 0.0, whole=jnp.bool_(True))[2], two_each)


def test_the_cost_model_times_the_host_on_experts_read_from_memory(monkeypatch):
    """measure() times the host function on a different expert at every call (a small expert computed again and
    again would be read from the CPU's caches) and measures the callbacks' round trip."""
    rng = np.random.default_rng(0)
    stacks = [{name: rng.standard_normal((3,) + shape).astype(np.float32) * 0.05
               for name, shape in (("gate", (16, 8)), ("up", (16, 8)), ("down", (8, 16)))} for _ in range(2)]
    computed = []
    real = HostExperts.expert_output

    def recorded(self, layer, expert, *rest):
        computed.append((layer, expert))
        return real(self, layer, expert, *rest)

    monkeypatch.setattr(HostExperts, "expert_output", recorded)
    experts = host_experts(tuple(stacks), stacks, "silu", 4 * 16 * 8 * 3, None, 8)
    assert set(computed) == {(m, e) for m in range(2) for e in range(3)}  # all 6, cycled through
    assert computed[:6] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert experts.cost.round_trip_s >= 0 and experts.cost.host_fixed_s + experts.cost.host_per_token_s > 0


@pytest.mark.parametrize("slow_rounds,warned", [(0, False), (1, False), (2, True)])
def test_a_slow_host_is_timed_again_and_named(monkeypatch, caplog, slow_rounds, warned):
    """measure() times a host that reads a 64 MiB expert at under 2 GB/s a second time and keeps the faster times;
    one still that slow gets a warning naming its rate (a busy host would otherwise silently get few experts)."""
    rng = np.random.default_rng(0)
    stacks = [{name: rng.standard_normal((2,) + shape).astype(np.float32)
               for name, shape in (("gate", (16, 8)), ("up", (16, 8)), ("down", (8, 16)))}]
    calls, per_round = [], 2 * (1 + 3 + 2)  # two row counts, each one untimed call and repeats + 2 timed ones
    real = HostExperts.expert_output

    def timed(self, *args):
        calls.append(1)
        if len(calls) <= slow_rounds * per_round:
            time.sleep(0.05)  # 64 MiB in 50 ms: 1.3 GB/s
        return real(self, *args)

    monkeypatch.setattr(HostExperts, "expert_output", timed)
    with caplog.at_level(logging.WARNING, logger="moejax.offload.cpu_experts"):
        experts = host_experts(tuple(stacks), stacks, "silu", 64 << 20, None, 8)
    assert len(calls) == (per_round if slow_rounds == 0 else 2 * per_round)
    assert (experts.cost.host_fixed_s > 0.04) == warned
    assert ("cpu_experts: the host computed one 64.0 MiB expert in" in caplog.text) == warned


@pytest.mark.parametrize("host_fixed_s,noted", [(1e-9, True), (10.0, False)])
def test_a_host_slower_in_the_steps_than_its_cost_model_is_named(caplog, host_fixed_s, noted):
    """stats() reports the host's seconds in the steps over the cost model's estimate of them (x_cost_model); past
    1.5x over 16 experts or more, a note says so, once (on an H100's host `auto` ran slower than copying at 1.59x)."""
    rng = np.random.default_rng(0)
    stacks = [{name: rng.standard_normal((4,) + shape).astype(np.float32)
               for name, shape in (("gate", (16, 8)), ("up", (16, 8)), ("down", (8, 16)))}]
    experts = HostExperts.from_stacks(stacks, "silu", 8)
    experts.cost = CostModel(64, 1e9, host_fixed_s, 0.0)
    x, ids = rng.standard_normal((2, 16)).astype(np.float32), np.asarray([[0, 1], [2, 3]], np.int32)
    with caplog.at_level(logging.WARNING, logger="moejax.offload.cpu_experts"):
        for _ in range(3):  # 4 experts a call: 12, under 16
            experts.compute(0, x, ids, np.ones((2, 2), np.float32), np.ones(4, bool))
        assert experts.stats()["x_cost_model"] is not None and "cpu_experts: the host took" not in caplog.text
        for _ in range(5):  # 32 experts in all
            experts.compute(0, x, ids, np.ones((2, 2), np.float32), np.ones(4, bool))
        stats, again = experts.stats(), experts.stats()
    assert stats["experts"] == 32 and (stats["x_cost_model"] > 1.5) is noted and again["x_cost_model"] > 0
    assert caplog.text.count("cpu_experts: the host took") == int(noted)
    assert "x_cost_model" not in HostExperts.from_stacks(stacks, "silu", 8).stats()  # no cost model, no ratio


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("link_bytes_per_s,losing", [(1e15, True), (1e-3, False)])
def test_host_work_the_device_waits_for_is_counted(overlap, link_bytes_per_s, losing):
    """A layer step's `finish` counts the seconds since its `start` (the device's own work meanwhile) and those it
    waited for the host's sum; where the waits outweigh the link time the host's experts saved (x_saved > 1, over 16
    experts or more), `losing` says why."""
    rng = np.random.default_rng(0)
    stacks = [{name: rng.standard_normal((4,) + shape).astype(np.float32)
               for name, shape in (("gate", (16, 8)), ("up", (16, 8)), ("down", (8, 16)))}]
    experts = HostExperts.from_stacks(stacks, "silu", 8)
    experts.overlap, experts.cost = overlap, CostModel(64, link_bytes_per_s, 1e-3, 0.0)
    x, ids = rng.standard_normal((2, 16)).astype(np.float32), np.asarray([[0, 1], [2, 3]], np.int32)
    for step in range(8):  # 4 experts a layer step: 32
        assert (experts.losing() is not None) == (losing and step >= 4)
        ticket = experts.start(0, x, ids, np.ones((2, 2), np.float32), np.ones(4, bool))
        time.sleep(0.002)  # the device's own fetches and compute
        experts.finish(ticket)
    stats = experts.stats()
    assert stats["experts"] == 32 and stats["layer_steps"] == 8 and stats["window_s"] >= 8 * 0.002
    assert stats["wait_s"] > 0 and (stats["x_saved"] > 1) is losing
    assert (experts.losing() or "").startswith("the device waited ") is losing
    experts.reset()
    assert experts.stats()["layer_steps"] == 0 and experts.stats()["wait_s"] == 0 and experts.losing() is None


@pytest.mark.parametrize("dtype,fmt,library,tolerance", [(jnp.float32, None, "auto", 1e-6),
                                                         (jnp.float32, None, "xla", 1e-6),
                                                         (jnp.bfloat16, None, "xla", 1e-2),
                                                         (jnp.bfloat16, None, "torch", 1e-2),
                                                         (jnp.bfloat16, "int4", "auto", 1e-2)])
def test_host_expert_outputs_match_the_device_path(dtype, fmt, library, tolerance):
    """The host's expert compute against the device's union compute on the same weights: float32 to 1e-6 of the
    output's largest value, bfloat16 (XLA's float32 blocks or torch's bf16 products; int4 weights dequantized to
    it) to 1e-2 (about two bf16 ulps)."""
    rng = np.random.default_rng(1)
    E, D, F, N, k = 6, 128, 64, 5, 2
    stack = {name: (rng.standard_normal((E,) + shape) * 0.05).astype(dtype)
             for name, shape in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D)))}
    if fmt is not None:
        stack = ExpertFormat(fmt, "bfloat16").convert(stack, "test")
    x = rng.standard_normal((N, D)).astype(dtype)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32)
    weights = rng.random((N, k)).astype(np.float32)
    distinct = jnp.arange(E, dtype=jnp.int32)
    device = np.asarray(experts_from_slab(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), distinct, distinct,
                                          {name: jnp.asarray(w) for name, w in stack.items()}))
    host = HostExperts.from_stacks([stack], "silu", 8, library)
    assert host.stats()["library"] == ("xla" if library == "xla" or fmt else "torch")  # torch: float experts
    host.threads = 1
    out = host.compute(0, x, ids, weights, np.ones(E, bool))
    assert np.abs(out - device).max() <= tolerance * np.abs(device).max()
    assert host.stats()["experts"] == E and host.stats()["tokens"] == N * k
    host.threads = 3  # the experts on three threads, each in three row ranges: as close, and the same bits each time
    threaded = host.compute(0, x, ids, weights, np.ones(E, bool))
    assert np.abs(threaded - device).max() <= tolerance * np.abs(device).max()
    np.testing.assert_array_equal(host.compute(0, x, ids, weights, np.ones(E, bool)), threaded)
    alone = np.arange(E) == ids[0, 0]  # a lone host expert gets every thread for its row ranges (bf16, compact)
    host.threads = 1
    one_thread = host.compute(0, x, ids, weights, alone)
    host.threads = 3
    np.testing.assert_allclose(host.compute(0, x, ids, weights, alone), one_thread, rtol=1e-5,
                               atol=1e-6 * np.abs(one_thread).max())


def shipped_cached_at_25(**options):
    """The shipped model in float32 (`shipped_in_float32`), cached at 25%, one slot of 32 tokens; `options` for
    `build_engine`."""
    cfg, globals_, layers, stacks = shipped_in_float32()
    return build_engine(cfg, globals_, layers, iter(stacks), OffloadConfig("cached", expert_budget="0.25"), slots=1,
                        max_seq_len=32, **options)


@functools.cache
def shipped_in_float32():
    """The shipped model's (config, globals, layers, expert stacks), every weight in float32."""
    cfg = checkpoint.load_config(SHIPPED).replace(dtype="float32")
    as32 = lambda tree: {k: as32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}  # noqa: E731
    layers = [as32(checkpoint.load_layer(SHIPPED, i)) for i in range(cfg.num_layers)]
    stacks = [as32(checkpoint.load_stacked_experts(SHIPPED, cfg, layer)) for layer in cfg.moe_layer_ids]
    return cfg, as32(checkpoint.load_globals(SHIPPED)), layers, stacks


def test_cpu_experts_in_the_cached_engine():
    """The shipped model in float32, cached at 25%: with a cost model that sends every miss to the host, no expert
    crosses the link, the stats count the host's experts and tokens, and the logits equal the copy-only engine's
    to float rounding (1e-4 of their range)."""
    cfg = shipped_in_float32()[0]
    copying = shipped_cached_at_25()
    ref = copying.logits([PROMPT])[0]
    host_first = shipped_cached_at_25(cpu_experts="auto", cpu_cost=CostModel(cfg.expert_bytes, 1e6, 0.0, 1e-9))
    logits = host_first.logits([PROMPT])[0]
    stats = host_first.stats()
    assert copying.stats()["total"]["misses"] > 0 and stats["total"]["misses"] == 0 and stats["total"]["bytes_h2d"] == 0
    assert stats["cpu_experts"]["experts"] > 0 and stats["cpu_experts"]["tokens"] >= stats["cpu_experts"]["experts"]
    assert stats["cpu_experts"]["layer_steps"] > 0 and stats["cpu_experts"]["wait_s"] > 0  # CPU: no overlap
    assert f"; {stats['cpu_experts']['experts']} missed experts (" in summary_line(stats, 1)
    assert np.abs(logits - ref).max() <= 1e-4 * (ref.max() - ref.min())
    # As on a GPU: each layer's host experts computed on the runner thread while the step goes on to the device's
    # (on the CPU backend the engine computes them when the step waits for them); the same bits either way.
    host = host_first.spec.cpu_experts
    assert not host.overlap
    host.overlap = True
    np.testing.assert_array_equal(host_first.logits([PROMPT])[0], logits)
    assert not host._jobs


@pytest.mark.parametrize("overlap", [True, False])
def test_auto_copies_every_miss_once_the_host_costs_the_steps_more(caplog, overlap):
    """Where the device waits for the host's experts longer than their copies would have taken (a cost model that
    thinks the host free and the link fast, so the host takes every miss), the engine stops sending the host experts
    once 16 have shown it: the next steps copy every miss (programs without host experts; the copy-only engine's
    tokens), and the stats and a warning say why. On the CPU backend (no overlap) only the warning."""
    cfg = shipped_in_float32()[0]
    engine = shipped_cached_at_25(cpu_experts="auto", cpu_cost=CostModel(cfg.expert_bytes, 1e12, 0.0, 0.0))
    engine.host_experts.overlap = overlap
    with caplog.at_level(logging.WARNING, logger="moejax.engine.engine"):
        first = engine.generate([PROMPT], max_new_tokens=6).stats["cpu_experts"]
        second = engine.generate([PROMPT], max_new_tokens=6)
    assert first["experts"] >= 16 and first["x_saved"] > 1 and "the host's work was not hidden" in first["losing"]
    assert first["stopped"] is overlap and (engine.spec.cpu_experts is None) is overlap
    assert caplog.text.count("cpu_experts: the device waited") == 1
    assert ("every missed expert is copied from here on" in caplog.text) is overlap
    if overlap:
        assert second.stats["cpu_experts"]["experts"] == 0 and second.stats["total"]["misses"] > 0
        assert second.tokens == shipped_cached_at_25().generate([PROMPT], max_new_tokens=6).tokens


def test_cpu_experts_share_a_wide_step():
    """Prompt chunks of the shipped model (float32) cached at 25% are wide steps (`whole_layer_from` 4): copy-only,
    each layer missing 4 or more experts is copied whole. When the host takes a share of such a step (a cost model
    where two ways beat the layer's copy), the device fetches only its own misses, one by one, into the layer's
    buffer: nothing is carried past them (streamed 0), the bytes moved are the device's misses, and the logits
    equal the copy-only engine's to float rounding."""
    cfg, globals_, layers, stacks = shipped_in_float32()
    cached = OffloadConfig("cached", expert_budget="0.25")
    options = dict(slots=1, max_seq_len=64, prefill_chunk=16, whole_layer_from=4)
    build = lambda **kw: build_engine(cfg, globals_, layers, iter(stacks), cached, **options, **kw)  # noqa: E731
    prompts = [PROMPT, PROMPT[::-1] + PROMPT[:8]]
    copying = build()
    reference = copying.logits(prompts)
    assert copying.stats()["total"]["streamed"] > 0
    # the host 1.5x a fetch's time an expert: sharing a layer's misses both ways beats the layer's copy
    copy_s = 1e-3
    cost = CostModel(cfg.expert_bytes, cfg.expert_bytes / copy_s, 1.5 * copy_s, 0.0, 0.0, 16 * copy_s)
    sharing = build(cpu_experts="auto", cpu_cost=cost)
    for logits, ref in zip(sharing.logits(prompts), reference):
        assert np.abs(logits - ref).max() <= 1e-4 * (ref.max() - ref.min())
    total, host = sharing.stats()["total"], sharing.stats()["cpu_experts"]
    assert host["experts"] > 0 and total["misses"] > 0 and total["streamed"] == 0
    assert total["bytes_h2d"] == total["misses"] * cfg.expert_bytes
    # a layer copy cheaper than any split: the host takes nothing from a wide step and the layer is copied whole
    copies = build(cpu_experts="auto", cpu_cost=dataclasses.replace(cost, layer_copy_s=copy_s))
    copies.logits(prompts)
    assert copies.stats()["total"]["streamed"] == copying.stats()["total"]["streamed"]


@pytest.mark.parametrize("cpu_experts", ["auto", "auto-float32"])
def test_torch_computes_bf16_misses_in_the_cached_engine(cpu_experts):
    """The shipped model (bf16) cached at 25%, every miss sent to the host, whose experts torch computes (bf16, or
    from a float32 copy): no expert crosses the link and the logits stay within bf16 rounding of the copy-only
    engine's: 6% of their range (the host's experts are added after the device's, in float32, and the difference
    goes through 8 bf16 layers; XLA's float32 host path is 4.0% off here, torch's bf16 4.2%)."""
    cfg = checkpoint.load_config(SHIPPED)
    globals_ = checkpoint.load_globals(SHIPPED)
    layers = [checkpoint.load_layer(SHIPPED, i) for i in range(cfg.num_layers)]
    stacks = [checkpoint.load_stacked_experts(SHIPPED, cfg, layer) for layer in cfg.moe_layer_ids]
    cached = OffloadConfig("cached", expert_budget="0.25")
    build = lambda **kw: build_engine(cfg, globals_, layers, iter(stacks), cached, slots=1, max_seq_len=32, **kw)  # noqa: E731
    ref = build().logits([PROMPT])[0].astype(np.float32)
    host_first = build(cpu_experts=cpu_experts, cpu_cost=CostModel(cfg.expert_bytes, 1e6, 0.0, 1e-9))
    logits = host_first.logits([PROMPT])[0].astype(np.float32)
    stats = host_first.stats()
    assert stats["cpu_experts"]["library"] == "torch" and stats["cpu_experts"]["experts"] > 0
    kept = host_first.spec.cpu_experts.weights(0, 0)
    assert {w.dtype for w in kept.values()} == {torch.float32 if cpu_experts == "auto-float32" else torch.bfloat16}
    assert stats["total"]["bytes_h2d"] == 0
    assert np.abs(logits - ref).max() <= 6e-2 * (ref.max() - ref.min())
