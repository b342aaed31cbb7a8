"""The host's time for one routed expert, as `cpu_experts='auto'` computes it (`offload.cpu_experts.HostExperts`):
from its own copy (pinned host store) and from a host-cache slot of the disk tier (`--host-budget`), per expert
format and row count, with the weight bytes it reads per second. The cost model measures the same function at
load; this shows where its time goes on a given host (cores, and XLA:CPU's speed per dtype).

Random normal(0, 0.02) weights of one expert (`--dims`: D x F, default Kimi-K2's 7168 x 2048; Mixtral-8x7B's is
4096 x 14336) in each `--formats` (f32 is the reference for XLA:CPU's arithmetic; bf16, int8, int4 as the engine
keeps them, compact ones dequantized by the engine's own function), written once to an expert file in --dir.

    PYTHONPATH=. python scripts/probe_host_expert.py --out out/probe_host_expert.json
    PYTHONPATH=. python scripts/probe_host_expert.py --dims 128x64 --repeats 2 --out /tmp/probe_host_expert.json  # smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent import futures
from pathlib import Path

import numpy as np

from moejax.offload.cpu_experts import HOST_THREADS, HostExperts
from moejax.offload.expert_files import ExpertFiles, write_expert_files
from moejax.offload.expert_format import ExpertFormat
from moejax.offload.host_cache import HostCache
from moejax.offload.host_ffn import host_operands, split_expert_ffn, split_units_ffn, unit_operands
from scripts.benchlib import environment, median_seconds, print_table, write_json

MODEL_DTYPE = {"f32": "float32"}  # the checkpoint dtype a format is taken from (others: bf16 models)


def expert_in(fmt: ExpertFormat, dims: tuple[int, int], seed: int = 0) -> dict:
    """One expert {name: array} of random float weights of dims (D, F), converted to `fmt`."""
    D, F = dims
    rng = np.random.default_rng(seed)
    weights = {name: rng.standard_normal(shape, np.float32) * 0.02
               for name, shape in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D)))}
    return fmt.convert(weights, "random expert")


def time_layer(fmt: ExpertFormat, dims: tuple[int, int], count: int, repeats: int) -> dict[int, float]:
    """{threads: median seconds} of `HostExperts.compute` on one MoE layer of `count` distinct experts, one token
    row each, every expert on the host, one expert at a time and HOST_THREADS at a time (the engine's)."""
    experts = [expert_in(fmt, dims, seed) for seed in range(count)]
    stack = {name: np.stack([e[name] for e in experts]) for name in experts[0]}
    host = HostExperts.from_stacks([stack], "silu", count)
    x = np.random.default_rng(2).standard_normal((count, dims[0])).astype(fmt.float_dtype)
    ids = np.arange(count, dtype=np.int32)[:, None]
    weights, on_host = np.ones((count, 1), np.float32), np.ones(count, bool)
    out = {}
    for threads in sorted({1, HOST_THREADS}):
        host.threads = threads
        out[threads] = median_seconds(lambda: host.compute(0, x, ids, weights, on_host), repeats)
    return out


def split_sweep(expert: dict, thread_counts, repeats: int) -> list[dict]:
    """[{split, threads, ms, weights_gb_s}]: one row of the bf16 expert cut into as many ranges as threads, each count
    on a pool of its own, both ways the host can cut it: 'units' (`host_ffn.split_units_ffn`, ranges of hidden
    units, one call each: how HostExperts computes its own copy) and 'rows' (`host_ffn.split_expert_ffn`, ranges of
    each projection's input rows: the disk tier's host cache). How a lone expert's time scales with the cores."""
    import jax

    cpu = jax.devices("cpu")[0]  # CPU arrays (aligned, so that the functions read them without a copy)
    splits = {"units": (split_units_ffn, jax.device_put(unit_operands(expert), cpu)),
              "rows": (split_expert_ffn, host_operands(jax.device_put(expert, cpu)))}
    nbytes = sum(w.nbytes for w in expert.values())
    x = np.random.default_rng(3).standard_normal((1, expert["up"].shape[0])).astype(np.float32)
    rows = []
    for threads in thread_counts:
        with futures.ThreadPoolExecutor(threads) as pool:
            for split, (function, operands) in splits.items():
                seconds = median_seconds(lambda: function(x, operands, "silu", threads, pool.map), repeats)
                rows.append({"split": split, "threads": threads, "ms": seconds * 1e3, "weights_gb_s": nbytes / seconds / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="7168x2048", help="D x F of the expert (default Kimi-K2's)")
    parser.add_argument("--formats", default="f32,bf16,int8,int4")
    parser.add_argument("--rows", default="1,8", help="token rows (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, default=8, help="experts of the layer computed at once, one row each")
    parser.add_argument("--sweep", default="1,2,4,8,16", help="thread counts a lone bf16 expert is split over")
    parser.add_argument("--dir", type=Path, help="where the expert files go (default: a temporary directory)")
    parser.add_argument("--out", default="probe_host_expert.json")
    args = parser.parse_args()
    D, F = (int(n) for n in args.dims.lower().split("x"))
    root = args.dir or Path(tempfile.mkdtemp(prefix="moejax-probe-"))
    out = {"environment": environment(), "cpu_cores": os.cpu_count(), "dims": [D, F], "rows": [], "layers": []}
    rng = np.random.default_rng(1)
    for name in args.formats.split(","):
        fmt = ExpertFormat(name, MODEL_DTYPE.get(name, "bfloat16"))
        expert = expert_in(fmt, (D, F))
        shapes = {n: (w.shape, w.dtype) for n, w in expert.items()}
        files_dir = root / f"{D}x{F}-{name}"
        if not files_dir.exists():
            write_expert_files(files_dir, shapes, 1, 1, lambda m, e, expert=expert: expert, expert_format=fmt.record())
        cache = HostCache(ExpertFiles(files_dir, shapes, 1, 1, fmt.record()), 1)
        sources = {"own copy": HostExperts.from_stacks([{n: w[None] for n, w in expert.items()}], "silu", 0),
                   "host cache": HostExperts.from_host_cache(cache, "silu", 0)}
        nbytes = sum(w.nbytes for w in expert.values())
        for count in (int(n) for n in args.rows.split(",")):
            x = rng.standard_normal((count, D)).astype(fmt.float_dtype)
            for source, host in sources.items():
                # as the engine computes a lone host expert: its projections in HOST_THREADS row ranges
                seconds = median_seconds(lambda: host.expert_output(0, 0, x, HOST_THREADS), args.repeats)
                out["rows"].append({"format": name, "source": source, "rows": count, "expert_mb": nbytes / 1e6,
                                    "ms": seconds * 1e3, "weights_gb_s": nbytes / seconds / 1e9})
        cache.close()
        if name == "bf16":
            out["sweep"] = split_sweep(expert, (int(n) for n in args.sweep.split(",")), args.repeats)
        for threads, seconds in time_layer(fmt, (D, F), args.experts, args.repeats).items():
            out["layers"].append({"format": name, "experts": args.experts, "threads": threads, "ms": seconds * 1e3,
                                  "weights_gb_s": args.experts * nbytes / seconds / 1e9})
        write_json(Path(args.out), out)
    print()
    print(f"one {D} x {F} expert on the host ({os.cpu_count()} cores)")
    print_table(out["rows"], [("format", "format", "s"), ("source", "from", "s"), ("rows", "rows", "d"),
                              ("expert_mb", "MB", ".1f"), ("ms", "ms", ".2f"), ("weights_gb_s", "GB/s", ".2f")])
    if out.get("sweep"):
        print("\na lone bf16 expert, one row, cut into `threads` ranges (of hidden units / of input rows) on as many threads")
        print_table(out["sweep"], [("split", "split", "s"), ("threads", "threads", "d"), ("ms", "ms", ".2f"),
                                   ("weights_gb_s", "GB/s", ".2f")])
    print(f"\na layer's {args.experts} host experts, one row each, `threads` at a time (HostExperts.compute; "
          f"the engine's: {HOST_THREADS})")
    print_table(out["layers"], [("format", "format", "s"), ("experts", "experts", "d"), ("threads", "threads", "d"),
                                ("ms", "ms", ".2f"), ("weights_gb_s", "GB/s", ".2f")])


if __name__ == "__main__":
    main()
