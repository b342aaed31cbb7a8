"""Decoding with experts offloaded to pinned host memory: the moejax engine's modes, transformers +
accelerate at the same GPU expert memory, and the floor.

Each model of --models (card[:layers]; by default Mixtral-8x7B, --layers of its 32, 8 so the run fits the
device call) with random bf16 weights, experts made on the device and moved to pinned host memory layer by
layer; batch 1, a random prompt, greedy decoding. In one run, per model:

  peer        transformers + accelerate offloading with --budgets of the expert bytes on the GPU on a model
              of the same card and layers (scripts/peers/hf_peer.py --mode offload, every model's first,
              each in its own process; ~2 s/token for Mixtral, so --peer-new-tokens is small). Its
              weights are random too but not the engine's: x peer compares speed on the same shapes
              (tests/test_families.py checks the outputs agree on the same weights). Where the peer
              fails (it does not fit the host or the GPU) the row has no peer figures, only the floor
  bandwidth   pinned host -> GPU, from copies of 8 expert-sized pinned buffers
  resident    every expert on the GPU: the compute part of the floor (TPOT and TTFT)
  cached      each budget, --policy; a row per --host-layout (the pinned stacks' layout), --miss-copy (how a
              miss reaches its slot: XLA's fetch and write, or the copy kernel) and --prefetch (default none;
              lookahead: the next layer's router on this layer's input names experts fetched while this layer
              computes; its wrong guesses are bytes moved, in the floor too)
  on-demand   the experts a step uses fetched at every step, no cache; a row per --host-layout and --miss-copy
  dense-offload  every expert fetched at every step (--dense-offload-tokens: it moves them all per token)

Per configuration: a short warm-up generate (compiles; it also fills the cache), then a timed one on
another prompt. bytes moved = the step programs' host -> device traffic during decoding (statistics' total less
the prompt's). Time per decode token = decode time / decode steps (the mean; TPOT, the median step, is in
the JSON too, but with few tokens the last steps, already computed when read, make it too small).
Floor per decode token = max(bytes moved per token / bandwidth, resident time per token): copies overlap
compute, so the slower of the two sets the pace; TTFT floor = max(the prompt's bytes / bandwidth,
resident TTFT). Every configuration's tokens are compared with the resident ones (bit-identical by
design).

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/bench_offload.py --out $OUT/bench_offload.json
  PYTHONPATH=. python scripts/bench_offload.py --dims tiny --skip-peer --prompt-len 16 --new-tokens 8 \
      --out /tmp/offload.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import numpy as np

from moejax.errors import ParameterError
from moejax.offload.expert_stacks import HOST_LAYOUTS, MISS_COPIES
from scripts.benchlib import (
    GB, WARM_UP_TOKENS, Budget, build_random_engine, decode_stats, environment, model_config, model_label, parse_models,
    pinned_bandwidth, pinned_stacks, print_table, random_dense_params, run_peers, start_backend, write_json,
)


def run_config(cfg, dense, stacks, mode: str, budget: str | None, policy: str, prompts, new_tokens: int,
               max_len: int, host_layout: str = "auto", miss_copy: str = "auto", prefetch: str = "none") -> dict:
    """A warm-up generate on prompts[0], then the timed one on prompts[1]: timing, traffic, tokens."""
    options = {"expert_budget": budget, "cache_policy": policy, "prefetch": prefetch} if mode == "cached" else {}
    if mode != "resident":
        options["host_layout"] = host_layout
    if mode in ("cached", "on-demand"):
        options["miss_copy"] = miss_copy
    engine = build_random_engine(cfg, mode, dense, stacks, max_seq_len=max_len, prefill_chunk=len(prompts[0]),
                                 **options)
    engine.generate([prompts[0]], max_new_tokens=min(new_tokens, WARM_UP_TOKENS), ignore_eos=True)
    result = engine.generate([prompts[1]], max_new_tokens=new_tokens, ignore_eos=True)
    decode = decode_stats(result)
    used = decode["prefetch_used"]
    prefill = result.stats.get("prefill") or {}
    row = {
        "mode": mode, "budget": budget, "policy": policy if mode == "cached" else None,
        "prefetch": prefetch if mode == "cached" else None,
        "prefetch_precision": used / decode["prefetch_issued"] if decode["prefetch_issued"] else None,
        "prefetch_recall": used / (used + decode["misses"]) if decode["prefetch_issued"] else None,
        "capacity_experts": result.stats.get("capacity_experts"),
        "ttft_s": result.timing.ttft_s, "tpot_s": result.timing.tpot_s,
        "decode_s_per_token": (result.timing.total_s - result.timing.ttft_s) / max(decode["steps"], 1),
        "decode_hit_rate": decode["hits"] / decode["activations"] if decode["activations"] else None,
        "decode_bytes_per_token": decode["bytes_h2d"] / max(decode["steps"], 1),
        "prefill_bytes": prefill.get("bytes_h2d", 0),
        "layer_program_chunks": result.stats.get("layer_stream", {}).get("chunks", 0),  # of the prompt
        "host_layout": result.stats.get("host_layout"), "miss_copy": result.stats.get("miss_copy"),
        "fetch_seconds": result.stats.get("fetch_seconds"),
        "tokens": result.tokens[0],
    }
    del engine
    gc.collect()
    return row


def add_floor(row: dict, resident: dict, bandwidth: float) -> None:
    """The row's floors: per decode token max(link time of its decode bytes per token, resident time per token);
    TTFT max(link time of its prompt's bytes, resident TTFT); and its times over them."""
    row["floor_s_per_token"] = max(row["decode_bytes_per_token"] / bandwidth, resident["decode_s_per_token"])
    row["floor_ttft_s"] = max(row["prefill_bytes"] / bandwidth, resident["ttft_s"])
    row["x_floor"] = row["decode_s_per_token"] / row["floor_s_per_token"]
    row["x_floor_ttft"] = row["ttft_s"] / row["floor_ttft_s"]
    row["decode_gb_per_token"] = row["decode_bytes_per_token"] / GB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    parser.add_argument("--models", default=None, help="card[:layers],... (default: mixtral-8x7b:LAYERS)")
    parser.add_argument("--layers", type=int, default=8, help="the default model's layers")
    parser.add_argument("--budgets", default="0.25,0.5", help="cached budgets, fractions of all expert bytes")
    parser.add_argument("--modes", default="resident,cached,on-demand,dense-offload",
                        help="offload modes to run (resident is the reference of the others: keep it)")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--host-layout", default="auto",
                        help="cached and on-demand rows, one per value (comma-separated): the pinned host stacks' "
                             "layout, auto (the engine's rule), stacked or per-expert (`expert_stacks`)")
    parser.add_argument("--miss-copy", default="auto",
                        help="cached and on-demand rows, one per value (comma-separated) and host layout: how a miss "
                             "is moved into its slot, auto (the engine's rule), xla or kernel (`expert_stacks`, "
                             "`kernels.host_rows`)")
    parser.add_argument("--prefetch", default="none",
                        help="cached rows, one per value (comma-separated) and host layout and miss copy: the "
                             "prefetcher, none or lookahead (the others need traces)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dense-offload-tokens", type=int, default=6, help="fewer tokens: it moves every expert per token")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-new-tokens", type=int, default=3)
    parser.add_argument("--peer-timeout", type=float, default=80, help="seconds, per model (all its budgets)")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: configurations that would not fit are skipped")
    parser.add_argument("--out", default="bench_offload.json")
    args = parser.parse_args()
    if set(args.host_layout.split(",")) - set(HOST_LAYOUTS):
        parser.error(f"--host-layout: {args.host_layout!r} is not a list of {', '.join(HOST_LAYOUTS)}")
    if set(args.miss_copy.split(",")) - set(MISS_COPIES):
        parser.error(f"--miss-copy: {args.miss_copy!r} is not a list of {', '.join(MISS_COPIES)}")
    if set(args.prefetch.split(",")) - {"none", "lookahead"}:
        parser.error(f"--prefetch: {args.prefetch!r} is not a list of none, lookahead")
    unknown = set(args.modes.split(",")) - {"resident", "cached", "on-demand", "dense-offload"}
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(sorted(unknown))} (resident, cached, on-demand, dense-offload)")
    budget = Budget(args.time_budget)
    models = parse_models(args.models or f"mixtral-8x7b:{args.layers}")
    configs = [model_config(card, layers, args.dims == "tiny") for card, layers in models]

    # The peers first, each in its own process, before JAX takes the GPU's memory.
    peers = {} if args.skip_peer else run_peers(
        models, ["--mode", "offload", "--gpu-expert-fraction", args.budgets, "--prompt-len", str(args.prompt_len),
                 "--new-tokens", str(args.peer_new_tokens)], args.dims, args.peer_timeout, budget)
    if "," not in args.budgets:  # the peer's JSON for a single fraction is that fraction's, not keyed by it
        peers = {label: peer if "error" in peer else {args.budgets: peer} for label, peer in peers.items()}
    # The pinned pool holds one model's experts at a time (and the bandwidth probe's 8 experts).
    start_backend(max(all_expert_bytes(cfg) + 8 * cfg.expert_bytes for cfg in configs), smoke=args.dims == "tiny")
    result = {"environment": environment(), "models": {}, "rows": []}
    need = 0.0
    for (card, layers), cfg in zip(models, configs, strict=True):
        label = model_label(card, layers)
        if not budget.allows(need, label):
            result.setdefault("skipped", []).append(label)
            continue
        need = bench_model(label, cfg, args, peers.get(label, {}), budget, result)

    print_table(result["rows"], [
        ("model", "model", "s"), ("mode", "mode", "s"), ("budget", "budget", "s"), ("host_layout", "host layout", "s"),
        ("miss_copy", "miss copy", "s"), ("prefetch", "prefetch", "s"), ("prefetch_precision", "prec", ".2f"),
        ("ttft_s", "TTFT s", ".3f"),
        ("floor_ttft_s", "TTFT floor", ".3f"), ("layer_program_chunks", "layer-program chunks", "d"),
        ("decode_s_per_token", "s/token", ".4f"), ("decode_hit_rate", "hit rate", ".3f"),
        ("decode_gb_per_token", "GB/token", ".3f"), ("floor_s_per_token", "floor s/token", ".4f"), ("x_floor", "x floor", ".3f"),
        ("peer_tpot_s", "peer TPOT s", ".2f"), ("x_peer_tokens_per_s", "x peer", ".1f"),
        ("tokens_equal_resident", "same tokens", "")])


