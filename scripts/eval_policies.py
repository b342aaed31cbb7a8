"""Cache policies and prefetchers on real routing traces: hit rate against cache capacity (the policy lab).

Fits the EAM collection on one part of the sequences and replays another part through the engine's own
cache code on the CPU (moejax/tools/lab.py: decode order when the trace records no prompt lengths, one cache
shared by all MoE layers, the engine's prefetch limits and schedule):

  LRU, LFU, LIFO, activation          demand fetching only
  LRU / activation + trace             trace prefetcher: the manager stages the likeliest experts of the
                                       next token (EAM match), fetched when the next step begins
  LRU / activation + lookahead         next layer's router one layer early, simulated at --lookahead-accuracy
  activation + trace+lookahead         both
  Belady                               offline optimal eviction (the bound for demand fetching)
  Belady + lookahead                   the same with the lookahead's installs

Writes <out>/eval_policies.json and eval_policies.md (and eval_policies.png with matplotlib).

  PYTHONPATH=. python scripts/eval_policies.py --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.tools.lab import DEFAULT_LOOKAHEAD_ACCURACY, parse_range, plot_curves, replay
from moejax.routing.traces import load_routing

DEFAULT_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "deepseek_v2_lite_prefill.npz"

# label, policy, prefetch
CONFIGS = [
    ("LRU", "lru", "none"),
    ("LFU", "lfu", "none"),
    ("LIFO", "lifo", "none"),
    ("activation", "activation", "none"),
    ("LRU + trace", "lru", "trace"),
    ("activation + trace", "activation", "trace"),
    ("LRU + lookahead", "lru", "lookahead"),
    ("activation + lookahead", "activation", "lookahead"),
    ("activation + trace+lookahead", "activation", "trace+lookahead"),
    ("Belady", "belady", "none"),
    ("Belady + lookahead", "belady", "lookahead"),
]

_state: dict = {}


def _setup(traces: str, fit_range: tuple[int, int], eval_range: tuple[int, int]) -> None:
    trace = load_routing(traces)
    _state.update(eval=trace.select(*eval_range), collection=trace.select(*fit_range).collection())


def _run(job: tuple) -> dict:
    (label, policy, prefetch), capacity, lookahead_accuracy = job
    result = replay(
        _state["eval"], capacity_fraction=capacity, policy=policy, prefetch=prefetch,
        collection=_state["collection"], lookahead_accuracy=lookahead_accuracy if "lookahead" in prefetch else None,
    )
    print(f"  {label:32s} {capacity:4.2f}  hit rate {result['hit_rate'] * 100:5.1f}%  ({result['replay_s']:.0f} s)",
          file=sys.stderr, flush=True)
    return {"label": label, **result}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(results: list[dict], capacities: list[float], meta: dict) -> str:
    by = {(r["label"], r["capacity_fraction"]): r for r in results}
    labels = [c[0] for c in CONFIGS if any(r["label"] == c[0] for r in results)]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    head = "| policy | " + " | ".join(f"{100 * c:g}%" for c in capacities) + " |"
    lines = ["Hit rate (%) by cache capacity (share of all MoE-layer experts):", "", head,
             "|---|" + "---:|" * len(capacities)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(pct(by[label, c]["hit_rate"]) for c in capacities) + " |")
    lines += ["", "Prefetch precision / recall (%) and experts moved per token (demand + prefetch):", "",
              "| policy | " + " | ".join(f"{100 * c:g}%: prec / rec / moved" for c in capacities) + " |",
              "|---|" + "---:|" * len(capacities)]
    for label in labels:
        cells = []
        for c in capacities:
            r = by[label, c]
            moved = r["experts_moved"] / r["tokens"]
            cells.append(f"{pct(r['prefetch_precision'])} / {pct(r['prefetch_recall'])} / {moved:.1f}"
                         if r["prefetch"] != "none" else f"- / - / {moved:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {line}" for line in meta["checks"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("--fit-sequences", help="A:B (default: the first half)")
    parser.add_argument("--eval-sequences", help="A:B (default: the second half)")
    parser.add_argument("--capacities", default="0.1,0.25,0.5")
    parser.add_argument("--lookahead-accuracy", type=float,
                        help=f"simulate lookahead at this accuracy (default: the trace's recorded lookahead, "
                             f"else {DEFAULT_LOOKAHEAD_ACCURACY})")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/lab"))
    args = parser.parse_args(argv)
    try:
        num_sequences = load_routing(args.traces).num_sequences
        fit_range = parse_range(args.fit_sequences or f":{num_sequences // 2}", num_sequences, "--fit-sequences")
        eval_range = parse_range(args.eval_sequences or f"{num_sequences // 2}:", num_sequences, "--eval-sequences")
    except MoejaxError as err:
        print(f"eval_policies: error: {err}", file=sys.stderr)
        return 2
    capacities = [float(c) for c in args.capacities.split(",")]
    jobs = [(config, c, args.lookahead_accuracy) for config in CONFIGS for c in capacities]
    start = time.time()
    print(f"{len(jobs)} replays of sequences {eval_range[0]}:{eval_range[1]}, fit on {fit_range[0]}:{fit_range[1]}",
          file=sys.stderr)
    init = (str(args.traces), fit_range, eval_range)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, initializer=_setup, initargs=init) as pool:
            results = list(pool.map(_run, jobs))
    else:
        _setup(*init)
        results = [_run(job) for job in jobs]

    by = {(r["label"], r["capacity_fraction"]): r for r in results}
    checks = []
    if 0.25 in capacities:
        gain = by["activation + trace", 0.25]["hit_rate"] - by["LRU", 0.25]["hit_rate"]
        checks.append(f"activation + trace vs LRU at 25%: {100 * gain:+.1f} points (target: >= +10)")
    if 0.5 in capacities:
        gap = by["Belady", 0.5]["hit_rate"] - by["activation + trace", 0.5]["hit_rate"]
        checks.append(f"Belady minus activation + trace at 50%: {100 * gap:.1f} points (target: <= 5)")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (CPU only)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": " ".join(["python", "scripts/eval_policies.py", *sys.argv[1:]]),
        "traces": str(args.traces),
        "fit_sequences": list(fit_range),
        "eval_sequences": list(eval_range),
        "eval_tokens": results[0]["tokens"],
        "lookahead_accuracy": args.lookahead_accuracy,
        "wall_s": round(time.time() - start, 1),
        "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "eval_policies.json", json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    table = markdown(results, capacities, meta)
    _write(args.out / "eval_policies.md", table)
    print(table)
    try:
        curves = {}
        for r in results:
            curves.setdefault(r["label"], []).append((r["capacity_fraction"], r["hit_rate"]))
        plot_curves(curves, args.out / "eval_policies.png", f"{args.traces.name}: sequences {eval_range[0]}:{eval_range[1]}")
    except MoejaxError as err:
        print(f"(no PNG: {err})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
