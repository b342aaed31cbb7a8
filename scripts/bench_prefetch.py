"""Prefetching and caching on real routing: DeepSeek-V2-Lite's recorded routing replayed through a
random-weight model of its MoE shape, with experts in pinned host memory.

BENCHMARK-ONLY ROUTER OVERRIDE: the model computes its own routing (random weights route randomly),
then `TraceReplay` replaces the chosen experts with those DeepSeek-V2-Lite chose for the same token
position of a recorded sequence, so the cache and the prefetchers see real routing with real expert
sizes (64 experts of 2048 x 1408 per MoE layer, top-6, 26 MoE layers). Combination weights stay the
model's. The lookahead prefetcher's guess (the next layer's router applied one layer early) cannot
be replayed, since the traces hold no hidden states: its guess is simulated from the next layer's
recorded experts, each right with probability --lookahead-accuracy (the accuracy measured on
moejax's own trained model by `moejax trace`); its router still runs on the GPU, so its cost is real.

Policy `belady` (Belady's MIN, offline optimal eviction) is told the replayed routing ahead of time;
with `--lookahead-accuracy 1.0` its lookahead prefetch is a perfect next-layer prediction: together
the ceiling of every online policy and prefetcher in this engine.

Per budget, policy and prefetcher: a warm-up sequence, then --sequences recorded sequences of the
evaluation part (the trace collection is fitted on other sequences), each a --prompt-len token
prompt and --new-tokens decoded tokens, one engine for all of them (the cache stays warm). With
--rounds R every configuration is measured R times, interleaved; the table gives medians over the
rounds and the range of the speed-up over LRU/none of the same round.

  XLA_CLIENT_MEM_FRACTION=0.95 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=40 PYTHONPATH=. python scripts/bench_prefetch.py \
      --traces .data/traces/deepseek_v2_lite_prefill.npz --out $OUT/bench_prefetch.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import jax
import numpy as np

from moejax.cards import load_card
from moejax.errors import MoejaxError
from moejax.lab import simulate_lookahead
from moejax.progress import Progress
from moejax.runtime.engine import Engine, GenerationConfig
from moejax.runtime.expert_runner import split_waves
from moejax.runtime.host_routed import HostRoutedExecutor
from moejax.runtime.loading import expert_runner, reserved_kv_bytes
from moejax.runtime.policies import Belady, make_policy
from moejax.routing.prefetchers import make_prefetcher
from moejax.runtime.store import HostExpertStore
from moejax.routing.traces import load_routing
from scripts.benchlib import environment, print_table, random_dense_params, random_expert, tiny_widths, write_json

GB = 1e9


class TraceReplay:
    """Benchmark-only routing override: at MoE layer m the valid rows of ids [N, k] become the
    recorded experts of the next tokens of a sequence, in order (the cursor moves at MoE layer 0),
    and their lookahead guess [N, k] the simulated guess of layer m + 1 for the same tokens.

    In a real run the ids the expert function reads are already on the device (the router made
    them); replayed ids would be copied there with every call. Given `step_tokens` (a sequence's
    steps take that many tokens each, every row valid) and the device, `start` copies the sequence's
    replayed ids there before it runs, outside the timed decode, and the calls take them from there
    as they would take the router's."""

    def __init__(self, experts: np.ndarray, lookahead: np.ndarray, step_tokens: list[int] | None = None, device=None):
        self.experts, self.lookahead = experts, lookahead  # [L, T, k] each
        self.step_tokens, self.device = step_tokens, device
        self.cursor = self.offset = 0
        self.staged: dict[tuple[int, int, int], jax.Array] = {}  # (layer, first token, tokens) -> ids on the device

    def steps(self, token: int) -> list[tuple[int, int]]:
        """(first token, tokens) of each step of the sequence that begins at `token`."""
        firsts = token + np.concatenate([[0], np.cumsum(self.step_tokens)[:-1]])
        return list(zip(firsts.tolist(), self.step_tokens, strict=True))

    def start(self, token: int) -> None:
        self.cursor = token
        if self.step_tokens is None:
            return
        keys = [(layer, first, n) for first, n in self.steps(token) for layer in range(len(self.experts))]
        arrays = [self.experts[layer, first : first + n].astype(np.int32) for layer, first, n in keys]
        self.staged = dict(zip(keys, jax.device_put(arrays, self.device), strict=True))

    def __call__(self, layer: int, ids: np.ndarray, lookahead: np.ndarray | None, valid_rows: np.ndarray | None):
        rows = np.arange(len(ids)) if valid_rows is None else np.flatnonzero(valid_rows)
        if layer == 0:
            self.offset, self.cursor = self.cursor, self.cursor + len(rows)
        tokens = slice(self.offset, self.offset + len(rows))
        ids = ids.copy()
        ids[rows] = self.experts[layer, tokens]
        if lookahead is not None and layer + 1 < len(self.lookahead):
            lookahead = lookahead.copy()
            lookahead[rows] = self.lookahead[layer + 1, tokens]
        staged = self.staged.get((layer, self.offset, len(rows))) if len(rows) == len(ids) else None
        return ids, lookahead, staged


