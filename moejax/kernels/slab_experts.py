"""In-place expert compute ('inplace'): the chosen experts' FFNs computed by Pallas kernels that read each chosen
expert's weights where it lies in the slab, with no gathered copy.

Union (`models.moe.experts_from_slab`) gathers the chosen experts out of the slab with `jnp.take` first: a copy of
U experts per layer, written and then read again by the einsums (for Mixtral-8x7B 2 x 352 MB per layer and token,
on top of the reads the matmuls need). Here each expert's weights are read once, by the matmul itself:

  slab {'gate': [S, D, F], 'up': [S, D, F], 'down': [S, F, D]} (bf16, f16 or f32; optional biases [S, F] / [S, D]),
  slots int32 [U] (-1: padding), x [N, D]
  1. `slot_matmuls(x, (gate, up))`: program (u, j, s, r) of the grid multiplies row block r of x by column block j
     of gate[slots[u]] and up[slots[u]] over its share s of D (split-K), tile by tile, accumulating in f32
     -> [splits, U, N, F] partial sums each, which XLA adds in a fixed order;
  2. XLA adds the biases and applies the activation (`models.moe.gated_activation`, the plain FFN's activation or
     gpt-oss's ClampedSwiGLU) -> hidden [U, N, F] in the slab's dtype;
  3. `slot_matmuls(hidden, (down,))` the same way, each expert on its own rows -> [U, N, D] f32, plus the down bias.

How a kernel reads the slab: the weight arrays are handed to `pallas_call` whole (a BlockSpec covering the whole
array, so under the Triton lowering the kernel's ref is the array's base pointer and nothing is staged), the
program loads its slot from `slots` (a block of one element) and reads the tiles
`w_ref[slot, pl.ds(k, block_k), pl.ds(col, block_cols)]`: addresses computed from the slot, loads of exactly
those bytes. An index map cannot read `slots` on the GPU (scalar prefetch is a Mosaic TPU feature), hence the
load inside the kernel. A padding slot (-1) runs its loop zero times: it reads nothing and its output is zeros
(union reads slot 0's weights for it, then weighs them by 0).

Why the splits: a decode step has few programs per matmul (U x cols / block_cols: Mixtral's down projection
2 x 4096 / 64 = 128) against ~132 SMs of an H100/H200, each of which wants several tiles in flight to reach the
memory bandwidth; splitting the reduction dimension multiplies the programs. The partial sums are added by XLA,
not with atomics, so a result does not depend on the order programs finish: outputs are the same bits in every
offload mode, budget and policy (all of them call this with the same shapes).

Tiles: Triton's dot needs every tile dimension >= 16 and the Triton lowering needs power-of-two tile sizes, so
the rows are zero-padded to blocks of 16..64 (`Tiling.block_rows`; a decode step's 1..16 rows: one block of 16,
whose padding rows cost loads of x only) and D and F must each have a power-of-two divisor >= 16 on the GPU
(`inplace_problem`). Prompt chunks of more than 64 rows run as several row blocks, each reading the weights
again: 'inplace' is for decode. For prompts and large batches 'grouped-inplace' (`grouped_inplace_experts`) runs
the same kernels on dynamic gating's blocks, each block one expert's pairs.

The tile sizes and split rule were written without a GPU; `scripts/probe_slab_kernel.py` measures them against
gather + einsum and a sweep of tilings (BENCHMARKS.md). On the CPU backend the same kernels run in the Pallas
interpreter, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from moejax.models.layers import ACTIVATIONS
from moejax.models.moe import GROUPED_BLOCK_ROWS, add_expert_outputs, gated_activation, grouped_pairs

try:
    from jax.experimental.pallas import triton as pallas_triton
except ImportError:  # a jax without Pallas' Triton backend: the kernels run only in the interpreter
    pallas_triton = None

FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))
MIN_TILE = 16  # Triton's dot: each dimension of a tile at least 16
MAX_BLOCK_ROWS = 64
# Programs a matmul is split up to (split-K): about two per SM of an H100/H200 (132 SMs). Provisional.
TARGET_PROGRAMS = 256


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How `slot_matmuls` cuts one matmul rows [N, K] x weights [K, M]: tiles of block_rows x block_k (rows) and
    block_k x block_cols (weights); `splits` programs share K; num_warps, num_stages: Triton's."""

    block_rows: int
    block_cols: int
    block_k: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def pow2_divisor(n: int, most: int) -> int:
    """The largest power of two <= most that divides n."""
    p = 1
    while p * 2 <= most and n % (p * 2) == 0:
        p *= 2
    return p


