"""Expert parallelism (issue 25): per-device load of the placements on real routing, and tokens/s over 1, 2, 4 devices.

Two parts:

  load        max/mean per-device load, round-robin against balanced (with and without --replicas hot copies),
              on a replayed routing trace (--traces, e.g. .data/traces/deepseek_v2_lite_prefill.npz): the balanced
              placement is fitted on the first half of the sequences and measured on the other half (as a
              deployment would, from yesterday's traffic). Figures per --devices count: 'all' over the whole held-out
              half (per layer, averaged over layers; the worst layer), and 'step' per prefill chunk of --step-tokens
              tokens (each step waits for its most loaded device), averaged over chunks and layers. Pure NumPy:
              the same figures on any machine.
  throughput  a random-weight model of each --models card's shape (--layers of its layers), experts split over the
              first N devices for each N of --devices (round-robin), dense weights on each, in each offload mode of
              --modes: resident (each device holds 1/N of the experts, so N=1 must hold the whole model: pick
              --layers so that it does; a refused configuration is an error row) and cached (each device a cache
              of --expert-budget, the same per device at every N, fed from the one pinned host store): decode
              tokens/s at --batch sequences, prefill tokens/s of a --prompt-len prompt, hit rate, max/mean
              per-device load (pairs computed) and per-device pairs, hit rate and bytes moved; 'same tokens'
              compares each run's greedy tokens with the first run's, 'logits diff' its prompt logits (max abs
              difference).

  PYTHONPATH=. python scripts/bench_ep.py --traces .data/traces/deepseek_v2_lite_prefill.npz --devices 1,2,4 \\
      --models mixtral-8x7b:4,deepseek-v2-lite:8 --out $OUT/bench_ep.json        # on a machine of 4 GPUs
  PYTHONPATH=. python scripts/bench_ep.py --dims tiny --devices 1,2,4 --traces .data/traces/deepseek_v2_lite_prefill.npz \\
      --models deepseek-v2-lite --expert-budget 0.5 --batch 2 --prompt-len 32 --new-tokens 8 \\
      --out /tmp/bench_ep.json                                                   # CPU smoke run (4 host devices, ~20 s)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from moejax.errors import MoejaxError
from moejax.offload.placement import balanced, load_spread, round_robin
from moejax.routing.eams import eam_counts
from moejax.routing.traces import RoutingTrace, load_routing


def step_spread(placement, experts: np.ndarray, num_experts: int, step_tokens: int) -> float:
    """Max/mean per-device load per chunk of `step_tokens` tokens of experts [L, T, k], averaged over chunks and
    layers (chunks with no routed token left out)."""
    spreads = []
    for start in range(0, experts.shape[1], step_tokens):
        device_load = placement.device_load(eam_counts(experts[:, start : start + step_tokens], num_experts))
        busy = device_load.sum(axis=1) > 0
        if busy.any():
            spreads.append(load_spread(device_load[busy])["mean"])
    return float(np.mean(spreads))


def load_part(trace: RoutingTrace, device_counts: list[int], replicas: int, step_tokens: int) -> list[dict]:
    """The load part's rows: per device count and placement, the held-out half's spreads."""
    half = trace.num_sequences // 2
    fit, held_out = trace.select(0, half), trace.select(half, trace.num_sequences)
    fit_load, load = eam_counts(fit.experts, trace.num_experts), eam_counts(held_out.experts, trace.num_experts)
    L, E = load.shape
    rows = []
    for devices in device_counts:
        if devices < 2:
            continue
        placements = {"round-robin": round_robin(L, E, devices), "balanced": balanced(fit_load, devices)}
        if replicas:
            placements[f"balanced+{replicas} replicas"] = balanced(fit_load, devices, replicas)
        for name, placement in placements.items():
            spread = load_spread(placement.device_load(load))
            rows.append({"devices": devices, "placement": name, "layer_mean": spread["mean"], "layer_worst": spread["worst"],
                         "step": step_spread(placement, held_out.experts, trace.num_experts, step_tokens)})
            print(rows[-1], flush=True)
    return rows


def throughput_part(args, device_counts: list[int]) -> list[dict]:
    """The throughput part's rows: per model, offload mode and device count, decode and prefill tokens/s, and the
    engine's per-device figures (pairs computed, hit rate, bytes moved)."""
    import jax

    from moejax.engine.loading import build_engine
    from moejax.offload.config import OffloadConfig
    from scripts.benchlib import model_config, random_dense_params, random_expert_stacks

    rows = []
    for spec in args.models.split(","):
        card, _, layers = spec.partition(":")
        cfg = model_config(card, int(layers) if layers else None, args.dims == "tiny")
        dense = random_dense_params(cfg)
        prompts = [list(np.random.default_rng(b).integers(1, cfg.vocab_size, args.prompt_len)) for b in range(args.batch)]
        reference = None  # the first run's (tokens, prompt logits): every mode and device count must give the same
        for mode in args.modes.split(","):
            offload = OffloadConfig(mode, expert_budget=args.expert_budget) if mode == "cached" else OffloadConfig(mode)
            for devices in device_counts:
                if devices > len(jax.devices()):
                    print(f"skipped {card} on {devices} devices: JAX sees {len(jax.devices())}", flush=True)
                    continue
                try:
                    engine = build_engine(cfg, *dense, random_expert_stacks(cfg), offload, slots=args.batch,
                                          max_seq_len=args.prompt_len + args.new_tokens + 1,
                                          prefill_chunk=args.prompt_len, devices=devices)
                except MoejaxError as err:  # e.g. resident on one device: the whole model does not fit
                    rows.append({"model": card, "mode": mode, "devices": devices, "error": str(err)})
                    print(rows[-1], flush=True)
                    continue
                row = _throughput_row(engine, args, prompts, card, mode, devices)
                tokens, logits = row.pop("tokens"), row.pop("logits")
                reference = reference or (tokens, logits)
                row.update(same_tokens=tokens == reference[0], logits_max_diff=float(np.abs(logits - reference[1]).max()))
                rows.append(row)
                print(row, flush=True)
                del engine
                jax.clear_caches()
    return rows


