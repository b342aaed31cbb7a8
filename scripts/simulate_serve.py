"""Scheduling policies judged offline on a GPU run's measured speed: `serving.simulate` (the serving loop's
turns in virtual time) with the step times, SLOs and service rate that `scripts/bench_serve.py`'s slo part
recorded for a model, on more and other Poisson workloads than the GPU run had time for.

Per load of --loads ('Nx': N x the recorded unloaded service rate) and scheduler of --schedulers, --seeds
workloads of --requests arrivals drawn as bench_serve draws them (prompts of --task-mix, tokenized by the
shipped model's tokenizer; the recorded --max-prompt, --min-tokens, --max-tokens): SLO attainment (mean, min,
max over the seeds), refusals, p50 TTFT and TPOT. The times are the recorded ones (or --decode-by-batch's), not
measured here, each step's varied by --variation: the figures are a model's, to be checked against the GPU rows
(bench_serve's slo.simulated rows compare both).

    PYTHONPATH=. python scripts/simulate_serve.py --run bench_serve.json --model tiny-moe \\
        --task-mix ../shared/data/prompts/tasks.jsonl --out simulate_serve.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

import moejax
from moejax.errors import MoejaxError
from moejax.serving import loadgen
from moejax.serving.requests import SLO
from moejax.serving.scheduler import Scheduler, SLOScheduler, StepTimes, make_scheduler
from moejax.serving.simulate import simulate
from moejax.tokenizer import load_tokenizer
from scripts.bench_serve import load_rps, parse_loads
from scripts.benchlib import print_table, write_json


def recorded(run: Path, model: str) -> tuple[dict, dict]:
    """(the slo part's record of `model`, the run's arguments) from a bench_serve JSON; one-line errors."""
    try:
        data = json.loads(run.read_text())
    except (OSError, ValueError) as err:
        raise MoejaxError(f"{run}: cannot read a bench_serve JSON ({err})") from None
    models = data.get("slo", {}).get("models", {})
    if model not in models:
        raise MoejaxError(f"{run}: no slo record of model '{model}' (it has: {', '.join(models) or 'none'})")
    if not models[model].get("step_times"):
        raise MoejaxError(f"{run}: model '{model}' has no measured step times")
    return models[model], data["args"]


def decode_table(text: str) -> tuple[tuple[int, float], ...]:
    """'1:0.035,2:0.11' -> ((1, 0.035), (2, 0.11))."""
    try:
        pairs = [item.split(":") for item in text.split(",")]
        return tuple((int(n), float(t)) for n, t in pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not BATCH:SECONDS,... (e.g. 1:0.035,2:0.11)") from None


def scheduler(name: str, args) -> Scheduler:
    """A fresh policy `name`; slo with the --slo-* settings."""
    if name == "slo":
        return SLOScheduler(margin=args.slo_margin, expire=args.slo_expire == "on")
    return make_scheduler(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a bench_serve.py JSON with an slo part")
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--task-mix", type=Path, required=True)
    p.add_argument("--loads", type=parse_loads, default=parse_loads("1x,2x,4x,8x"))
    p.add_argument("--schedulers", default="fcfs,slo")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--slo-margin", type=float, default=0.1, help="slo's planning margin on the step times")
    p.add_argument("--slo-expire", choices=("on", "off"), default="on",
                   help="off: slo serves queued requests past their TTFT objective instead of refusing them")
    p.add_argument("--variation", type=float, default=0.0,
                   help="sigma of a lognormal factor on each step's time (0.3: steps vary by about 30%%)")
    p.add_argument("--decode-by-batch", type=decode_table, default=None,
                   help="decode step seconds per batch size instead of the recorded ones, e.g. 1:0.035,2:0.11,4:0.19")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    try:
        record, run_args = recorded(args.run, args.model)
        mix = loadgen.read_task_mix(args.task_mix)
    except MoejaxError as err:
        raise SystemExit(f"error: {err}") from None
    times = StepTimes(**record["step_times"])
    if args.decode_by_batch is not None:
        times = dataclasses.replace(times, decode_by_batch=args.decode_by_batch)
    slos = {task: SLO(**slo) for task, slo in record["slos"].items()}
    tokenizer = load_tokenizer(moejax.SHIPPED_CHECKPOINT)
    encode = lambda text: tokenizer.encode(text)  # noqa: E731 - lengths are all a simulation needs
    shape = {k: run_args[k] for k in ("max_prompt", "min_tokens", "max_tokens")}
    slots = run_args.get("max_batch") or record["slots"]
    rows = []
    for load in args.loads:
        rps = load_rps(load, record["service_rate_rps"])
        workloads = [loadgen.draw_arrivals(mix, rps, seed=seed, count=args.requests, encode=encode, **shape)
                     for seed in range(args.seeds)]
        for name in args.schedulers.split(","):
            runs = [simulate(arrivals, slos, scheduler(name, args), times, slots=slots, max_queue=run_args["max_queue"],
                             variation=args.variation, seed=seed).summary for seed, arrivals in enumerate(workloads)]
            attained = [r["attainment_pct"] for r in runs]
            rows.append({"load": load, "offered_rps": rps, "scheduler": name,
                         "attainment_pct": float(np.mean(attained)),
                         "attainment_min": min(attained), "attainment_max": max(attained),
                         "refused": float(np.mean([r["refused"] for r in runs])),
                         "ttft_p50_s": float(np.median([r["ttft_p50_s"] for r in runs])),
                         "tpot_p50_s": float(np.median([r["tpot_p50_s"] for r in runs]))})
    print(f"{args.model}: step times {times} (varying by a lognormal of sigma {args.variation}), {slots} slots, "
          f"{args.requests} requests x {args.seeds} seeds (recorded in {args.run})")
    print_table(rows, [("load", "load", "s"), ("scheduler", "sched", "s"),
                       ("attainment_pct", "SLO % (mean)", ".1f"), ("attainment_min", "min", ".1f"),
                       ("attainment_max", "max", ".1f"), ("refused", "refused", ".1f"),
                       ("ttft_p50_s", "TTFT p50", ".3f"), ("tpot_p50_s", "TPOT p50", ".4f")])
    write_json(args.out, {"run": str(args.run), "model": args.model, "step_times": dataclasses.asdict(times),
                          "variation": args.variation, "slo_margin": args.slo_margin, "slo_expire": args.slo_expire, "requests": args.requests, "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":
    main()
