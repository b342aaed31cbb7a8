"""Where a cached step's miss fetches lose the link's bandwidth: one MoE layer's M misses, fetched several ways.

On the H100 (2026-12-05) a batch-64 decode step of DeepSeek-V2-Lite at 25% moved 28.5 GB in 0.751 s (38 GB/s)
where one large pinned copy read 52.7 GB/s. For a card's experts (default DeepSeek-V2-Lite: 64 of 2048 x 1408
bf16 x 3, 17.3 MB) in a pinned-host stack, per M of --misses, in one program each:
  copies   a loop of M in-program fetches into slab slots (`fetch_expert` + `write_slot`: the engine's move), the
           expert to fetch being the loop's counter
  ids      the same loop, the expert to fetch read from an array argument (a data-dependent offset, as the
           engine's misses are): against copies, whether XLA copies a slice at a counter's offset differently
  ids-u32  ids from stacks kept as uint32 (each pair of bf16 one word; bitcast back on the device): whether the
           kernel that reads host memory at a data-dependent offset goes faster with wider elements
  ids-flat the same with each expert one row of words ([E, n] uint32)
  static   ids from the stack as it is, the expert chosen by a lax.switch whose branch e copies expert e (a slice at a
           static offset)
  switch   ids from E separate pinned buffers, one per expert, the expert chosen by a lax.switch whose branches each
           copy a whole buffer (a static copy: a DMA, if XLA keeps it one inside a branch)
  masked   a loop over all E experts, the loop's counter the expert, each copied (under a lax.cond) only if it
           is one of the M: counter offsets for data-dependent misses, at the cost of E - M skipped iterations
  chunks4  the same loop with four fetches per iteration (M rounded down to a multiple of 4): whether copies
           that may run at once read the link faster than one after another
  access   `device_cache.access` with that move, on a cache holding none of the M (LRU): the copies plus the
           engine's bookkeeping per miss (victim choice, tables, counters)
  whole    the layer's whole stack moved in one copy per weight (what dense-offload moves)
  one      reference: M experts' bytes as one pinned buffer, one device_put (outside any program)
  each     reference: M experts' separate buffers (switch's), device_put together (outside any program)
and, the other way to fill a wide step, --stream-layers whole layers streamed from one layer-stacked pinned array
in a loop whose slice offset is the loop's counter (the case XLA may turn into an asynchronous memcpy):
  stream-fetch     the layers fetched one after another, nothing computed
  stream-compute   a stand-in for the layers' compute (--stream-rows rows through every weight of every expert),
                   on a device copy, nothing fetched
  stream-pipelined each iteration computes on the layer fetched by the one before while fetching the next:
                   about max(fetch, compute) if XLA overlaps the copy with the compute, their sum if not
prints ms per call (median of --repeats after a warm-up) and GB/s of the bytes moved. copies against one says
what per-expert copies cost; access against copies, the bookkeeping. The optimized HLO of each in-program variant
at the first miss count, and of the streaming programs, goes to <out>_hlo/ (how XLA moves a slice of host memory:
a copy engine's memcpy, or a kernel reading the pinned memory over the link).

  XLA_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python scripts/probe_miss_fetch.py --out $OUT/probe_miss_fetch.json
  PYTHONPATH=. python scripts/probe_miss_fetch.py --dims tiny --out /tmp/probe_miss_fetch.json   # CPU smoke run
  scripts/gpu_session.sh missfetch                                    # as a part of a device call
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from scripts.benchlib import Budget, environment, median_seconds, model_config, print_table, start_backend, write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--card", default="deepseek-v2-lite")
    parser.add_argument("--misses", default="6,32,63", help="misses per layer call (comma-separated)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    parser.add_argument("--stream-layers", type=int, default=4, help="layers of the streaming rows (0: none)")
    parser.add_argument("--stream-rows", type=int, default=4096, help="rows of the streaming rows' stand-in compute")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: a miss count that would not fit is skipped")
    parser.add_argument("--out", default="probe_miss_fetch.json")
    args = parser.parse_args()
    tiny = args.dims == "tiny"
    cfg = model_config(args.card, None, tiny)
    start_backend(cfg.num_experts * cfg.expert_bytes * (6 + args.stream_layers), smoke=tiny)  # the stack 4 ways, a buffer, the layers

    import jax
    import jax.numpy as jnp
    import numpy as np

    from scripts.benchlib import random_expert_stacks
    from moejax.offload import device_cache as dc
    from moejax.offload.expert_stacks import fetch_all, fetch_expert, host_sharding, write_slot

    device = jax.devices()[0]

    def to_words(w, keep_rows: bool):
        """A bf16 host stack [E, A, B] as uint32 words (two bf16 each), [E, A, B / 2] or [E, A * B / 2], pinned."""
        values = np.asarray(w)
        values = values if keep_rows else values.reshape(values.shape[0], -1)
        return jax.device_put(values.view(np.uint32), host_sharding(device))

    def from_words(words, shape):
        """uint32 words on the device -> the bf16 array of `shape` they hold."""
        return jax.lax.bitcast_convert_type(words, jnp.bfloat16).reshape(shape)
    E = cfg.num_experts
    stack = next(random_expert_stacks(cfg, 1, host_sharding(device)))  # the first MoE layer's only
    # E slots, donated to each call and replaced by its result: the slots are written in place, as in the engine
    fresh_slab = lambda: {name: jnp.zeros(w.shape, w.dtype, device=device) for name, w in stack.items()}  # noqa: E731
    held = {"slab": fresh_slab()}

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=0)
    def copies(slab, stack, misses):
        move = lambda i, slab: write_slot(slab, i, fetch_expert(stack, i))  # noqa: E731
        return jax.lax.fori_loop(0, misses, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=1)
    def copies_at(experts, slab, stack, misses):
        move = lambda i, slab: write_slot(slab, i, fetch_expert(stack, experts[i]))  # noqa: E731
        return jax.lax.fori_loop(0, misses, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=1)
    def masked(wanted, slab, stack, misses):  # wanted bool [E]: M of them; the j-th wanted expert goes to slot j
        slots = jnp.cumsum(wanted) - 1

        def move(e, slab):
            return jax.lax.cond(wanted[e], lambda slab: write_slot(slab, slots[e], fetch_expert(stack, e)),
                                lambda slab: slab, slab)
        return jax.lax.fori_loop(0, E, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=1)
    def switched(experts, slab, separate, misses):  # separate: one {name: pinned [...]} per expert
        branches = [lambda one=one: fetch_all(one) for one in separate]

        def move(i, slab):
            return write_slot(slab, i, jax.lax.switch(experts[i], branches))
        return jax.lax.fori_loop(0, misses, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=1)
    def static_slices(experts, slab, stack, misses):  # the stack as it is; a switch's branch e copies expert e
        branches = [lambda e=e: {n: jax.device_put(w[e], jax.memory.Space.Device) for n, w in stack.items()}
                    for e in range(E)]

        def move(i, slab):
            return write_slot(slab, i, jax.lax.switch(experts[i], branches))
        return jax.lax.fori_loop(0, misses, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=1)
    def copies_words(experts, slab, words, misses):  # words: {name: uint32 [E, ...]}, bf16 pairs
        def move(i, slab):
            fetched = fetch_expert(words, experts[i])
            return write_slot(slab, i, {n: from_words(w, slab[n].shape[1:]) for n, w in fetched.items()})
        return jax.lax.fori_loop(0, misses, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=0)
    def chunks4(slab, stack, misses):
        def move(i, slab):
            for j in range(4):
                slab = write_slot(slab, 4 * i + j, fetch_expert(stack, 4 * i + j))
            return slab
        return jax.lax.fori_loop(0, misses // 4, move, slab)

    @functools.partial(jax.jit, static_argnames="misses", donate_argnums=1)
    def access(state, slab, stack, misses):
        experts = jnp.arange(misses, dtype=jnp.int32)
        move = lambda slab, e, slot: write_slot(slab, slot, fetch_expert(stack, e))  # noqa: E731
        return dc.access(state, 0, experts, policy="lru", num_experts=E, move=move, slab=slab)[1]

    def in_place(call):  # one call on the held slab, which its result replaces
        held["slab"] = call()
        return held["slab"]

    whole = jax.jit(fetch_all)
    on_device = jax.sharding.SingleDeviceSharding(device)
    empty = dc.empty_state(1, E, E)
    # the in-program variants: (program, its arguments before the slab, its static arguments besides misses)
    reversed_experts = jnp.arange(E - 1, -1, -1, dtype=jnp.int32)
    words = {n: to_words(w, keep_rows=True) for n, w in stack.items()}
    flat_words = {n: to_words(w, keep_rows=False) for n, w in stack.items()}
    separate = tuple({n: jax.device_put(np.asarray(w)[e], host_sharding(device)) for n, w in stack.items()}
                     for e in range(E))
    # the host stacks a variant reads, when not `stack`
    sources = {"ids-u32": words, "ids-flat": flat_words, "switch": separate}
    spread = lambda m: jnp.asarray(np.isin(np.arange(E), np.linspace(0, E - 1, m).round()))  # noqa: E731 - M wanted of E
    in_program = {"copies": (copies, (), {}), "ids": (copies_at, (reversed_experts,), {}),
                  "ids-u32": (copies_words, (reversed_experts,), {}), "ids-flat": (copies_words, (reversed_experts,), {}),
                  "switch": (switched, (reversed_experts,), {}), "static": (static_slices, (reversed_experts,), {}),
                  "chunks4": (chunks4, (), {}),
                  "access": (access, (empty,), {})}
    hlo_dir = Path(args.out).with_name(Path(args.out).stem + "_hlo")
    hlo_dir.mkdir(parents=True, exist_ok=True)
    rows, budget, need = [], Budget(args.time_budget), 0.0
    for misses in (int(n) for n in args.misses.split(",")):
        if not 0 < misses <= E:
            raise SystemExit(f"--misses: {misses} is not in 1..{E} (the card's experts)")
        if not budget.allows(need, f"{misses} misses"):
            continue
        started = time.monotonic()
        in_program["masked"] = (masked, (spread(misses),), {})
        if not rows:  # the first miss count: each in-program variant's optimized HLO, for reading
            for name, (program, before, static) in in_program.items():
                hlo = program.lower(*before, held["slab"], sources.get(name, stack), misses=misses,
                                    **static).compile().as_text()
                (hlo_dir / f"{name}-{misses}.hlo.txt").write_text(hlo)
        nbytes = misses * cfg.expert_bytes
        one_buffer = jax.device_put(np.zeros(nbytes, np.uint8), host_sharding(device))
        runs = {name: functools.partial(in_place, lambda program=program, before=before, static=static, name=name:
                                        program(*before, held["slab"], sources.get(name, stack), misses=misses,
                                                **static))
                for name, (program, before, static) in in_program.items()}
        runs.update(whole=lambda: whole(stack), one=lambda: jax.device_put(one_buffer, on_device),
                    each=lambda: jax.device_put(separate[:misses], on_device))
        for name, run in runs.items():
            try:
                seconds = median_seconds(run, args.repeats)
            except Exception as error:  # noqa: BLE001 - a variant XLA cannot build is a row with its error
                rows.append({"card": args.card, "misses": misses, "how": name,
                             "error": str(error).splitlines()[0][:300]})
                print(json.dumps(rows[-1]), flush=True)
                held["slab"] = fresh_slab()
                continue
            experts_moved = {"whole": E, "chunks4": misses // 4 * 4}.get(name, misses)
            moved = experts_moved * cfg.expert_bytes
            rows.append({"card": args.card, "misses": misses, "how": name, "ms": seconds * 1e3, "gb": moved / 1e9,
                         "gb_per_s": moved / seconds / 1e9})
            print(json.dumps(rows[-1]), flush=True)
        need = time.monotonic() - started
        write_json(args.out, {"environment": environment(), "expert_bytes": cfg.expert_bytes, "rows": rows})
    if args.stream_layers > 1 and budget.allows(need, "the streaming rows"):
        for name, seconds in stream_rows(stack, args.stream_layers, args.stream_rows, args.repeats, device,
                                         hlo_dir).items():
            moved = 0 if name == "stream-compute" else args.stream_layers * E * cfg.expert_bytes
            rows.append({"card": args.card, "misses": E, "how": name, "ms": seconds * 1e3, "gb": moved / 1e9,
                         "gb_per_s": moved / seconds / 1e9})
            print(json.dumps(rows[-1]), flush=True)
        write_json(args.out, {"environment": environment(), "expert_bytes": cfg.expert_bytes, "rows": rows})
    print(f"\n{args.card}: one layer's misses fetched from pinned host memory ({cfg.expert_bytes / 1e6:.1f} MB an expert)")
    print_table(rows, [("misses", "misses", "d"), ("how", "how", "s"), ("ms", "ms", ".3f"), ("gb", "GB", ".3f"),
                       ("gb_per_s", "GB/s", ".1f")])


def stream_rows(stack: dict, layers: int, rows: int, repeats: int, device, hlo_dir: Path) -> dict[str, float]:
    """Seconds per call of the three streaming programs (module docstring) over `layers` copies of `stack`; the
    optimized HLO of the two that fetch goes to hlo_dir."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from moejax.offload.expert_stacks import fetch_expert, host_sharding

    on_device = jax.sharding.SingleDeviceSharding(device)
    one_layer = jax.device_put(stack, on_device)
    layered = jax.device_put({n: jnp.stack([w] * layers) for n, w in one_layer.items()}, host_sharding(device))
    inputs = {n: jnp.ones((rows, w.shape[1]), w.dtype, device=device) for n, w in one_layer.items()}

    fetch = fetch_expert  # layer i (a function of the loop counter) of the stacked host array, on the device

    def compute(layer, i):  # every weight of every expert times `rows` rows (scaled by i: not loop-invariant)
        # The tanh keeps XLA from summing the rows before the product (which would leave a read of the weights).
        scale = jnp.asarray(i + 1)
        return sum(jnp.tanh(jnp.einsum("ta,eab->teb", inputs[n] * scale.astype(w.dtype), w)).sum(dtype=jnp.float32)
                   for n, w in layer.items())

    @jax.jit
    def stream_fetch(layered):  # the fetched layer is the loop's state: no fetch is dead code
        empty = jax.tree.map(jnp.zeros_like, one_layer)
        return lax.fori_loop(0, layers, lambda i, current: fetch(layered, i), empty)

    @jax.jit
    def stream_compute(layer):
        return lax.fori_loop(0, layers, lambda i, acc: acc + compute(layer, i), 0.0)

    @jax.jit
    def stream_pipelined(layered):
        def body(i, carry):
            current, acc = carry
            return fetch(layered, i + 1), acc + compute(current, i)
        last, acc = lax.fori_loop(0, layers - 1, body, (fetch(layered, 0), 0.0))
        return acc + compute(last, layers - 1)

    for name, program in (("stream-fetch", stream_fetch), ("stream-pipelined", stream_pipelined)):
        (hlo_dir / f"{name}.hlo.txt").write_text(program.lower(layered).compile().as_text())
    runs = {"stream-fetch": lambda: stream_fetch(layered), "stream-compute": lambda: stream_compute(one_layer),
            "stream-pipelined": lambda: stream_pipelined(layered)}
    return {name: median_seconds(run, repeats) for name, run in runs.items()}


if __name__ == "__main__":
    main()
