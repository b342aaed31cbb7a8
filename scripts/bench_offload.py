"""Decoding with experts offloaded to pinned host memory: moejax's modes, the peer and the floor.

A Mixtral-8x7B-shaped model (as many layers as host RAM allows, 32 if possible) with random
bf16 weights; batch 1, a random prompt, greedy decoding. In one run:

  bandwidth   pinned host -> GPU, measured with expert-sized copies
  resident    a smaller model (--resident-layers) that fits: resident vs cached at budget 1.0,
              and the resident per-layer decode and prefill time used by the floor
  moejax      cached (each budget), on-demand, dense-offload on the big model
  peer        transformers + accelerate offloading at the same GPU expert memory (JSON from
              scripts/peers/hf_mixtral.py --mode offload, run in the same device call)
  floor       per decode token: bytes the run moved / bandwidth + resident compute time

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/bench_offload.py --layers 32 --out $OUT/bench_offload.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import jax
import numpy as np

from moejax.errors import MoejaxError
from moejax.runtime.engine import Engine, GenerationConfig
from moejax.runtime.host_routed import HostRoutedExecutor
from moejax.runtime.loading import expert_runner, reserved_kv_bytes
from moejax.runtime.policies import make_policy
from moejax.runtime.store import HostExpertStore, device_sharding, host_sharding
from moejax.progress import Progress
from scripts.benchlib import (
    environment, median, model_config, print_table, random_dense_params, random_expert, write_json,
)

GB = 1e9


def pinned_bandwidth(cfg, device, experts: int = 8, repeats: int = 5) -> float:
    """Bytes/s of one host->GPU copy of `experts` expert-sized pinned buffers (the way the cache copies)."""
    host = [jax.device_put(random_expert(cfg, jax.random.PRNGKey(i)), host_sharding(device)) for i in range(experts)]
    jax.block_until_ready(host)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(host, device_sharding(device)))
        times.append(time.perf_counter() - start)
    return experts * cfg.expert_bytes / median(times[1:])


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes (a large number where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 60


def build_store(cfg, device, reserve_bytes: int) -> tuple[HostExpertStore, int]:
    """Random experts made on the GPU and moved to pinned host memory, layer by layer, while more than
    `reserve_bytes` of host RAM would stay free; returns the store and how many layers it holds."""
    store = HostExpertStore(device, cfg.expert_bytes)
    progress = Progress("random experts", cfg.num_layers * cfg.num_experts)
    layer_bytes = cfg.num_experts * cfg.expert_bytes
    for layer in range(cfg.num_layers):
        if available_host_bytes() - layer_bytes < reserve_bytes:
            print(f"host RAM: stopping at {layer} layers ({available_host_bytes() / GB:.1f} GB available)", flush=True)
            return store, layer
        for e in range(cfg.num_experts):
            store.put((layer, e), random_expert(cfg, jax.random.PRNGKey(10_000 * layer + e)))
            progress.advance()
        jax.block_until_ready([store.get((layer, e)) for e in range(cfg.num_experts)])
    return store, cfg.num_layers


def sub_store(store: HostExpertStore, layers: int, on_device: bool) -> HostExpertStore:
    """The experts of the first `layers` layers: the same pinned arrays (device_put to the memory they
    are in is a no-op), or copies on the device."""
    return store.subset([key for key in store.keys() if key[0] < layers], on_device)


def run_config(cfg, globals_, layers, store, mode, budget, policy, prompts, new_tokens) -> dict:
    """Warm-up on one prompt, then time another; returns timing and traffic."""
    try:
        runner = expert_runner(cfg, store, mode, budget, make_policy(policy), 0, reserved_kv_bytes(cfg, 1, 1024))
        executor = HostRoutedExecutor(cfg, globals_, layers, runner)
    except MoejaxError as err:
        return {"mode": mode, "budget": budget, "skipped": str(err)}
    engine = Engine(cfg, executor)
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompts[0]], GenerationConfig(max_new_tokens=4, ignore_eos=True))
    result = engine.generate([prompts[1]], config)
    total, prefill = result.stats["total"], result.stats.get("prefill", {})
    decode_tokens = max(new_tokens - 1, 1)
    decode_bytes = total["bytes_h2d"] - prefill.get("bytes_h2d", 0)
    decode_hits = total["hits"] - prefill.get("hits", 0)
    decode_acts = total["activations"] - prefill.get("activations", 0)
    row = {
        "mode": mode, "budget": budget, "policy": policy if mode == "cached" else None,
        "capacity_experts": result.stats.get("capacity_experts"),
        "ttft_s": result.timing.ttft_s, "tpot_s": result.timing.tpot_s, "tokens_per_s": 1 / result.timing.tpot_s,
        "decode_hit_rate": decode_hits / decode_acts if decode_acts else None,
        "decode_gb_per_token": decode_bytes / decode_tokens / GB,
        "decode_stall_s_per_token": (total["stall_s"] - prefill.get("stall_s", 0.0)) / decode_tokens,
        "prefill_gb": prefill.get("bytes_h2d", 0) / GB,
        "tokens": result.tokens[0],
    }
    del engine, executor, runner
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="mixtral-8x7b", choices=("mixtral-8x7b", "tiny"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--resident-layers", type=int, default=8)
    parser.add_argument("--budgets", default="0.1,0.25,0.5,0.75")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dense-offload-tokens", type=int, default=8, help="fewer tokens: it moves every expert per token")
    parser.add_argument("--reserve-gb", type=float, default=24.0, help="host RAM to leave free when building the store")
    parser.add_argument("--peer-json", type=Path, help="output of scripts/peers/hf_mixtral.py --mode offload runs")
    parser.add_argument("--out", default="bench_offload.json")
    args = parser.parse_args()
    device = jax.devices()[0]
    rng = np.random.default_rng(0)

    bandwidth = pinned_bandwidth(model_config(args.dims, 1), device)
    print(f"pinned host->GPU bandwidth: {bandwidth / GB:.1f} GB/s", flush=True)
    gc.collect()

    # The big model: as many layers as host RAM allows, up to --layers.
    cfg = model_config(args.dims, args.layers)
    start = time.perf_counter()
    store, built = build_store(cfg, device, int(args.reserve_gb * GB))
    cfg = model_config(args.dims, built)
    print(f"{len(store)} experts ({store.total_bytes / GB:.1f} GB) in pinned host memory in {time.perf_counter() - start:.0f} s", flush=True)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(2)]

    # Its first layers as a model that fits on the GPU: resident vs cached at 1.0, and the floor's
    # compute term per layer.
    small = model_config(args.dims, min(args.resident_layers, built))
    small_globals, small_layers = random_dense_params(small)
    resident = run_config(small, small_globals, small_layers, sub_store(store, small.num_layers, True), "resident",
                          None, args.policy, prompts, args.new_tokens)
    gc.collect()
    cached_full = run_config(small, small_globals, small_layers, sub_store(store, small.num_layers, False), "cached",
                             "1.0", args.policy, prompts, args.new_tokens)
    del small_globals, small_layers
    gc.collect()
    per_layer_decode = resident["tpot_s"] / small.num_layers
    per_layer_prefill = resident["ttft_s"] / small.num_layers

    globals_, layers = random_dense_params(cfg)
    configs = [("cached", b, args.policy) for b in args.budgets.split(",")]
    configs += [("on-demand", None, args.policy), ("dense-offload", None, args.policy)]
    rows = []
    for mode, budget, policy in configs:
        tokens = args.dense_offload_tokens if mode == "dense-offload" else args.new_tokens
        row = run_config(cfg, globals_, layers, store, mode, budget, policy, prompts, tokens)
        if "skipped" not in row:
            compute = per_layer_decode * cfg.num_layers
            transfer = row["decode_gb_per_token"] * GB / bandwidth
            row["floor_tpot_s"] = transfer + compute
            row["x_floor"] = row["tpot_s"] / row["floor_tpot_s"]
            row["link_utilisation"] = transfer / (row["tpot_s"] - compute) if row["tpot_s"] > compute and transfer > 0 else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)

    peer = json.loads(args.peer_json.read_text()) if args.peer_json and args.peer_json.is_file() else {}
    for row in rows:
        match = peer.get(str(row["budget"])) if row["mode"] == "cached" else None
        if match and "tpot_s" in match:
            row["peer_tpot_s"], row["peer_ttft_s"] = match["tpot_s"], match["ttft_s"]
            row["x_peer_tokens_per_s"] = match["tpot_s"] / row["tpot_s"]

    reference = [r for r in rows if "tokens" in r]
    tokens_agree = all(r["tokens"][: args.dense_offload_tokens] == reference[0]["tokens"][: args.dense_offload_tokens] for r in reference)
    write_json(args.out, {
        "environment": environment(),
        "model": {"architecture": f"{args.dims} dims", "layers": cfg.num_layers, "dtype": cfg.dtype,
                  "expert_bytes": cfg.expert_bytes, "all_expert_bytes": store.total_bytes,
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1},
        "bandwidth_bytes_per_s": bandwidth,
        "resident_small": {k: v for k, v in resident.items() if k != "tokens"},
        "cached_full_small": {k: v for k, v in cached_full.items() if k != "tokens"},
        "cached_full_vs_resident": cached_full["tpot_s"] / resident["tpot_s"],
        "resident_per_layer_decode_s": per_layer_decode, "resident_per_layer_prefill_s": per_layer_prefill,
        "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
        "tokens_agree_across_modes": tokens_agree, "peer": peer,
    })
    print(f"\n{args.dims} dims, {cfg.num_layers} layers ({store.total_bytes / GB:.1f} GB experts), bf16, batch 1, "
          f"prompt {args.prompt_len}; bandwidth {bandwidth / GB:.1f} GB/s")
    print(f"{small.num_layers}-layer model: resident TPOT {resident['tpot_s'] * 1e3:.2f} ms, cached@1.0 "
          f"{cached_full['tpot_s'] * 1e3:.2f} ms ({cached_full['tpot_s'] / resident['tpot_s']:.3f}x); tokens agree: {tokens_agree}")
    print_table([r for r in rows if "skipped" not in r], [
        ("mode", "mode", "s"), ("budget", "budget", "s"), ("ttft_s", "TTFT s", ".2f"), ("tpot_s", "TPOT s", ".3f"),
        ("tokens_per_s", "tok/s", ".2f"), ("decode_hit_rate", "hit rate", ".3f"), ("decode_gb_per_token", "GB/token", ".2f"),
        ("floor_tpot_s", "floor s", ".3f"), ("x_floor", "x floor", ".3f"), ("link_utilisation", "link util", ".3f"),
        ("peer_tpot_s", "peer TPOT s", ".2f"), ("x_peer_tokens_per_s", "x peer", ".1f"),
    ])
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['mode']} {r['budget']}: {r['skipped']}")


if __name__ == "__main__":
    main()
