"""A quick look at the step engine on a random-weight model: compile seconds, TTFT and TPOT per configuration.

Builds the model of a card (random bf16 weights made on the device, layer by layer) once per offload
configuration and generates greedily from a random prompt; prints one JSON line per configuration. For
checking a change on the GPU before the full benchmarks (scripts/gpu_session.sh).

  PYTHONPATH=. python scripts/probe_engine.py --card deepseek-v2-lite --configs resident,cached:0.25
  PYTHONPATH=. python scripts/probe_engine.py --configs resident --profile 20   # where a decode step's GPU time goes
  PYTHONPATH=. python scripts/probe_engine.py --configs cached:0.25:lru:none,cached:0.25:lru:none:auto --profile 8
                                     # what `--cpu-experts auto` costs a step (its host callbacks inside the layer loop)

--profile N records N decode tokens with the JAX profiler after the timed runs and prints, per configuration,
the GPU time per token by XLA operation (the `hlo_op` of each kernel; the largest first) and the GPU's busy
time against the wall time of those tokens. A step runs as one CUDA command buffer, which the profiler shows as
one operation: `XLA_FLAGS=--xla_gpu_enable_command_buffer=` (none) splits it into its kernels.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import tempfile
import time

from moejax.engine.loading import prepare_backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--card", default="deepseek-v2-lite")
    parser.add_argument("--layers", type=int, help="fewer layers of the card's pattern")
    parser.add_argument("--configs", default="resident,cached:0.25",
                        help="mode[:budget[:policy[:prefetch[:cpu_experts]]]],...")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unroll-layers", action="store_true", help="every layer in the program, no loop over layers")
    parser.add_argument("--expert-compute", default="auto", help="every configuration's (models.moe.EXPERT_COMPUTES)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N decode tokens: GPU ms/token by op")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: no configuration starts after it")
    parser.add_argument("--profile-top", type=int, default=30, help="operations listed per configuration")
    args = parser.parse_args()
    prepare_backend()  # before JAX starts its backend

    import jax
    import numpy as np

    from moejax.cards import load_card
    from moejax.engine.loading import build_engine
    from moejax.models.decoder import init_params
    from moejax.offload.config import OffloadConfig

    cfg = load_card(args.card, num_layers=args.layers)
    globals_, layers, experts = init_params(cfg, jax.random.PRNGKey(0))
    stacks = [e for e in experts if e is not None]
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    print(json.dumps({"devices": str(jax.devices()), "card": args.card, "layers": cfg.num_layers}), flush=True)
    started = time.monotonic()
    for spec in args.configs.split(","):
        if time.monotonic() - started > args.time_budget:
            print(json.dumps({"config": spec, "skipped": "time budget"}), flush=True)
            continue
        mode, *rest = spec.split(":")
        options = {}
        if rest:
            options["expert_budget"] = rest[0]
        if len(rest) > 1:
            options["cache_policy"] = rest[1]
        if len(rest) > 2:
            options["prefetch"] = rest[2]
        cpu_experts = rest[3] if len(rest) > 3 else "off"
        start = time.perf_counter()
        engine = build_engine(cfg, globals_, layers, iter(stacks), OffloadConfig(mode, **options), slots=1,
                              max_seq_len=args.prompt_len + args.new_tokens + 16, unroll_layers=args.unroll_layers,
                              expert_compute=args.expert_compute, cpu_experts=cpu_experts)
        built = time.perf_counter() - start
        runs = [engine.generate([prompt], max_new_tokens=args.new_tokens, ignore_eos=True) for _ in range(args.repeats + 1)]
        last = runs[-1]
        total = last.stats["total"]
        print(json.dumps({
            "config": spec, "build_s": round(built, 1), "compile_s": round(runs[0].timing.compile_s, 1),
            "ttft_ms": round(last.timing.ttft_s * 1e3, 2), "tpot_ms": round(last.timing.tpot_s * 1e3, 3),
            "tokens_per_s": round(last.timing.tokens_per_s, 1), "hit_rate": round(total["hit_rate"], 3),
            "GB_per_token": round(total["bytes_h2d"] / 1e9 / max(1, sum(map(len, last.tokens))), 3),
            "host_wait_s": round(last.stats["host_wait_s"], 3), "same_tokens": runs[1].tokens == last.tokens,
            "decode_expert_compute": last.stats["decode_expert_compute"],
            **({"cpu_experts": last.stats["cpu_experts"]} if last.stats.get("cpu_experts") else {}),
        }), flush=True)
        if args.profile:
            print(json.dumps({"config": spec, **profile_decode(engine, prompt, args.profile, args.profile_top)}),
                  flush=True)
        del engine


def profile_decode(engine, prompt: list[int], tokens: int, top: int) -> dict:
    """GPU time per decode token by XLA operation, from a JAX profiler trace of `tokens` decode steps.

    Kernels are grouped by their `hlo_op` stat (else their name) and summed over every GPU stream; `busy_ms` is
    the union of kernel intervals per token (ms), `wall_ms` the host's time per token over the same steps.
    """
    import jax
    from jax.profiler import ProfileData

    engine.generate([prompt], max_new_tokens=2, ignore_eos=True)  # compiled and warm
    directory = tempfile.mkdtemp(prefix="moejax-profile-")
    slot = 0
    engine.prefill(slot, prompt)
    jax.block_until_ready(engine.decode())
    start = time.perf_counter()
    with jax.profiler.trace(directory):
        for _ in range(tokens):
            engine.decode()
        jax.effects_barrier()
    wall = time.perf_counter() - start
    engine.release(slot)
    (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    by_op: collections.Counter = collections.Counter()
    intervals = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for event in line.events:
                stats = dict(event.stats)
                by_op[str(stats.get("hlo_op", event.name))] += event.duration_ns
                intervals.append((event.start_ns, event.start_ns + event.duration_ns))
    busy, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    per_token = lambda ns: round(ns / 1e6 / tokens, 4)  # noqa: E731
    return {"profiled_tokens": tokens, "wall_ms": round(wall * 1e3 / tokens, 3), "busy_ms": per_token(busy),
            "kernel_ms": per_token(sum(by_op.values())), "kernels_per_token": len(intervals) / tokens,
            "ops_ms": {op: per_token(ns) for op, ns in by_op.most_common(top)}}


if __name__ == "__main__":
    main()
