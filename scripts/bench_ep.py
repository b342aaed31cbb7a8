"""Expert parallelism (issue 25): per-device load of the placements on real routing, and tokens/s over 1, 2, 4 devices.

Two parts:

  load        max/mean per-device load, round-robin against balanced (with and without --replicas hot copies),
              on a replayed routing trace (--traces, e.g. .data/traces/deepseek_v2_lite_prefill.npz): the balanced
              placement is fitted on the first half of the sequences and measured on the other half (as a
              deployment would, from yesterday's traffic). Figures per --devices count: 'all' over the whole held-out
              half (per layer, averaged over layers; the worst layer), and 'step' per prefill chunk of --step-tokens
              tokens (each step waits for its most loaded device), averaged over chunks and layers. Pure NumPy:
              the same figures on any machine.
  throughput  a random-weight model of each --models card's shape (--layers of its layers), experts resident and
              sharded over the first N local devices for each N of --devices (round-robin), dense weights on each:
              decode tokens/s at --batch sequences and prefill tokens/s of a --prompt-len prompt; 'same tokens'
              compares each N's greedy tokens with N=1's, 'logits diff' its prompt logits (max abs difference). Resident mode only (the engine's expert parallelism
              keeps every expert on some device): each device holds 1/N of the experts, so N=1 must hold the whole
              model (pick --layers so that it does).

  PYTHONPATH=. python scripts/bench_ep.py --traces .data/traces/deepseek_v2_lite_prefill.npz --devices 1,2,4 \\
      --models mixtral-8x7b:4,deepseek-v2-lite:8 --out $OUT/bench_ep.json        # on a machine of 4 GPUs
  PYTHONPATH=. python scripts/bench_ep.py --dims tiny --devices 1,2,4 --traces .data/traces/deepseek_v2_lite_prefill.npz \\
      --models deepseek-v2-lite --out /tmp/bench_ep.json                         # CPU smoke run (4 host devices)
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
    """The throughput part's rows: per model and device count, decode and prefill tokens/s."""
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
        reference = None  # N=1's (tokens, prompt logits)
        for devices in device_counts:
            if devices > len(jax.local_devices()):
                print(f"skipped {card} on {devices} devices: {len(jax.local_devices())} local", flush=True)
                continue
            engine = build_engine(cfg, *dense, random_expert_stacks(cfg), OffloadConfig("resident"), slots=args.batch,
                                  max_seq_len=args.prompt_len + args.new_tokens + 1, prefill_chunk=args.prompt_len,
                                  devices=devices)
            engine.generate(prompts, max_new_tokens=2, ignore_eos=True)  # compiles
            result = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
            logits = engine.logits([prompts[0]])[0]  # compiles
            started = time.perf_counter()
            engine.logits([prompts[0]])
            prefill_s = time.perf_counter() - started
            reference = reference or (result.tokens, logits)
            stats = engine.stats().get("expert_parallel") or {}
            rows.append({"model": card, "layers": cfg.num_layers, "devices": devices, "batch": args.batch,
                         "decode_tok_s": args.batch / result.timing.tpot_s, "prefill_tok_s": args.prompt_len / prefill_s,
                         "same_tokens": result.tokens == reference[0],
                         "logits_max_diff": float(np.abs(logits - reference[1]).max()),
                         "device_load": stats.get("device_load")})
            print(rows[-1], flush=True)
            del engine
            jax.clear_caches()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4", help="device counts (default %(default)s)")
    parser.add_argument("--traces", help="a routing trace (routing.npz or any npz of experts and seq_lens) for the load part")
    parser.add_argument("--replicas", type=int, default=2, help="balanced: also with this many hot copies per layer")
    parser.add_argument("--step-tokens", type=int, default=512, help="tokens of a step for the per-step spread")
    parser.add_argument("--models", default="mixtral-8x7b:4,deepseek-v2-lite:8", help="card[:layers],... ('' : none)")
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
        print_table(out["throughput"], [("model", "model", "s"), ("devices", "devices", "d"), ("batch", "batch", "d"),
                                        ("decode_tok_s", "decode tok/s", ".1f"), ("prefill_tok_s", "prefill tok/s", ".1f"),
                                        ("same_tokens", "same tokens", ""), ("logits_max_diff", "logits diff", ".2g")])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except MoejaxError as err:
        raise SystemExit(f"bench_ep: error: {err}") from None
