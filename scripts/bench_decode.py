"""Decode speed with every weight on the GPU (batch 1): the moejax engine against the whole-model
program, transformers and the HBM floor.

Random bf16 weights made on the device (`jax.random`, layer by layer) and handed to
`engine.loading.build_engine`; a random prompt, greedy decoding of a fixed number of tokens; TTFT and
TPOT are medians over --repeats runs after a warm-up (compilation excluded). Per model (--models,
`card[:layers]`):

  moejax engine   the v2 step engine, resident mode (fused prefill / decode step programs), expert compute
                  'auto' (on a GPU: the in-place kernels at decode); on the --reference-models also with
                  union's gather ("moejax engine, union")
  whole-model     `models.decoder.forward` jitted with a KV cache, one program per token, experts as
                  separate buffers run through `lax.switch` (the reference; --reference-models)
  transformers    generate() with the default and the eager experts, and a forward loop on a model of the
                  same card and layers (scripts/peers/hf_peer.py, each model's in its own process, all
                  before JAX starts); its weights are random too but not the engine's: the ratio compares
                  speed on the same shapes (tests/test_families.py checks the outputs agree on the same
                  weights). A peer that fails (e.g. out of memory) leaves an error in peer_raw, and the
                  model's rows are against the HBM floor only
  HBM floor       bytes one token must read (non-expert weights but the embedding table, lm_head,
                  top_k experts per MoE layer, the KV cache) / the measured HBM bandwidth

The tokens of the engine and the whole-model program are compared (informative: different programs
round bf16 differently, so greedy paths may part after some tokens).

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/bench_decode.py --out $OUT/bench_decode.json
  PYTHONPATH=. python scripts/bench_decode.py --dims tiny --skip-peer --out /tmp/decode.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.decoder import empty_kv_caches, forward
from scripts.benchlib import (
    GB, Budget, active_bytes_per_token, build_random_engine, environment, hbm_bandwidth, median, model_config,
    model_label, parse_models, print_table, random_dense_params, random_expert_stacks, run_peers, start_backend,
    time_generate, write_json,
)

DEFAULT_MODELS = "mixtral-8x7b:8,deepseek-v2-lite,qwen3-30b-a3b"


def whole_model(cfg, dense, stacks, prompt: list[int], new_tokens: int, repeats: int, max_len: int) -> dict:
    """The reference: `models.decoder.forward` jitted over the whole model with a KV cache of `max_len`
    positions, one program call per token (greedy argmax inside it), its token left on the device for the
    next call; like the engine, the host reads each token after dispatching the next step. Experts: each a
    separate buffer (sliced out of `stacks`), as `device_routed_experts` reads them in place."""
    globals_, layers = dense
    per_layer, experts = iter(stacks), []
    for moe in cfg.moe_layers:
        stack = next(per_layer) if moe else None
        experts.append(None if stack is None else tuple({n: w[e] for n, w in stack.items()} for e in range(cfg.num_experts)))

    @functools.partial(jax.jit, donate_argnums=(4,))
    def step(globals_, layers, experts, tokens, kv_caches, positions):
        logits, kv_caches = forward(cfg, globals_, layers, experts, tokens, kv_caches, positions)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], kv_caches

    def run():
        kv = empty_kv_caches(cfg, 1, max_len)
        start = time.perf_counter()
        token, kv = step(globals_, layers, experts, np.asarray([prompt], np.int32), kv,
                         np.arange(len(prompt), dtype=np.int32)[None])
        tokens = [int(token[0, 0])]
        ttft = time.perf_counter() - start
        times, last, previous = [], time.perf_counter(), None

        def read(token):
            nonlocal last
            tokens.append(int(token[0, 0]))
            now = time.perf_counter()
            times.append(now - last)
            last = now

        for i in range(new_tokens - 1):
            token, kv = step(globals_, layers, experts, token, kv, np.full((1, 1), len(prompt) + i, np.int32))
            token.copy_to_host_async()
            if previous is not None:
                read(previous)
            previous = token
        if previous is not None:
            read(previous)
        return ttft, median(times), tokens

    run()  # compiles
    runs = [run() for _ in range(repeats)]
    return {"ttft_s": median([r[0] for r in runs]), "tpot_s": median([r[1] for r in runs]), "tokens": runs[0][2]}


def bench_model(card: str, layers: int | None, args, bandwidth: float, reference: bool) -> list[dict]:
    """Rows of one model: the engine, the whole-model program if asked, the HBM floor."""
    cfg = model_config(card, layers, args.dims == "tiny")
    name = f"{card} ({cfg.num_layers} layers)"
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    max_len = min(-(-(args.prompt_len + args.new_tokens) // 64) * 64, cfg.max_position_embeddings)
    dense = random_dense_params(cfg)
    # The whole-model program needs every expert twice (its own buffers beside the engine's slab): keep the
    # stacks only then; otherwise the engine's slab is filled one layer at a time.
    stacks = list(random_expert_stacks(cfg)) if reference else random_expert_stacks(cfg)
    rows = []
    # The default engine ('auto': in-place kernels on a GPU), and on the reference models union's gather beside it.
    for label, compute in [("moejax engine", "auto")] + [("moejax engine, union", "union")] * reference:
        try:
            engine = build_random_engine(cfg, "resident", dense, stacks, max_seq_len=max_len,
                                         prefill_chunk=args.prompt_len, expert_compute=compute)
            rows.append({"model": name, "engine": label, **time_generate(engine, prompt, args.new_tokens, args.repeats),
                         "decode_expert_compute": engine.stats()["decode_expert_compute"]})
        except Exception as err:  # noqa: BLE001 -- a failing variant is a row with its error; the others still run
            print(f"{name} {label}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"model": name, "engine": label, "tpot_s": float("nan"), "tokens": None,
                         "error": f"{type(err).__name__}: {str(err)[:300]}"})
        engine = None
        gc.collect()
    if reference:
        rows.append({"model": name, "engine": "moejax whole-model",
                     **whole_model(cfg, dense, stacks, prompt, args.new_tokens, args.repeats, max_len)})
        for row in rows[:-1]:
            row["tokens_equal_whole_model"] = row["tokens"] == rows[-1]["tokens"]
        del stacks
        gc.collect()
    floor = active_bytes_per_token(cfg, args.prompt_len + args.new_tokens // 2)
    rows.append({"model": name, "engine": "HBM floor", "tpot_s": floor["total_bytes"] / bandwidth, **floor})
    jax.clear_caches()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=DEFAULT_MODELS, help="card[:layers],... (default: %(default)s)")
    parser.add_argument("--reference-models", default="mixtral-8x7b", help="cards also run as the whole-model program")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-timeout", type=float, default=90, help="seconds, per model")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: models that would not fit are skipped")
    parser.add_argument("--out", default="bench_decode.json")
    args = parser.parse_args()
    budget = Budget(args.time_budget)
    models = parse_models(args.models)
    references = set(args.reference_models.split(",")) if args.reference_models else set()

    # The peers first, each in its own process, before JAX takes the GPU's memory.
    peers = {} if args.skip_peer else run_peers(
        models, ["--mode", "resident", "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                 "--repeats", str(args.repeats)], args.dims, args.peer_timeout, budget)
    start_backend(smoke=args.dims == "tiny")
    bandwidth = hbm_bandwidth(64 << 20 if args.dims == "tiny" else 1 << 30)
    print(f"HBM bandwidth (elementwise bf16, read + write): {bandwidth / GB:.0f} GB/s", flush=True)

    result = {"environment": environment(), "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "hbm_bandwidth_bytes_per_s": bandwidth, "peer_raw": peers, "rows": []}
    rows = result["rows"]
    configs = [model_config(card, layers, args.dims == "tiny") for card, layers in models]
    seconds_per_layer = 0.0  # of the last model run: the next one needs about as much per layer
    for (card, layers), cfg in zip(models, configs, strict=True):
        label = f"{card}:{cfg.num_layers}"
        if not budget.allows(seconds_per_layer * cfg.num_layers, label):
            result.setdefault("skipped", []).append(label)
            continue
        start = time.monotonic()
        model_rows = bench_model(card, layers, args, bandwidth, card in references)
        for variant, timing in peers.get(model_label(card, layers), {}).items():
            if isinstance(timing, dict) and "tpot_s" in timing:
                model_rows.append({"model": model_rows[0]["model"], "engine": f"transformers {variant}", **timing})
        add_ratios(model_rows)
        rows += model_rows
        for row in model_rows:
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        write_json(args.out, {**result, "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]})
        if card not in references:  # the whole-model program's compilations make a model slower than the next
            seconds_per_layer = (time.monotonic() - start) / cfg.num_layers
    print(f"\nbatch 1, random bf16 weights, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
          f"HBM {bandwidth / GB:.0f} GB/s")
    print_table(rows, [("model", "model", "s"), ("engine", "engine", "s"),
                       ("decode_expert_compute", "decode compute", "s"), ("ttft_ms", "TTFT ms", ".1f"),
                       ("tpot_ms", "TPOT ms", ".3f"), ("x_whole_model", "x whole-model", ".3f"),
                       ("x_best_transformers", "x best transformers", ".3f"), ("x_floor", "x HBM floor", ".2f")])


def add_ratios(rows: list[dict]) -> None:
    """ms figures and each row's TPOT over the whole-model program's, the best transformers path's and the
    HBM floor's, where those rows exist."""
    tpot = {row["engine"]: row["tpot_s"] for row in rows}
    peers = [t for name, t in tpot.items() if name.startswith("transformers")]
    for row in rows:
        row["tpot_ms"] = row["tpot_s"] * 1e3
        if "ttft_s" in row:
            row["ttft_ms"] = row["ttft_s"] * 1e3
        if row["engine"] == "HBM floor":
            continue
        if "moejax whole-model" in tpot:
            row["x_whole_model"] = row["tpot_s"] / tpot["moejax whole-model"]
        if peers:
            row["x_best_transformers"] = row["tpot_s"] / min(peers)
        row["x_floor"] = row["tpot_s"] / tpot["HBM floor"]


if __name__ == "__main__":
    main()
