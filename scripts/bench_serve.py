"""Serving many requests (issue 21): throughput vs batch, dynamic gating vs capacity padding, and SLO
attainment under a Poisson load. `--parts throughput,gating,slo` (default all, in that order); one JSON
(--out, written after every row) and the parts' tables, printed last.

throughput  DeepSeek-V2-Lite (its card, random weights) at an expert budget of --budget, experts in pinned
            host memory, DeepSeek-V2-Lite's recorded routing replayed (`bench_prefetch.RoutingReplay`
            through `Engine.routing_override`: each slot replays a recorded sequence of its own). Per batch of
            --batches: the engine's step API directly (no serving loop: what the batch does to a step),
            B prompts of --prompt-len random tokens prefilled, then --new-tokens - 1 decode steps of all
            B; a warm-up pass on other sequences first (compiles, fills the cache); all of it per cache
            policy of --policies (default lru and activation; 'resident': the all-resident engine, whose step is
            the compute alone, the other term of a step's floor); --one-by-one: every miss fetched by itself, never
            out of a copy of its whole layer (`ProgramSpec.whole_layer_from` None; to time what that gains);
            --cpu-experts off,auto: each policy also with missed experts routed few tokens computed on the host
            (`offload.cpu_experts`: a batch's union of misses split between the host and the link; auto-float32:
            from a float32 copy in host RAM, twice the bf16 experts' bytes); --layer-stream off,auto: each also
            with wide steps as one program (off) and as layer programs whose whole layers the host stages while the
            device computes (auto, the engine's default: `engine.layer_stream`); the second's rows say whether
            their decode steps gave the first's tokens (they must). Per row: output
            tokens/s (B x steps / decode time), step time (the mean), the experts each step needs (the
            union of its tokens' choices, summed over MoE layers) and moves, bytes moved per step, its
            link floor (those bytes / the pinned host -> device bandwidth, measured with expert-sized
            copies as the other benchmarks do), step time / link floor and tokens/s / batch 1's (of the same
            policy, --cpu-experts and --layer-stream values); with cpu experts, the experts the host computed per
            step, its seconds, and those over the cost model's estimate of them (cpu_x_cost_model, JSON only), the
            seconds a step's device waited for the host's sums (cpu_wait_s_per_step: host work not hidden) and
            those waits with the callbacks' round trips over the link time the host's experts saved
            (cpu_x_saved, JSON only: > 1, the host cost more than copying would have, and the engine then copied
            every miss: cpu_stopped).
gating      `scripts/bench_gating.py` (`add_arguments(parser)`, `run(args) -> rows`): dynamic gating vs
            capacity padding. Its options are accepted here too; without the module the part reports
            that it is missing.
slo         Per model of --slo-models (tiny-moe: the shipped model, `moejax.SHIPPED_CHECKPOINT`, with
            --tiny-offload; a card name: a random model of its shape, --slo-layers layers, cached at
            --budget), served by `serving.loop.ServingLoop` with --slots KV slots:
            1. calibration: --calibration-per-task prompts of each task of the task mix, one at a time
               (after one per task as a warm-up): each task's unloaded TTFT, TPOT and latency. The SLOs
               of a task: TTFT --ttft-slo-factor x its unloaded TTFT, TPOT --tpot-slo-factor x its
               unloaded TPOT (`loadgen.slos_from_calibration`).
            2. a warm-up run (fcfs) of --warmup-requests Poisson arrivals at the largest of --loads, on
               other prompts: it compiles the batched step programs the measured runs use.
            3. per offered load of --loads (requests/s; 'Nx': N x the unloaded service rate, 1 / the mean
               of the tasks' unloaded latencies) and per scheduler of --schedulers: --requests Poisson
               arrivals (the same ones for every scheduler at a load; at most --max-run-s of them) with
               prompts drawn from --task-mix (`moejax.serving.loadgen`), a fresh loop over the same
               engine, given the step times the warm-up run measured (so `slo` orders and refuses by the
               engine's speed from the first arrival). Per row: SLO attainment (% of all requests
               finished within both SLOs; refused, failed and unfinished ones count as missed), p50/p99
               TTFT and TPOT, goodput (SLO-meeting requests/s), output tokens/s, refusals, and the
               programs compiled during the run (should be 0: the warm-up compiles them). The same
               arrivals also go through `serving.simulate` (the loop's turns in virtual time with the
               warm-up's step times), for every load and scheduler even where the time budget skips the
               run: the JSON's slo.simulated rows, printed with the table.
            Prompts are tokenized by the shipped model's tokenizer (ids folded into a random model's
            vocabulary: it needs only realistic lengths), cut to --max-prompt tokens; a request's
            max_tokens is its reference answer's token count within [--min-tokens, --max-tokens], and it
            ignores EOS (a fixed output length per request). A PNG (--plot; needs matplotlib, the `plot`
            extra) plots p50/p99 TTFT and TPOT and attainment against the offered load; `--replot JSON`
            prints a written JSON's tables and draws that PNG again, running nothing (a run without
            matplotlib, or a plot to redraw).

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/bench_serve.py \\
      --traces .data/traces/deepseek_v2_lite_prefill.npz --task-mix .data/prompts/tasks.jsonl --out $OUT/bench_serve.json
  SMOKE=1 TASKS=../shared/data/prompts/tasks.jsonl scripts/gpu_session.sh serve   # CPU smoke run (its arguments)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib
import json
import os
import time
import traceback
from pathlib import Path

import jax
import numpy as np

import moejax
from moejax.errors import MoejaxError
from moejax.engine.layer_stream import LAYER_STREAM
from moejax.offload.cpu_experts import CPU_EXPERTS
from moejax.offload.stats import experts_moved
from moejax.routing.traces import RoutingTrace, load_routing
from moejax.serving import loadgen
from moejax.serving.loop import ServingLoop, serving_cache_policy
from moejax.serving.scheduler import make_scheduler
from moejax.serving.simulate import simulate
from moejax.tokenizer import load_tokenizer
from scripts.bench_prefetch import RoutingReplay
from scripts.benchlib import (
    GB, ROOT, Budget, build_random_engine, environment, median, model_config, pinned_bandwidth, pinned_stacks,
    print_table, random_dense_params, start_backend, write_json,
)

PARTS = ("throughput", "gating", "slo")
TINY_MOE = "tiny-moe"
RESIDENT = "resident"  # a --policies value: the all-resident engine
DEFAULT_TASK_MIX = ROOT.parent / "shared" / "data" / "prompts" / "tasks.jsonl"
# The most telling first (where fcfs misses), cheapest too (the arrivals come fast): a time budget skips the last.
DEFAULT_LOADS = "32x,16x,8x,4x,2x"
THROUGHPUT_COLUMNS = [
    ("policy", "policy", "s"), ("cpu_experts", "cpu", "s"), ("layer_stream", "stream", "s"), ("batch", "batch", "d"),
    ("tokens_per_s", "tok/s", ".1f"),
    ("x_batch1", "x batch 1", ".3f"), ("same_tokens_other_stream", "same tokens as other stream", ""),
    ("step_s", "step s", ".4f"), ("experts_needed_per_step", "experts needed/step", ".1f"),
    ("experts_moved_per_step", "moved/step", ".1f"), ("hit_rate", "hit", ".3f"), ("gb_per_step", "GB/step", ".3f"),
    ("link_floor_s", "link floor s", ".4f"), ("x_link_floor", "x link floor", ".2f"),
    ("layers_staged_per_step", "staged/step", ".1f"), ("cpu_experts_per_step", "cpu experts/step", ".1f"),
    ("cpu_s_per_step", "cpu s/step", ".4f"), ("cpu_wait_s_per_step", "cpu wait s/step", ".4f")]
SLO_COLUMNS = [
    ("model", "model", "s"), ("scheduler", "sched", "s"), ("load", "load", "s"), ("offered_rps", "req/s", ".2f"),
    ("requests", "n", "d"), ("attainment_pct", "SLO %", ".1f"), ("ttft_p50_s", "TTFT p50", ".3f"),
    ("ttft_p99_s", "TTFT p99", ".3f"), ("tpot_p50_s", "TPOT p50", ".4f"), ("tpot_p99_s", "TPOT p99", ".4f"),
    ("goodput_rps", "goodput req/s", ".2f"), ("output_tokens_per_s", "tok/s", ".1f"), ("refused", "refused", "d"),
    ("programs_compiled", "compiled", "d")]


# -- throughput ---------------------------------------------------------------------------------------------
def decode_batch(engine, replay: RoutingReplay, sequences: list[int], prompt: list[int], new_tokens: int) -> dict:
    """Slots 0..B-1 replay `sequences`: B prefills of `prompt`, then new_tokens - 1 decode steps of all B,
    timed; the statistics cover the decode steps only. -> the row's measured figures."""
    batch = len(sequences)
    for slot, sequence in enumerate(sequences):
        replay.assign(slot, sequence)
        engine.prefill(slot, prompt, max_new_tokens=new_tokens)
    engine.reset_stats()
    steps, times, tokens = new_tokens - 1, [], []
    start = time.perf_counter()
    for _ in range(steps):
        step_start = time.perf_counter()
        produced = engine.decode()
        times.append(time.perf_counter() - step_start)
        if len(produced) != batch:
            raise MoejaxError(f"a decode step returned {len(produced)} tokens for a batch of {batch}")
        tokens.append([produced[slot] for slot in range(batch)])
    seconds = time.perf_counter() - start
    stats = engine.stats()
    total, host = stats["total"], stats.get("cpu_experts") or {}
    for slot in range(batch):
        engine.release(slot)
    engine.finish_pending()
    return {"batch": batch, "steps": steps, "decode_s": seconds, "step_s": seconds / steps, "step_p50_s": median(times),
            "tokens_per_s": batch * steps / seconds, "bytes_per_step": total["bytes_h2d"] / steps,
            "gb_per_step": total["bytes_h2d"] / steps / GB, "experts_needed_per_step": total["activations"] / steps,
            "experts_moved_per_step": experts_moved(total) / steps,
            "hit_rate": total["hit_rate"], "cpu_experts_per_step": host.get("experts", 0) / steps,
            "cpu_s_per_step": host.get("seconds", 0.0) / steps, "cpu_cost_model": host.get("cost_model"),
            "cpu_x_cost_model": host.get("x_cost_model"), "cpu_wait_s_per_step": host.get("wait_s", 0.0) / steps,
            "cpu_x_saved": host.get("x_saved"), "cpu_stopped": host.get("stopped"),
            "layers_staged_per_step": stats.get("layer_stream", {}).get("layers_staged", 0) / steps,
            "tokens_digest": hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:16]}


