"""The host's expert FFN (`offload.host_ffn`): blocked float32 arithmetic against a float64 loop-free NumPy twin
of the expert on the same weights, for every format the host keeps."""

from __future__ import annotations

import numpy as np
import pytest

from moejax.models.moe import ClampedSwiGLU
from moejax.models.quantized import SCALE_SUFFIX, dequantize
from moejax.offload.expert_format import ExpertFormat
from moejax.offload.host_ffn import (BF16_BITS, BLOCK_ROWS, _block_rows, _row_ranges, host_expert_ffn, host_operands,
                                     split_expert_ffn, split_units_ffn, unit_operands)


def float64_expert(x, expert: dict, act) -> np.ndarray:
    """The expert in float64 from its stored weights (compact ones dequantized in float32 first)."""
    w = {name: (dequantize(v, expert[name + SCALE_SUFFIX], np, np.float32) if name + SCALE_SUFFIX in expert else v)
         for name, v in expert.items() if not name.endswith(SCALE_SUFFIX)}
    w = {name: np.asarray(v).astype(np.float64) for name, v in w.items()}
    x = np.asarray(x).astype(np.float64)
    up = x @ w["up"] + w.get("up_bias", 0.0)
    if "gate" not in w:
        hidden = np.maximum(up, 0.0)  # relu
    else:
        gate = x @ w["gate"] + w.get("gate_bias", 0.0)
        if isinstance(act, ClampedSwiGLU):
            gate, up = np.minimum(gate, act.limit), np.clip(up, -act.limit, act.limit)
            hidden = (up + 1) * gate / (1 + np.exp(-act.alpha * gate))
        else:
            hidden = gate / (1 + np.exp(-gate)) * up  # silu
    return hidden @ w["down"] + w.get("down_bias", 0.0)


@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("kind", ["silu", "relu", "clamped"])
def test_host_ffn_matches_a_float64_expert(fmt, kind):
    """D = 2 x BLOCK_ROWS + 192 (several blocks, one that is not BLOCK_ROWS), F = 192; biases where the kind has
    them; to 1e-5 of the output's largest value (float32 rounding of sums of a few hundred products)."""
    rng = np.random.default_rng(hash((fmt, kind)) % 2**32)
    D, F, N = 2 * BLOCK_ROWS + 192, 192, 3
    shapes = {"up": (D, F), "down": (F, D)} | ({} if kind == "relu" else {"gate": (D, F)})
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.05 for name, shape in shapes.items()}
    if kind != "silu":
        weights |= {"up_bias": rng.standard_normal(F).astype(np.float32), "down_bias": rng.standard_normal(D)}
        weights["down_bias"] = weights["down_bias"].astype(np.float32)
    act = {"silu": "silu", "relu": "relu", "clamped": ClampedSwiGLU(1.702, 7.0)}[kind]
    expert = ExpertFormat(fmt, "float32" if fmt == "f32" else "bfloat16").convert(weights, "test")
    expert = {name: np.asarray(w) for name, w in expert.items()}
    operands = host_operands(expert)
    if fmt == "bf16":  # the matrices as their bits, no copy; the biases as they are
        assert set(operands) == {n + BF16_BITS for n in shapes} | {n for n in weights if n.endswith("_bias")}
        assert np.shares_memory(operands["up" + BF16_BITS], expert["up"])
    x = rng.standard_normal((N, D)).astype(np.float32)
    out = np.asarray(host_expert_ffn(x, operands, act))
    reference = float64_expert(x, expert, act)
    assert out.dtype == np.float32 and out.shape == (N, D)
    assert np.abs(out - reference).max() <= 1e-5 * np.abs(reference).max()
    split = split_expert_ffn(x, operands, act, 3)  # each projection's rows in three ranges, summed in order
    assert split.dtype == np.float32 and np.abs(split - reference).max() <= 1e-5 * np.abs(reference).max()
    units = unit_operands(expert)  # bf16 only: gate and up transposed, the hidden units in ranges
    assert (units is None) == (fmt != "bf16")
    for parts in ([1, 3, 5] if units is not None else []):  # 192 units: one range, whole 16s, and a remainder
        out = split_units_ffn(x, units, act, parts)
        assert out.dtype == np.float32 and np.abs(out - reference).max() <= 1e-5 * np.abs(reference).max()


def test_row_ranges():
    assert _row_ranges(704, 3) == [(0, 256), (256, 448), (448, 704)]  # whole groups of 64 rows
    assert _row_ranges(192, 8) == [(0, 64), (64, 128), (128, 192)] and _row_ranges(100, 3) == [(0, 33), (33, 67), (67, 100)]


def test_block_rows():
    assert _block_rows(4096, 1) == BLOCK_ROWS and _block_rows(192, 1) == 192 and _block_rows(1408, 64) == 128
    assert _block_rows(704, 32) == 64 and _block_rows(7, 1) == 7 and _block_rows(100, 64) == 100


@pytest.mark.parametrize("kind", ["silu", "relu", "clamped"])
@pytest.mark.parametrize("copy", [True, False])
def test_torch_ffn_matches_a_float64_expert_to_bf16_rounding(kind, copy):
    """torch's bf16 products (`offload.torch_ffn`: gate and up stacked in linear's layout, or over the stored arrays;
    torch's own silu/relu, gpt-oss's activation through the device's function), to 2% of the output's largest
    value: the rows and the hidden units are rounded to bf16 as on the device."""
    from moejax.offload.torch_ffn import GATE_UP, LINEAR, STORED, torch_expert_ffn, torch_operands
    rng = np.random.default_rng(hash(("torch", kind)) % 2**32)
    D, F, N = 256, 96, 3
    shapes = {"up": (D, F), "down": (F, D)} | ({} if kind == "relu" else {"gate": (D, F)})
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.05 for name, shape in shapes.items()}
    if kind != "silu":
        weights |= {"up_bias": rng.standard_normal(F).astype(np.float32),
                    "down_bias": rng.standard_normal(D).astype(np.float32)}
    if kind == "clamped":
        weights["gate_bias"] = rng.standard_normal(F).astype(np.float32)
    act = {"silu": "silu", "relu": "relu", "clamped": ClampedSwiGLU(1.702, 7.0)}[kind]
    expert = {name: np.asarray(w) for name, w in ExpertFormat("bf16", "bfloat16").convert(weights, "test").items()}
    operands = torch_operands(expert, copy=copy)
    assert (GATE_UP + LINEAR in operands) == (copy and kind != "relu")
    assert (("up" + STORED) in operands) == (not copy)
    x = rng.standard_normal((N, D)).astype(np.float32)
    out = torch_expert_ffn(x, operands, act)
    reference = float64_expert(x, expert, act)
    assert out.dtype == np.float32 and out.shape == (N, D)
    assert np.abs(out - reference).max() <= 2e-2 * np.abs(reference).max()
