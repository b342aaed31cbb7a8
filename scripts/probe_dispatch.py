"""What one MoE layer's jitted calls cost the host (a diagnosis probe, one layer of the bench_prefetch model).

Times, with every expert resident and the device idle at each call (as in the host-routed decode):
the host seconds of the `attend_and_route` and `accumulate_and_finish` calls and their full round
trips; the routing readback (idle, and behind 0 / 6 / 18 expert copies in flight: the ids read back
from the device against the routing the program writes to host memory); copy calls and routing
reads behind them with each expert one array (the engine's) or three; a chain of K small matmuls,
the price of one kernel launch; calls whose argument buffers change from call to call (as in the
engine) against calls on the same buffers; a layer's experts one at a time against top_k at a time (batched
matmuls, the engine's); a layer's finish fused with the next layer's attention and routing (one
call) against the two calls. Counts the kernels (thunks) of each compiled function. Run it under
different XLA_FLAGS to compare.

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/probe_dispatch.py --out $OUT/probe_dispatch.json
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.cards import load_card
from moejax.models.decoder import kv_cache_shape
from moejax.models.moe import ExpertLayout, accumulate_experts
from moejax.runtime import layer_fns
from moejax.runtime.store import copy_experts, device_sharding, host_sharding
from scripts.benchlib import environment, random_dense_params, random_expert, write_json


def host_and_round_trip(call, repeats: int) -> dict:
    """Median host seconds of call() and of call() + waiting for its result, in ms."""
    jax.block_until_ready(call())
    host, total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        mid = time.perf_counter()
        jax.block_until_ready(out)
        host.append(mid - start)
        total.append(time.perf_counter() - start)
    return {"host_ms": float(np.median(host) * 1e3), "round_trip_ms": float(np.median(total) * 1e3)}


def kernel_count(jitted, *args, **kwargs) -> dict:
    """Instructions of the compiled ENTRY computation by opcode (each fusion / custom call is a kernel)."""
    text = jitted.lower(*args, **kwargs).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[: entry.index("\n}")]
    ops: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        match = re.search(r"=\s*\S+\s+([a-z\-]+)\(", line)
        if match:
            ops[match.group(1)] = ops.get(match.group(1), 0) + 1
    return ops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="probe_dispatch.json")
    args = parser.parse_args()

    card = load_card("deepseek-v2-lite-shape")
    cfg = card.replace(num_layers=2, moe_layers=card.moe_layers[:2], sliding_windows=card.sliding_windows[:2])
    _, layers = random_dense_params(cfg)
    params, device = layers[1], jax.devices()[0]
    expert_dicts = tuple(random_expert(cfg, jax.random.PRNGKey(e)) for e in range(cfg.top_k))
    layout = ExpertLayout.of(expert_dicts[0])
    experts = tuple(layout.pack(e) for e in expert_dicts)  # as the engine passes them: one buffer each
    x = jnp.zeros((1, 1, cfg.hidden_size), cfg.dtype)
    kv = tuple(jnp.zeros(kv_cache_shape(cfg, 1, 256), cfg.dtype) for _ in range(2))
    positions = jnp.zeros((1, 1), jnp.int32)
    shape = (cfg, True, None)
    result = {"environment": environment(), "xla_flags": os.environ.get("XLA_FLAGS", "")}

    state = {"kv": kv}

    def attend(all_outputs=False):
        out = layer_fns.attend_and_route(*shape, params, x, state["kv"], positions)
        state["kv"] = out[1]
        return out if all_outputs else (out[0], *out[2:5])

    h, moe_in, weights, ids = attend()
    result["attend_and_route"] = host_and_round_trip(attend, args.repeats)

    readback = []
    for _ in range(args.repeats):
        out = attend()
        jax.block_until_ready(out)
        out[3].copy_to_host_async()
        start = time.perf_counter()
        np.asarray(out[3])
        readback.append(time.perf_counter() - start)
    result["readback_idle_ms"] = float(np.median(readback) * 1e3)
    dispatched = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = attend()
        out[3].copy_to_host_async()
        np.asarray(out[3])
        dispatched.append(time.perf_counter() - start)
    result["attend_then_readback_ms"] = float(np.median(dispatched) * 1e3)

    # Reading the routing while prefetch copies are in flight on the link: the ids on the device, read
    # back after the program, against the routing the program writes to pinned host memory itself.
    pinned = [list(jax.device_put(random_expert(cfg, jax.random.PRNGKey(100 + e)), host_sharding(device)).values())
              for e in range(18)]  # each expert as its three arrays
    flat = lambda experts: [a for expert in experts for a in expert]  # noqa: E731
    for in_flight in (0, 6, 18):
        for variant, read in (("device_ids", 4), ("host_routing", 5)):
            times = []
            for _ in range(max(10, args.repeats // 4)):
                copies = copy_experts(flat(pinned[:in_flight]), device_sharding(device))
                start = time.perf_counter()
                np.asarray(attend(all_outputs=True)[read])
                times.append(time.perf_counter() - start)
                jax.block_until_ready(copies)
            result[f"attend_and_read_{variant}_ms_{in_flight}_copies"] = float(np.median(times) * 1e3)
    # The same bytes as one array per expert (gate, up and down packed): what a copy call and the
    # routing read behind it cost per array; and copies issued after the attention call, not before.
    packed = [[jax.device_put(jnp.concatenate([a.reshape(-1) for a in e]), host_sharding(device))] for e in pinned]
    for name, sources in (("3_arrays", pinned), ("1_array", packed)):
        for count in (6, 18):
            issue, read = [], []
            for _ in range(max(10, args.repeats // 4)):
                start = time.perf_counter()
                copies = copy_experts(flat(sources[:count]), device_sharding(device))
                mid = time.perf_counter()
                np.asarray(attend(all_outputs=True)[5])
                read.append(time.perf_counter() - mid)
                issue.append(mid - start)
                jax.block_until_ready(copies)
            result[f"copy_call_ms_{count}_experts_{name}"] = float(np.median(issue) * 1e3)
            result[f"attend_and_read_host_routing_ms_behind_{count}_experts_{name}"] = float(np.median(read) * 1e3)
        times = []
        for _ in range(max(10, args.repeats // 4)):
            start = time.perf_counter()
            routing = attend(all_outputs=True)[5]
            copies = copy_experts(flat(sources[:6]), device_sharding(device))
            np.asarray(routing)
            times.append(time.perf_counter() - start)
            jax.block_until_ready(copies)
        result[f"attend_copy_6_{name}_then_read_ms"] = float(np.median(times) * 1e3)

    expert_ids = np.arange(cfg.top_k, dtype=np.int32)
    acc = jnp.zeros(moe_in.shape, jnp.float32)

    def finish():
        return layer_fns.accumulate_and_finish(*shape, params, h, moe_in, ids, weights, expert_ids, experts, acc, layout)

    result["accumulate_and_finish"] = host_and_round_trip(finish, args.repeats)
    # As in the engine, where each call sees other buffers (each layer its parameters and KV cache, each
    # step other experts): do calls cost the host more when their arguments' addresses change?
    rotating_params = [jax.tree.map(jnp.copy, params) for _ in range(4)]
    rotating_kv = [tuple(jnp.zeros_like(a) for a in kv) for _ in range(4)]
    rotating_experts = [tuple(jnp.copy(e) for e in experts) for _ in range(4)]
    turn = {"n": 0}

    def attend_rotating():
        n = turn["n"] = (turn["n"] + 1) % 4
        out = layer_fns.attend_and_route(*shape, rotating_params[n], x, rotating_kv[n], positions)
        rotating_kv[n] = out[1]
        return out[0]

    def finish_rotating():
        n = turn["n"] = (turn["n"] + 1) % 4
        return layer_fns.accumulate_and_finish(*shape, rotating_params[n], h, moe_in, ids, weights, expert_ids,
                                               rotating_experts[n], acc, layout)

    result["attend_and_route_rotating_buffers"] = host_and_round_trip(attend_rotating, args.repeats)
    result["accumulate_and_finish_rotating_buffers"] = host_and_round_trip(finish_rotating, args.repeats)
    # The routed experts alone, one expert at a time (3 matmuls each) against top_k at a time (batched).
    per_expert = jax.jit(accumulate_experts, static_argnames=("act", "chunk", "layout"))
    experts_args = (moe_in, ids, weights, expert_ids, experts, acc)
    for chunk in (None, cfg.top_k):
        call = functools.partial(per_expert, *experts_args, act=cfg.hidden_act, chunk=chunk, layout=layout)
        result[f"experts_chunk_{chunk}"] = host_and_round_trip(call, args.repeats)
        result[f"kernels_experts_chunk_{chunk}"] = kernel_count(per_expert, *experts_args, act=cfg.hidden_act, chunk=chunk, layout=layout)
    # The layer's finish and the next layer's attention and routing as one call, against two calls
    # (every array an argument in both, as the engine would pass them).
    @functools.partial(jax.jit, donate_argnums=9)
    def finish_then_attend(params, h, moe_in, ids, weights, expert_ids, experts, acc, next_params, kv, positions):
        y = layer_fns.accumulate_and_finish(*shape, params, h, moe_in, ids, weights, expert_ids, experts, acc, layout)
        return layer_fns.attend_and_route(*shape, next_params, y, kv, positions)

    def two_calls():
        y = finish()
        out = layer_fns.attend_and_route(*shape, params, y, state["kv"], positions)
        state["kv"] = out[1]
        return out

    def one_call():
        out = finish_then_attend(params, h, moe_in, ids, weights, expert_ids, experts, acc, params, state["kv"], positions)
        state["kv"] = out[1]
        return out

    result["finish_then_attend_two_calls"] = host_and_round_trip(two_calls, args.repeats)
    result["finish_then_attend_one_call"] = host_and_round_trip(one_call, args.repeats)
    result["kernels"] = {
        "attend_and_route": kernel_count(layer_fns.attend_and_route, *shape, params, x, state["kv"], positions),
        "accumulate_and_finish": kernel_count(
            layer_fns.accumulate_and_finish, *shape, params, h, moe_in, ids, weights, expert_ids, experts, acc, layout),
    }

    # The price of a kernel launch: K dependent tiny matmuls (each its own cuBLAS call).
    w = jnp.eye(64, dtype=jnp.float32)
    v = jnp.ones((1, 64), jnp.float32)
    for k in (1, 10, 40):
        chain = jax.jit(lambda v, w, k=k: [v := v @ w for _ in range(k)][-1])
        result[f"matmul_chain_{k}"] = host_and_round_trip(lambda: chain(v, w), args.repeats)
    print(result, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