def routing_for(cfg, path: str, tiny: bool) -> RoutingTrace:
    trace = load_routing(path)
    if tiny:  # the smoke model's first MoE layers replay the recorded first layers
        trace = RoutingTrace(trace.experts[: len(cfg.moe_layer_ids)], trace.seq_lens, trace.num_experts)
    if (trace.num_layers, trace.num_experts, trace.top_k) != (len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k):
        raise SystemExit(f"--traces {path}: routing of {trace.num_layers} MoE layers x {trace.num_experts} experts, "
                         f"top-{trace.top_k}, does not match the {cfg.num_experts}-expert top-{cfg.top_k} model")
    return trace


def throughput_part(args, budget: Budget, out: dict, save) -> None:
    tiny = args.dims == "tiny"
    cfg = model_config(args.card, None, tiny)
    trace = routing_for(cfg, args.traces, tiny)
    batches = sorted(args.batches)
    needed = args.prompt_len + args.new_tokens - 1
    long_enough = [s for s in range(trace.num_sequences) if trace.seq_lens[s] >= needed]
    if len(long_enough) < 2 * batches[-1]:
        raise SystemExit(f"--traces {args.traces}: {len(long_enough)} sequences of >= {needed} tokens "
                         f"(--prompt-len + --new-tokens - 1), fewer than 2 x the largest batch {batches[-1]}")
    device = jax.devices()[0]
    bandwidth = pinned_bandwidth(cfg, device)
    print(f"pinned host -> device: {bandwidth / GB:.2f} GB/s", flush=True)
    dense, stacks = random_dense_params(cfg), pinned_stacks(cfg, device)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    part = out["throughput"] = {"card": args.card, "budget": args.budget, "one_by_one": args.one_by_one,
                                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                "bandwidth_bytes_per_s": bandwidth, "rows": []}
    need, took = 0.0, {}  # took: seconds of each batch's rows under the first policy
    configs = [(p, c, s) for p in args.policies for c in args.cpu_experts for s in args.layer_stream
               if p != RESIDENT or (c, s) == (args.cpu_experts[0], args.layer_stream[0])]
    for policy, cpu_experts, layer_stream in configs:
        start = time.monotonic()
        sizes = dict(slots=batches[-1], max_seq_len=args.prompt_len + args.new_tokens, prefill_chunk=args.prompt_len)
        if policy == RESIDENT:  # every expert on the device: the steps' compute alone, nothing moves
            cpu_experts, layer_stream = "off", "off"
            engine = build_random_engine(cfg, RESIDENT, dense, stacks, **sizes)
        else:
            engine = build_random_engine(cfg, "cached", dense, stacks, **sizes, expert_budget=args.budget,
                                         cache_policy=policy, cpu_experts=cpu_experts, layer_stream=layer_stream,
                                         **({"whole_layer_from": None} if args.one_by_one else {}))
        replay = RoutingReplay(trace)
        engine.routing_override = replay
        if policy != RESIDENT:
            part.update(capacity_experts=engine.cache.num_slots, expert_bytes=cfg.expert_bytes,
                        whole_layer_from=engine.spec.whole_layer_from)
        slots = "every expert on the device" if policy == RESIDENT else f"{engine.cache.num_slots} expert slots"
        print(f"{args.card} ({args.dims}) {policy}, cpu-experts {cpu_experts}, layer-stream {layer_stream}: built in "
              f"{time.monotonic() - start:.0f} s, {slots}", flush=True)
        for batch in batches:
            need = took.get(batch, need)
            config = f"{policy} cpu-experts {cpu_experts} layer-stream {layer_stream}"
            if not budget.allows(need, f"throughput {config} batch {batch}"):
                part.setdefault("skipped", []).append(f"{config} batch {batch}")
                save()
                continue
            start = time.monotonic()
            decode_batch(engine, replay, long_enough[batch : 2 * batch], prompt, args.new_tokens)  # warm-up
            row = {"policy": policy, "cpu_experts": cpu_experts, "layer_stream": layer_stream,
                   **decode_batch(engine, replay, long_enough[:batch], prompt, args.new_tokens)}
            row["link_floor_s"] = row["bytes_per_step"] / bandwidth
            row["x_link_floor"] = row["step_s"] / row["link_floor_s"] if row["link_floor_s"] else None
            ones = [r for r in part["rows"] + [row] if (r["policy"], r["cpu_experts"], r["layer_stream"], r["batch"])
                    == (policy, cpu_experts, layer_stream, 1)]
            row["x_batch1"] = row["tokens_per_s"] / ones[0]["tokens_per_s"] if ones else None
            # the other --layer-stream value's row of this batch: the same tokens? (the layer programs must not
            # change a token; None: not run yet)
            twins = [r for r in part["rows"] if r["layer_stream"] != layer_stream
                     and (r["policy"], r["cpu_experts"], r["batch"]) == (policy, cpu_experts, batch)]
            row["same_tokens_other_stream"] = twins[0]["tokens_digest"] == row["tokens_digest"] if twins else None
            part["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
            took.setdefault(batch, time.monotonic() - start)
            need = 2 * took[batch]  # the next batch is larger
        del engine
        gc.collect()


# -- gating -------------------------------------------------------------------------------------------------
def gating_module():
    """scripts/bench_gating.py (the gating helper's), or None where it is not there."""
    try:
        return importlib.import_module("scripts.bench_gating")
    except ModuleNotFoundError as err:
        if err.name not in ("scripts.bench_gating", "scripts"):
            raise
        return None


def gating_part(module, gating_args, args, budget: Budget, out: dict, save) -> None:
    if module is None:
        out["gating"] = {"error": "scripts/bench_gating.py is missing: part not run"}
        print("gating: scripts/bench_gating.py is missing: part not run", flush=True)
        save()
        return
    shared = {"dims": args.dims, "out": args.out.with_name(args.out.stem + "_gating.json")}
    for name, value in shared.items():
        if hasattr(gating_args, name):  # the options both scripts know are given once, here
            setattr(gating_args, name, value)
    # Half of what is left when the slo part comes after: its max-batch searches would take any time given.
    gating_args.time_budget = budget.left() / (2 if "slo" in args.parts else 1)
    rows = module.run(gating_args)
    out["gating"] = {"rows": rows}
    save()


# -- slo ----------------------------------------------------------------------------------------------------
def parse_loads(text: str) -> list[str]:
    """--loads: requests/s or 'Nx' (N x the unloaded service rate), comma-separated."""
    loads = [item.strip() for item in text.split(",") if item.strip()]
    for load in loads:
        try:
            value = float(load[:-1] if load.endswith("x") else load)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{load}' is not requests/s or a multiple 'Nx' of the service rate") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"'{load}' must be > 0")
    if not loads:
        raise argparse.ArgumentTypeError("no load given")
    return loads


def load_rps(load: str, service_rate: float) -> float:
    return float(load[:-1]) * service_rate if load.endswith("x") else float(load)


def slo_engine(model: str, args):
    """The engine the slo part serves `model` with (see the module docstring)."""
    if model == TINY_MOE:
        offload = {"expert_budget": args.budget} if args.tiny_offload == "cached" else {}
        return moejax.load(moejax.SHIPPED_CHECKPOINT, args.tiny_offload, slots=args.slots, max_seq_len=args.serve_max_seq_len,
                           prefill_chunk=args.prefill_chunk, **offload)
    cfg = model_config(model, args.slo_layers, args.dims == "tiny")
    return build_random_engine(cfg, "cached", random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0]), slots=args.slots,
                               max_seq_len=args.serve_max_seq_len, prefill_chunk=args.prefill_chunk, expert_budget=args.budget,
                               cache_policy=serving_cache_policy("cached", None, args.slots))  # as `moejax serve` runs it