def _throughput_row(engine, args, prompts, card: str, mode: str, devices: int) -> dict:
    """One engine measured: decode tokens/s at the batch, prefill tokens/s of one prompt, the decode part's stats."""
    engine.generate(prompts, max_new_tokens=2, ignore_eos=True)  # compiles
    result = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
    stats = result.stats
    logits = engine.logits([prompts[0]])[0]  # compiles
    started = time.perf_counter()
    engine.logits([prompts[0]])
    prefill_s = time.perf_counter() - started
    parallel = stats.get("expert_parallel") or {}
    per_device = parallel.get("per_device") or [{"pairs": None, **stats["total"]}]
    return {"model": card, "layers": engine.cfg.num_layers, "mode": mode,
            "budget_per_device": args.expert_budget if mode == "cached" else None, "devices": devices,
            "batch": args.batch, "decode_tok_s": args.batch / result.timing.tpot_s,
            "prefill_tok_s": args.prompt_len / prefill_s, "hit_rate": stats["total"]["hit_rate"],
            "load_max_over_mean": (parallel.get("max_over_mean") or {}).get("total", 1.0),
            "device_pairs": [d["pairs"] for d in per_device], "device_hit_rate": [d["hit_rate"] for d in per_device],
            "device_bytes_h2d": [d["bytes_h2d"] for d in per_device], "tokens": result.tokens, "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4", help="device counts (default %(default)s)")
    parser.add_argument("--traces", help="a routing trace (routing.npz or any npz of experts and seq_lens) for the load part")
    parser.add_argument("--replicas", type=int, default=2, help="balanced: also with this many hot copies per layer")
    parser.add_argument("--step-tokens", type=int, default=512, help="tokens of a step for the per-step spread")
    parser.add_argument("--models", default="mixtral-8x7b:4,deepseek-v2-lite:8", help="card[:layers],... ('' : none)")
    parser.add_argument("--modes", default="resident,cached", help="offload modes of the throughput part "
                        "(default %(default)s)")
    parser.add_argument("--expert-budget", default="0.25", help="cached mode: each device's cache, a fraction of all "
                        "expert bytes or a size (default %(default)s: the same per device at every device count)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    parser.add_argument("--out", default="bench_ep.json")
    args = parser.parse_args()
    device_counts = [int(n) for n in args.devices.split(",")]
    if args.dims == "tiny" and "XLA_FLAGS" not in os.environ:  # a smoke run: the CPU split into devices
        from scripts.benchlib import CPU_SMOKE_FLAGS

        os.environ["XLA_FLAGS"] = f"{CPU_SMOKE_FLAGS} --xla_force_host_platform_device_count={max(device_counts)}"
    from scripts.benchlib import environment, print_table, start_backend, write_json

    start_backend(smoke=args.dims == "tiny")
    out = {"environment": environment(), "load": [], "throughput": []}
    if args.traces:
        out["load"] = load_part(load_routing(args.traces), device_counts, args.replicas, args.step_tokens)
        write_json(args.out, out)
    if args.models:
        out["throughput"] = throughput_part(args, device_counts)
        write_json(args.out, out)
    if out["load"]:
        print_table(out["load"], [("devices", "devices", "d"), ("placement", "placement", "s"),
                                  ("layer_mean", "max/mean per layer", ".3f"), ("layer_worst", "worst layer", ".3f"),
                                  ("step", f"per {args.step_tokens}-token step", ".3f")])
    if out["throughput"]:
        print_table([row for row in out["throughput"] if "error" not in row],
                    [("model", "model", "s"), ("mode", "mode", "s"), ("devices", "devices", "d"), ("batch", "batch", "d"),
                     ("decode_tok_s", "decode tok/s", ".1f"), ("prefill_tok_s", "prefill tok/s", ".1f"),
                     ("hit_rate", "hit rate", ".3f"), ("load_max_over_mean", "load max/mean", ".3f"),
                     ("same_tokens", "same tokens", ""), ("logits_max_diff", "logits diff", ".2g")])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except MoejaxError as err:
        raise SystemExit(f"bench_ep: error: {err}") from None
