"""Dynamic gating against capacity padding (Huang et al., "Toward Efficient Inference for MoE"): the MoE layers'
computation alone, per expert compute of the step engine (`models.moe.routed_experts`), on random models of
real MoE shapes, all experts on the device.

Per model (`--gating-models`: Switch-base-128, NLLB-MoE, Mixtral-8x7B, DeepSeek-V2-Lite shapes by default) and
per expert compute (`--gating-computes`):
  union      every token row through every expert the call uses (the engine's compute for few rows)
  grouped    dropless dynamic gating: each expert computes exactly its (token, choice) pairs, in blocks run one
             after another on the gathered experts
  grouped-inplace  the same blocks, all at once, each reading its expert where it lies (Pallas kernels)
  ragged     the same pairs through XLA's grouped matmul (`lax.ragged_dot`), no padding
  capacity   static capacity-factor gating: every used expert padded to C = ceil(factor x N x k / E) token slots,
             the pairs past them dropped (approximate: its rows report the fraction dropped); the engine's
             `--routing capacity` compute (queue places scattered into [U, C] rows)
  capacity-einsum  the same gating as GShard and fairseq compute it (fairseq's MoE LM and NLLB-MoE are the
             models Huang et al. measured): one-hot dispatch and combine tensors [N, E, C] and einsums through
             them to and from every expert's C rows (memory and work grow with N x N); the same pairs dropped,
             the same outputs as capacity
one program runs `--layers` MoE layers (router, top-k, gating, experts, residual; experts [E, ...] per layer,
random normal weights of the card's dtype, random bf16 rows) on N token rows:
  batch rows       tokens/s of that program for N in `--gating-rows` (median of `--gating-repeats` timed calls
                   after a compiling one), the expert rows the compute does per layer (static: union U x N,
                   grouped at most its block bound, capacity U x C) and the program's footprint
  max-batch rows   the largest N whose compiled footprint (XLA's memory analysis: arguments + outputs + temporaries)
                   fits `--memory-gb`, found by doubling then bisecting from a guess (the bytes per row of the
                   largest batch row's program; compiles only, nothing runs out of memory), and tokens/s at that N:
                   the maximum throughput at equal memory (where running it still exhausts the device, as at the
                   device's whole limit, at 7/8 of N, and so on: `rows_fitting` is the search's N, `rows` the one
                   timed, `runtime_shrunk` how many times); with each compute's best tokens/s over all its rows
                   and the ratios of those bests to capacity padding's (`add_best_ratios`)

Random routing is about balanced; real routing is skewed, so capacity gating drops more there (and grouped has
fewer, fuller blocks). The figures are the layers' compute, not the engine's steps (no attention, no offloading).

  PYTHONPATH=. python scripts/bench_gating.py --memory-gb 40 --out $OUT/bench_gating.json
  PYTHONPATH=. python scripts/bench_gating.py --dims tiny --out /tmp/gating.json   # CPU smoke run (seconds)

`scripts/bench_serve.py` runs this as its `gating` part: `add_arguments(parser, shared=False)` where it defines
--dims and --layers itself, then `run(args)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from moejax.cards import load_card
from moejax.encdec_config import EncDecConfig
from moejax.models.capacity import capacity_slots, drop_over_capacity, queue_positions
from moejax.models.moe import (CAPACITY_FACTOR, GROUPED_BLOCK_ROWS, batched_expert_ffn, grouped_blocks, route,
                               routed_experts)
from moejax.offload.device_cache import distinct_experts
from scripts.benchlib import GB, Budget, environment, median, print_table, start_backend, write_json

DEFAULT_MODELS = "switch-base-128,nllb-moe-54b,mixtral-8x7b,deepseek-v2-lite"
COMPUTES = ("union", "grouped", "grouped-inplace", "ragged", "capacity", "capacity-einsum")
DEFAULT_ROWS = "1,8,64,256,1024"
TINY_ROWS = "1,8"
TINY_MEMORY_GB = 0.01
TINY_MAX_ROWS = 16


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """One MoE layer's shape: hidden size, expert FFN size, experts, top-k, activation, gated (gate/up/down) or
    plain (up/down, with biases where `biases`) experts, router weights normalised over the top-k, dtype."""

    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    act: str
    gated: bool
    biases: bool
    normalize: bool
    dtype: str
    moe_layers: int  # the card's

    def expert_shapes(self) -> dict:
        d, f = self.hidden, self.ffn
        if self.gated:
            return {"gate": (d, f), "up": (d, f), "down": (f, d)}
        return {"up": (d, f), "down": (f, d), **({"up_bias": (f,), "down_bias": (d,)} if self.biases else {})}


def moe_shape(card: str, tiny: bool) -> MoEShape:
    """A card's MoE layer shape (tiny: hidden 64, FFN 32, the card's experts and top-k)."""
    cfg = load_card(card)
    encdec = isinstance(cfg, EncDecConfig)
    ffn = cfg.ffn_size(cfg.moe_layer_ids[0]) if encdec else cfg.expert_intermediate_size
    return MoEShape(card, 64 if tiny else cfg.hidden_size, 32 if tiny else ffn, cfg.num_experts, cfg.top_k,
                    cfg.hidden_act, not encdec, encdec and cfg.ffn_bias, cfg.norm_topk_prob, cfg.dtype,
                    len(cfg.moe_layer_ids))


def random_params(shape: MoEShape, layers: int, seed: int = 0) -> dict:
    """{'router': [L, D, E], 'slab': {name: [L * E, ...]}} on the device, the slab laid out as the resident engine's
    (slot = layer x E + expert): normal weights scaled by 1/sqrt(fan-in) (router logits and expert outputs of order
    one), biases 0.1 x normal."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    dtype = jnp.dtype(shape.dtype)

    def normal(size, scale):
        return (jax.random.normal(next(keys), size, jnp.float32) * scale).astype(dtype)

    slab = {name: normal((layers * shape.experts, *dims), 0.1 if name.endswith("bias") else dims[0] ** -0.5)
            for name, dims in shape.expert_shapes().items()}
    return {"router": normal((layers, shape.hidden, shape.experts), shape.hidden ** -0.5), "slab": slab}


