"""The GPU expert budget: parsing `--expert-budget` and fitting it into device memory."""

from __future__ import annotations

import dataclasses
import re

from moejax.errors import MoejaxError

UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
WORKSPACE_FRACTION = 0.05
MIN_WORKSPACE_BYTES = 512 * 2**20


def parse_budget(text: str | float | int, all_expert_bytes: int) -> int:
    """Bytes of GPU memory for experts: a fraction of all expert bytes ('0.25') or a size ('12GiB', '500MB').

    A bare number <= 1 is a fraction; a bare number > 1 is bytes.
    """
    match = _BUDGET.match(str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise MoejaxError(
            f"--expert-budget '{text}' is not a fraction of expert bytes (e.g. 0.25) or a size (e.g. 12GiB, 500MB)"
        )
    value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise MoejaxError(f"--expert-budget must be positive (got '{text}')")
    if unit == "" and value <= 1:
        return int(value * all_expert_bytes)
    return int(value * UNITS[unit])


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes the device can give the expert cache once everything else is placed."""

    limit: int  # what the allocator may use (JAX's bytes_limit)
    in_use: int  # already allocated: dense weights and anything else placed
    kv_cache: int  # reserved for the largest KV cache the engine will allocate
    workspace: int  # reserved for XLA temporaries

    @property
    def available(self) -> int:
        return self.limit - self.in_use - self.kv_cache - self.workspace


def device_memory(device, kv_cache_bytes: int, to_place_bytes: int = 0) -> DeviceMemory | None:
    """The device's memory account, or None where the backend reports none (CPU).

    `to_place_bytes`: weights about to be placed on the device (counted as in use).
    """
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    limit = int(stats["bytes_limit"])
    workspace = max(MIN_WORKSPACE_BYTES, int(WORKSPACE_FRACTION * limit))
    return DeviceMemory(limit, int(stats.get("bytes_in_use", 0)) + to_place_bytes, kv_cache_bytes, workspace)


def cache_capacity(budget_bytes: int, expert_bytes: int, min_experts: int, memory: DeviceMemory | None) -> int:
    """Number of expert slots for `budget_bytes`; refuses budgets below one layer's need or above the device."""
    if memory is not None and budget_bytes > memory.available:
        raise MoejaxError(
            f"--expert-budget of {budget_bytes / 2**30:.2f} GiB is more than the device holds: "
            f"{memory.available / 2**30:.2f} GiB free of {memory.limit / 2**30:.2f} GiB after dense weights and "
            f"other buffers ({memory.in_use / 2**30:.2f} GiB), KV cache ({memory.kv_cache / 2**30:.2f} GiB) "
            f"and workspace ({memory.workspace / 2**30:.2f} GiB)"
        )
    capacity = budget_bytes // expert_bytes
    if capacity < min_experts:
        raise MoejaxError(
            f"--expert-budget of {budget_bytes:,} bytes holds {capacity} experts; one layer needs at least "
            f"{min_experts} at once (minimum budget {min_experts * expert_bytes:,} bytes)"
        )
    return int(capacity)
