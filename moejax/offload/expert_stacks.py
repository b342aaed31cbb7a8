"""Where expert weights live: per-MoE-layer stacks in pinned host memory, and the device slab of slots.

The host tier keeps, for each MoE layer m and weight name, one array [E, ...] in pinned host memory
(`jax.memory` kind `pinned_host`), which copies to the device at link speed and from which a step
program fetches one expert by index (`fetch_expert`), moving only that expert's bytes. The device tier
is a slab {name: [S, ...]} of S slots addressed by the cache's slot table (`offload.device_cache`);
in the resident mode the slab holds every expert, expert e of MoE layer m in slot m * E + e.
JAX's CPU backend has the same memory kinds, so the same code runs (and is tested) on the CPU.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import SingleDeviceSharding

from moejax.errors import MoejaxError
from moejax.progress import Progress

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


SWITCH_FETCH_MAX_EXPERTS = 16  # more experts a layer: a branch each would cost too much compile time


def fetch_expert(stack: Stack, expert, by_switch: bool = False) -> Stack:
    """Inside a step program: expert `expert` (traced int) of a host stack, moved to the device.

    by_switch: through a `lax.switch` whose branch e copies expert e, a slice at a static offset, which the GPU
    moves as one copy at the link's DMA rate; otherwise the slice at the traced offset, which it reads with a
    kernel over the link (slower for large experts: BENCHMARKS.md; the engine measures both at load)."""
    if by_switch:
        E = next(iter(stack.values())).shape[0]
        return lax.switch(expert, [lambda e=e: {name: jax.device_put(w[e], jax.memory.Space.Device)
                                                for name, w in stack.items()} for e in range(E)])
    return {name: jax.device_put(lax.dynamic_index_in_dim(w, expert, keepdims=False), jax.memory.Space.Device)
            for name, w in stack.items()}


def fetch_all(stack: Stack) -> Stack:
    """Inside a step program: a whole host stack moved to the device (one copy per weight)."""
    return {name: jax.device_put(w, jax.memory.Space.Device) for name, w in stack.items()}


def zero_experts(stack: Stack, count: int) -> Stack:
    """`count` experts' worth of zeros on the device, shaped as `stack`'s ({name: [count, ...]}): a scratch to fetch into."""
    return {name: jnp.zeros((count, *w.shape[1:]), w.dtype) for name, w in stack.items()}


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


def time_layer_fetches(stack: Stack, repeats: int = 3) -> tuple[float, float, float | None]:
    """(seconds of one expert's fetch at a traced offset, of the whole stack's copy, of one expert's fetch by
    switch or None where the stack has more than SWITCH_FETCH_MAX_EXPERTS) from a pinned host stack to its device:
    the fetches as a cached step fetches its misses (routing-chosen, traced offsets, in a loop writing a scratch of
    min(8, E) slots; the mean of them), the copy as its whole-layer move makes it (`fetch_all`); medians."""
    E = next(iter(stack.values())).shape[0]
    count = min(8, E)

    @functools.partial(jax.jit, static_argnums=2)
    def fetch_some(stack, experts, by_switch):
        fetch = lambda j, scratch: write_slot(scratch, j, fetch_expert(stack, experts[j], by_switch))  # noqa: E731
        return lax.fori_loop(0, count, fetch, zero_experts(stack, count))

    move_all = jax.jit(fetch_all)
    experts = jnp.arange(count, dtype=jnp.int32)[::-1]
    one = lambda by_switch: median_seconds(  # noqa: E731
        lambda: jax.block_until_ready(fetch_some(stack, experts, by_switch)), repeats) / count
    return one(False), median_seconds(lambda: jax.block_until_ready(move_all(stack)), repeats), (
        one(True) if E <= SWITCH_FETCH_MAX_EXPERTS else None)


def choose_miss_fetch(fetch_times: tuple[float, float, float | None], forced: bool | None = None
                      ) -> tuple[bool, tuple[float, float]]:
    """From `time_layer_fetches`' (offset, whole layer, switch) seconds: (whether misses go by switch, (seconds of
    one miss the way they go, of the whole layer's copy)); by switch where it was timed and is faster, unless
    `forced` says which."""
    one_s, whole_s, switch_s = fetch_times
    by_switch = (switch_s is not None and switch_s < one_s) if forced is None else forced
    return by_switch, (switch_s if by_switch and switch_s is not None else one_s, whole_s)


def write_slot(slab: Stack, slot, expert: Stack) -> Stack:
    """Inside a step program: `expert`'s weights written into slot `slot` of the slab (in place once donated)."""
    return {name: lax.dynamic_update_index_in_dim(slab[name], expert[name].astype(slab[name].dtype), slot, 0)
            for name in slab}