def programs_compiled(engine) -> int:
    # the engine counts no compilations publicly; its program table tells, and jit's caches for the layer programs
    return len(engine._compiled) + (engine.layer_stream.programs_compiled() if engine.layer_stream else 0)


def serve(engine, scheduler: str, args, work, step_times=None):
    """Runs `work(loop.submit)` on a fresh serving loop over `engine`, given `step_times` -> (its result, the
    loop's metrics, the step times it measured)."""
    loop = ServingLoop(engine, scheduler=scheduler, max_queue=args.max_queue, max_batch=args.max_batch,
                       step_times=step_times).start()
    try:
        result = work(loop.submit)
        return result, loop.metrics(), loop.step_times
    finally:
        loop.shutdown(drain=True, timeout=args.drain_timeout)


def slo_part(args, budget: Budget, out: dict, save) -> None:
    mix = loadgen.read_task_mix(args.task_mix)
    tokenizer = load_tokenizer(moejax.SHIPPED_CHECKPOINT)
    part = out["slo"] = {"task_mix": str(args.task_mix), "ttft_slo_factor": args.ttft_slo_factor,
                         "tpot_slo_factor": args.tpot_slo_factor, "models": {}, "rows": []}
    shape = dict(max_prompt=args.max_prompt, min_tokens=args.min_tokens, max_tokens=args.max_tokens)
    run_options = dict(drain_timeout_s=args.drain_timeout)
    for model in args.slo_models:
        if not budget.allows(30.0, f"slo {model}"):
            part.setdefault("skipped", []).append(model)
            continue
        start = time.monotonic()
        engine = slo_engine(model, args)
        engine.warm_up(longest=args.max_prompt + args.max_tokens)  # every program the runs can meet, compiled now
        vocab = engine.cfg.vocab_size
        encode = lambda text, vocab=vocab: [t % vocab for t in tokenizer.encode(text)]  # noqa: E731
        calibration_arrivals = loadgen.calibration_arrivals(mix, args.calibration_per_task, args.seed, encode, **shape)
        per_task = {a.task: a for a in calibration_arrivals}

        def prepare(submit):
            loadgen.calibrate(submit, list(per_task.values()), **run_options)  # compiles the batch-1 programs
            calibration = loadgen.calibrate(submit, calibration_arrivals, **run_options)
            busiest = max(load_rps(load, loadgen.service_rate(calibration)) for load in args.loads)
            warm_up = loadgen.draw_arrivals(mix, busiest, seed=args.seed + 1, count=args.warmup_requests, encode=encode,
                                            **shape)
            loadgen.run_load(submit, warm_up, **run_options)  # compiles the batched ones
            return calibration

        calibration, _, step_times = serve(engine, "fcfs", args, prepare)
        rate = loadgen.service_rate(calibration)
        slos = loadgen.slos_from_calibration(calibration, args.ttft_slo_factor, args.tpot_slo_factor)
        part["models"][model] = {"calibration": calibration, "service_rate_rps": rate, "slots": args.slots,
                                 "slos": {t: {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for t, s in slos.items()},
                                 "step_times": step_times and dataclasses.asdict(step_times),
                                 "prepared_s": time.monotonic() - start, "runs": []}
        print(f"{model}: unloaded service rate {rate:.2f} requests/s; calibration {json.dumps(calibration)}", flush=True)
        save()
        tail = 0.0  # how long the last run ran past its last arrival
        for load in args.loads:
            rps = load_rps(load, rate)
            arrivals = loadgen.draw_arrivals(mix, rps, seed=args.seed, count=args.requests, duration_s=args.max_run_s,
                                             encode=encode, **shape)
            for scheduler in args.schedulers:
                if step_times is not None:  # the same arrivals through the loop's model, in virtual time
                    simulated = simulate(arrivals, slos, make_scheduler(scheduler), step_times,
                                         slots=args.max_batch or args.slots, max_queue=args.max_queue).summary
                    part.setdefault("simulated", []).append({"model": model, "scheduler": scheduler, "load": load,
                                                             **simulated})
                span = arrivals[-1].at_s
                if not budget.allows(span + tail, f"slo {model} {scheduler} at {load}"):
                    part.setdefault("skipped", []).append(f"{model} {scheduler} {load}")
                    continue
                compiled = programs_compiled(engine)
                run_start = time.monotonic()
                result, metrics, _ = serve(engine, scheduler, args,
                                           lambda submit: loadgen.run_load(submit, arrivals, slos, **run_options),
                                           step_times)
                tail = time.monotonic() - run_start - span
                row = {"model": model, "scheduler": scheduler, "load": load, "offered_rps": rps,
                       "x_service_rate": rps / rate, **result.summary,
                       "programs_compiled": programs_compiled(engine) - compiled, "loop_metrics": metrics}
                part["rows"].append(row)
                part["models"][model]["runs"].append({"scheduler": scheduler, "load": load,
                                                      "records": [r.as_dict() for r in result.records]})
                print(json.dumps({k: v for k, v in row.items() if k != "loop_metrics"}), flush=True)
                save()
        del engine
        gc.collect()
    if part["rows"]:
        part["plot"] = plot_slo(part["rows"], args.plot)
        save()


def plot_slo(rows: list[dict], path: Path) -> str | None:
    """p50/p99 TTFT, p50/p99 TPOT and SLO attainment against the offered load, a row of plots per model and a
    line per scheduler, as a PNG at `path` -> its path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'moejax[plot]')", flush=True)
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    for axes_row, model in zip(axes, models):
        for scheduler in dict.fromkeys(r["scheduler"] for r in rows if r["model"] == model):
            mine = sorted((r for r in rows if r["model"] == model and r["scheduler"] == scheduler),
                          key=lambda r: r["offered_rps"])
            x = [r["offered_rps"] for r in mine]
            values = lambda key: [np.nan if r[key] is None else r[key] for r in mine]  # noqa: E731  (None: no request had it)
            for ax, metric in zip(axes_row[:2], ("ttft", "tpot")):
                line, = ax.plot(x, values(f"{metric}_p50_s"), "o-", label=f"{scheduler} p50")
                ax.plot(x, values(f"{metric}_p99_s"), "s--", color=line.get_color(), label=f"{scheduler} p99")
            axes_row[2].plot(x, values("attainment_pct"), "o-", label=scheduler)
        for ax, title in zip(axes_row, ("TTFT (s)", "TPOT (s)", "SLO attainment (%)")):
            ax.set_title(f"{model}: {title}")
            ax.set_xlabel("offered load (requests/s)")
            ax.legend()
            ax.grid(alpha=0.3)
        axes_row[2].set_ylim(0, 100)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"plot: {path}", flush=True)
    return str(path)


# -- main ---------------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give integers >= 1")
    return values


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    # No abbreviated options: one of ours must not swallow one of the gating part's (--batch as --batches).
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="The gating part's options: scripts/bench_gating.py.")
    p.add_argument("--parts", type=names, default=list(PARTS), help="comma-separated, of: " + ", ".join(PARTS))
    p.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    p.add_argument("--budget", default="0.25", help="expert budget of the cached models (throughput, slo's random models)")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds: what would not fit is skipped")
    p.add_argument("--out", type=Path, default=Path("bench_serve.json"))
    g = p.add_argument_group("throughput")
    g.add_argument("--card", default="deepseek-v2-lite")
    g.add_argument("--traces", help="the card's recorded routing (experts [L, T, k], seq_lens), e.g. "
                                    ".data/traces/deepseek_v2_lite_prefill.npz")
    g.add_argument("--batches", type=int_list, default=[1, 4, 16, 64])
    g.add_argument("--policies", type=names, default=["lru", "activation"],
                   help="cache policies, each with every batch (LRU thrashes once a step needs more experts than "
                        f"slots); '{RESIDENT}': every expert on the device (the steps' compute alone, the floor's other "
                        "term)")
    g.add_argument("--prompt-len", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--one-by-one", action="store_true", help="misses never moved out of a copy of their whole layer")
    g.add_argument("--cpu-experts", type=names, default=["off"],
                   help="some of off, auto, auto-float32: each policy's rows with these cpu_experts values "
                   "(default off)")
    g.add_argument("--layer-stream", type=names, default=["auto"],
                   help="some of auto, off: each policy's rows with these layer_stream values (default auto)")
    g = p.add_argument_group("slo")
    g.add_argument("--task-mix", type=Path, default=DEFAULT_TASK_MIX, help="task-mix JSONL (default: %(default)s)")
    g.add_argument("--slo-models", type=names, default=[TINY_MOE, "mixtral-8x7b"], help="tiny-moe and/or cards")
    g.add_argument("--slo-layers", type=int, default=4, help="layers of a card's random model")
    g.add_argument("--tiny-offload", default="resident", choices=("resident", "cached"), help="tiny-moe's mode (cached: at --budget)")
    g.add_argument("--schedulers", type=names, default=["fcfs", "slo"])
    g.add_argument("--loads", type=parse_loads, default=parse_loads(DEFAULT_LOADS),
                   help=f"requests/s, or 'Nx': N x the unloaded service rate, run in this order (default: {DEFAULT_LOADS})")
    g.add_argument("--requests", type=int, default=40, help="requests per run")
    g.add_argument("--max-run-s", type=float, default=15.0, help="arrivals of a run end after this many seconds")
    g.add_argument("--slots", type=int, default=16)
    g.add_argument("--max-batch", type=int, default=None)
    g.add_argument("--max-queue", type=int, default=256)
    g.add_argument("--serve-max-seq-len", type=int, default=512)
    g.add_argument("--prefill-chunk", type=int, default=128)
    g.add_argument("--max-prompt", type=int, default=256, help="prompts are cut to this many tokens")
    g.add_argument("--min-tokens", type=int, default=4)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--calibration-per-task", type=int, default=2)
    g.add_argument("--warmup-requests", type=int, default=48, help="requests of the warm-up run")
    g.add_argument("--ttft-slo-factor", type=float, default=loadgen.DEFAULT_TTFT_FACTOR)
    g.add_argument("--tpot-slo-factor", type=float, default=loadgen.DEFAULT_TPOT_FACTOR)
    g.add_argument("--drain-timeout", type=float, default=60.0, help="seconds a run may take past its last arrival")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--plot", type=Path, default=None, help="the PNG (default: --out with .png)")
    p.add_argument("--replot", type=Path, default=None,
                   help="run nothing: print the tables of a JSON this script wrote and draw its slo part's PNG "
                   "(--plot; default: the JSON with .png): a run without matplotlib, or a plot to redraw")
    return p


def checked_args(p: argparse.ArgumentParser):
    """Our arguments, the gating module (None if missing or not asked for) and its arguments."""
    args, rest = p.parse_known_args()
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        p.error(f"--parts: '{unknown[0]}' is not one of {', '.join(PARTS)}")
    if "throughput" in args.parts and not args.traces:
        p.error("--traces is required by the throughput part")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (a decode step after the first token)")
    if not set(args.cpu_experts) <= set(CPU_EXPERTS):
        p.error(f"--cpu-experts {','.join(args.cpu_experts)}: give some of {', '.join(CPU_EXPERTS)}")
    if not set(args.layer_stream) <= set(LAYER_STREAM):
        p.error(f"--layer-stream {','.join(args.layer_stream)}: give some of {', '.join(LAYER_STREAM)}")
    if args.max_prompt + args.max_tokens > args.serve_max_seq_len:
        p.error(f"--max-prompt + --max-tokens ({args.max_prompt + args.max_tokens}) exceed --serve-max-seq-len")
    try:
        if "slo" in args.parts:
            loadgen.read_task_mix(args.task_mix)
        for card in [args.card] * ("throughput" in args.parts) + [m for m in args.slo_models if m != TINY_MOE]:
            model_config(card, None, False)
    except MoejaxError as err:
        p.error(str(err))
    args.plot = args.plot or args.out.with_suffix(".png")
    module = gating_module() if "gating" in args.parts else None
    gating_args = None
    if module is not None:
        sub = argparse.ArgumentParser(prog="bench_serve.py (gating part)", allow_abbrev=False)
        module.add_arguments(sub, shared=False)
        gating_args, rest = sub.parse_known_args(rest)
        gating_args.dims, gating_args.layers = args.dims, getattr(args, "layers", None)  # this script's own
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}"
                + ("" if module is not None else " (the gating part's options need scripts/bench_gating.py and --parts gating)"))
    return args, module, gating_args


def replot(path: Path, plot: Path | None) -> None:
    """--replot: the tables of a JSON this script wrote, and its slo part's PNG."""
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--replot {path}: {err}") from None
    rows = out.get("slo", {}).get("rows")
    if rows:
        out["slo"]["plot"] = plot_slo(rows, plot or path.with_suffix(".png"))
    print_tables(out)


def main() -> None:
    args = parser().parse_known_args()[0]
    if args.replot is not None:
        return replot(args.replot, args.plot)
    args, gating, gating_args = checked_args(parser())
    budget = Budget(args.time_budget)
    tiny = args.dims == "tiny"
    pinned = [len(cfg.moe_layer_ids) * (cfg.num_experts + 8) * cfg.expert_bytes for cfg in
              ([model_config(args.card, None, tiny)] if "throughput" in args.parts else [])
              + [model_config(m, args.slo_layers, tiny) for m in args.slo_models if m != TINY_MOE and "slo" in args.parts]]
    start_backend(max(pinned, default=0) or None, smoke=tiny)
    out = {"environment": environment(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    save = lambda: write_json(args.out, out)  # noqa: E731
    save()
    parts = {"throughput": lambda: throughput_part(args, budget, out, save),
             "gating": lambda: gating_part(gating, gating_args, args, budget, out, save),
             "slo": lambda: slo_part(args, budget, out, save)}
    failed = []
    for name in (name for name in PARTS if name in args.parts):
        try:
            parts[name]()
        except Exception as err:  # noqa: BLE001 -- a part that fails loses itself only, not the parts after it
            if not isinstance(err, MoejaxError):
                traceback.print_exc()
            print(f"{name}: error: {err}", flush=True)
            out.setdefault(name, {})["error"] = f"{type(err).__name__}: {err}"
            failed.append(name)
            save()
            gc.collect()
    print_tables(out)
    if failed:
        raise SystemExit(f"failed parts: {', '.join(failed)}")


def slo_verdicts(rows: list[dict]) -> list[str]:
    """Per model and load where fcfs misses >= 30% of its SLOs: slo's attainment against fcfs's (the issue asks
    for >= 20 points more at such a load)."""
    lines = []
    for (model, load), fcfs in {(r["model"], r["load"]): r for r in rows if r["scheduler"] == "fcfs"}.items():
        slo = next((r for r in rows if (r["model"], r["load"], r["scheduler"]) == (model, load, "slo")), None)
        if slo is not None and fcfs["attainment_pct"] <= 70:
            lines.append(f"{model} at {load}: fcfs meets {fcfs['attainment_pct']:.0f}% of SLOs, slo "
                         f"{slo['attainment_pct']:.0f}% ({slo['attainment_pct'] - fcfs['attainment_pct']:+.0f} points)")
    return lines


def numeric(rows: list[dict], key: str) -> bool:
    """Whether a column holds numbers, floats among them (printed to 4 significant digits)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return all(is_number(v) for v in values) and any(isinstance(v, float) for v in values)


def print_tables(out: dict) -> None:
    """Every part's table, after one empty line (scripts/gpu_session.sh prints what follows the last one)."""
    print()
    for name in PARTS:
        if "error" in out.get(name, {}):
            print(f"{name}: error: {out[name]['error']}")
    if out.get("throughput", {}).get("rows"):  # (none when the part failed before its first row)
        t = out["throughput"]
        print(f"throughput: {t['card']}, budget {t['budget']} ({t['capacity_experts']} expert slots), real routing "
              f"replayed, prompt {t['prompt_len']}, {t['new_tokens'] - 1} decode steps; pinned host -> device "
              f"{t['bandwidth_bytes_per_s'] / GB:.2f} GB/s")
        print_table(t["rows"], THROUGHPUT_COLUMNS)
        # the fastest configuration at the largest batch against the fastest at batch 1 (whatever their settings)
        offloaded = [row for row in t["rows"] if row["policy"] != RESIDENT]
        largest = max(offloaded, key=lambda row: (row["batch"], row["tokens_per_s"]), default=None)
        one = max((row for row in offloaded if row["batch"] == 1), key=lambda row: row["tokens_per_s"], default=None)
        if largest and one and largest["x_link_floor"] is not None:
            # three decimals: a ratio a hair under its target must not print as the target (5.998x as 6.00x)
            how = lambda row: (f"{row['policy']}, cpu-experts {row['cpu_experts']}, "  # noqa: E731
                               f"layer-stream {row['layer_stream']}")
            ratio = largest["tokens_per_s"] / one["tokens_per_s"]
            print(f"batch {largest['batch']} ({how(largest)}): {ratio:.3f}x the fastest batch 1's tokens/s "
                  f"({how(one)}; issue: >= 6x at 64), step "
                  f"{largest['x_link_floor']:.3f}x its link floor (issue: <= 1.25x)")
            resident = [row for row in t["rows"] if row["policy"] == RESIDENT and row["batch"] == largest["batch"]]
            if resident:
                print(f"  the all-resident step at batch {largest['batch']}: {resident[0]['step_s']:.4f} s (compute "
                      f"alone), {largest['step_s'] / max(largest['link_floor_s'], resident[0]['step_s']):.2f}x "
                      f"max(link floor, that)")
    if out.get("gating", {}).get("rows"):
        rows = out["gating"]["rows"]
        print("gating: dynamic gating vs capacity padding (scripts/bench_gating.py)")
        keys = dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, (dict, list)))
        print_table(rows, [(k, k, ".4g" if numeric(rows, k) else "") for k in keys])
    if "rows" in out.get("slo", {}):
        s = out["slo"]
        for model, info in s["models"].items():
            print(f"slo: {model}, {info['slots']} slots, unloaded service rate {info['service_rate_rps']:.2f} req/s; "
                  f"SLOs {s['ttft_slo_factor']}x unloaded TTFT, {s['tpot_slo_factor']}x unloaded TPOT per task")
        print_table(s["rows"], SLO_COLUMNS)
        for line in slo_verdicts(s["rows"]):
            print(line)
        if s.get("simulated"):
            print("simulated (serving.simulate, the warm-up's step times, the same arrivals):")
            print_table(s["simulated"], [("model", "model", "s"), ("scheduler", "sched", "s"), ("load", "load", "s"),
                                         ("attainment_pct", "SLO %", ".1f"), ("refused", "refused", "d"),
                                         ("ttft_p50_s", "TTFT p50", ".3f"), ("tpot_p50_s", "TPOT p50", ".4f")])
        if s.get("plot"):
            print(f"plot: {s['plot']}")


if __name__ == "__main__":
    main()
