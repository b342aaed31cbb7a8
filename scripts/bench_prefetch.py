"""Caching and prefetching on real routing: DeepSeek-V2-Lite's recorded routing replayed through the
engine's real step programs with a random-weight model of its shape, experts in pinned host memory, a
GPU cache of --budget.

BENCHMARK-ONLY ROUTING OVERRIDE (`RoutingReplay`, through `Engine.routing_override`): each slot is
assigned a recorded sequence, and every MoE layer uses, for a token at position p, the experts that
DeepSeek-V2-Lite chose for that sequence's token p (combination weights: the random router's
probabilities of them, renormalised). So the cache, the policies and the trace prefetcher see real
routing with real expert sizes (26 MoE layers of 64 experts of 2048 x 1408, top-6).

The lookahead prefetcher's guess (the next MoE layer's router applied one layer early) cannot be
replayed: the traces hold no hidden states, and the random model's own next router guesses experts
that have nothing to do with the replayed routing (precision ~0.08). So the replay also gives the engine
the guesses (the override's second array): the next layer's recorded experts, each kept with probability
--lookahead-accuracy (default 0.783, what the shipped model's lookahead scored on its own traces,
BENCHMARKS.md) and otherwise replaced by a random other expert, as `moejax lab --lookahead-accuracy`
simulates it (`lab.simulate_lookahead`). --lookahead-accuracy router: the random router's own guesses
(the lookahead's cost, not its benefit).

Per configuration (--configs policy/prefetch): one engine, a warm-up sequence (compiles, fills the
cache) then --sequences recorded sequences of the evaluation part (the trace collection of the activation
policy and the trace prefetcher is fitted on the other part), each a --prompt-len token prompt and
--new-tokens decoded tokens; decode figures only. Per row: tokens/s, x LRU/none, hit rate, GB moved per
token, the link floor per token (those bytes / the pinned host -> GPU bandwidth, measured with
expert-sized copies) and the time per token over it, prefetch precision and recall, and the bytes over
Belady's.

Belady (Belady's MIN, the offline optimal eviction for demand fetching) runs in the lab, on the same
steps as the engine (the same sequences, prompt chunks and decode steps, the same capacity, the engine's
own cache code `offload.device_cache`): as the priority policy told, before each step, every key's next
use from the known future (`belady_priorities`). The lab's LRU on the same steps is checked against the
engine's LRU/none counters (`lab_matches_engine`): a check that the replay maps what the engine runs.

TTFT (--ttft-prompt tokens, on the LRU/none engine after its decode figures, the cache emptied before
each prompt): against the link floor of the experts the prompt uses (the distinct (layer, expert) pairs of
its routing x expert bytes / bandwidth). --time-budget skips what would not fit, the last configurations
first.

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/bench_prefetch.py \\
      --traces .data/traces/deepseek_v2_lite_prefill.npz --out $OUT/bench_prefetch.json
  PYTHONPATH=. python scripts/bench_prefetch.py --dims tiny --traces .data/traces/deepseek_v2_lite_prefill.npz \\
      --new-tokens 8 --sequences 1 --ttft-prompt 64 --out /tmp/prefetch.json   # CPU smoke run

The SiDA predictor as the prefetcher (`--configs ...,lru/predictor --predictor DIR`, DIR trained on the
fit part of --traces): it runs ahead on a host thread, as in the engine, and is asked about the recorded
tokens of the replayed sequence (`ReplayedTokens`), so it predicts the replayed routing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.errors import MoejaxError
from moejax.offload import device_cache as dc
from moejax.offload.expert_stacks import MISS_COPIES
from moejax.offload.stats import experts_moved
from moejax.predictors import store
from moejax.predictors.base import Predictor
from moejax.predictors.data import load_trace_data
from moejax.routing.traces import RoutingTrace, load_routing
from moejax.tools.lab import simulate_lookahead
from scripts.benchlib import (
    GB, Budget, build_random_engine, decode_stats, environment, model_config, pinned_bandwidth, pinned_stacks,
    print_table, random_dense_params, start_backend, write_json,
)

# The most telling first: a time budget skips the last ones (the H200 runs ~85 s each). activation/lookahead and
# activation/trace+lookahead were the best on the H200 of 2026-12-03 (1.29x and 1.21x LRU/none); activation/trace
# moves the most bytes. TTFT runs on the lru/none engine, after its decode.
DEFAULT_CONFIGS = "lru/none,activation/lookahead,activation/trace+lookahead,activation/none,lru/lookahead,activation/trace"
NEVER = 1e9  # Belady's next use of a key the future never needs again


class RoutingReplay:
    """Benchmark-only routing override (`Engine.routing_override`): slot s replays recorded sequence
    `assigned[s]` of `trace`: a token at position p uses, at every MoE layer, the experts the sequence's token
    p chose. Padding rows (slot -1) and positions past the recording get experts 0..k-1: they are never valid
    tokens of a step, so nothing is fetched or computed for them."""

    def __init__(self, trace: RoutingTrace, guesses: np.ndarray | None = None):
        """guesses: None, or int [L, T, k] the lookahead's guess of each layer's experts (row 0: unused), given
        to the engine with the routing (at MoE layer m, row m + 1: the guess for the next layer)."""
        self.experts = trace.experts  # [L, T, k]
        self.guesses = guesses
        self.offsets, self.lengths = trace.offsets(), trace.seq_lens
        self.assigned: dict[int, int] = {}

    def assign(self, slot: int, sequence: int) -> None:
        self.assigned[slot] = sequence

    def __call__(self, slots: list[int], positions: np.ndarray):
        """slots [rows] (-1: padding), positions int [rows, T] -> experts int32 [L, rows * T, k], or with guesses
        the pair (experts, guesses int32 [L, rows * T, k]; -1: none)."""
        L, _, k = self.experts.shape
        rows, T = positions.shape
        out = np.broadcast_to(np.arange(k, dtype=np.int32), (L, rows * T, k)).copy()
        guesses = np.full((L, rows * T, k), -1, np.int32)
        for row, slot in enumerate(slots):
            if slot < 0:
                continue
            sequence = self.assigned[slot]
            recorded = np.flatnonzero(positions[row] < self.lengths[sequence])
            tokens = self.offsets[sequence] + positions[row, recorded]
            out[:, row * T + recorded] = self.experts[:, tokens]
            if self.guesses is not None:
                guesses[:-1, row * T + recorded] = self.guesses[1:, tokens]
        return out if self.guesses is None else (out, guesses)


class ReplayedTokens(Predictor):
    """Benchmark-only: `predictor` (trained on the recorded model's routing, e.g. `moejax train-predictor
    --kind sida` on the trace) as the engine's run-ahead prefetcher (`--prefetch predictor`), asked about the
    recorded sequence that slot 0 replays instead of the random model's tokens: for the engine's first T
    tokens, the predictor's prediction from the sequence's first T recorded token strings (`tokens`: per
    sequence, from NAME_tokens.json; the last one repeats past its end), for the first `num_layers` MoE
    layers (a --dims tiny model replays the first recorded layers)."""

    def __init__(self, predictor: Predictor, tokens: list[list[str]], replay: RoutingReplay, num_layers: int):
        if predictor.num_layers < num_layers:
            raise SystemExit(f"--predictor is for {predictor.num_layers} MoE layers, the model has {num_layers}")
        super().__init__(num_layers, predictor.num_experts, predictor.top_k)
        self.predictor, self.tokens, self.replay = predictor, tokens, replay
        self.per = predictor.per

    def _recorded(self, tokens) -> list[str]:
        recorded = self.tokens[self.replay.assigned[0]]
        return [recorded[min(t, len(recorded) - 1)] for t in range(len(tokens))]

    def predict(self, tokens, experts=None, lookahead=None):
        return self.predictor.predict(self._recorded(tokens))[:, : self.num_layers]

    def predict_next(self, tokens):
        ahead = self.predictor.predict_next(self._recorded(tokens))
        return None if ahead is None else ahead[: self.num_layers]

    def warm_up(self):
        self.predictor.warm_up()


def engine_steps(trace: RoutingTrace, sequences: list[int], prompt_len: int, new_tokens: int, prefill_chunk: int):
    """What the engine's `generate` runs, per sequence, for one prompt of `prompt_len` tokens and `new_tokens`
    new ones: [(sequence, kind 'prefill' | 'decode', experts [L, T, k])], the prompt in chunks of at most
    `prefill_chunk` tokens, then one step per decoded token after the first."""
    steps = []
    for s in sequences:
        start = int(trace.offsets()[s])
        for chunk in range(0, prompt_len, prefill_chunk):
            stop = min(chunk + prefill_chunk, prompt_len)
            steps.append((s, "prefill", trace.experts[:, start + chunk : start + stop]))
        for position in range(prompt_len, prompt_len + new_tokens - 1):
            steps.append((s, "decode", trace.experts[:, start + position : start + position + 1]))
    return steps


def used_keys(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [L, E]: the (layer, expert) pairs a step's experts [L, T, k] use."""
    used = np.zeros((experts.shape[0], num_experts), bool)
    for layer, rows in enumerate(experts):
        used[layer, rows[rows < num_experts]] = True
    return used


def belady_priorities(steps: list[np.ndarray], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Belady's MIN as the device cache's priority tables (`device_cache.Priorities`), per step: while MoE layer
    c of step t runs, key (l, e) is next needed (s - t) L + l - c layer steps ahead, s its first step using it
    (s >= t for l > c, s > t otherwise). The victim is the largest; dropping the -c common to every key gives
    ahead[t] = (s_from_t - t) L + l and behind[t] = (s_after_t - t) L + l (NEVER where no such step exists).
    steps: each step's experts [L, T, k] -> (ahead, behind) float32 [steps, L, E]."""
    L = steps[0].shape[0]
    used = np.stack([used_keys(experts, num_experts) for experts in steps])  # [S, L, E]
    index = np.arange(len(steps))[:, None, None]
    first = np.full((len(steps) + 1, L, num_experts), np.inf)  # first[t]: first step >= t using the key
    for t in range(len(steps) - 1, -1, -1):
        first[t] = np.where(used[t], t, first[t + 1])
    layer = np.arange(L)[None, :, None]

    def distance(next_step):
        return np.where(np.isinf(next_step), NEVER, (next_step - index) * L + layer).astype(np.float32)

    return distance(first[:-1]), distance(first[1:])


@functools.partial(jax.jit, static_argnames=("policy", "num_experts", "whole_from"))
def cache_steps(state: dc.CacheState, ids, ahead, behind, *, policy: str, num_experts: int, whole_from: int | None):
    """The lab: steps of known routing through the engine's cache code, without a model or prefetching (what
    a step program does to the cache per MoE layer: `access` of the distinct experts of its valid tokens).
    ids int32 [S, L, T, k]; ahead, behind float32 [S, L, E] (the priority policy's tables per step); whole_from:
    the engine's `whole_layer_from` (`device_cache.copies_whole`).
    -> (state, counters int32 [S, L, len(COUNTERS)] after each step)."""
    size = min(ids.shape[2] * ids.shape[3], num_experts)

    def step(state, xs):
        step_ids, priorities = xs[0], dc.Priorities(xs[1], xs[2])

        def layer(state, layer_xs):
            m, layer_ids = layer_xs
            distinct = dc.distinct_experts(layer_ids, None, num_experts, size)
            whole = dc.copies_whole(state, m, distinct, num_experts, whole_from)
            state, _, _, _ = dc.access(state, m, distinct, policy=policy, num_experts=num_experts,
                                       priorities=priorities, whole=whole)
            return state, None

        state, _ = lax.scan(layer, state, (jnp.arange(step_ids.shape[0]), step_ids))
        return state, state.counters

    return lax.scan(step, state, (ids, ahead, behind))


def lab_replay(steps, capacity: int, num_experts: int, policy: str, device,
               whole_from: int | None = None) -> np.ndarray:
    """Counters int64 [steps, L, len(COUNTERS)] each step added (lru: the engine's LRU; belady: the priority
    policy with `belady_priorities`), the cache starting empty, layer steps missing `whole_from` experts copying
    their layer whole as the engine's do. Runs of like steps go in one call."""
    experts = [e for _, _, e in steps]
    L = experts[0].shape[0]
    ahead, behind = belady_priorities(experts, num_experts) if policy == "belady" else (
        np.zeros((len(steps), L, num_experts), np.float32),) * 2
    state = jax.device_put(dc.empty_state(L, num_experts, capacity), device)
    after, start = [], 0
    while start < len(steps):
        stop = start + 1
        while stop < len(steps) and experts[stop].shape == experts[start].shape:
            stop += 1
        ids = jax.device_put(np.stack(experts[start:stop]).astype(np.int32), device)
        state, counters = cache_steps(state, ids, jax.device_put(ahead[start:stop], device),
                                      jax.device_put(behind[start:stop], device),
                                      policy="priority" if policy == "belady" else policy, num_experts=num_experts,
                                      whole_from=whole_from)
        after.append(np.asarray(counters, np.int64))
        start = stop
    after = np.concatenate(after)
    return np.diff(after, axis=0, prepend=np.zeros_like(after[:1]))


def lab_row(steps, added: np.ndarray, measured: set[int], expert_bytes: int) -> dict:
    """Decode totals of the measured sequences from per-step counters."""
    keep = [i for i, (s, kind, _) in enumerate(steps) if kind == "decode" and s in measured]
    total = dict(zip(dc.COUNTERS, added[keep].sum(axis=(0, 1)).tolist(), strict=True))
    moved = experts_moved(total)
    return {"decode_steps": len(keep), "activations": total["activations"], "hits": total["hits"],
            "misses": total["misses"], "hit_rate": total["hits"] / max(total["activations"], 1),
            "bytes_per_token": moved * expert_bytes / len(keep)}


def cached_engine(cfg, dense, stacks, replay: RoutingReplay, args, policy: str, prefetch: str, traces: Path,
                  predictor: Predictor | None = None):
    """A cached engine at --budget replaying `replay`'s routing (`traces`: the fit sequences' collection, for the
    activation policy and the trace prefetcher; predictor: the run-ahead predictor of prefetch 'predictor'), its
    misses moved as --miss-copy says."""
    options = {"traces": traces} if policy == "activation" or prefetch.startswith("trace") else {}
    engine = build_random_engine(cfg, "cached", dense, stacks, max_seq_len=args.max_seq_len, expert_budget=args.budget,
                                 cache_policy=policy, prefetch=prefetch, prefill_chunk=max(args.ttft_prompt, args.prompt_len),
                                 miss_copy=args.miss_copy, **options)
    engine.routing_override = replay
    if prefetch == "predictor":
        engine.use_predictor(predictor)
    return engine


def measure_decode(engine, replay: RoutingReplay, sequences: list[int], prompt: list[int], new_tokens: int) -> dict:
    """The engine's decode figures over the sequences (the first a warm-up: compiles, fills the cache)."""
    totals, seconds, tpots = {}, 0.0, []
    for n, sequence in enumerate(sequences):
        replay.assign(0, sequence)
        result = engine.generate([prompt], max_new_tokens=new_tokens, ignore_eos=True)
        if n == 0:
            continue
        for key, value in decode_stats(result).items():
            totals[key] = totals.get(key, 0) + value
        seconds += result.timing.total_s - result.timing.ttft_s
        tpots.append(result.timing.tpot_s)
    steps, moved, used = totals["steps"], totals["bytes_h2d"], totals["prefetch_used"]
    return {
        "policy": engine.manager.policy, "prefetch": engine.manager.prefetch, "capacity_experts": engine.cache.num_slots,
        "tokens_per_s": steps / seconds, "s_per_token": seconds / steps, "tpot_s": float(np.median(tpots)),
        "hit_rate": totals["hits"] / totals["activations"], "misses": totals["misses"],
        "bytes_per_token": moved / steps, "gb_per_token": moved / steps / GB,
        "prefetch_precision": used / totals["prefetch_issued"] if totals["prefetch_issued"] else None,
        "prefetch_recall": used / (used + totals["misses"]) if used + totals["misses"] else None,
        "decode_steps": steps, "miss_copy": engine.stats_info.get("miss_copy"),
    }


def add_ratios(row: dict, bandwidth: float, lru: dict | None, belady: dict) -> None:
    """The row's link floor per token (its bytes / bandwidth), its time per token over it, its bytes over
    Belady's and its tokens/s over LRU/none's."""
    row["link_floor_s"] = row["bytes_per_token"] / bandwidth
    if "s_per_token" in row:
        row["x_link_floor"] = row["s_per_token"] / row["link_floor_s"] if row["link_floor_s"] else None
        row["x_lru_none"] = row["tokens_per_s"] / lru["tokens_per_s"] if lru else None
    row["x_belady_bytes"] = row["bytes_per_token"] / belady["bytes_per_token"] if belady["bytes_per_token"] else None


def time_to_first_token(engine, replay: RoutingReplay, trace: RoutingTrace, sequences: list[int], prompt_len: int,
                        bandwidth: float) -> dict:
    """TTFT of a `prompt_len` token prompt, the cache emptied before each (the first sequence a warm-up),
    against the link floor of the experts the prompt uses."""
    cfg = engine.cfg
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, prompt_len).tolist()
    runs = []
    for n, sequence in enumerate(sequences):
        replay.assign(0, sequence)
        engine.cache = jax.device_put(dc.empty_state(len(cfg.moe_layer_ids), cfg.num_experts, engine.cache.num_slots),
                                      engine.device)
        result = engine.generate([prompt], max_new_tokens=1, ignore_eos=True)
        start = int(trace.offsets()[sequence])
        used = int(used_keys(trace.experts[:, start : start + prompt_len], cfg.num_experts).sum())
        floor = used * cfg.expert_bytes / bandwidth
        if n:
            runs.append({"sequence": sequence, "ttft_s": result.timing.ttft_s, "experts_used": used,
                         "bytes_moved": result.stats["total"]["bytes_h2d"], "link_floor_s": floor,
                         "x_link_floor": result.timing.ttft_s / floor,
                         "layer_program_chunks": result.stats.get("layer_stream", {}).get("chunks", 0)})
    return {"prompt_len": prompt_len, "policy": engine.manager.policy, "prefetch": engine.manager.prefetch, "runs": runs,
            "ttft_s": float(np.median([r["ttft_s"] for r in runs])),
            "link_floor_s": float(np.median([r["link_floor_s"] for r in runs])),
            "x_link_floor": float(np.median([r["x_link_floor"] for r in runs]))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--card", default="deepseek-v2-lite")
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    parser.add_argument("--traces", required=True, help="DeepSeek-V2-Lite routing (experts [26, T, 6], seq_lens)")
    parser.add_argument("--fit-fraction", type=float, default=0.5, help="the first part of the sequences fits the collection")
    parser.add_argument("--budget", default="0.25")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="policy/prefetch,... (default: %(default)s)")
    parser.add_argument("--sequences", type=int, default=3, help="measured sequences per configuration (after a warm-up one)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--ttft-prompt", type=int, default=512, help="0: no TTFT part")
    parser.add_argument("--ttft-repeats", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--miss-copy", default="auto", choices=MISS_COPIES,
                        help="how every engine moves a miss into its slot (`expert_stacks`; `kernels.host_rows`)")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: configurations that would not fit are skipped")
    parser.add_argument("--predictor", help="a predictor directory (`moejax train-predictor` on --traces, whose "
                        "NAME_tokens.json it reads) for the configurations with prefetch 'predictor'")
    parser.add_argument("--lookahead-accuracy", default="0.783",
                        help="the simulated lookahead's accuracy, or 'router': the random model's own guesses")
    parser.add_argument("--out", default="bench_prefetch.json")
    args = parser.parse_args()
    budget = Budget(args.time_budget)
    configs = [tuple(config.split("/")) for config in args.configs.split(",")]
    if any(len(config) != 2 for config in configs):
        raise SystemExit(f"--configs: '{args.configs}' is not policy/prefetch,...")
    if any(prefetch == "predictor" for _, prefetch in configs) != (args.predictor is not None):
        raise SystemExit("--predictor DIR goes with a configuration of prefetch 'predictor' (e.g. lru/predictor)")
    cfg = model_config(args.card, None, args.dims == "tiny")
    trace = load_routing(args.traces)
    if args.dims == "tiny":  # the smoke model's first MoE layers replay the recorded first layers
        trace = RoutingTrace(trace.experts[: len(cfg.moe_layer_ids)], trace.seq_lens, trace.num_experts)
    if (trace.num_layers, trace.num_experts, trace.top_k) != (len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k):
        raise SystemExit(f"{args.traces}: routing of {trace.num_layers} MoE layers x {trace.num_experts} experts, "
                         f"top-{trace.top_k}, does not match card {args.card}")
    n_fit = int(trace.num_sequences * args.fit_fraction)
    evaluate = list(range(n_fit, trace.num_sequences))
    needed = args.prompt_len + args.new_tokens - 1
    sequences = [s for s in evaluate if trace.seq_lens[s] >= needed][: args.sequences + 1]
    long_ones = [s for s in evaluate if trace.seq_lens[s] >= args.ttft_prompt][: args.ttft_repeats + 1]
    if len(sequences) < 2:
        raise SystemExit(f"{args.traces}: fewer than 2 evaluation sequences of {needed} tokens")
    print(f"{n_fit} sequences fit the collection; replaying {sequences} (the first a warm-up)", flush=True)

    start_backend(len(cfg.moe_layer_ids) * (cfg.num_experts + 1) * cfg.expert_bytes, smoke=args.dims == "tiny")
    device = jax.devices()[0]
    bandwidth = pinned_bandwidth(cfg, device)
    print(f"pinned host -> GPU: {bandwidth / GB:.1f} GB/s", flush=True)
    start = time.monotonic()
    dense = random_dense_params(cfg)
    stacks = pinned_stacks(cfg, device)
    print(f"model built in {time.monotonic() - start:.0f} s", flush=True)
    if args.lookahead_accuracy == "router":
        guesses, guessed_by = None, "the random model's router (not the replayed routing's)"
    else:
        try:
            guesses = simulate_lookahead(trace, float(args.lookahead_accuracy))
        except (ValueError, MoejaxError) as err:
            raise SystemExit(f"--lookahead-accuracy: {err}") from None
        guessed_by = f"simulated at accuracy {float(args.lookahead_accuracy):g}"
    replay = RoutingReplay(trace, guesses)
    predictor = None
    if args.predictor is not None:
        try:
            predictor = ReplayedTokens(store.load(args.predictor), load_trace_data(args.traces).tokens, replay,
                                       len(cfg.moe_layer_ids))
        except MoejaxError as err:
            raise SystemExit(str(err)) from None
        predictor.warm_up()
    cpu = jax.devices("cpu")[0]  # the lab's device
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    workdir = tempfile.TemporaryDirectory()
    eams = Path(workdir.name) / "eams.npz"
    trace.select(0, n_fit).collection().save(eams)  # EAMs and layer-to-layer transitions of the fit sequences

    rows, result = [], {
        "environment": environment(), "card": args.card, "dims": args.dims, "traces": str(args.traces),
        "budget": args.budget, "fit_sequences": n_fit, "sequences": sequences, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "expert_bytes": cfg.expert_bytes, "bandwidth_bytes_per_s": bandwidth,
        "lookahead_guesses": guessed_by, "miss_copy": args.miss_copy,
    }
    result["rows"] = rows
    lru, need = None, 0.0
    for policy, prefetch in configs:
        if not budget.allows(need, f"{policy}/{prefetch}"):
            result.setdefault("skipped", []).append(f"{policy}/{prefetch}")
            continue
        start = time.monotonic()
        engine = cached_engine(cfg, dense, stacks, replay, args, policy, prefetch, eams, predictor)
        row = measure_decode(engine, replay, sequences, prompt, args.new_tokens)
        if "lab" not in result:  # Belady and LRU on the same steps, at the engine's capacity
            steps = engine_steps(trace, sequences, args.prompt_len, args.new_tokens, engine.prefill_chunk)
            result["lab"] = {name: lab_row(steps, lab_replay(steps, engine.cache.num_slots, cfg.num_experts, name, cpu,
                                                             engine.spec.whole_layer_from),
                                           set(sequences[1:]), cfg.expert_bytes) for name in ("lru", "belady")}
            belady = {"policy": "belady (lab)", "prefetch": "none", "capacity_experts": engine.cache.num_slots,
                      **result["lab"]["belady"], "gb_per_token": result["lab"]["belady"]["bytes_per_token"] / GB}
        if (policy, prefetch) == ("lru", "none"):
            lru = row
            result["lab_matches_engine"] = result["lab"]["lru"]["misses"] == row["misses"]
        add_ratios(row, bandwidth, lru, belady)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(args.out, result)
        need = time.monotonic() - start
        if row is lru and args.ttft_prompt and len(long_ones) >= 2 and budget.allows(need, f"TTFT ({args.ttft_prompt} tokens)"):
            result["ttft"] = time_to_first_token(engine, replay, trace, long_ones, args.ttft_prompt, bandwidth)
            print(json.dumps(result["ttft"]), flush=True)
            write_json(args.out, result)
        engine.close()  # the run-ahead thread
        del engine
        gc.collect()
    if "lab" in result:
        add_ratios(belady, bandwidth, lru, belady)
        rows.append(belady)
        write_json(args.out, result)
    workdir.cleanup()

    print(f"\n{args.card} ({args.dims}), real routing replayed, budget {args.budget}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens x {len(sequences) - 1} sequences; pinned host -> GPU {bandwidth / GB:.1f} GB/s; "
          f"lookahead guesses: {guessed_by}; misses moved by {rows[0].get('miss_copy') if rows else args.miss_copy}; "
          f"lab LRU == engine LRU: {result.get('lab_matches_engine')}")
    print_table(rows, [
        ("policy", "policy", "s"), ("prefetch", "prefetch", "s"), ("capacity_experts", "slots", "d"),
        ("tokens_per_s", "tok/s", ".2f"), ("x_lru_none", "x lru/none", ".2f"), ("s_per_token", "s/token", ".4f"),
        ("hit_rate", "hit", ".3f"), ("gb_per_token", "GB/tok", ".3f"), ("link_floor_s", "link floor s", ".4f"),
        ("x_link_floor", "x link floor", ".2f"), ("x_belady_bytes", "x Belady bytes", ".2f"),
        ("prefetch_precision", "prec", ".2f"), ("prefetch_recall", "recall", ".2f")])
    if "ttft" in result:
        ttft = result["ttft"]
        print(f"TTFT, {ttft['prompt_len']}-token prompt, LRU at {args.budget}, empty cache: {ttft['ttft_s']:.3f} s; link floor "
              f"of the experts it uses {ttft['link_floor_s']:.3f} s; {ttft['x_link_floor']:.2f}x; prompt chunks run as "
              f"layer programs: {[run['layer_program_chunks'] for run in ttft['runs']]}")


if __name__ == "__main__":
    main()
