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
