"""Shape buckets: steps padded to a few sizes (powers of two), so compiled programs are reused."""

from __future__ import annotations


def next_power_of_two(n: int, minimum: int = 1) -> int:
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size
