"""What a batched decode step moves over the link, counted on the CPU: bench_serve's throughput schedule replayed
through the engine's cache code (`bench_prefetch.lab_replay`, no model), on recorded routing.

Per batch of --batches and cache rule: B sequences of the trace (those of at least --prompt-len + --new-tokens - 1
tokens) are prefilled one at a time (a step of --prompt-len tokens each), then decoded together for
--new-tokens - 1 steps of B tokens; a warm-up pass on the next B sequences comes first, as in bench_serve. The
cache holds --budget of the model's experts, under --policy (lru, lfu, fifo or lifo). Rules:
  engine      the engine's: a step needing `whole_layer_from` of a layer's experts (the default threshold,
              `device_cache.whole_layer_from`) copies its layer whole where it misses that many or more than the
              empty slots hold, and evicts nothing (`device_cache.copies_whole`)
  one-by-one  every miss fetched by itself and admitted by evicting the policy's victim
Per row, per decode step: the experts needed (union of the batch's choices, summed over MoE layers), hits,
experts moved (misses + those a whole copy carried past), evictions, the bytes moved at the card's expert size, and
the link's time in single fetches (a whole copy counted as `whole_layer_from` of them, the engine's own measure of
its time: the step's time where the link sets it, in the unit of one miss's fetch). --whole-from: the threshold the
engine measured on its GPU at load (bench_serve's JSON names it) instead of device_cache's default.
Counts do not depend on the machine: they are the engine's on the same routing (tests hold the lab to the engine).

  PYTHONPATH=. python scripts/replay_batches.py --traces .data/traces/deepseek_v2_lite_prefill.npz --out replay.json
  PYTHONPATH=. python scripts/replay_batches.py --traces ... --batches 64 --whole-from 51  # the H100's of 12-07
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from moejax.cards import load_card
from moejax.offload import device_cache as dc
from moejax.offload.stats import experts_moved
from moejax.routing.traces import RoutingTrace, load_routing
from scripts.bench_prefetch import lab_replay
from scripts.benchlib import GB, print_table, write_json

RULES = ("engine", "one-by-one")


def batch_steps(trace: RoutingTrace, sequences: list[int], prompt_len: int, new_tokens: int) -> list[tuple]:
    """bench_serve's decode_batch as steps for `bench_prefetch.lab_replay`: the sequences' prompts, one step each,
    then new_tokens - 1 decode steps of all of them -> [(None, 'prefill' | 'decode', experts [L, T, k])]."""
    offsets = trace.offsets()
    steps = [(None, "prefill", trace.experts[:, offsets[s] : offsets[s] + prompt_len]) for s in sequences]
    return steps + [(None, "decode", np.stack([trace.experts[:, offsets[s] + position] for s in sequences], axis=1))
                    for position in range(prompt_len, prompt_len + new_tokens - 1)]


def run(args) -> list[dict]:
    trace = load_routing(args.traces)
    L, E = trace.num_layers, trace.num_experts
    expert_bytes = load_card(args.card).expert_bytes
    capacity = int(args.budget * L * E)
    needed = args.prompt_len + args.new_tokens - 1
    long_enough = [s for s in range(trace.num_sequences) if trace.seq_lens[s] >= needed]
    if args.whole_from is not None and not 1 <= args.whole_from <= E:
        raise SystemExit(f"--whole-from {args.whole_from}: must be 1 to the trace's {E} experts a layer")
    rows = []
    for batch in args.batches:
        if len(long_enough) < 2 * batch:
            raise SystemExit(f"--traces {args.traces}: {len(long_enough)} sequences of >= {needed} tokens, fewer "
                             f"than 2 x batch {batch}")
        for rule in RULES:
            whole_from = None if rule != "engine" else args.whole_from or dc.whole_layer_from(E, capacity)
            warm_up = batch_steps(trace, long_enough[batch : 2 * batch], args.prompt_len, args.new_tokens)
            measured = batch_steps(trace, long_enough[:batch], args.prompt_len, args.new_tokens)
            added = lab_replay(warm_up + measured, capacity, E, args.policy, jax.devices("cpu")[0], whole_from)
            decoding = [len(warm_up) + i for i, (_, kind, _) in enumerate(measured) if kind == "decode"]
            decoded = added[decoding]  # [decode steps, L, counters]
            total = dict(zip(dc.COUNTERS, decoded.sum(axis=(0, 1)).tolist(), strict=True))
            steps = args.new_tokens - 1
            moved = experts_moved(total) / steps
            # the link's time in single fetches: a layer step moving whole_from or more copied its layer whole,
            # which takes as long as whole_from fetches (`device_cache.whole_layer_from`)
            per_layer = decoded[..., dc.MISSES] + decoded[..., dc.STREAMED]
            fetches = (per_layer if whole_from is None else np.minimum(per_layer, whole_from)).sum() / steps
            rows.append({"batch": batch, "rule": rule, "policy": args.policy, "capacity_experts": capacity,
                         "whole_layer_from": whole_from, "experts_needed_per_step": total["activations"] / steps,
                         "hits_per_step": total["hits"] / steps, "experts_moved_per_step": moved,
                         "evictions_per_step": total["evictions"] / steps, "gb_per_step": moved * expert_bytes / GB,
                         "fetch_times_per_step": fetches})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, required=True, help="recorded routing (experts [L, T, k], seq_lens)")
    parser.add_argument("--card", default="deepseek-v2-lite", help="the model whose expert size prices the moves")
    parser.add_argument("--budget", type=float, default=0.25, help="cache size as a fraction of all experts")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--whole-from", type=int, default=None,
                        help="the engine rule's `whole_layer_from` (default: device_cache's, unmeasured; the GPU "
                             "engine measures its own at load: bench_serve's JSON names it)")
    parser.add_argument("--policy", default="lru", choices=("lru", "lfu", "fifo", "lifo"))
    parser.add_argument("--out", type=Path, default=Path("replay_batches.json"))
    args = parser.parse_args()
    if not 0 < args.budget <= 1 or args.prompt_len < 1 or args.new_tokens < 2 or min(args.batches) < 1:
        raise SystemExit("replay_batches: --budget in (0, 1], --prompt-len >= 1, --new-tokens >= 2, --batches >= 1")
    rows = run(args)
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print_table(rows, [("batch", "batch", "d"), ("rule", "rule", "s"), ("experts_needed_per_step", "needed/step", ".1f"),
                       ("hits_per_step", "hits/step", ".1f"), ("experts_moved_per_step", "moved/step", ".1f"),
                       ("evictions_per_step", "evictions/step", ".1f"),
                       ("fetch_times_per_step", "fetch times/step", ".1f"), ("gb_per_step", "GB/step", ".2f")])


if __name__ == "__main__":
    main()