def choose_tiling(experts: int, rows: int, k: int, cols: int, *, block_cols: int = 64, block_k: int = 128,
                  target_programs: int = TARGET_PROGRAMS, num_warps: int = 4, num_stages: int = 3) -> Tiling:
    """The tiling of `experts` matmuls [rows, k] x [k, cols]: the largest power-of-two tiles up to block_cols x
    block_k that divide the matrix (the whole dimension where none of at least MIN_TILE does: the interpreter
    only), then K split in two (the tile along K halved, down to 2 x MIN_TILE, where the tiles do not split evenly)
    until the grid has target_programs programs or a split would get fewer than 2 tiles."""
    block_rows = min(MAX_BLOCK_ROWS, max(MIN_TILE, 1 << max(0, rows - 1).bit_length()))
    tile = lambda n, most: pow2_divisor(n, most) if pow2_divisor(n, most) >= MIN_TILE else n  # noqa: E731
    cols_tile, k_tile = tile(cols, block_cols), tile(k, block_k)
    programs = experts * (cols // cols_tile) * math.ceil(rows / block_rows)
    steps, splits = k // k_tile, 1
    while programs * splits < target_programs:
        if steps % (2 * splits) == 0 and steps // (2 * splits) >= 2:
            splits *= 2
        elif k_tile >= 4 * MIN_TILE and k_tile & (k_tile - 1) == 0:  # an odd count of tiles: halve the tile
            k_tile, steps = k_tile // 2, steps * 2
        else:
            break
    return Tiling(block_rows, cols_tile, k_tile, splits, num_warps, num_stages)


def inplace_problem(shapes: dict, on_gpu: bool) -> str | None:
    """Why the in-place kernels cannot compute experts of `shapes` {name: (shape, dtype)} (one expert's, without
    the slot axis), or None: they read float weights (compact int8/int4 experts keep union's gather, which
    dequantizes them), and on the GPU every matrix dimension needs a power-of-two divisor >= 16."""
    if any(name.endswith("_scale") for name in shapes):
        return ("reads float experts in place; compact int8/int4 experts (expert_format) keep the gather path "
                "(expert_compute 'union')")
    dtypes = {np.dtype(dtype) for _, dtype in shapes.values()}
    if not dtypes <= set(FLOAT_DTYPES):
        return f"reads bf16, f16 or f32 experts, not {', '.join(sorted(map(str, dtypes)))}"
    if on_gpu:
        if pallas_triton is None:
            return "needs Pallas' Triton backend (jax.experimental.pallas.triton), which this jax lacks"
        odd = sorted({n for name, (shape, _) in shapes.items() if name in ("gate", "up", "down") for n in shape
                      if pow2_divisor(n, MIN_TILE) < MIN_TILE})
        if odd:
            return f"needs expert dimensions that are multiples of {MIN_TILE} on the GPU, not {odd}"
    return None


def _slot_matmul_kernel(slots_ref, rows_ref, *refs, tiling: Tiling, steps: int, precision):
    """One program: rows block [block_rows, K] times the block_cols-wide columns of each weight of slot
    slots[u], over its share of K; writes [block_rows, block_cols] f32 per weight."""
    weight_refs, out_refs = refs[: len(refs) // 2], refs[len(refs) // 2:]
    slot = slots_ref[0]
    col = pl.multiple_of(pl.program_id(1) * tiling.block_cols, tiling.block_cols)
    first = pl.program_id(2) * (steps * tiling.block_k)

    def step(i, accs):
        k = pl.multiple_of(first + i * tiling.block_k, tiling.block_k)
        rows = rows_ref[:, pl.ds(k, tiling.block_k)]
        return tuple(
            acc + lax.dot_general(rows, w_ref[slot, pl.ds(k, tiling.block_k), pl.ds(col, tiling.block_cols)],
                                  (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
            for acc, w_ref in zip(accs, weight_refs))

    zeros = tuple(jnp.zeros((tiling.block_rows, tiling.block_cols), jnp.float32) for _ in weight_refs)
    # A padding slot runs no step: nothing is read, its tiles stay zero. Both bounds int32: Triton refuses a loop
    # whose bounds differ in type (the H200 run of 2026-12-05: "'scf.for' op failed to verify").
    accs = lax.fori_loop(jnp.int32(0), jnp.where(slot >= 0, jnp.int32(steps), jnp.int32(0)), step, zeros)
    for out_ref, acc in zip(out_refs, accs):
        out_ref[...] = acc


def slot_matmuls(rows, weights: tuple, slots, tiling: Tiling, interpret: bool) -> tuple:
    """rows [N, K] (every expert on the same rows) or [U, N, K] (each expert on its own) times each weight array
    of `weights` ([S, K, M], one shape) at the U slots `slots` int32 [U], read in place -> per weight [U, N, M]
    f32 (zeros for slot -1). rows are cast to the weights' dtype; f32 weights multiply at full f32 precision."""
    dtype = weights[0].dtype
    S, K, M = weights[0].shape
    U, N = slots.shape[0], rows.shape[-2]
    t = tiling
    if K % (t.block_k * t.splits) or M % t.block_cols:
        raise ValueError(f"tiling {t} does not divide a [{K}, {M}] weight")
    padded = math.ceil(N / t.block_rows) * t.block_rows
    rows = jnp.pad(rows.astype(dtype), [(0, 0)] * (rows.ndim - 2) + [(0, padded - N), (0, 0)])
    if rows.ndim == 2:
        rows_spec = pl.BlockSpec((t.block_rows, K), lambda u, j, s, r: (r, 0))
    else:
        rows_spec = pl.BlockSpec((None, t.block_rows, K), lambda u, j, s, r: (u, r, 0))
    whole = pl.BlockSpec((S, K, M), lambda u, j, s, r: (0, 0, 0))
    out_spec = pl.BlockSpec((None, None, t.block_rows, t.block_cols), lambda u, j, s, r: (s, u, r, j))
    kernel = functools.partial(_slot_matmul_kernel, tiling=t, steps=K // t.block_k // t.splits,
                                   precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    params = None if pallas_triton is None else pallas_triton.CompilerParams(num_warps=t.num_warps,
                                                                             num_stages=t.num_stages)
    partials = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((t.splits, U, padded, M), jnp.float32) for _ in weights],
        grid=(U, M // t.block_cols, t.splits, padded // t.block_rows),
        in_specs=[pl.BlockSpec((1,), lambda u, j, s, r: (u,)), rows_spec] + [whole] * len(weights),
        out_specs=[out_spec] * len(weights),
        compiler_params=params,
        interpret=interpret,
        name="slab_slot_matmul",
    )(slots.astype(jnp.int32), rows, *weights)
    return tuple(p.sum(axis=0)[:, :N] for p in partials)


def slab_expert_outputs(x, slab: dict, slots, act="silu", *, interpret: bool | None = None,
                        tilings: tuple[Tiling, Tiling] | None = None):
    """The FFN outputs of the experts at `slots` int32 [U] of `slab` (float, {name: [S, ...]}, `models.moe.expert_ffn`'s
    names) on every row of x [N, D], or each on its own rows x [U, N, D] -> [U, N, D] f32, each expert's weights
    read in place (module docstring); slot -1: zeros (nothing read). interpret: run the kernels in the Pallas
    interpreter (default: unless the default backend is a GPU); tilings: (gate/up, down) instead of
    `choose_tiling`'s."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    problem = inplace_problem({name: (w.shape[1:], w.dtype) for name, w in slab.items()}, on_gpu=not interpret)
    if problem:
        raise ValueError(f"expert_compute 'inplace' {problem}")
    S, F, D = slab["down"].shape
    N, U = x.shape[-2], slots.shape[0]
    gate_up, down = tilings or (choose_tiling(U, N, D, F), choose_tiling(U, N, F, D))
    safe = jnp.maximum(slots, 0)

    def bias(name):  # [U, 1, n] at the chosen slots, or 0 for experts without it
        return jnp.take(slab[name], safe, axis=0)[:, None, :].astype(jnp.float32) if name in slab else 0.0

    names = ("gate", "up") if "gate" in slab else ("up",)
    projected = dict(zip(names, slot_matmuls(x, tuple(slab[n] for n in names), slots, gate_up, interpret)))
    up = projected["up"] + bias("up_bias")
    if "gate" in projected:
        hidden = gated_activation(projected["gate"] + bias("gate_bias"), up, act)
    else:
        hidden = ACTIVATIONS[act](up)
    (out,) = slot_matmuls(hidden.astype(slab["down"].dtype), (slab["down"],), slots, down, interpret)
    return jnp.where(slots[:, None, None] >= 0, out + bias("down_bias"), 0.0)


def inplace_experts(x, topk_ids, topk_weights, distinct, slots, slab: dict, act="silu"):
    """`models.moe.experts_from_slab` with the experts' outputs from `slab_expert_outputs` (read in place, no gather):
    the same arguments, the same per-row sums in increasing expert order -> [N, D] f32."""
    return add_expert_outputs(slab_expert_outputs(x, slab, slots, act), topk_ids, topk_weights, distinct)


def grouped_inplace_experts(x, topk_ids, topk_weights, distinct, slots, slab: dict, act="silu", *, valid_rows=None,
                            block_rows: int = GROUPED_BLOCK_ROWS, interpret: bool | None = None):
    """Dropless dynamic gating with the in-place kernels ('grouped-inplace'): `models.moe.grouped_pairs`' blocks of
    pairs sorted by expert, every block computed at once by `slab_expert_outputs`, each reading its expert's
    weights where they lie in the slab (blocks past the ones in use: slot -1, nothing read). Where
    `models.moe.grouped_experts` gathers the chosen experts and runs its blocks one after another, this reads an
    expert once per block of its pairs, with no copy, and every block in parallel. Arguments as
    `grouped_experts`'s; interpret as `slab_expert_outputs`'. -> [N, D] f32."""

    def run_blocks(rows, owner, used):
        block_slots = jnp.where(jnp.arange(owner.shape[0]) < used, slots[owner], -1)
        return slab_expert_outputs(rows, slab, block_slots, act, interpret=interpret)

    return grouped_pairs(x, topk_ids, topk_weights, distinct, run_blocks, valid_rows=valid_rows, block_rows=block_rows)
