"""Where does the host-routed decode spend its host time? (a diagnosis probe)

Builds the bench_prefetch model (the `deepseek-v2-lite-shape` card, random weights) cut to its first
--moe-layers MoE layers, replays DeepSeek-V2-Lite routing as bench_prefetch does, and for each
configuration reports the decode TPOT, then the host milliseconds per token of each phase (the jitted
layer functions' dispatch, the runner's cache, copy, prefetch and recording steps) in one more sequence,
and cProfile's top functions by own time in another. It also times the
host side of one expert copy call, jax.device_put against `store.copy_experts`, and of a tiny jitted
call (the floor every dispatch pays).

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/probe_host.py \\
      --traces .data/traces/deepseek_v2_lite_prefill.npz --out $OUT/probe_host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import jax
import numpy as np

from moejax.cards import load_card
from moejax.lab import simulate_lookahead
from moejax.runtime import cache as cache_module
from moejax.runtime import expert_runner as expert_runner_module
from moejax.runtime import layer_fns, prefetch, recorder
from moejax.runtime.engine import Engine, GenerationConfig
from moejax.runtime.host_routed import HostRoutedExecutor
from moejax.runtime.loading import expert_runner, reserved_kv_bytes
from moejax.runtime.policies import make_policy
from moejax.routing.prefetchers import make_prefetcher
from moejax.runtime.store import copy_experts, device_sharding
from moejax.routing.traces import load_routing
from scripts.bench_prefetch import TraceReplay, build_store
from scripts.benchlib import environment, random_dense_params, tiny_widths, write_json

# What PhaseTimer times: (owner, attribute, label). Nested phases overlap: runner.run holds the ones below it.
PHASES = [
    *((layer_fns, name, name) for name in ("embed", "head", "attend_and_route", "accumulate", "accumulate_and_finish", "finish_and_attend",
                                           "layer_device_routed")),
    (expert_runner_module.ExpertRunner, "run", "runner.run (holds those below)"),
    (expert_runner_module.ExpertRunner, "_prefetch", "runner._prefetch"),
    (cache_module.ExpertCache, "begin_layer", "cache.begin_layer"),
    (cache_module.ExpertCache, "prefetch", "cache.prefetch"),
    (cache_module.ExpertCache, "wait_for_copies", "cache.wait_for_copies (stall)"),
    (cache_module, "copy_experts", "copy call"),
    (prefetch.TracePrefetcher, "observe", "prefetcher.observe"),
    (prefetch.TracePrefetcher, "predict", "prefetcher.predict"),
    (recorder.RoutingRecorder, "record", "recorder.record"),
    (TraceReplay, "__call__", "replay (benchmark only)"),
]


class PhaseTimer:
    """Wraps the PHASES (jitted layer functions and the runner's steps) to sum the host seconds their
    calls take: cheaper than cProfile (one perf_counter pair a call), so the decode keeps its pace."""

    def __init__(self):
        self.seconds = {label: 0.0 for _, _, label in PHASES}
        self.calls = {label: 0 for _, _, label in PHASES}
        self.originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PHASES]

    def __enter__(self):
        for (owner, name, fn), (_, _, label) in zip(self.originals, PHASES, strict=True):
            setattr(owner, name, self._wrap(label, fn))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.originals:
            setattr(owner, name, fn)

    def _wrap(self, label, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--traces", required=True)
    parser.add_argument("--moe-layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--configs", default="resident:-:lru:none,cached:0.25:lru:none,cached:0.25:activation:lookahead")
    parser.add_argument("--tiny", action="store_true", help="shrink every width (a CPU smoke run)")
    parser.add_argument("--out", default="probe_host.json")
    args = parser.parse_args()

    card = load_card("deepseek-v2-lite-shape")
    cfg = card.replace(num_layers=args.moe_layers + 1, moe_layers=card.moe_layers[: args.moe_layers + 1],
                       sliding_windows=card.sliding_windows[: args.moe_layers + 1])
    if args.tiny:
        cfg = tiny_widths(cfg)
    trace = load_routing(args.traces)
    trace = type(trace)(experts=trace.experts[: args.moe_layers], seq_lens=trace.seq_lens, num_experts=trace.num_experts)
    fit, evaluate = trace.select(0, 400), trace.select(400, 500)
    collection = fit.collection()
    replay = TraceReplay(evaluate.experts, simulate_lookahead(evaluate, 0.783, seed=0), [16] + [1] * (args.new_tokens - 1),
                         jax.devices()[0])
    bounds = np.concatenate([[0], np.cumsum(evaluate.seq_lens)])
    starts = [int(b) for b, n in zip(bounds, evaluate.seq_lens) if n >= 16 + args.new_tokens][:5]

    device = jax.devices()[0]
    globals_, layers = random_dense_params(cfg)
    store = build_store(cfg, device)
    result = {"environment": environment(), "moe_layers": args.moe_layers, "configs": []}

    # The host side of one copy call of 6 experts (18 arrays), issued and not waited for.
    keys = [(0, e) for e in range(6)]
    target = device_sharding(device)
    for name, copy in (("jax.device_put", lambda: jax.device_put([store.get(k) for k in keys], target)),
                       ("copy_experts", lambda: copy_experts([store.get(k) for k in keys], target))):
        times = []
        for _ in range(12):
            start = time.perf_counter()
            out = copy()
            times.append(time.perf_counter() - start)
            jax.block_until_ready(out)
        result[f"copy_call_ms_{name}"] = float(np.median(times[2:]) * 1e3)
    print({k: v for k, v in result.items() if k.startswith("copy")}, flush=True)

    # The floor of a jitted call's host time: one tiny op, with 1 and with 36 array arguments.
    x = jax.device_put(np.ones((1, cfg.hidden_size), np.float32), device)
    one = jax.jit(lambda a: a + 1)
    many = jax.jit(lambda *args: args[0] + 1)
    for name, call in (("1_arg", lambda: one(x)), ("36_args", lambda: many(*[x] * 36))):
        jax.block_until_ready(call())
        start = time.perf_counter()
        for _ in range(200):
            out = call()
        result[f"dispatch_ms_{name}"] = (time.perf_counter() - start) / 200 * 1e3
        jax.block_until_ready(out)
    print({k: v for k, v in result.items() if k.startswith("dispatch")}, flush=True)

    num_moe = args.moe_layers
    for spec in args.configs.split(","):
        mode, budget, policy, prefetch = spec.split(":")
        source = store
        if mode == "resident":
            source = store.subset(on_device=True)
        runner = expert_runner(
            cfg, source, mode, None if budget == "-" else budget,
            make_policy(policy, num_layers=num_moe, num_experts=cfg.num_experts, collection=collection),
            0, reserved_kv_bytes(cfg, 1, 256),
            prefetcher=None if prefetch == "none" else make_prefetcher(
                prefetch, num_layers=num_moe, num_experts=cfg.num_experts, top_k=cfg.top_k, collection=collection),
            collection=collection)
        runner.replay = replay
        engine = Engine(cfg, HostRoutedExecutor(cfg, globals_, layers, runner))
        config = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
        prompt = list(range(1, 17))
        tpots = []
        for start in starts[:3]:
            replay.start(start)
            tpots.append(engine.generate([prompt], config).timing.tpot_s)
        replay.start(starts[3])
        with PhaseTimer() as timer:  # one sequence with the phases timed, then one under cProfile
            timed = engine.generate([prompt], config)
        steps = timed.timing.decode_steps + 1
        replay.start(starts[4])
        profile = cProfile.Profile()
        profile.enable()
        profiled = engine.generate([prompt], config)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(r"moejax|bench_prefetch", 35)
        row = {
            "config": spec, "tpot_ms": float(np.median(tpots[1:]) * 1e3), "tpot_ms_phases_timed": timed.timing.tpot_s * 1e3,
            "tpot_ms_profiled": profiled.timing.tpot_s * 1e3,
            "host_ms_per_token": {k: v / steps * 1e3 for k, v in timer.seconds.items() if timer.calls[k]},
            "calls_per_token": {k: v / steps for k, v in timer.calls.items() if v},
            "stats": {k: timed.stats["total"][k] for k in ("hit_rate", "stall_s", "bytes_h2d")},
            "profile": text.getvalue(),
        }
        result["configs"].append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)
        print(row["profile"], flush=True)
        write_json(args.out, result)
        del engine, runner, source


if __name__ == "__main__":
    main()
