"""One routed expert's FFN as the host computes it (`cpu_experts='auto'`), compiled by XLA for the CPU.

The device's function (`models.moe.expert_ffn` on `models.quantized.dequantized` weights) is slow on XLA:CPU
for the formats the engine keeps: XLA:CPU computes bfloat16 in float32 and converts a whole bf16 (or
dequantized) weight matrix to a float32 temporary before its matmul, which takes several times as long as
reading the weight (`scripts/probe_host_expert.py` times both; README, "CPU compute of misses").
This function instead reads each weight matrix in blocks of BLOCK_ROWS input rows, widens one block at a time
to float32 (bf16 as its bits, uint16, shifted into a float32's high half; int8 / int4 codes times their
group scales) and accumulates the block's product, so no temporary is larger than a block and every weight
byte is read once.

Arithmetic is float32 throughout (rows, products, the activation): closer to exact than the device's bf16
program; tests/test_host_ffn.py checks it against the float64 expert of the same weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.models.moe import ACTIVATIONS, gated_activation
from moejax.models.quantized import GROUP_SIZE, QUANTIZED_WEIGHTS, SCALE_SUFFIX

BLOCK_ROWS = 256  # input rows widened at a time: a 2048-wide block is 2 MB of float32
BF16_BITS = "bf16_bits"  # the suffix of a bf16 weight passed as its bits (uint16), see host_operands
UNITS_BITS = "units_bf16_bits"  # the suffix of a bf16 gate / up matrix passed transposed, [F, D] bits: see unit_operands


def host_operands(expert: dict) -> dict:
    """An expert's weights {name: array} (NumPy or CPU JAX arrays) as `host_expert_ffn` takes them: each bfloat16
    matrix (gate, up, down) viewed as its bits (NumPy uint16, no copy) under `name + BF16_BITS`; the rest
    (compact codes, scales, biases, float32; and weights already given as bits) as they are."""
    out = {}
    for name, w in expert.items():
        if name in QUANTIZED_WEIGHTS and w.dtype == jnp.bfloat16:
            out[name + BF16_BITS] = np.asarray(w).view(np.uint16)
        else:
            out[name] = w
    return out


def unit_operands(expert: dict) -> dict | None:
    """An expert's weights (NumPy or CPU JAX arrays) laid out for `split_units_ffn`, when they are bf16 and not
    compact (else None): gate and up transposed, [F, D] bits (a copy, C order: each hidden unit's weights one
    contiguous row) under `name + UNITS_BITS`; down [F, D] as its bits (`host_operands`); biases as they are."""
    if any(name.endswith(SCALE_SUFFIX) for name in expert) or expert["up"].dtype != jnp.bfloat16:
        return None
    out = host_operands({name: w for name, w in expert.items() if name not in ("gate", "up")})
    for name in ("gate", "up"):
        if name in expert:
            out[name + UNITS_BITS] = np.ascontiguousarray(np.asarray(expert[name]).view(np.uint16).T)
    return out


def widened_in_blocks(dtypes: dict) -> bool:
    """Whether `host_expert_ffn` widens an expert of these weights ({name: dtype}, as the device cache holds them)
    block by block on one core: bf16 matrices or compact codes. Float32 (and float16) products are XLA:CPU's own
    matmuls, which use every core."""
    return any(name.endswith(SCALE_SUFFIX) or (name in QUANTIZED_WEIGHTS and np.dtype(dtype) == jnp.bfloat16)
               for name, dtype in dtypes.items())


def _block_rows(rows: int, quantum: int) -> int:
    """The largest block of at most BLOCK_ROWS rows, a multiple of `quantum`, that divides `rows` (rows itself
    when none does)."""
    for block in range(BLOCK_ROWS - BLOCK_ROWS % quantum, 0, -quantum):
        if rows % block == 0:
            return block
    return rows


def _sum_of_blocks(x, weights: tuple, product, block: int):
    """sum over b of product(x's b-th block of columns, each weight's b-th block of `block` rows): x [N, C] f32
    (C a multiple of the blocks' count), weights arrays [R, ...] cut along R -> product's [N, O] f32."""
    count = weights[0].shape[0] // block
    n = x.shape[0]
    xs = x.reshape(n, count, -1).transpose(1, 0, 2)
    parts = tuple(w.reshape(count, w.shape[0] // count, *w.shape[1:]) for w in weights)

    def add(total, operand):
        return total + product(*operand), None

    out_width = weights[0].shape[-1]
    total, _ = lax.scan(add, jnp.zeros((n, out_width), jnp.float32), (xs, *parts))
    return total


def _bits_to_f32(bits):
    """bf16 bits (uint16) -> the same values as float32."""
    return lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


def _grouped(codes, scales):
    """int codes [R, O] x scales [G, O] (R / G consecutive rows per scale) -> float32 [R, O]."""
    rows, cols = codes.shape
    groups = scales.shape[0]
    return (codes.reshape(groups, rows // groups, cols).astype(jnp.float32)
            * scales.astype(jnp.float32)[:, None, :]).reshape(rows, cols)


def _int4_product(x, codes, scales):
    """x [N, 2R] f32 @ the int4 weight of packed codes [R, O] (byte row i: input rows 2i in its low nibble and
    2i + 1 in its high one, both in the same group) and scales [G, O] -> [N, O] f32, without interleaving rows:
    x's even columns meet the low nibbles, its odd columns the high ones."""
    low = _grouped((codes & 15).astype(jnp.int8) - 8, scales)
    high = _grouped((codes >> 4).astype(jnp.int8) - 8, scales)
    pairs = x.reshape(x.shape[0], -1, 2)
    return pairs[:, :, 0] @ low + pairs[:, :, 1] @ high


def _matmul(x, weights: dict, name: str):
    """x [N, I] f32 @ weight `name` of `weights` (as host_operands gives it) [I, O] -> [N, O] f32."""
    if name + BF16_BITS in weights:
        bits = weights[name + BF16_BITS]
        return _sum_of_blocks(x, (bits,), lambda xb, wb: xb @ _bits_to_f32(wb), _block_rows(bits.shape[0], 1))
    w = weights[name]
    scale = weights.get(name + SCALE_SUFFIX)
    if scale is None:
        return x @ w.astype(jnp.float32)
    if w.dtype == jnp.int8:
        return _sum_of_blocks(x, (w, scale), lambda xb, cb, sb: xb @ _grouped(cb, sb),
                              _block_rows(w.shape[0], GROUP_SIZE))
    return _sum_of_blocks(x, (w, scale), _int4_product, _block_rows(w.shape[0], GROUP_SIZE // 2))


def _bias(weights: dict, name: str):
    bias = weights.get(name + "_bias")
    return 0.0 if bias is None else jnp.asarray(bias).astype(jnp.float32)


def _gated(weights: dict) -> bool:
    return "gate" in weights or "gate" + BF16_BITS in weights


def _activation(gate, up, weights: dict, act):
    """The hidden units [N, F] f32 from the projections x @ gate (None: a plain FFN) and x @ up, their biases
    (if `weights` has them) added."""
    up = up + _bias(weights, "up")
    return ACTIVATIONS[act](up) if gate is None else gated_activation(gate + _bias(weights, "gate"), up, act)


@functools.partial(jax.jit, static_argnames=("act",))
def _activation_program(gate, up, biases: dict, act):
    return _activation(gate, up, biases, act)


def host_activation(gate, up, biases: dict, act):
    """The hidden units [N, F] f32 of projections gate (None: a plain FFN) and up [N, F] (NumPy) and the biases
    {'gate_bias', 'up_bias'} among `biases`, computed on the CPU (the device's activation functions)."""
    cpu = jax.devices("cpu")[0]
    return _activation_program(*jax.device_put((gate, up, biases), cpu), act)


@functools.partial(jax.jit, static_argnames=("act",))
def host_expert_ffn(x, weights: dict, act):
    """One expert on rows x [N, D] (any float dtype) with `weights` as host_operands gives them -> [N, D] f32:
    gated_activation(x @ gate + gate_bias, x @ up + up_bias) @ down + down_bias (plain: act(x @ up + up_bias)),
    as models.moe.expert_ffn, in float32."""
    x = x.astype(jnp.float32)
    gate = _matmul(x, weights, "gate") if _gated(weights) else None
    hidden = _activation(gate, _matmul(x, weights, "up"), weights, act)
    return _matmul(hidden, weights, "down") + _bias(weights, "down")


def _unit_product(x, bits_t):
    """x [N, I] f32 @ the bf16 matrix whose transpose's bits are bits_t [O, I] -> [N, O] f32: BLOCK_ROWS output units at a
    time, each widened and reduced over the whole input, so no temporary is larger than a block."""
    block = _block_rows(bits_t.shape[0], 1)
    count = bits_t.shape[0] // block

    def part(_, rows):
        return None, lax.dot_general(x, _bits_to_f32(rows), (((1,), (1,)), ((), ())))

    _, outs = lax.scan(part, None, bits_t.reshape(count, block, -1))  # [count, N, block]
    return outs.transpose(1, 0, 2).reshape(x.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("act",))
def _units_output(x, weights: dict, act):
    """x [N, D] through some of an expert's hidden units (weights as `unit_operands` lays them out, sliced to those
    units: gate / up [U, D] transposed bits, down [U, D] bits, gate / up biases [U]) -> [N, D] f32, their share of the
    output (the down projection's bias not added)."""
    x = x.astype(jnp.float32)
    gate = _unit_product(x, weights["gate" + UNITS_BITS]) if "gate" + UNITS_BITS in weights else None
    hidden = _activation(gate, _unit_product(x, weights["up" + UNITS_BITS]), weights, act)
    return _matmul(hidden, weights, "down")


def split_units_ffn(x: np.ndarray, weights: dict, act, parts: int, run=map) -> np.ndarray:
    """The expert of `weights` (as `unit_operands` lays them out) on rows x [N, D] -> [N, D] f32 (NumPy), its hidden
    units cut into `parts` ranges whose outputs `run` computes (run(function, items) -> results in order: a thread
    pool's map) and summed in range order, then the down projection's bias added. Each range is one call that reads
    only its units' rows of every matrix, with no step between the projections (splitting the input rows instead
    needs two calls per range and the sum of the first ones in between)."""
    cpu = jax.devices("cpu")[0]
    units = np.asarray(weights["up" + UNITS_BITS]).shape[0]
    ranges = _row_ranges(units, parts, quantum=16 if units % 16 == 0 else 1)
    x = np.asarray(x, np.float32)

    def part(bounds):  # every entry but the down projection's bias has a row per hidden unit
        chunk = {name: np.asarray(w)[bounds[0] : bounds[1]] for name, w in weights.items() if name != "down_bias"}
        return np.asarray(_units_output(x, jax.device_put(chunk, cpu, may_alias=True), act))

    out = None
    for partial in run(part, ranges):
        out = partial if out is None else out + partial
    bias = weights.get("down_bias")
    return out if bias is None else out + np.asarray(bias, np.float32)


def _row_ranges(width: int, parts: int, quantum: int | None = None) -> list[tuple[int, int]]:
    """At most `parts` near-equal [start, stop) ranges of input rows covering `width`, cut at multiples of `quantum`
    (default: GROUP_SIZE where width is one, so that a quantized weight's groups, and int4's byte rows, stay whole)."""
    if quantum is None:
        quantum = GROUP_SIZE if width % GROUP_SIZE == 0 else 1
    units = width // quantum
    parts = max(1, min(parts, units))
    bounds = [round(i * units / parts) * quantum for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _weight_rows(weights: dict, name: str, start: int, stop: int) -> dict:
    """The entries of weight `name` (its codes and scale, or its bits) for input rows [start, stop), as NumPy views."""
    if name + BF16_BITS in weights:
        return {name + BF16_BITS: np.asarray(weights[name + BF16_BITS])[start:stop]}
    w = np.asarray(weights[name])
    scale = weights.get(name + SCALE_SUFFIX)
    if scale is None:
        return {name: w[start:stop]}
    packed = 2 if w.dtype == np.uint8 else 1  # int4: two input rows a byte row
    return {name: w[start // packed : stop // packed],
            name + SCALE_SUFFIX: np.asarray(scale)[start // GROUP_SIZE : stop // GROUP_SIZE]}


@functools.partial(jax.jit, static_argnames=("names",))
def _products(x, weights: dict, names: tuple):
    """x [N, R] @ each weight of `names` (R input rows of it) -> tuple of [N, O] f32."""
    x = x.astype(jnp.float32)
    return tuple(_matmul(x, weights, name) for name in names)


_hidden = jax.jit(_activation, static_argnames=("act",))


def split_expert_ffn(x: np.ndarray, weights: dict, act, parts: int, run=map) -> np.ndarray:
    """`host_expert_ffn` with each projection's input rows cut into `parts` ranges whose products `run` computes
    (run(function, items) -> results in order: a thread pool's map, so one expert uses several cores; XLA:CPU
    runs the blocked function on one) and summed in range order -> [N, D] f32 (NumPy). x [N, D]; weights as
    host_operands gives them (NumPy or CPU JAX arrays). parts 1: `host_expert_ffn` itself."""
    cpu = jax.devices("cpu")[0]
    if parts <= 1:
        return np.asarray(host_expert_ffn(x, jax.device_put(weights, cpu, may_alias=True), act))

    def project(rows: np.ndarray, names: tuple) -> list[np.ndarray]:
        def part(bounds):
            chunk = {k: v for name in names for k, v in _weight_rows(weights, name, *bounds).items()}
            return _products(rows[:, bounds[0] : bounds[1]], jax.device_put(chunk, cpu, may_alias=True), names)

        sums = None
        for products in run(part, _row_ranges(rows.shape[1], parts)):
            products = [np.asarray(p) for p in products]
            sums = products if sums is None else [s + p for s, p in zip(sums, products)]
        return sums

    x = np.asarray(x, np.float32)
    gated = _gated(weights)
    first = project(x, ("gate", "up") if gated else ("up",))
    biases = {name: w for name, w in weights.items() if name.endswith("_bias")}
    hidden = np.asarray(_hidden(first[0] if gated else None, first[-1], biases, act))
    (out,) = project(hidden, ("down",))
    bias = weights.get("down_bias")
    return out if bias is None else out + np.asarray(bias, np.float32)