def belady_future(replay: TraceReplay, starts: list[int], capacity: int):
    """(MoE layer, experts needed) for every layer step the engine will run over the sequences
    beginning at `starts` (warm-up included), a layer's experts in waves of at most `capacity` as
    the engine runs them: Belady's future, so the bench can time the offline optimal eviction as the
    ceiling of every online policy."""
    for start in starts:
        for first, n in replay.steps(start):
            for layer in range(len(replay.experts)):
                for wave in split_waves(np.unique(replay.experts[layer, first : first + n]).tolist(), capacity):
                    yield layer, wave


def build_store(cfg, device) -> HostExpertStore:
    """Pinned host experts for every MoE layer: copies of one layer's worth of random experts."""
    store = HostExpertStore(device, cfg.expert_bytes)
    pool = [random_expert(cfg, jax.random.PRNGKey(e)) for e in range(cfg.num_experts)]
    progress = Progress("pinned experts", len(cfg.moe_layer_ids) * cfg.num_experts)
    for m in range(len(cfg.moe_layer_ids)):
        for e in range(cfg.num_experts):
            store.put((m, e), pool[e])
            progress.advance()
        jax.block_until_ready([store.get((m, e)) for e in range(cfg.num_experts)])
    progress.close()
    return store


def run_config(cfg, globals_, layers, store, collection, replay, starts, args, budget, policy, prefetch, mode="cached",
               floor=None) -> dict:
    """Warm-up sequence, then the measured ones; one engine, the cache warm across sequences. floor: the
    trace prefetchers' `--prefetch-floor` (None: their default)."""
    num_moe = len(cfg.moe_layer_ids)
    collection = copy.deepcopy(collection)
    try:
        runner = expert_runner(
            cfg, store, mode, budget,
            # Belady's future depends on the cache's capacity (a layer too big for it runs in waves):
            # it replaces a placeholder policy once the cache exists, before the first step.
            make_policy("lru" if policy == "belady" else policy, num_layers=num_moe, num_experts=cfg.num_experts,
                        collection=collection),
            0, reserved_kv_bytes(cfg, 1, 256),
            prefetcher=None if prefetch == "none" else make_prefetcher(
                prefetch, num_layers=num_moe, num_experts=cfg.num_experts, top_k=cfg.top_k, collection=collection,
                floor=floor),
            prefetch_per_layer=args.prefetch_per_layer, collection=collection,
        )
    except MoejaxError as err:
        return {"budget": budget, "policy": policy, "prefetch": prefetch, "prefetch_floor": floor, "skipped": str(err)}
    runner.replay = replay
    if policy == "belady":
        runner.cache.directory.policy = Belady(belady_future(replay, starts, runner.cache.capacity))
    engine = Engine(cfg, HostRoutedExecutor(cfg, globals_, layers, runner))
    config = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompt = list(range(1, args.prompt_len + 1))
    decode_s = decode_steps = hits = activations = stall = moved = 0.0
    used = issued = misses = 0
    tpots = []
    for n, start in enumerate(starts):
        replay.start(start)
        result = engine.generate([prompt], config)
        if n == 0:
            continue  # warm-up: compiles, fills the cache
        total, prefill = result.stats["total"], result.stats["prefill"]
        decode_s += result.timing.total_s - result.timing.ttft_s
        decode_steps += result.timing.decode_steps
        tpots.append(result.timing.tpot_s)
        hits += total["hits"] - prefill["hits"]
        activations += total["activations"] - prefill["activations"]
        misses += total["misses"] - prefill["misses"]
        used += total["prefetch_used"] - prefill["prefetch_used"]
        issued += total["prefetch_issued"] - prefill["prefetch_issued"]
        stall += total["stall_s"] - prefill["stall_s"]
        moved += total["bytes_h2d"] - prefill["bytes_h2d"]
    row = {
        "mode": mode, "budget": budget, "policy": policy, "prefetch": prefetch,
        "prefetch_floor": getattr(runner.prefetcher, "min_probability", None), "capacity_experts": runner.cache.capacity,
        "tokens_per_s": decode_steps / decode_s, "tpot_s": float(np.median(tpots)),
        "hit_rate": hits / activations, "stall_s_per_token": stall / decode_steps,
        "gb_per_token": moved / decode_steps / GB,
        "prefetch_precision": used / issued if issued else None,
        "prefetch_recall": used / (used + misses) if used + misses else None,
        "decode_steps": int(decode_steps),
    }
    del engine, runner
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--card", default="deepseek-v2-lite-shape")
    parser.add_argument("--traces", required=True, help="DeepSeek-V2-Lite routing (experts [26, T, 6], seq_lens)")
    parser.add_argument("--fit-fraction", type=float, default=0.5, help="the first part of the sequences fits the collection")
    parser.add_argument("--sequences", type=int, default=4, help="evaluation sequences measured per configuration")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--policies", default="lru,lfu,activation")
    parser.add_argument("--prefetch", default="none,lookahead,trace,trace+lookahead")
    parser.add_argument("--configs", help="policy:prefetch pairs to run instead of every --policies x --prefetch pair; "
                        "policy:prefetch:floor sets a trace prefetcher's --prefetch-floor")
    parser.add_argument("--prefetch-per-layer", type=int, help="default: the model's top-k")
    parser.add_argument("--rounds", type=int, default=1, help="times each configuration is measured, interleaved")
    parser.add_argument("--lookahead-accuracy", type=float, required=True)
    parser.add_argument("--compare-resident", action="store_true", help="also time resident and cached at budget 1.0")
    parser.add_argument("--resident-pairs", type=int, default=2, help="interleaved resident / cached 1.0 pairs of --compare-resident")
    parser.add_argument("--tiny", action="store_true", help="shrink every width (a CPU smoke run of this script)")
    parser.add_argument("--out", default="bench_prefetch.json")
    args = parser.parse_args()

    if args.configs:
        pairs = [parse_config(config) for config in args.configs.split(",")]
    else:
        pairs = [(policy, prefetch, None) for policy in args.policies.split(",") for prefetch in args.prefetch.split(",")]
    cfg = load_card(args.card)
    if args.tiny:
        cfg = tiny_widths(cfg)
    trace = load_routing(args.traces)
    if trace.experts.shape[0] != len(cfg.moe_layer_ids) or trace.experts.shape[2] != cfg.top_k:
        raise SystemExit(f"{args.traces}: routing {trace.experts.shape} does not match card {args.card}")
    n_fit = int(len(trace.seq_lens) * args.fit_fraction)
    fit, evaluate = trace.select(0, n_fit), trace.select(n_fit, len(trace.seq_lens))
    collection = fit.collection()  # EAMs and the layer-to-layer transitions of the fit sequences
    lookahead = simulate_lookahead(evaluate, args.lookahead_accuracy, seed=0)
    steps = [args.prompt_len] + [1] * (args.new_tokens - 1)
    replay = TraceReplay(evaluate.experts, lookahead, steps, jax.devices()[0])
    bounds = np.concatenate([[0], np.cumsum(evaluate.seq_lens)])
    needed = args.prompt_len + args.new_tokens - 1
    starts = [int(bounds[s]) for s in range(len(evaluate.seq_lens)) if evaluate.seq_lens[s] >= needed][: args.sequences + 1]
    print(f"{n_fit} sequences fit the collection; replaying {len(starts)} of the other {len(evaluate.seq_lens)}", flush=True)

    device = jax.devices()[0]
    start = time.perf_counter()
    globals_, layers = random_dense_params(cfg)
    store = build_store(cfg, device)
    print(f"model built in {time.perf_counter() - start:.0f} s: {len(store)} experts, {store.total_bytes / GB:.1f} GB pinned", flush=True)

    # The whole model on the GPU against the cache at budget 1.0, twice each, interleaved.
    ceiling = []
    if args.compare_resident:
        on_device = store.subset(on_device=True)
        for _ in range(args.resident_pairs):
            ceiling.append(run_config(cfg, globals_, layers, on_device, collection, replay, starts, args, None, "lru", "none", "resident"))
            ceiling.append(run_config(cfg, globals_, layers, store, collection, replay, starts, args, "1.0", "lru", "none"))
            print(ceiling[-2], ceiling[-1], flush=True)
        del on_device
        gc.collect()

    rows = []
    result = {
        "environment": environment(), "card": args.card, "traces": str(args.traces),
        "fit_sequences": n_fit, "measured_sequences": len(starts) - 1, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "lookahead_accuracy": args.lookahead_accuracy,
        "expert_bytes": cfg.expert_bytes, "rows": rows, "resident_vs_cached_full": ceiling,
    }
    # Rounds interleave the configurations, and each one's speed-up is taken against LRU/none of the
    # same round: the GPU machine's host speed drifts between runs by up to ~20% (BENCHMARKS.md).
    for budget in args.budgets.split(","):
        for round_ in range(args.rounds):
            for policy, prefetch, floor in pairs:
                row = run_config(cfg, globals_, layers, store, collection, replay, starts, args, budget, policy, prefetch,
                                 floor=floor)
                row["round"] = round_
                base = next((r for r in rows if (r["budget"], r["policy"], r["prefetch"], r.get("round")) == (budget, "lru", "none", round_)), None)
                if base and "tokens_per_s" in row and "tokens_per_s" in base:
                    row["x_lru_none"] = row["tokens_per_s"] / base["tokens_per_s"]
                rows.append(row)
                print(row, flush=True)
                write_json(args.out, result)  # after every row: a run cut short keeps what it measured
    result["summary"] = summary = summarize([r for r in rows if "tokens_per_s" in r])
    write_json(args.out, result)
    print_table([r for r in ceiling + summary], [
        ("mode", "mode", "s"),
        ("budget", "budget", "s"), ("policy", "policy", "s"), ("prefetch", "prefetch", "s"), ("prefetch_floor", "floor", ".2f"),
        ("capacity_experts", "slots", "d"), ("tokens_per_s", "tok/s", ".2f"), ("x_lru_none", "x lru/none", ".2f"),
        ("x_lru_none_min", "min x", ".2f"), ("x_lru_none_max", "max x", ".2f"),
        ("tpot_s", "TPOT s", ".4f"), ("hit_rate", "hit", ".3f"), ("stall_s_per_token", "stall s/tok", ".4f"),
        ("gb_per_token", "GB/tok", ".3f"), ("prefetch_precision", "prec", ".2f"), ("prefetch_recall", "recall", ".2f"),
    ])


def parse_config(config: str) -> tuple[str, str, float | None]:
    """'policy:prefetch' or 'policy:prefetch:floor' -> (policy, prefetch, floor or None)."""
    fields = config.split(":")
    try:
        if len(fields) in (2, 3):
            return fields[0], fields[1], float(fields[2]) if len(fields) == 3 else None
    except ValueError:
        pass
    raise SystemExit(f"--configs: '{config}' is not policy:prefetch or policy:prefetch:floor (a number)")


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (budget, policy, prefetch, floor): the median over rounds of each number, and the
    smallest and largest paired speed-up over LRU/none."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["policy"], row["prefetch"], row.get("prefetch_floor")), []).append(row)
    summary = []
    for group in groups.values():
        merged = {**group[0], "rounds": len(group)}
        merged.pop("round", None)
        for key, value in group[0].items():
            if isinstance(value, float) and all(isinstance(r.get(key), float) for r in group):
                merged[key] = float(np.median([r[key] for r in group]))
        speedups = [r["x_lru_none"] for r in group if "x_lru_none" in r]
        if speedups:
            merged["x_lru_none_min"], merged["x_lru_none_max"] = min(speedups), max(speedups)
        summary.append(merged)
    return summary


if __name__ == "__main__":
    main()
