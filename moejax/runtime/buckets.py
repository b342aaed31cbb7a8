"""Shape buckets: a few fixed (batch, length) sizes so compiled functions are reused."""

from __future__ import annotations


def next_power_of_two(n: int, minimum: int = 1) -> int:
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def batch_bucket(batch: int) -> int:
    """1, 2, 4, 8, ... rows."""
    return next_power_of_two(batch)


def prompt_bucket(length: int) -> int:
    """Prefill length: 16, 32, 64, ... tokens."""
    return next_power_of_two(length, 16)


def cache_bucket(length: int) -> int:
    """KV cache slots: 64, 128, 256, ... positions."""
    return next_power_of_two(length, 64)


def expert_bucket(count: int, top_k: int, num_experts: int) -> int:
    """Experts per expert-function call: top_k, 2 top_k, 4 top_k, ... (at most max(count, num_experts)).

    Each distinct count compiles its own program (the experts are unrolled in it), so a prompt
    whose layers use 37, 41, 44 ... distinct experts would compile one per count; padded to these
    sizes it compiles a handful. A decode step of one sequence uses exactly top_k: no padding.
    """
    if count <= 0:
        return count
    return min(next_power_of_two(-(-count // top_k)) * top_k, max(count, num_experts))
