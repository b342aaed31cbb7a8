"""Does a CUDA kernel that copies a missed expert from pinned host memory straight into its slab slot (the
`moejax_host_rows_to_slots` FFI target, moejax/kernels/host_rows.cu) beat XLA's in-program fetch, which slices the
host stack into a temporary on the device and then writes the temporary into the slot?

For Mixtral-8x7B-sized experts (3 x 4096 x 14336 bf16: 352 MB) and DeepSeek-V2-Lite-sized ones (3 x 2048 x 1408:
17.3 MB), `--copies` misses per program (the experts and slots as device arrays, as a step chooses them):
  dma     one `jax.device_put` of the whole pinned stack (the link's DMA rate: the floor);
  xla     a fori_loop of write_slot(slab, slot, device_put(dynamic_index(host stack, e))) (the engine's fetch);
  kernel  the FFI kernel, at several grid sizes (blocks per copy), all copies in one launch;
and checks that every written slot equals its host expert. Prints GB/s (median of --repeats) and writes JSON.

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/probe_host_rows.py --out probe_host_rows.json
  PYTHONPATH=. python scripts/probe_host_rows.py --shapes tiny --out /tmp/rows.json   # CPU smoke run (the C++ twin)
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.kernels import host_rows

SHAPES = {"mixtral": (8, 4096, 14336), "deepseek": (64, 2048, 1408), "tiny": (8, 64, 128)}  # experts, D, F


def timed(f, state, *args, repeats: int):
    """Median seconds of state = f(state, *args) after one warm-up call (f donates state), and the last state."""
    state = jax.block_until_ready(f(state, *args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(f(state, *args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral,deepseek", help="of mixtral, deepseek, tiny (a smoke run)")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--blocks", default="16,32,64,132,264")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: a shape starts only before then")
    parser.add_argument("--out", default="probe_host_rows.json")
    args = parser.parse_args()
    start = time.monotonic()
    device = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(device)
    print(f"{device.device_kind}; jax {jax.__version__}; kernel library {host_rows.library_path()}")
    rows = []
    for shape_name in args.shapes.split(","):
        if time.monotonic() - start > args.time_budget / 2:
            print(f"{shape_name}: skipped (time budget)")
            continue
        E, D, F = SHAPES[shape_name]
        rng = np.random.default_rng(0)
        names = ("gate", "up", "down")
        dims = {"gate": (D, F), "up": (D, F), "down": (F, D)}
        host = {n: jax.device_put(rng.standard_normal((E, *dims[n]), np.float32).astype(jnp.bfloat16), pinned)
                for n in names}
        expert_bytes = sum(w[0].nbytes for w in host.values())
        S = args.copies + 1
        slab = {n: jax.device_put(jnp.zeros((S, *dims[n]), jnp.bfloat16), on_device) for n in names}
        experts = jnp.asarray(rng.permutation(E)[:args.copies], jnp.int32)
        slots = jnp.asarray(rng.permutation(S)[:args.copies], jnp.int32)
        moved = args.copies * expert_bytes

        def check(result, label):
            ok = all(np.array_equal(np.asarray(result[n][int(s)]), np.asarray(host[n][int(e)]))
                     for n in names for e, s in zip(np.asarray(experts), np.asarray(slots)))
            print(f"  {label}: slots equal their host experts: {ok}")
            return ok

        seconds, _ = timed(lambda _, h: jax.device_put(h, on_device), None, host, repeats=args.repeats)
        dma = E * expert_bytes / seconds / 1e9
        rows.append({"shape": shape_name, "way": "dma", "gb_s": dma, "ms": seconds * 1e3, "bytes": E * expert_bytes})
        print(f"{shape_name}: expert {expert_bytes / 1e6:.1f} MB; dma of the whole stack {dma:.1f} GB/s")

        @functools.partial(jax.jit, donate_argnums=0)
        def xla_fetch(slab, host, experts, slots):
            def one(i, slab):
                fetched = {n: jax.device_put(lax.dynamic_index_in_dim(host[n], experts[i], keepdims=False),
                                             jax.memory.Space.Device) for n in names}
                return {n: lax.dynamic_update_index_in_dim(slab[n], fetched[n], slots[i], 0) for n in names}
            return lax.fori_loop(0, experts.shape[0], one, slab)

        seconds, slab = timed(xla_fetch, slab, host, experts, slots, repeats=args.repeats)
        rows.append({"shape": shape_name, "way": "xla", "gb_s": moved / seconds / 1e9, "ms": seconds * 1e3,
                     "bytes": moved, "identical": check(slab, "xla")})
        print(f"  xla fetch + write: {moved / seconds / 1e9:.1f} GB/s ({seconds * 1e3:.2f} ms)")

        tables = {n: host_rows.row_table([(host[n], E)]) for n in names}
        for blocks in [int(b) for b in args.blocks.split(",")]:
            @functools.partial(jax.jit, donate_argnums=0)
            def kernel_fetch(slab, tables, experts, slots, blocks=blocks):
                return {n: host_rows.host_rows_to_slots(tables[n], experts, slots, slab[n], blocks=blocks)
                        for n in names}

            slab = {n: jnp.zeros_like(w) for n, w in slab.items()}
            seconds, slab = timed(kernel_fetch, slab, tables, experts, slots, repeats=args.repeats)
            rows.append({"shape": shape_name, "way": "kernel", "blocks": blocks, "gb_s": moved / seconds / 1e9,
                         "ms": seconds * 1e3, "bytes": moved, "identical": check(slab, f"kernel {blocks}")})
            print(f"  kernel, {blocks} blocks per copy: {moved / seconds / 1e9:.1f} GB/s ({seconds * 1e3:.2f} ms)")
        with open(args.out, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "copies": args.copies, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
