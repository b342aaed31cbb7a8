"""The in-place expert kernels (`moejax.kernels.slab_experts`, expert_compute 'inplace') against today's union
(gather + einsum) on real expert shapes, and through the engine. For one device call (~3-4 minutes with compiles):

  PYTHONPATH=. python scripts/probe_slab_kernel.py --out $OUT/probe_slab_kernel.json
  PYTHONPATH=. python scripts/probe_slab_kernel.py --smoke --out /tmp/probe_slab_kernel.json   # CPU, interpreter

Part 1, per card (`--cards`: Mixtral-8x7B, DeepSeek-V2-Lite, Qwen3-30B-A3B) and rows N (`--rows`): a slab of one MoE
layer's experts (S = the card's experts, random bf16) and U = top_k chosen slots; ms per layer call of
  union     `batched_expert_ffn(x, gathered(slab, slots))`: the gather (a copy of U experts) and the einsums
  inplace   `slab_expert_outputs(x, slab, slots)`: the kernels reading the U experts in the slab, default tiling
  floor     U experts' bytes / the measured HBM bandwidth (elementwise bf16, read + write)
and the largest |union - inplace| (bf16 outputs against f32 ones: expect bf16 rounding). A call is timed as
`--calls` calls in one program (a fori_loop, the slots rotated each call so nothing is loop-invariant or hot in L2),
the median of `--repeats` runs, divided by the calls.
Part 2 (`--engine-layers`, 0: skip): Mixtral-8x7B's shape with that many layers, resident, batch 1, random weights:
TPOT of the engine with expert_compute 'union' and with 'inplace' (the same weights), and the HBM floor.
Part 3 (`--sweep`, while the time budget lasts): other tilings of the kernels (tile widths, K tiles, splits, warps,
stages), for choosing `choose_tiling`'s defaults.
--smoke: tiny widths on the CPU with the kernels in the Pallas interpreter (the figures mean nothing), and first every
tiling the GPU run would try lowered to Triton IR for CUDA at the cards' real shapes (the GPU path up to PTX).

The table is printed last; the JSON is rewritten after every row (a run cut short keeps what it measured). A kernel
that fails to lower or run becomes an error row (the first failure's traceback is printed), the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback

import numpy as np

from scripts.benchlib import Budget, GB, environment, median, print_table, start_backend, write_json

DEFAULT_CARDS = "mixtral-8x7b,deepseek-v2-lite,qwen3-30b-a3b"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cards", default=DEFAULT_CARDS, help="expert shapes of these cards (default: %(default)s)")
    parser.add_argument("--rows", default="1,8", help="token rows per call (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=20, help="layer calls per timed program")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine-layers", type=int, default=8, help="Mixtral-shape engine row's layers (0: none)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="other tilings (part 3)")
    parser.add_argument("--time-budget", type=float, default=180, help="seconds; parts that would not fit are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny widths on the CPU, kernels in the interpreter")
    parser.add_argument("--out", default="probe_slab_kernel.json")
    args = parser.parse_args()
    budget = Budget(args.time_budget)
    start_backend(smoke=args.smoke)

    import jax

    from scripts.benchlib import hbm_bandwidth

    bandwidth = hbm_bandwidth(64 << 20 if args.smoke else 1 << 30)
    print(f"{jax.devices()[0]}; HBM bandwidth (elementwise bf16, read + write): {bandwidth / GB:.0f} GB/s", flush=True)
    result = {"environment": environment(), "hbm_bandwidth_bytes_per_s": bandwidth, "calls": args.calls,
              "repeats": args.repeats, "rows": []}
    rows = result["rows"]

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(args.out, result)

    cards, counts = args.cards.split(","), [int(n) for n in args.rows.split(",")]
    if args.smoke:
        for row in lowering_rows(cards, counts):
            add(row)
    problems = [Layer.of(card, args.smoke) for card in cards]
    # union everywhere first: a kernel that faults the GPU leaves today's figures behind it
    for layer in problems:
        for n in counts:
            for row in layer.union_rows(n, bandwidth, args):
                add(row)
    for layer in problems:
        for n in counts:
            add(layer.inplace_row(n, bandwidth, args))
    if args.engine_layers and budget.allows(100, "the engine rows"):
        for row in engine_rows(args, bandwidth):
            add(row)
    if args.sweep:
        for layer in problems:
            for n in counts:
                for tilings in layer.variants(n):
                    if not budget.allows(8, f"sweep {layer.card} N={n}"):
                        break
                    add(layer.time_inplace(n, bandwidth, args, tilings))

    print(f"\nper layer call, bf16, {args.calls} calls per program, median of {args.repeats}; "
          f"HBM {bandwidth / GB:.0f} GB/s")
    print_table(rows, [("card", "card", "s"), ("rows", "N", "d"), ("compute", "compute", "s"),
                       ("tiling", "tiling (rows,cols,k,splits,warps,stages: gate/up | down)", "s"),
                       ("ms", "ms", ".3f"), ("x_floor", "x floor", ".2f"), ("max_abs_diff", "max |diff|", ".2e"),
                       ("error", "error", "s")])


@dataclasses.dataclass
class Layer:
    """One MoE layer's experts of a card's shape: slab {name: [S, ...]} bf16 on the device, U = top_k."""

    card: str
    dim: int
    ffn: int
    slots: int
    chosen: int
    slab: dict
    first_error: list

    @classmethod
    def of(cls, card: str, smoke: bool) -> Layer:
        import jax

        from moejax.models.decoder import random_experts
        from scripts.benchlib import model_config

        cfg = model_config(card, None, smoke)  # widths only: no layer is built
        slab = random_experts(cfg, jax.random.PRNGKey(0))
        return cls(card, cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.top_k, slab, [])

    @property
    def floor_bytes(self) -> int:
        return self.chosen * sum(int(np.prod(w.shape[1:])) * w.dtype.itemsize for w in self.slab.values())

    def inputs(self, n: int):
        import jax
        import jax.numpy as jnp

        rng = np.random.default_rng(n)
        x = jax.device_put(jnp.asarray(rng.normal(size=(n, self.dim)), jnp.bfloat16))
        return x, jnp.asarray(np.sort(rng.choice(self.slots, self.chosen, replace=False)), jnp.int32)

    def base(self, n: int, compute: str, tilings) -> dict:
        return {"card": self.card, "D": self.dim, "F": self.ffn, "S": self.slots, "U": self.chosen, "rows": n,
                "compute": compute, "tiling": describe(tilings)}

    def union_rows(self, n: int, bandwidth: float, args) -> list[dict]:
        """union and the floor at n rows."""
        x, slots = self.inputs(n)
        floor = {**self.base(n, "floor", None), "ms": self.floor_bytes / bandwidth * 1e3, "bytes": self.floor_bytes}
        return [{**self.base(n, "union", None), **self.timed(union, x, slots, bandwidth, args)}, floor]

    def inplace_row(self, n: int, bandwidth: float, args) -> dict:
        """inplace with the default tiling at n rows, and its largest difference from union."""
        import jax

        from moejax.kernels.slab_experts import slab_expert_outputs

        row = self.time_inplace(n, bandwidth, args, None)
        if "error" not in row:
            x, slots = self.inputs(n)
            ours = np.asarray(jax.jit(slab_expert_outputs)(x, self.slab, slots))
            theirs = np.asarray(jax.jit(union)(x, self.slab, slots), np.float32)
            row.update(max_abs_diff=float(np.abs(ours - theirs).max()), max_abs_output=float(np.abs(theirs).max()))
        return row

    def time_inplace(self, n: int, bandwidth: float, args, tilings) -> dict:
        """inplace at n rows with `tilings` (None: the default, `choose_tiling`'s)."""
        from moejax.kernels.slab_experts import choose_tiling, slab_expert_outputs

        x, slots = self.inputs(n)
        run = lambda x, slab, slots: slab_expert_outputs(x, slab, slots, tilings=tilings)  # noqa: E731
        row = {**self.base(n, "inplace", tilings), **self.timed(run, x, slots, bandwidth, args)}
        if tilings is None:
            default = (choose_tiling(self.chosen, n, self.dim, self.ffn), choose_tiling(self.chosen, n, self.ffn, self.dim))
            row.update(compute="inplace (default)", tiling=describe(default))
        return row

    def timed(self, fn, x, slots, bandwidth: float, args) -> dict:
        """ms per call of fn(x, slab, slots) -> [U, N, D], `args.calls` calls per program with rotated slots."""
        import jax
        import jax.numpy as jnp

        @jax.jit
        def program(x, slab, slots):
            def call(i, acc):
                return acc + fn(x, slab, (slots + i) % self.slots).astype(jnp.float32).sum(axis=0)

            return jax.lax.fori_loop(0, args.calls, call, jnp.zeros(x.shape, jnp.float32))

        try:
            start = time.perf_counter()
            program(x, self.slab, slots).block_until_ready()
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                program(x, self.slab, slots).block_until_ready()
                times.append(time.perf_counter() - start)
        except Exception as err:  # a probe: report it and go on
            if not self.first_error:
                self.first_error.append(err)
                traceback.print_exc()
            return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"}
        ms = median(times) / args.calls * 1e3
        return {"ms": ms, "compile_s": round(compile_s, 2), "x_floor": ms / (self.floor_bytes / bandwidth * 1e3)}

    def variants(self, n: int) -> list[tuple]:
        return tiling_variants(self.chosen, n, self.dim, self.ffn)


def tiling_variants(chosen: int, n: int, dim: int, ffn: int) -> list[tuple]:
    """Tilings besides the default for `chosen` experts on n rows: (gate/up, down) pairs, each knob changed alone."""
    from moejax.kernels.slab_experts import choose_tiling

    pick = lambda **kw: (choose_tiling(chosen, n, dim, ffn, **kw), choose_tiling(chosen, n, ffn, dim, **kw))  # noqa: E731
    knobs = [dict(block_cols=32), dict(block_cols=128), dict(block_k=64), dict(block_k=256, num_stages=2),
             dict(target_programs=128), dict(target_programs=512), dict(num_warps=8), dict(num_stages=4)]
    default = pick()
    return [t for t in dict.fromkeys(pick(**k) for k in knobs) if t != default]


def lowering_rows(cards: list[str], counts: list[int]) -> list[dict]:
    """The smoke run's check of the GPU path on the CPU: every tiling the GPU run would try, at the cards' real
    shapes (bf16, the slab of all MoE layers' experts), lowered to Triton IR for CUDA (abstract arrays: nothing is
    allocated; Triton's own compilation to PTX happens only on the GPU)."""
    import jax
    import jax.numpy as jnp

    from moejax.cards import load_card
    from moejax.kernels.slab_experts import slab_expert_outputs
    from moejax.models.decoder import expert_shapes

    rows = []
    for card in cards:
        cfg = load_card(card)
        slots = len(cfg.moe_layer_ids) * cfg.num_experts
        slab = {name: jax.ShapeDtypeStruct((slots, *shape), cfg.dtype) for name, shape in expert_shapes(cfg).items()}
        for n in counts:
            args = jax.ShapeDtypeStruct((n, cfg.hidden_size), cfg.dtype), slab, jax.ShapeDtypeStruct((cfg.top_k,), jnp.int32)
            tried = [None, *tiling_variants(cfg.top_k, n, cfg.hidden_size, cfg.expert_intermediate_size)]
            failed = []
            for tilings in tried:
                compute = jax.jit(lambda x, slab, slots, t=tilings: slab_expert_outputs(x, slab, slots, tilings=t,
                                                                                       interpret=False))
                try:
                    compute.trace(*args).lower(lowering_platforms=("cuda",))
                except Exception as err:  # a probe: report it and go on
                    failed.append(f"{describe(tilings)}: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}")
            rows.append({"card": card, "S": slots, "rows": n, "compute": "inplace lowers for cuda",
                         "tiling": f"{len(tried) - len(failed)}/{len(tried)} tilings", **({"error": failed} if failed else {})})
    return rows


def union(x, slab, slots):
    """Today's union: the chosen experts gathered (a copy), then the einsums -> [U, N, D] bf16."""
    from moejax.models.moe import batched_expert_ffn, gathered

    return batched_expert_ffn(x, gathered(slab, slots))


def describe(tilings) -> str:
    if tilings is None:
        return "-"
    return " | ".join(",".join(str(v) for v in dataclasses.astuple(t)) for t in tilings)


def engine_rows(args, bandwidth: float) -> list[dict]:
    """Mixtral-8x7B's shape, `args.engine_layers` layers, resident, batch 1: TPOT of union and inplace engines on
    the same random weights, and the HBM floor."""
    import gc

    import jax

    from moejax.engine.loading import build_engine
    from moejax.offload.config import OffloadConfig
    from scripts.benchlib import (
        active_bytes_per_token, model_config, random_dense_params, random_expert_stacks, time_generate,
    )

    cfg = model_config("mixtral-8x7b", args.engine_layers, args.smoke)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 32).tolist()
    dense = random_dense_params(cfg)
    label = f"mixtral-8x7b engine ({cfg.num_layers} layers)"
    rows, tokens = [], {}
    for compute in ("union", "inplace"):
        start = time.perf_counter()
        try:
            engine = build_engine(cfg, *dense, random_expert_stacks(cfg), OffloadConfig("resident"), slots=1,
                                  max_seq_len=128, prefill_chunk=32, expert_compute=compute)
            timing = time_generate(engine, prompt, args.new_tokens, 2)
        except Exception as err:
            traceback.print_exc()
            rows.append({"card": label, "rows": 1, "compute": compute,
                         "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"})
            continue
        finally:
            engine = None
            gc.collect()
        tokens[compute] = timing.pop("tokens")
        rows.append({"card": label, "rows": 1, "compute": compute, "ms": timing["tpot_s"] * 1e3,
                     "ttft_ms": timing["ttft_s"] * 1e3, "seconds": round(time.perf_counter() - start, 1)})
        jax.clear_caches()
    floor = active_bytes_per_token(cfg, 32 + args.new_tokens // 2)["total_bytes"] / bandwidth * 1e3
    for row in rows:
        if "ms" in row:
            row["x_floor"] = row["ms"] / floor
    if len(tokens) == 2:
        same = [a == b for a, b in zip(tokens["union"], tokens["inplace"])]
        rows[-1]["tokens_equal_union"] = all(same)
        rows[-1]["first_token_differing"] = same.index(False) if not all(same) else None
    rows.append({"card": label, "rows": 1, "compute": "HBM floor", "ms": floor})
    return rows


if __name__ == "__main__":
    main()