def dispatch_einsum_experts(x, ids, weights, experts: dict, capacity: int, act: str):
    """Static capacity gating through one-hot tensors (GShard, fairseq): x [N, D]; ids int32 [N, k] and weights
    f32 [N, k], the router's choices (none dropped yet); experts {name: [E, ...]}, a layer's. Pairs past their
    expert's `capacity` places (queued as `drop_over_capacity` queues them) are left out. -> ([N, D] in x's dtype,
    pairs dropped int32 [])."""
    E = experts["down"].shape[0]
    places = queue_positions([ids[None, :, j] for j in range(ids.shape[1])], jnp.ones((1, ids.shape[0]), bool), E)
    place = jnp.stack([p[0] for p in places], axis=-1).astype(jnp.int32)  # [N, k]
    kept = place < capacity
    to_expert = jax.nn.one_hot(jnp.where(kept, ids, E), E, dtype=x.dtype)  # [N, k, E]; a dropped pair: zeros
    to_place = jax.nn.one_hot(place, capacity, dtype=x.dtype)  # [N, k, C]
    dispatch = jnp.einsum("nke,nkc->nec", to_expert, to_place)
    combine = jnp.einsum("nke,nkc,nk->nec", to_expert, to_place, weights.astype(x.dtype))
    rows_out = batched_expert_ffn(jnp.einsum("nec,nd->ecd", dispatch, x), experts, act)  # [E, C, D]
    return jnp.einsum("nec,ecd->nd", combine, rows_out), jnp.sum(~kept, dtype=jnp.int32)