def all_expert_bytes(cfg) -> int:
    return len(cfg.moe_layer_ids) * cfg.num_experts * cfg.expert_bytes


def bench_model(label: str, cfg, args, peer: dict, budget: Budget, result: dict) -> float:
    """One model's rows (resident, each cached budget, on-demand, dense-offload) appended to result['rows'] and
    its description to result['models'], the JSON rewritten after each; returns the seconds its last configuration
    took (what the next one is expected to need)."""
    device = jax.devices()[0]
    bandwidth = pinned_bandwidth(cfg, device)
    print(f"{label}: pinned host -> GPU: {bandwidth / GB:.1f} GB/s", flush=True)
    start = time.monotonic()
    dense = random_dense_params(cfg)
    stacks = pinned_stacks(cfg, device)  # shared by every engine (the resident one copies them to the device)
    expert_bytes = all_expert_bytes(cfg)
    print(f"{expert_bytes / GB:.1f} GB of experts in pinned host memory in {time.monotonic() - start:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(2)]
    max_len = min(-(-(args.prompt_len + args.new_tokens) // 64) * 64, cfg.max_position_embeddings)
    result["models"][label] = {
        "family": cfg.family, "dims": args.dims, "layers": cfg.num_layers, "dtype": cfg.dtype, "expert_bytes": cfg.expert_bytes,
        "all_expert_bytes": expert_bytes, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1,
        "bandwidth_bytes_per_s": bandwidth, "peer": peer,
    }
    ways = [(layout, copy) for layout in args.host_layout.split(",") for copy in args.miss_copy.split(",")]
    configs = [("resident", None, args.new_tokens, ("auto", "auto"), "none")]
    configs += [("cached", b, args.new_tokens, way, prefetch) for b in args.budgets.split(",") for way in ways
                for prefetch in args.prefetch.split(",")]
    configs += [("on-demand", None, args.new_tokens, way, "none") for way in ways]
    configs += [("dense-offload", None, args.dense_offload_tokens, ("auto", "auto"), "none")]
    configs = [config for config in configs if config[0] in args.modes.split(",")]
    resident, need = None, 0.0
    for mode, expert_budget, tokens, (layout, copy), prefetch in configs:
        what = f"{label} {mode} {expert_budget or ''} {layout} {copy} {prefetch}".strip()
        if not budget.allows(need, what):
            result.setdefault("skipped", []).append(what)
            continue
        start = time.monotonic()
        try:
            row = run_config(cfg, dense, stacks, mode, expert_budget, args.policy, prompts, tokens, max_len, layout,
                             copy, prefetch)
        except ParameterError as err:  # e.g. a budget under what one step needs: the other rows still run
            result["rows"].append({"model": label, "mode": mode, "budget": expert_budget, "error": str(err)})
            print(json.dumps(result["rows"][-1]), flush=True)
            continue
        need = time.monotonic() - start
        if mode == "resident":
            resident = row
        elif resident is None:  # no resident row (skipped): nothing to compare with or floor against
            continue
        row["tokens_equal_resident"] = row["tokens"] == resident["tokens"][: len(row["tokens"])]
        add_floor(row, resident, bandwidth)
        match = peer.get(expert_budget) if mode == "cached" else None
        if isinstance(match, dict) and "tpot_s" in match:
            row["peer_tpot_s"], row["peer_ttft_s"] = match["tpot_s"], match["ttft_s"]
            row["x_peer_tokens_per_s"] = match["tpot_s"] / row["decode_s_per_token"]
        result["rows"].append({"model": label, **{k: v for k, v in row.items() if k != "tokens"}})
        print(json.dumps(result["rows"][-1]), flush=True)
        write_json(args.out, result)
    print(f"{label} ({args.dims}), {cfg.num_layers} layers ({expert_bytes / GB:.1f} GB of experts), bf16, batch 1, "
          f"prompt {args.prompt_len}; pinned host -> GPU {bandwidth / GB:.1f} GB/s", flush=True)
    del dense, stacks
    gc.collect()
    return need


if __name__ == "__main__":
    main()
