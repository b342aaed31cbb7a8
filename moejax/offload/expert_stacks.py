"""Where expert weights live: per-MoE-layer stacks in pinned host memory, and the device slab of slots.

The host tier keeps, for each MoE layer m and weight name, one array [E, ...] in pinned host memory
(`jax.memory` kind `pinned_host`), which copies to the device at link speed and from which a step
program fetches one expert by index (`fetch_expert`), moving only that expert's bytes; or, for layers of few
large experts on a GPU, one buffer per expert (`per_expert_layout`), which copies faster. The device tier
is a slab {name: [S, ...]} of S slots addressed by the cache's slot table (`offload.device_cache`);
in the resident mode the slab holds every expert, expert e of MoE layer m in slot m * E + e.
A miss is either fetched by XLA (`fetch_expert`: into a temporary on the device, then written into its slot) or,
where the engine chooses it (`miss_copy`: on a GPU, for stacked host arrays), copied straight into its slot by a
kernel that reads the host memory over the link (`AddressedHost`, `kernels.host_rows`).
JAX's CPU backend has the same memory kinds, so the same code runs (and is tested) on the CPU.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import SingleDeviceSharding

from moejax.errors import MoejaxError
from moejax.kernels import host_rows

PINNED_LIMIT_VARIABLE = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_MARGIN = 1.03

Stack = dict  # {weight name: array [E or S, ...]}


def size_pinned_pool(expert_bytes: int) -> None:
    """Sizes XLA's pinned host pool for `expert_bytes` of experts, unless the user set it.

    XLA caps pinned host memory at 64 GB by default, and its pool grows in doubling regions that
    stay page-locked, so a store of ~70 GB could lock ~100 GB of RAM. A limit just above the
    experts' size lifts the cap and bounds the overshoot. It only takes effect if set before JAX
    starts its GPU backend (the CLI always does).
    """
    if PINNED_LIMIT_VARIABLE not in os.environ:
        os.environ[PINNED_LIMIT_VARIABLE] = str(max(1, math.ceil(expert_bytes * PINNED_MARGIN / 2**30) + 1))


def has_pinned_host(device) -> bool:
    """Whether `device` has a pinned host memory (GPU and CPU backends do)."""
    return any(memory.kind == "pinned_host" for memory in device.addressable_memories())


def host_sharding(device) -> SingleDeviceSharding:
    """Pinned host memory of `device` when it has it, else its default memory."""
    return SingleDeviceSharding(device, memory_kind="pinned_host" if has_pinned_host(device) else None)


# Pinned host stacks one buffer per expert (`per_expert_layout`) for layers of at most this many experts of at least
# this many bytes.
PER_EXPERT_MAX_EXPERTS = 16
PER_EXPERT_MIN_BYTES = 64 << 20
HOST_LAYOUTS = ("auto", "stacked", "per-expert")  # `engine.loading.build_engine`'s host_layout
MISS_COPIES = ("auto", "xla", "kernel")  # its miss_copy (`fetch_expert` then `write_slot`, or `AddressedHost.write`)


def per_expert_layout(num_experts: int, expert_bytes: int, platform: str) -> bool:
    """Whether a layer's pinned host stack is kept as one buffer per expert ({name: (E arrays [...])}) instead of
    one array [E, ...]: on a GPU, for few large experts. XLA copies a whole pinned buffer with a DMA at the link's
    rate, but a slice of one (at a traced offset, or a static one) with a kernel reading over the link, which is
    slower (BENCHMARKS.md: `scripts/probe_miss_fetch.py` on Mixtral's experts). A miss then picks its buffer
    through a switch with a branch per expert, whose fixed cost per miss weighs as much as that gain on small
    experts, and whose branches compile slowly for many experts."""
    return platform == "gpu" and num_experts <= PER_EXPERT_MAX_EXPERTS and expert_bytes >= PER_EXPERT_MIN_BYTES


def is_per_expert(stack: Stack) -> bool:
    """Whether a host stack is in the per-expert layout (`per_expert_layout`)."""
    return isinstance(next(iter(stack.values())), tuple)


def stack_experts(stack: Stack) -> int:
    """The number of experts in a stack, in either layout."""
    w = next(iter(stack.values()))
    return len(w) if isinstance(w, tuple) else w.shape[0]


def expert_shapes(stack: Stack) -> dict:
    """{name: (one expert's shape, dtype)} of a stack, in either layout."""
    return {name: (tuple(w[0].shape), w[0].dtype) if isinstance(w, tuple) else (tuple(w.shape[1:]), w.dtype)
            for name, w in stack.items()}


def stack_bytes(stack: Stack) -> int:
    """The bytes of a stack's experts, in either layout."""
    return sum(sum(x.nbytes for x in w) if isinstance(w, tuple) else w.nbytes for w in stack.values())


def fetch_expert(stack: Stack, expert) -> Stack:
    """Inside a step program: expert `expert` (traced int) of a host stack, moved to the device: the slice at that
    offset, or in the per-expert layout its own buffers, chosen by a switch."""
    if is_per_expert(stack):
        return lax.switch(expert, [lambda e=e: {name: jax.device_put(w[e], jax.memory.Space.Device)
                                                for name, w in stack.items()} for e in range(stack_experts(stack))])
    return {name: jax.device_put(lax.dynamic_index_in_dim(w, expert, keepdims=False), jax.memory.Space.Device)
            for name, w in stack.items()}


def fetch_all(stack: Stack) -> Stack:
    """Inside a step program: a whole host stack moved to the device as {name: [E, ...]} (one copy per weight, or
    per weight and expert in the per-expert layout)."""
    if is_per_expert(stack):
        return {name: jnp.stack([jax.device_put(x, jax.memory.Space.Device) for x in w]) for name, w in stack.items()}
    return {name: jax.device_put(w, jax.memory.Space.Device) for name, w in stack.items()}


def stack_to_device(stack: Stack, sharding) -> Stack:
    """A host stack copied by the host (`jax.device_put`, asynchronous) to `sharding`'s device as {name: [E, ...]}."""
    if is_per_expert(stack):
        return {name: jnp.stack(jax.device_put(list(w), sharding)) for name, w in stack.items()}
    return jax.device_put(stack, sharding)


def zero_experts(stack: Stack, count: int) -> Stack:
    """`count` experts' worth of zeros on the device, shaped as `stack`'s ({name: [count, ...]}): a scratch to fetch into."""
    return {name: jnp.zeros((count, *shape), dtype) for name, (shape, dtype) in expert_shapes(stack).items()}


def median_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The median wall seconds of `repeats` calls of run() (which blocks until its work is done), after one
    untimed call (compiles, warms)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_layer_fetches(stack: Stack, repeats: int = 3, addressed: AddressedHost | None = None) -> tuple[float, float]:
    """(seconds of one expert's fetch, of the whole stack's copy) from a pinned host stack to its device: the
    fetch as a cached step fetches its misses (routing-chosen, traced offsets, in a loop writing a scratch of
    min(8, E) slots; the mean of them), the copy as its whole-layer move makes it (`fetch_all`); medians.
    addressed: the engine's AddressedHost, whose first MoE layer `stack` is: the fetches are then the kernel's."""
    count = min(8, stack_experts(stack))

    @jax.jit
    def fetch_some(stack, addressed, experts):
        if addressed is not None:
            fetch = lambda j, scratch: addressed.write(scratch, 0, experts[j], j)  # noqa: E731
        else:
            fetch = lambda j, scratch: write_slot(scratch, j, fetch_expert(stack, experts[j]))  # noqa: E731
        return lax.fori_loop(0, count, fetch, zero_experts(stack, count))

    move_all = jax.jit(fetch_all)
    experts = jnp.arange(count, dtype=jnp.int32)[::-1]
    one_s = median_seconds(lambda: jax.block_until_ready(fetch_some(stack, addressed, experts)), repeats) / count
    return one_s, median_seconds(lambda: jax.block_until_ready(move_all(stack)), repeats)


def write_slot(slab: Stack, slot, expert: Stack) -> Stack:
    """Inside a step program: `expert`'s weights written into slot `slot` of the slab (in place once donated)."""
    return {name: lax.dynamic_update_index_in_dim(slab[name], expert[name].astype(slab[name].dtype), slot, 0)
            for name in slab}


@jax.tree_util.register_pytree_node_class
class AddressedHost(tuple):
    """The MoE layers' pinned host stacks (a tuple of them, used as one everywhere) with the row tables of the
    copy kernel (`kernels.host_rows`): `rows` {name: uint32 [L x E, 2]} on the device, the host address of
    expert e of MoE layer m's weight `name` at row m x E + e. An engine whose misses the kernel copies straight
    into their slots (`miss_copy='kernel'`) takes this as `host`; the stacks must outlive its programs."""

    def __new__(cls, stacks, rows: dict):
        host = super().__new__(cls, stacks)
        host.rows = rows
        return host

    @classmethod
    def of(cls, stacks: tuple) -> AddressedHost:
        """The stacks (either layout) with their row tables, built on the stacks' device."""
        rows = {name: host_rows.row_table([piece for stack in stacks for piece in _rows_of(stack[name])])
                for name in stacks[0]}
        return cls(stacks, rows)

    def tree_flatten(self):
        return (tuple(self), self.rows), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def write(self, slab: Stack, m, e, slot) -> Stack:
        """Inside a step program: the slab with expert e of MoE layer m (traced ints) copied by the kernel from
        its host rows into slot `slot` (int32 []; out of [0, S): nothing written). The kernel copies bytes, so
        each slab weight must hold one expert's weight in the host's shape and dtype (checked when traced)."""
        held = expert_shapes(self[0])
        for name, w in slab.items():
            if (tuple(w.shape[1:]), w.dtype) != held[name]:
                raise ValueError(f"slab weight {name!r} {w.dtype}{list(w.shape[1:])} is not the host's "
                                 f"{held[name][1]}{list(held[name][0])}: the copy kernel copies bytes")
        key = jnp.reshape(m * stack_experts(self[0]) + e, (1,)).astype(jnp.int32)
        slot = jnp.reshape(slot, (1,)).astype(jnp.int32)
        return {name: host_rows.host_rows_to_slots(self.rows[name], key, slot, w) for name, w in slab.items()}


def _rows_of(w) -> list:
    """A host weight as `row_table`'s (array, rows) pieces: the stacked array [E, ...] as E rows, or in the
    per-expert layout each expert's buffer as one row."""
    return [(x, 1) for x in w] if isinstance(w, tuple) else [(w, w.shape[0])]


def place_on_host(stack: Stack, sharding, count: int, per_expert: bool = False) -> Stack:
    """A stack {name: [E, ...]} put in pinned host memory (`sharding`), in the per-expert layout if asked
    (`per_expert_layout`); running out of it is a MoejaxError saying what to do (`count`: the MoE layers placed
    before it)."""
    if per_expert:
        stack = {name: tuple(w[e] for e in range(w.shape[0])) for name, w in stack.items()}
    try:
        return jax.device_put(stack, sharding)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise MoejaxError(f"out of pinned host memory after {count} MoE layers of experts: set {PINNED_LIMIT_VARIABLE} "
                          "(in GB) before JAX starts, or free host RAM") from None


def empty_slab(shapes: dict, num_slots: int, device) -> Stack:
    """A device slab of `num_slots` zeroed slots; shapes: {name: (one expert's shape, dtype)}. Each weight is
    its own buffer (the slab is donated to step programs)."""
    return {n: jnp.zeros((num_slots,) + s, d, device=device) for n, (s, d) in shapes.items()}


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_layer(slab: Stack, layer: Stack, start) -> Stack:
    return {name: lax.dynamic_update_slice_in_dim(slab[name], layer[name], start, 0) for name in slab}
