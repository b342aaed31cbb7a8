"""The host tier: every routed expert's weights in pinned host memory, ready for async copies.

On GPUs, arrays in the `pinned_host` memory kind copy to the device at ~50 GB/s against ~8 GB/s
from NumPy (measured on an H100, PCIe gen5 x16, JAX 0.11.2), so each expert is placed there as it
is read from the checkpoint, and its NumPy copy is dropped at once: host RAM holds one copy of the
experts.
JAX's CPU backend has the same memory kinds, so the same path runs (and is tested) on CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
from jax.sharding import SingleDeviceSharding

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.errors import MoejaxError
from moejax.models.moe import PackedExpert
from moejax.progress import Progress
from moejax.runtime.policies import ExpertKey

try:  # jaxlib's batched copy, what jax.device_put ends in for committed arrays (see copy_experts)
    from jax._src.interpreters.pxla import global_aval_to_result_handler as _result_handler
    from jax._src.lib import xla_client as _xc

    _batched_copy = _xc.batched_copy_array_to_devices_with_sharding
    _ALWAYS_COPY = _xc.ArrayCopySemantics.ALWAYS_COPY
except (ImportError, AttributeError):  # pragma: no cover - other jax versions
    _batched_copy = None

_HANDLERS: dict = {}  # sharding -> {(shape, dtype): wraps a copy as an array of the target memory}


PINNED_LIMIT_VARIABLE = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_MARGIN = 1.03


def size_pinned_pool(expert_bytes: int) -> None:
    """Sizes XLA's pinned host pool for `expert_bytes` of experts, unless the user set it.

    XLA caps pinned host memory at 64 GB by default, and its pool grows in doubling regions that
    stay page-locked, so a store of ~70 GB could lock ~100 GB of RAM (measured on our H100 host).
    A limit just above the experts' size lifts the cap and bounds the overshoot. It only takes
    effect if set before JAX starts its GPU backend (the CLI always does).
    """
    if PINNED_LIMIT_VARIABLE not in os.environ:
        os.environ[PINNED_LIMIT_VARIABLE] = str(max(1, math.ceil(expert_bytes * PINNED_MARGIN / 2**30) + 1))


def has_pinned_host(device) -> bool:
    """Whether `device` has a pinned host memory (GPU and CPU backends do)."""
    return any(memory.kind == "pinned_host" for memory in device.addressable_memories())


def host_sharding(device) -> SingleDeviceSharding:
    """Pinned host memory of `device` when it has it, else its default memory."""
    return SingleDeviceSharding(device, memory_kind="pinned_host" if has_pinned_host(device) else None)


def device_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="device")


def copy_experts(experts: Sequence, sharding: SingleDeviceSharding) -> list:
    """Starts asynchronous copies of experts (PackedExperts or dicts of committed single-device
    arrays) into `sharding`'s memory, one call for all of them; returns the copies at once.

    jax.device_put spends ~45 us of Python per array on checks that cannot fail here (same
    device, same sharding, only the memory kind changes), and the engine issues copies on the
    host's critical path, so the call goes straight to jaxlib's batched copy, which jax.device_put
    itself ends in. Falls back to jax.device_put where jaxlib lacks that call.
    """
    global _batched_copy
    if not experts:
        return []
    if _batched_copy is not None:
        try:
            return _copy_experts_fast(experts, sharding)
        except (TypeError, AttributeError):  # pragma: no cover - this jax's private calls differ
            _batched_copy = None
    return jax.device_put(list(experts), sharding)


def _copy_experts_fast(experts: Sequence, sharding: SingleDeviceSharding) -> list:
    arrays, structure = jax.tree_util.tree_flatten(list(experts))
    devices = sharding._internal_device_list.addressable_device_list
    copies = _batched_copy(arrays, [devices] * len(arrays), [sharding] * len(arrays), [_ALWAYS_COPY] * len(arrays))
    # The copies keep their sources' abstract value, whose memory space is the host's; jax.device_put
    # re-wraps them with the target's, as done here. Handlers are looked up by shape and dtype within
    # the sharding's table (hashing a sharding per array cost ~5 us).
    handlers = _HANDLERS.setdefault(sharding, {})
    wrapped = []
    for a, c in zip(arrays, copies, strict=True):
        handler = handlers.get((a.shape, a.dtype))
        if handler is None:
            handler = handlers[(a.shape, a.dtype)] = _result_handler(jax.core.ShapedArray(a.shape, a.dtype), sharding, True)
        wrapped.append(handler(c))
    return jax.tree_util.tree_unflatten(structure, wrapped)


class HostExpertStore:
    """Expert weights by (moe_layer, expert) in host memory; `expert_bytes` is one expert's size.

    With `on_device=True` the "store" holds the experts in device memory instead (resident mode):
    staging from it is then free, and the same executor runs with no transfers.
    """

    def __init__(self, device, expert_bytes: int, on_device: bool = False):
        """Experts are added with `put` and read with `get` (a PackedExpert in the store's memory)."""
        self.device, self.on_device = device, on_device
        self.sharding = device_sharding(device) if on_device else host_sharding(device)
        self.expert_bytes = expert_bytes
        self._experts: dict[ExpertKey, PackedExpert] = {}

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._experts

    def __len__(self) -> int:
        return len(self._experts)

    def put(self, key: ExpertKey, weights) -> None:
        """Places one expert in the host tier, packed (a PackedExpert: one array, one copy per move).

        weights: {name: NumPy or JAX array} of one dtype, or a PackedExpert.
        """
        if not isinstance(weights, PackedExpert):
            try:
                weights = PackedExpert.pack(weights)
            except ValueError as err:
                raise MoejaxError(f"expert {key}: its weights {sorted(weights)}: {err}") from None
        try:
            self._experts[key] = jax.device_put(weights, self.sharding)
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            where, advice = ("device", "use an offloading mode") if self.on_device else (
                "pinned host", f"set {PINNED_LIMIT_VARIABLE} (in GB) before JAX starts, or free host RAM")
            raise MoejaxError(
                f"out of {where} memory after {len(self._experts)} experts ({self.total_bytes / 2**30:.1f} GiB): {advice}"
            ) from None

    def get(self, key: ExpertKey) -> PackedExpert:
        return self._experts[key]

    def keys(self) -> Iterable[ExpertKey]:
        return self._experts.keys()

    def subset(self, keys: Iterable[ExpertKey] | None = None, on_device: bool | None = None) -> HostExpertStore:
        """A store of `keys` (default: all) in device memory or pinned host memory (default: where this
        one is); arrays already in that memory are shared, not copied."""
        other = HostExpertStore(self.device, self.expert_bytes, self.on_device if on_device is None else on_device)
        for key in self.keys() if keys is None else keys:
            other.put(key, self._experts[key])
        return other

    @property
    def total_bytes(self) -> int:
        return len(self._experts) * self.expert_bytes

    @classmethod
    def from_checkpoint(cls, ckpt: Path, cfg: ModelConfig, device, on_device: bool = False, show_progress: bool = False):
        """Reads each expert from the checkpoint straight into the store, one at a time."""
        load = lambda layer, e: checkpoint.load_expert(ckpt, layer, e)  # noqa: E731
        return cls.from_loader(load, cfg, device, on_device, show_progress)

    @classmethod
    def from_loader(cls, load: Callable[[int, int], dict], cfg: ModelConfig, device, on_device: bool = False, show_progress: bool = False):
        """Builds the store from `load(layer, expert) -> weights`, keyed by MoE-layer order."""
        store = cls(device, cfg.expert_bytes, on_device)
        moe_layers = cfg.moe_layer_ids
        progress = Progress("load experts", len(moe_layers) * cfg.num_experts, enabled=show_progress)
        for m, layer in enumerate(moe_layers):
            for e in range(cfg.num_experts):
                weights = load(layer, e)
                store.put((m, e), weights)
                progress.advance()
        progress.close()
        return store
