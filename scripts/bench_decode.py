"""Decode speed with every weight on the GPU: moejax's executors against transformers.

Mixtral-8x7B dimensions with fewer layers (so the model and the peer fit), random bf16
weights, batch 1, a random prompt, greedy decoding of a fixed number of tokens:

  moejax host-routed    the per-layer engine of every offloading mode (resident: no transfers)
  moejax device-routed  per-layer, routing resolved on the GPU (no host round trip)
  moejax whole-model    the whole model as one XLA program (the upper bound)
  transformers          generate() (default fused experts, eager experts) and a forward loop

  PYTHONPATH=. python scripts/bench_decode.py --layers 8 --out $OUT/bench_decode.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from moejax.runtime.engine import Engine, GenerationConfig
from moejax.runtime.executors import DeviceRoutedExecutor, WholeModelExecutor
from moejax.runtime.expert_runner import ExpertRunner
from moejax.runtime.host_routed import HostRoutedExecutor
from moejax.runtime.store import HostExpertStore
from scripts.benchlib import (
    environment, median, model_config, print_table, random_dense_params, random_expert, run_peer, write_json,
)


def time_engine(engine: Engine, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompt], config)  # compile every shape
    runs = [engine.generate([prompt], config) for _ in range(repeats)]
    assert all(len(r.tokens[0]) == new_tokens for r in runs)
    return {
        "ttft_s": median([r.timing.ttft_s for r in runs]),
        "tpot_s": median([r.timing.tpot_s for r in runs]),
        "tokens": runs[0].tokens[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dims", default="mixtral-8x7b", choices=("mixtral-8x7b", "tiny"), help="tiny: CPU smoke run")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-json", help="reuse the peer results of an earlier run (bench_decode JSON's peer_raw)")
    parser.add_argument("--out", default="bench_decode.json")
    args = parser.parse_args()

    # The peer first, in its own process, before JAX takes the GPU's memory.
    peer = json.loads(Path(args.peer_json).read_text())["peer_raw"] if args.peer_json else {} if args.skip_peer else run_peer(
        ["scripts/peers/hf_mixtral.py", "--mode", "resident", "--layers", str(args.layers), "--prompt-len",
         str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)], timeout=900)

    cfg = model_config(args.dims, args.layers)
    device = jax.devices()[0]
    globals_, layers = random_dense_params(cfg)
    store = HostExpertStore(device, cfg.expert_bytes, on_device=True)
    per_layer = []  # the same device arrays, as each layer's tuple of experts
    for layer in range(cfg.num_layers):
        experts = tuple(random_expert(cfg, jax.random.PRNGKey(1000 * layer + e)) for e in range(cfg.num_experts))
        for e, weights in enumerate(experts):
            store.put((layer, e), weights)
        per_layer.append(experts)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()

    engines = {
        "moejax host-routed": Engine(cfg, HostRoutedExecutor(cfg, globals_, layers, ExpertRunner(store, "resident", cfg.num_experts, cfg.hidden_act, top_k=cfg.top_k))),
        "moejax device-routed": Engine(cfg, DeviceRoutedExecutor(cfg, globals_, layers, per_layer, device)),
        "moejax whole-model": Engine(cfg, WholeModelExecutor(cfg, globals_, layers, per_layer, device)),
    }
    results = {name: time_engine(engine, prompt, args.new_tokens, args.repeats) for name, engine in engines.items()}
    for name, timing in peer.items():
        if isinstance(timing, dict) and "tpot_s" in timing:
            results[f"transformers {name}"] = timing

    whole = results["moejax whole-model"]["tpot_s"]
    best_peer = min((r["tpot_s"] for n, r in results.items() if n.startswith("transformers")), default=None)
    rows = []
    for name, r in results.items():
        rows.append({
            "name": name, "ttft_ms": r["ttft_s"] * 1e3, "tpot_ms": r["tpot_s"] * 1e3,
            "vs_whole": r["tpot_s"] / whole, "vs_best_hf": r["tpot_s"] / best_peer if best_peer else None,
        })
    tokens_agree = results["moejax host-routed"]["tokens"] == results["moejax whole-model"]["tokens"]
    write_json(args.out, {
        "environment": environment(),
        "model": {"architecture": "Mixtral-8x7B dims", "layers": cfg.num_layers, "dtype": cfg.dtype,
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1},
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in results.items()},
        "rows": rows, "peer_raw": peer, "host_routed_tokens_equal_whole_model": tokens_agree,
    })
    print(f"\nMixtral-8x7B dims, {cfg.num_layers} layers, bf16, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"host-routed tokens == whole-model tokens: {tokens_agree}")
    print_table(rows, [("name", "engine", "s"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
                       ("vs_whole", "x whole-model", ".3f"), ("vs_best_hf", "x best transformers", ".3f")])


if __name__ == "__main__":
    main()
