"""Shape buckets: steps padded to a few sizes (powers of two), so compiled programs are reused."""

from __future__ import annotations


def next_power_of_two(n: int, minimum: int = 1) -> int:
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size


def prefill_chunk_size(tokens: int, prefill_chunk: int) -> int:
    """Positions a prefill chunk of `tokens` prompt tokens computes (at most `prefill_chunk`)."""
    return min(next_power_of_two(tokens, 16), prefill_chunk)


def padded_prompt_tokens(tokens: int, prefill_chunk: int) -> int:
    """Positions the prefill of a `tokens`-token prompt computes over its chunks."""
    full, rest = divmod(tokens, prefill_chunk)
    return full * prefill_chunk + (prefill_chunk_size(rest, prefill_chunk) if rest else 0)