def moe_layers(shape: MoEShape, how: str, rows: int, capacity_factor: float, block_rows: int):
    """The program: x [rows, D] through every layer of params -> (x, pairs dropped by capacity gating)."""
    E, k = shape.experts, shape.top_k
    capacity = capacity_slots(capacity_factor, rows, k, E)
    union = min(rows * k, E)

    def layer(x, slab, router, m):
        weights, ids = route(x @ router, k, shape.normalize)
        if how == "capacity-einsum":
            experts = {name: w[m * E:(m + 1) * E] for name, w in slab.items()}
            out, dropped = dispatch_einsum_experts(x, ids, weights, experts, capacity, shape.act)
            return x + out.astype(x.dtype), dropped
        dropped = jnp.int32(0)
        if how == "capacity":
            ids, weights = drop_over_capacity(ids, weights, None, capacity, E)
            dropped = jnp.sum(ids == E, dtype=jnp.int32)
        distinct = distinct_experts(ids, None, E, union)
        slots = jnp.where(distinct < E, m * E + distinct, -1)
        out = routed_experts(how, x, ids, weights, distinct, slots, slab, shape.act, capacity=capacity,
                             block_rows=block_rows)
        return x + out.astype(x.dtype), dropped

    def program(params, x):  # layers unrolled: a loop over them would copy the slab (XLA's loop state)
        dropped = []
        for m in range(params["router"].shape[0]):
            x, lost = layer(x, params["slab"], params["router"][m], m)
            dropped.append(lost)
        return x, sum(dropped)

    return jax.jit(program)


def expert_rows(shape: MoEShape, how: str, rows: int, capacity_factor: float, block_rows: int) -> int:
    """Expert rows one layer computes (static: grouped's block bound; its loop runs only the blocks in use)."""
    union = min(rows * shape.top_k, shape.experts)
    if how == "union":
        return union * rows
    if how in ("grouped", "grouped-inplace"):
        return grouped_blocks(rows, shape.top_k, union, block_rows) * block_rows
    if how == "ragged":
        return rows * shape.top_k
    experts = shape.experts if how == "capacity-einsum" else union  # the one-hot einsums run every expert
    return experts * capacity_slots(capacity_factor, rows, shape.top_k, shape.experts)


def footprint(compiled) -> int:
    """Device bytes a compiled program needs: its arguments, outputs and temporaries (aliased bytes once)."""
    stats = compiled.memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes


class Bench:
    """One model's programs: compiled per (compute, rows) once, for the footprint search and the timings."""

    def __init__(self, shape: MoEShape, layers: int, args, repeats: int):
        self.shape, self.layers, self.args, self.repeats = shape, layers, args, repeats
        self.params = random_params(shape, layers)
        self.programs = {}

    def compiled(self, how: str, rows: int):
        if (how, rows) not in self.programs:
            program = moe_layers(self.shape, how, rows, self.args.capacity_factor, self.args.block_rows)
            x = jax.ShapeDtypeStruct((rows, self.shape.hidden), jnp.dtype(self.shape.dtype))
            self.programs[how, rows] = program.lower(self.params, x).compile()
        return self.programs[how, rows]

    def least_bytes(self, how: str, rows: int) -> int:
        """Bytes the program needs at least: its weights and one layer's expert hidden activations [expert rows,
        FFN] in the dtype, which the computes hold between their two matmuls (grouped: one block at a time), and
        capacity-einsum's dispatch and combine tensors [N, E, C]."""
        hidden_rows = (self.args.block_rows if how == "grouped" else
                       expert_rows(self.shape, how, rows, self.args.capacity_factor, self.args.block_rows))
        elements = hidden_rows * self.shape.ffn
        if how == "capacity-einsum":
            elements += 2 * rows * self.shape.experts * capacity_slots(self.args.capacity_factor, rows,
                                                                         self.shape.top_k, self.shape.experts)
        return sum(w.nbytes for w in jax.tree.leaves(self.params)) + elements * jnp.dtype(self.shape.dtype).itemsize

    def fits(self, how: str, rows: int, memory: float) -> bool:
        if self.least_bytes(how, rows) > memory:  # not compiled: XLA's autotuner would try to allocate it all
            return False
        try:
            return footprint(self.compiled(how, rows)) <= memory
        except jax.errors.JaxRuntimeError as err:  # XLA's autotuner could not allocate the program's buffers
            print(f"{self.shape.name} {how} at {rows} rows does not compile, taken as not fitting: "
                  f"{str(err).splitlines()[0][:160]}", flush=True)
            return False

    def rows_guess(self, how: str, memory: float) -> int:
        """Where the largest-batch search starts: the largest power of two at half the rows that fit `memory` by
        the bytes per row of the largest program of `how` compiled so far (the batch rows'), over its weights
        (1 where none of 2 rows or more is compiled). Each compile of a large program takes seconds to minutes:
        doubling from 1 spent a Switch-base-128 search's time on small ones."""
        compiled = [rows for compute, rows in self.programs if compute == how and rows > 1]
        if not compiled:
            return 1
        rows = max(compiled)
        weights = sum(w.nbytes for w in jax.tree.leaves(self.params))
        per_row = max(1.0, (footprint(self.programs[how, rows]) - weights) / rows)
        fitting = (memory - weights) / per_row / 2
        return 1 << max(0, int(fitting).bit_length() - 1) if fitting >= 1 else 1

    def time(self, how: str, rows: int) -> dict:
        """tokens/s of one call on random rows (median of the timed calls after one untimed), dropped fraction."""
        compiled = self.compiled(how, rows)
        x = jax.random.normal(jax.random.PRNGKey(rows), (rows, self.shape.hidden), jnp.float32).astype(self.shape.dtype)
        _, dropped = compiled(self.params, x)
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(self.params, x))
            times.append(time.perf_counter() - start)
        seconds = median(times)
        return {"tokens_per_s": rows / seconds, "us_per_layer": seconds / self.layers * 1e6,
                "dropped_fraction": int(dropped) / (rows * self.shape.top_k * self.layers)}

    def row(self, how: str, rows: int) -> dict:
        return {"model": self.shape.name, "layers": self.layers, "compute": how, "rows": rows,
                "expert_rows_per_layer": expert_rows(self.shape, how, rows, self.args.capacity_factor, self.args.block_rows),
                "footprint_bytes": footprint(self.compiled(how, rows)), **self.time(how, rows)}