class HostExperts:
    """Every MoE layer's routed experts, as one stack per layer: `layers[m]` = {name: [E, ...]}.

    on_device=False: pinned host memory (the offloading modes); True: device memory (what the resident
    slab is built from, then dropped).
    """

    def __init__(self, layers: list[Stack], expert_bytes: int):
        self.layers, self.expert_bytes = layers, expert_bytes

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return next(iter(self.layers[0].values())).shape[0]

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{name: (one expert's shape, dtype)}."""
        return {name: (tuple(w.shape[1:]), w.dtype) for name, w in self.layers[0].items()}

    @classmethod
    def from_loader(cls, load: Callable[[int, int], dict], moe_layers: Sequence[int], num_experts: int, device,
                    on_device: bool = False, show_progress: bool = False) -> HostExperts:
        """Reads every expert with `load(layer, expert) -> {name: NumPy array}`, one MoE layer at a time,
        and places each layer's stacks in pinned host memory (or the device)."""
        sharding = SingleDeviceSharding(device) if on_device else host_sharding(device)
        progress = Progress("load experts", len(moe_layers) * num_experts, enabled=show_progress)
        layers, expert_bytes = [], None
        for layer in moe_layers:
            experts = []
            for e in range(num_experts):
                experts.append(load(layer, e))
                progress.advance()
            names = list(experts[0])
            stack = {name: np.stack([np.asarray(x[name]) for x in experts]) for name in names}
            dtypes = {w.dtype for w in stack.values()}
            if len(dtypes) != 1:
                raise MoejaxError(f"experts of layer {layer}: weights of different dtypes {sorted(map(str, dtypes))}")
            expert_bytes = sum(w[0].nbytes for w in stack.values())
            layers.append(_place(stack, sharding, len(layers), on_device))
        progress.close()
        return cls(layers, expert_bytes or 0)


def _place(stack: Stack, sharding, count: int, on_device: bool) -> Stack:
    try:
        return jax.device_put(stack, sharding)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        where, advice = ("device", "use an offloading mode (offload='cached')") if on_device else (
            "pinned host", f"set {PINNED_LIMIT_VARIABLE} (in GB) before JAX starts, or free host RAM")
        raise MoejaxError(f"out of {where} memory after {count} MoE layers of experts: {advice}") from None


def empty_slab(shapes: dict, num_slots: int, device) -> Stack:
    """A device slab of `num_slots` zeroed slots; shapes: {name: (one expert's shape, dtype)}. Each weight is
    its own buffer (the slab is donated to step programs)."""
    return {n: jnp.zeros((num_slots,) + s, d, device=device) for n, (s, d) in shapes.items()}


def resident_slab(experts: HostExperts, device) -> Stack:
    """A device slab with every expert, expert e of MoE layer m in slot m * E + e (layers copied one at a time
    into a slab allocated once)."""
    slab = empty_slab(experts.shapes(), experts.num_layers * experts.num_experts, device)
    for m, layer in enumerate(experts.layers):
        slab = _write_layer(slab, jax.device_put(layer, SingleDeviceSharding(device)), m * experts.num_experts)
    return slab


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_layer(slab: Stack, layer: Stack, start) -> Stack:
    return {name: lax.dynamic_update_slice_in_dim(slab[name], layer[name], start, 0) for name in slab}
