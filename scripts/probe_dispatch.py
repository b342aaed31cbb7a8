"""What one MoE layer's jitted calls cost the host (a diagnosis probe, one layer of the bench_prefetch model).

Times, with every expert resident and the device idle at each call (as in the host-routed decode):
the host seconds of the `attend_and_route` and `accumulate_and_finish` calls and their full round
trips; the routing readback (idle, and behind 0 / 6 / 18 expert copies in flight: the ids read back
from the device against the routing the program writes to host memory); a chain of K small matmuls,
the price of one kernel launch; a layer's experts stacked into batched matmuls; a layer's finish
fused with the next layer's attention and routing (one call) against the two calls; the finish with
the same experts every call against experts that moved (made on the device, or copied in as the cache
does); the finish with NumPy arguments (which the call copies to the device) against device arrays and
an ExpertWave (ids found in the program), alone and behind 0 / 6 / 18 expert copies in flight; the
finish and the routing readback behind the same bytes in flight as 1, 6 or 36 copies; and
both calls chained as the engine makes them (each one's inputs still being computed),
without and with 0.5 ms of NumPy work between them, as the runner does between its calls. Counts the
kernels (thunks) of each compiled function. Run it under different XLA_FLAGS to compare.

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/probe_dispatch.py --out $OUT/probe_dispatch.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.cards import load_card
from moejax.models.decoder import kv_cache_shape
from moejax.models.moe import ExpertWave
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
    experts = tuple(random_expert(cfg, jax.random.PRNGKey(e)) for e in range(cfg.top_k))
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
    pinned = [jax.device_put(random_expert(cfg, jax.random.PRNGKey(100 + e)), host_sharding(device)) for e in range(18)]
    for in_flight in (0, 6, 18):
        for variant, read in (("device_ids", 4), ("host_routing", 5)):
            times = []
            for _ in range(max(10, args.repeats // 4)):
                copies = copy_experts(pinned[:in_flight], device_sharding(device))
                start = time.perf_counter()
                np.asarray(attend(all_outputs=True)[read])
                times.append(time.perf_counter() - start)
                jax.block_until_ready(copies)
            result[f"attend_and_read_{variant}_ms_{in_flight}_copies"] = float(np.median(times) * 1e3)

    expert_ids = np.arange(cfg.top_k, dtype=np.int32)
    acc = jnp.zeros(moe_in.shape, jnp.float32)

    def finish():
        return layer_fns.accumulate_and_finish(*shape, params, h, moe_in, ids, weights, expert_ids, experts, acc)

    result["accumulate_and_finish"] = host_and_round_trip(finish, args.repeats)

    # The finish's host time with expert copies in flight (as trace prefetching leaves them when the
    # finish is dispatched) and NumPy arguments, which the call must copy to the device itself (the
    # engine passes expert_ids so; bench_prefetch's replay passes ids so too), against device arrays.
    # The engine's way: an ExpertWave, whose ids the program finds from the routing (no transfer).
    ids_numpy, expert_ids_device = np.asarray(ids), jax.device_put(expert_ids, device)
    wave = ExpertWave(jax.device_put(np.array([0, cfg.num_experts], np.int32), device), None, cfg.num_experts)
    variants = (("device_args", ids, expert_ids_device), ("numpy_expert_ids", ids, expert_ids),
                ("numpy_ids_and_expert_ids", ids_numpy, expert_ids), ("expert_wave", ids, wave))
    for variant, call_ids, call_expert_ids in variants:
        result[f"finish_{variant}"] = host_and_round_trip(
            lambda i=call_ids, e=call_expert_ids: layer_fns.accumulate_and_finish(*shape, params, h, moe_in, i, weights, e, experts, acc),
            args.repeats)
    for in_flight in (0, 6, 18):
        for variant, call_ids, call_expert_ids in variants:
            times = []
            for _ in range(max(10, args.repeats // 4)):
                copies = copy_experts(pinned[:in_flight], device_sharding(device))
                start = time.perf_counter()
                out = layer_fns.accumulate_and_finish(*shape, params, h, moe_in, call_ids, weights, call_expert_ids, experts, acc)
                times.append(time.perf_counter() - start)
                jax.block_until_ready((out, copies))
            result[f"finish_host_ms_{variant}_{in_flight}_copies"] = float(np.median(times) * 1e3)

    # Is it the number of copies in flight or their bytes? The same ~100 MB in flight as 1, 6 or 36
    # copies, behind which the finish is dispatched and the routing read back.
    total = 6 * cfg.expert_bytes
    for count in (1, 6, 36):
        chunks = [jax.device_put(np.full(total // count // 2, c, np.uint16), host_sharding(device)) for c in range(count)]
        finish_times, read_times = [], []
        for _ in range(max(10, args.repeats // 4)):
            copies = copy_experts(chunks, device_sharding(device))
            start = time.perf_counter()
            out = layer_fns.accumulate_and_finish(*shape, params, h, moe_in, ids, weights, wave, experts, acc)
            finish_times.append(time.perf_counter() - start)
            jax.block_until_ready((out, copies))
            copies = copy_experts(chunks, device_sharding(device))
            start = time.perf_counter()
            np.asarray(attend(all_outputs=True)[5])
            read_times.append(time.perf_counter() - start)
            jax.block_until_ready(copies)
        result[f"behind_{count}_copies_of_{total // count >> 20}_MiB"] = {
            "finish_host_ms": float(np.median(finish_times) * 1e3), "attend_and_read_ms": float(np.median(read_times) * 1e3)}
        del chunks

    # Does a call cost the host more when its buffers moved since the last call (XLA command buffers
    # record addresses)? The experts cycle over 8 sets, made on the device or copied in by copy_experts
    # as the cache does; then the engine's pattern, each call's inputs the outputs of the call before.
    sets = [tuple(random_expert(cfg, jax.random.PRNGKey(1000 + 10 * s + e)) for e in range(cfg.top_k)) for s in range(8)]
    copied = [tuple(copy_experts([jax.device_put(e, host_sharding(device)) for e in s], device_sharding(device)))
              for s in sets]
    for name, pool in (("same", [experts]), ("moved", sets), ("moved_copied", copied)):
        cycle = itertools.cycle(pool)
        result[f"accumulate_and_finish_{name}_experts"] = host_and_round_trip(
            lambda cycle=cycle: layer_fns.accumulate_and_finish(*shape, params, h, moe_in, ids, weights, expert_ids, next(cycle), acc),
            args.repeats)
    # With host work between the calls, as the runner does (~0.5 ms of NumPy per layer step): does the
    # dispatch itself get slower when its code and data have left the CPU caches?
    scratch = np.zeros(64)

    def host_work(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            np.flatnonzero(np.bincount(np.arange(6), minlength=64) + scratch)

    for name, pool, busy in (("made", sets, 0.0), ("copied", copied, 0.0), ("copied_host_work", copied, 0.5e-3)):
        attend_ms, finish_ms, y = [], [], x
        for i in range(args.repeats):
            start = time.perf_counter()
            hh, state["kv"], mi, w, ii, routing = layer_fns.attend_and_route(*shape, params, y, state["kv"], positions)
            attend_ms.append(time.perf_counter() - start)
            np.asarray(routing)
            host_work(busy)
            start = time.perf_counter()
            y = layer_fns.accumulate_and_finish(*shape, params, hh, mi, ii, w, expert_ids, pool[i % 8], acc)
            finish_ms.append(time.perf_counter() - start)
            host_work(busy)
        jax.block_until_ready(y)
        result[f"chained_host_ms_{name}_experts"] = {"attend_and_route": float(np.median(attend_ms[10:]) * 1e3),
                                                     "accumulate_and_finish": float(np.median(finish_ms[10:]) * 1e3)}
    # The same experts stacked inside the call: 3 batched matmuls instead of 3 per expert.
    @jax.jit
    def stacked(moe_in, ids, weights, expert_ids, experts, acc):
        gate, up, down = (jnp.stack([e[name] for e in experts]) for name in ("gate", "up", "down"))
        hidden = jax.nn.silu(jnp.einsum("nd,edf->enf", moe_in, gate)) * jnp.einsum("nd,edf->enf", moe_in, up)
        out = jnp.einsum("enf,efd->end", hidden, down).astype(jnp.float32)
        chosen = jnp.sum(jnp.where(ids[None] == expert_ids[:, None, None], weights[None], 0.0), axis=-1)
        for i in range(len(experts)):
            acc = acc + chosen[i][:, None] * out[i]
        return acc

    result["stacked_experts"] = host_and_round_trip(lambda: stacked(moe_in, ids, weights, expert_ids, experts, acc), args.repeats)
    # The layer's finish and the next layer's attention and routing as one call, against two calls.
    @functools.partial(jax.jit, donate_argnums=3)
    def finish_then_attend(h, ids, experts, kv):
        y = layer_fns.accumulate_and_finish(*shape, params, h, moe_in, ids, weights, expert_ids, experts, acc)
        return layer_fns.attend_and_route(*shape, params, y, kv, positions)

    def two_calls():
        y = finish()
        out = layer_fns.attend_and_route(*shape, params, y, state["kv"], positions)
        state["kv"] = out[1]
        return out

    def one_call():
        out = finish_then_attend(h, ids, experts, state["kv"])
        state["kv"] = out[1]
        return out

    result["finish_then_attend_two_calls"] = host_and_round_trip(two_calls, args.repeats)
    result["finish_then_attend_one_call"] = host_and_round_trip(one_call, args.repeats)
    result["kernels"] = {
        "stacked_experts": kernel_count(stacked, moe_in, ids, weights, expert_ids, experts, acc),
        "attend_and_route": kernel_count(layer_fns.attend_and_route, *shape, params, x, state["kv"], positions),
        "accumulate_and_finish": kernel_count(
            layer_fns.accumulate_and_finish, *shape, params, h, moe_in, ids, weights, expert_ids, experts, acc),
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
