"""Admitting a prefetcher's picks into the host-routed engine's expert directory."""

from __future__ import annotations

from collections.abc import Iterable

from reference_directory import ExpertDirectory
from reference_policies import ExpertKey


def select_prefetch(directory: ExpertDirectory, keys: Iterable[ExpertKey], limit: int) -> list[ExpertKey]:
    """Up to `limit` of `keys`, in order, that are not resident, while unpinned or free slots remain for them."""
    chosen: list[ExpertKey] = []
    seen: set[ExpertKey] = set()
    room = directory.evictable() + directory.free
    for key in keys:
        if len(chosen) >= limit or len(chosen) >= room:
            break
        if key not in directory and key not in seen:
            chosen.append(key)
            seen.add(key)
    return chosen


def prefetch_into(directory: ExpertDirectory, keys: Iterable[ExpertKey], limit: int) -> list[ExpertKey]:
    """Admits (prefetch=True) the keys `select_prefetch` picks; returns them.

    Only unpinned experts are evicted for them (the layer in progress keeps its experts), and the
    admitted keys are pinned until all are placed, so they cannot evict each other.
    """
    chosen = select_prefetch(directory, keys, limit)
    for key in chosen:
        directory.admit(key, prefetch=True)
        directory.pinned.add(key)
    directory.unpin(chosen)
    return chosen