def largest_fitting(fits, limit: int, out_of_time=lambda: False, start: int = 1) -> tuple[int, bool]:
    """(the largest n in [1, limit] with fits(n), whether the search was cut short) (monotone: fits(n) implies
    fits(m) for m < n; 0 if none): from `start` (a guess; halved until it fits), doubling, then bisecting until the
    bounds are within 1/16 of each other. Once out_of_time() the search stops at the largest n known to fit, a
    lower bound."""
    if not fits(1):
        return 0, False
    lo, hi, n = 1, None, min(max(1, start), limit)
    while n > 1 and hi is None:  # the guess, or below it until one fits
        if out_of_time():
            return lo, True
        if fits(n):
            lo = n
            break
        hi, n = n, n // 2
    while hi is None:
        n = min(2 * lo, limit)
        if n == lo:
            return lo, False
        if out_of_time():
            return lo, True
        if fits(n):
            lo = n
        else:
            hi = n
    while hi - lo > max(1, lo // 16):
        if out_of_time():
            return lo, True
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def timed_fitting(bench: Bench, how: str, rows: int, tries: int = 4) -> dict:
    """bench.row(how, rows), or where running it exhausts the device's memory (the compiled footprint fits, but the
    allocator's fragmentation or other live buffers leave too little), the same at 7/8 of the rows, up to `tries`
    times: the row says `runtime_shrunk` (times shrunk) or, if none ran, `error`."""
    error = None
    for shrunk in range(tries):
        if rows < 1:
            break
        try:
            return {**bench.row(how, rows), "runtime_shrunk": shrunk}
        except jax.errors.JaxRuntimeError as err:  # --memory-gb beyond what the device can give: say so, go on
            error = f"{type(err).__name__}: {str(err)[:200]}"
            if "RESOURCE_EXHAUSTED" not in str(err):
                break
            rows = rows * 7 // 8
    return {"error": error} if error else {}


def max_batch_rows(bench: Bench, computes: list[str], memory: float, limit: int,
                   seconds: float = float("inf")) -> list[dict]:
    """Per compute, the largest batch (at most `limit` rows) whose footprint fits `memory` bytes, timed, and its
    tokens/s over capacity gating's (x_capacity, x_capacity_einsum). Each compute's search gets an equal share of
    `seconds`; one cut short reports the largest batch it found to fit (`search_cut_short`: a lower bound)."""
    best, end = {}, time.monotonic() + seconds
    for i, how in enumerate(computes):
        deadline = time.monotonic() + (end - time.monotonic()) / (len(computes) - i)
        started = time.monotonic()
        largest, cut = largest_fitting(lambda n, how=how: bench.fits(how, n, memory), limit,
                                       lambda: time.monotonic() > deadline, bench.rows_guess(how, memory))
        best[how] = {"kind": "max-batch", "model": bench.shape.name, "compute": how, "rows": largest,
                     "rows_fitting": largest, "memory_bytes": memory, "at_row_limit": largest == limit,
                     "search_cut_short": cut, "search_s": time.monotonic() - started,
                     "search_share_s": deadline - started}
        best[how].update(timed_fitting(bench, how, largest))
        print(json.dumps(best[how]), flush=True)
    for padded in ("capacity", "capacity-einsum"):
        if best.get(padded, {}).get("tokens_per_s"):
            for row in best.values():
                if row.get("tokens_per_s"):
                    row["x_" + padded.replace("-", "_")] = row["tokens_per_s"] / best[padded]["tokens_per_s"]
    return list(best.values())


def add_best_ratios(rows: list[dict], model: str) -> None:
    """Each max-batch row of `model` gets best_tokens_per_s, the most tokens/s its compute reached in any row of the
    model (capacity-einsum's work grows with N x N, so it may peak below its largest batch), and x_capacity_best
    and x_capacity_einsum_best: that over the padded compute's best (the ratio that credits capacity padding with
    its best batch, not only its largest)."""
    timed = [r for r in rows if r["model"] == model and r.get("tokens_per_s")]
    best = {}
    for row in timed:
        best[row["compute"]] = max(best.get(row["compute"], 0.0), row["tokens_per_s"])
    for row in timed:
        if row["kind"] == "max-batch":
            row["best_tokens_per_s"] = best[row["compute"]]
            for padded in ("capacity", "capacity-einsum"):
                if padded in best:
                    row[f"x_{padded.replace('-', '_')}_best"] = best[row["compute"]] / best[padded]


def add_arguments(parser: argparse.ArgumentParser, shared: bool = True) -> None:
    """This part's options (`--gating-*` and a few unprefixed ones of its own); shared: also --dims and --layers
    (leave them out where the calling script defines them)."""
    group = parser.add_argument_group("gating: dynamic gating vs capacity padding (scripts/bench_gating.py)")
    if shared:
        group.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
        group.add_argument("--layers", type=int, default=None, help="MoE layers per program (default 2, at most the card's)")
    group.add_argument("--gating-models", default=DEFAULT_MODELS, help="cards (default: %(default)s)")
    group.add_argument("--gating-computes", default=",".join(COMPUTES), help="expert computes (default: %(default)s)")
    group.add_argument("--gating-rows", help=f"token rows per call (default {DEFAULT_ROWS}; --dims tiny: {TINY_ROWS})")
    group.add_argument("--gating-repeats", type=int, help="timed calls per point (default 5; --dims tiny: 1)")
    group.add_argument("--capacity-factor", type=float, default=CAPACITY_FACTOR,
                       help="capacity gating: C = ceil(factor x rows x top_k / experts) (default %(default)s)")
    group.add_argument("--block-rows", type=int, default=GROUPED_BLOCK_ROWS, help="grouped: rows per block (default %(default)s)")
    group.add_argument("--memory-gb", type=float,
                       help="device memory for the largest batch (default: the device's limit; --dims tiny: "
                       f"{TINY_MEMORY_GB}); 0: no search")
    group.add_argument("--gating-max-rows", type=int, help=f"most rows the search tries (default 2^20; tiny: {TINY_MAX_ROWS})")
    if shared:
        group.add_argument("--time-budget", type=float, default=1e9,
                           help="seconds: a model (or its max-batch search) that would not fit is skipped")


def _settings(args) -> tuple[list[int], float, int, list[str]]:
    """(rows, memory bytes, row limit, computes) from the arguments and their defaults."""
    tiny = args.dims == "tiny"
    rows = [int(n) for n in (args.gating_rows or (TINY_ROWS if tiny else DEFAULT_ROWS)).split(",")]
    memory_gb = args.memory_gb
    if memory_gb is None:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        memory_gb = TINY_MEMORY_GB if tiny or limit is None else limit / GB
    computes = args.gating_computes.split(",")
    unknown = sorted(set(computes) - set(COMPUTES))
    if unknown or min(rows) < 1 or args.capacity_factor <= 0 or args.block_rows < 1:
        raise SystemExit(f"bench_gating: --gating-computes must be among {', '.join(COMPUTES)} (got {unknown}), "
                         "--gating-rows >= 1, --capacity-factor > 0, --block-rows >= 1")
    return rows, memory_gb * GB, args.gating_max_rows or (TINY_MAX_ROWS if tiny else 1 << 20), computes


def run(args, on_rows=None) -> list[dict]:
    """Rows of every model: kind 'batch' (per compute and token rows) and 'max-batch' (per compute, the largest
    batch that fits the memory and its tokens/s, with x_capacity and x_capacity_einsum: its tokens/s over that
    capacity gating's max-batch tokens/s, and `add_best_ratios`'). on_rows(rows so far), if given, after each
    model (to save partial results)."""
    batch_rows, memory, limit, computes = _settings(args)
    repeats = args.gating_repeats or (1 if args.dims == "tiny" else 5)
    budget = Budget(args.time_budget)
    rows, need, models = [], 0.0, args.gating_models.split(",")
    for i, card in enumerate(models):
        if not budget.allows(need, f"gating {card}"):
            continue
        start = time.monotonic()
        share = budget.left() / (len(models) - i)  # this model's part of what is left, its search included
        shape = moe_shape(card, args.dims == "tiny")
        bench = Bench(shape, min(args.layers or 2, shape.moe_layers), args, repeats)
        for how in computes:
            for n in batch_rows:
                started = time.monotonic()
                rows.append({"kind": "batch", **bench.row(how, n), "seconds": time.monotonic() - started})
                print(json.dumps(rows[-1]), flush=True)
        print(f"gating {card}: batch rows took {time.monotonic() - start:.0f} s of the model's {share:.0f} s",
              flush=True)
        # The search compiles ~2 log2(rows) programs per compute, the largest slowly: it stops at the model's share.
        search_s = start + share - time.monotonic()
        if memory > 0 and search_s > 0:
            rows += max_batch_rows(bench, computes, memory, limit, search_s)
            add_best_ratios(rows, shape.name)
        elif memory > 0:
            print(f"skipped gating {card}: the max-batch search (the batch rows took the model's {share:.0f} s)",
                  flush=True)
        need = time.monotonic() - start
        del bench  # its weights go before the next model's are made
        jax.clear_caches()
        if on_rows is not None:
            on_rows(rows)
    return rows


def print_rows(rows: list[dict]) -> None:
    for kind in ("batch", "max-batch"):
        chosen = [dict(r, footprint_mb=r.get("footprint_bytes", 0) / 1e6,
                       dropped_pct=100 * r.get("dropped_fraction", 0),
                       rows_bound=f"{r['rows']}{'+' if r.get('search_cut_short') else ''}")
                  for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        print(f"\n{kind}:")
        print_table(chosen, [("model", "model", "s"), ("compute", "compute", "s"), ("rows_bound", "rows", "s"),
                             ("tokens_per_s", "tokens/s", ",.0f"), ("us_per_layer", "us/layer", ",.1f"),
                             ("expert_rows_per_layer", "expert rows/layer", ",d"), ("dropped_pct", "dropped %", ".1f"),
                             ("footprint_mb", "footprint MB", ",.1f"), ("x_capacity", "x capacity", ".2f"),
                             ("x_capacity_einsum", "x capacity-einsum", ".2f"),
                             ("best_tokens_per_s", "best tokens/s", ",.0f"),
                             ("x_capacity_einsum_best", "best x capacity-einsum's best", ".2f")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--out", default="bench_gating.json")
    args = parser.parse_args()
    start_backend(smoke=args.dims == "tiny")
    result = {"environment": environment(), "capacity_factor": args.capacity_factor, "block_rows": args.block_rows,
              "rows": []}
    rows = run(args, on_rows=lambda rows: write_json(args.out, {**result, "rows": rows}))
    write_json(args.out, {**result, "rows": rows})
    print_rows(rows)
    print(f"\nrandom weights and routing; tokens/s of the MoE layers alone; capacity factor {args.capacity_factor:g}; "
          f"grouped blocks of {args.block_rows} rows; max-batch: the compiled footprint within the memory "
          "(rows+: the search ran out of time, a lower bound)")


if __name__ == "__main__":
    main()
