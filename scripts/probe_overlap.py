"""Does a pinned-host -> GPU copy overlap GPU compute and a routing readback? (a diagnosis probe)

The prefetch benchmark (BENCHMARKS.md, issue 4) saw prefetching remove stall but not time, as if
copies and compute ran one after the other. This probe times, with expert-sized buffers:
  compute    a jitted matmul chain alone;
  copy       N expert copies alone;
  before     copies issued, then the chain dispatched: time until the chain's result, until all;
  after      the chain dispatched, then the copies issued;
  readback   copies issued, then a tiny jitted op whose result is read to the host (a routing readback);
             readback_behind_N: that wait with N expert copies in flight (N = 0, 1, 6, 24), and how long
             the device_put call itself took.
Prints one JSON object; times are medians in milliseconds.

  PYTHONPATH=. python scripts/probe_overlap.py --out $OUT/probe_overlap.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.runtime.store import device_sharding, host_sharding


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=24, help="expert copies per trial (2048 x 1408 x 3 bf16 each)")
    parser.add_argument("--matmuls", type=int, default=40, help="4096^2 bf16 matmuls in the chain")
    parser.add_argument("--out", default="probe_overlap.json")
    args = parser.parse_args()
    device = jax.devices()[0]
    on_device, pinned = device_sharding(device), host_sharding(device)
    key = jax.random.PRNGKey(0)
    expert = {n: jax.random.normal(key, (2048, 1408), jnp.bfloat16) for n in ("gate", "up", "down")}
    host = [jax.device_put(expert, pinned) for _ in range(args.experts)]
    jax.block_until_ready(host)
    x = jax.random.normal(key, (4096, 4096), jnp.bfloat16)

    @jax.jit
    def chain(x):
        for _ in range(args.matmuls):
            x = jnp.tanh(x @ x * 0.01)
        return x

    @jax.jit
    def tiny(x):
        return jnp.argmax(x[:8, :64], axis=-1)

    jax.block_until_ready(chain(x))
    jax.block_until_ready(tiny(x))
    results = {"device": device.device_kind, "expert_bytes": 3 * 2048 * 1408 * 2, "experts": args.experts}
    results["compute"] = median_ms(lambda: jax.block_until_ready(chain(x)))
    results["copy"] = median_ms(lambda: jax.block_until_ready(jax.device_put(host, on_device)))

    def before():
        copies = jax.device_put(host, on_device)
        out = chain(x)
        start = time.perf_counter()
        jax.block_until_ready(out)
        results.setdefault("_before_compute_done", []).append((time.perf_counter() - start) * 1e3)
        jax.block_until_ready(copies)

    def after():
        out = chain(x)
        copies = jax.device_put(host, on_device)
        jax.block_until_ready([out, copies])

    def readback():
        copies = jax.device_put(host, on_device)
        start = time.perf_counter()
        np.asarray(tiny(x))
        results.setdefault("_readback_wait", []).append((time.perf_counter() - start) * 1e3)
        jax.block_until_ready(copies)

    def readback_behind(n: int):
        """A tiny op + host readback issued behind n expert copies in flight: (wait ms, device_put call ms)."""
        def trial():
            start = time.perf_counter()
            copies = jax.device_put(host[:n], on_device) if n else []
            put = time.perf_counter()
            np.asarray(tiny(x))
            results.setdefault(f"_behind_{n}", []).append(((time.perf_counter() - put) * 1e3, (put - start) * 1e3))
            jax.block_until_ready(copies)
        median_ms(trial)
        waits, calls = zip(*results.pop(f"_behind_{n}"))
        return float(np.median(waits)), float(np.median(calls))

    for n in (0, 1, 6, 24):
        results[f"readback_behind_{n}_ms"], results[f"device_put_call_{n}_ms"] = readback_behind(n)
    results["before_total"] = median_ms(before)
    results["after_total"] = median_ms(after)
    results["readback_total"] = median_ms(readback)
    results["before_compute_done"] = float(np.median(results.pop("_before_compute_done")))
    results["readback_wait"] = float(np.median(results.pop("_readback_wait")))
    results["serial_estimate"] = results["compute"] + results["copy"]
    print(json.dumps(results, indent=1))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
