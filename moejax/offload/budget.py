"""The GPU expert budget: parsing `expert_budget` (`--expert-budget`) and fitting it into device memory."""

from __future__ import annotations

import dataclasses
import logging
import math
import re

from moejax.errors import ParameterError, plural

log = logging.getLogger(__name__)

UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
WORKSPACE_FRACTION = 0.05
MIN_WORKSPACE_BYTES = 512 * 2**20


def parse_budget(text: str | float | int, all_expert_bytes: int, parameter: str = "expert_budget") -> int:
    """Bytes of memory for experts: a fraction of all expert bytes ('0.25') or a size ('12GiB', '500MB').

    A bare number is a fraction, so it must be <= 1; sizes carry a unit ('2GB', or '2048B' for bytes).
    parameter: the one errors name (`expert_budget`, `host_budget`).
    """
    match = _BUDGET.match(str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise ParameterError("{" + parameter + "} {text!r} is not a fraction of expert bytes (e.g. 0.25) or a size "
                             "(e.g. 12GiB, 500MB)", text=str(text))
    value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ParameterError("{" + parameter + "} must be positive (got {text!r})", text=str(text))
    if unit == "":
        if value > 1:
            raise ParameterError("{" + parameter + "} {text!r}: a bare number is a fraction of all expert bytes, at most 1; "
                                 "give a size with its unit (e.g. {text}GB, or {text}B for bytes)", text=str(text).strip())
        return int(value * all_expert_bytes)
    size = value * UNITS[unit]
    if not math.isfinite(size):
        raise ParameterError("{" + parameter + "} {text!r} is too large to represent", text=str(text))
    return int(size)


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


def cache_capacity(budget_bytes: int, expert_bytes: int, min_experts: int, max_experts: int,
                   memory: DeviceMemory | None) -> int:
    """Number of expert slots for `budget_bytes`, at most `max_experts` (all the experts there are: a larger
    budget is capped, with a note in the log); refuses budgets below one layer's need (`min_experts`) or
    above what the device has free."""
    capacity = budget_bytes // expert_bytes
    if capacity > max_experts:
        log.warning(f"the expert budget ({budget_bytes:,} bytes) is more than all {plural(max_experts, 'expert')} take "
                    f"({max_experts * expert_bytes:,} bytes): the cache holds all of them")
        capacity = max_experts
    needed = capacity * expert_bytes
    if memory is not None and needed > memory.available:
        raise ParameterError(
            "{expert_budget} of {needed:.2f} GiB is more than the device holds: {available:.2f} GiB free of "
            "{limit:.2f} GiB after dense weights and other buffers ({in_use:.2f} GiB), KV cache ({kv:.2f} GiB) "
            "and workspace ({workspace:.2f} GiB)",
            needed=needed / 2**30, available=memory.available / 2**30, limit=memory.limit / 2**30,
            in_use=memory.in_use / 2**30, kv=memory.kv_cache / 2**30, workspace=memory.workspace / 2**30,
        )
    if capacity < min_experts:
        raise ParameterError(
            "{expert_budget} of {budget:,} bytes holds {holds}; a step can need {min_experts} at once "
            "(minimum budget {minimum:,} bytes)",
            budget=budget_bytes, holds=plural(capacity, "expert"), min_experts=min_experts,
            minimum=min_experts * expert_bytes,
        )
    return int(capacity)
