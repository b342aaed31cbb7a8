"""Bookkeeping of a bounded expert cache: which experts are resident, pinned, prefetched; counters.

No arrays live here: the engine's GPU cache pairs a directory with device buffers, and the
policy lab replays traces through a directory alone, so both count hits the same way.

Per MoE layer step, the caller:
  1. `begin_layer(layer, needed)`: counts hits and misses of the distinct experts the layer
     needs, pins the resident ones (they cannot be evicted while the layer runs);
  2. `admit(key)` for each miss it fetches (evicting per the policy when full);
  3. `end_layer()`: unpins.
Prefetches are `admit(key, prefetch=True)` at any time; a prefetched expert counts as used
at its first hit and as wasted if evicted before one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from moejax.errors import MoejaxError
from reference_policies import CachePolicy, ExpertKey


@dataclasses.dataclass
class DirectoryCounters:
    activations: int = 0  # distinct (layer, expert) needed per layer step
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.activations if self.activations else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetched experts used before eviction."""
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the accesses that would have missed without prefetching (used prefetches + misses)
        that a prefetch covered."""
        would_miss = self.prefetch_used + self.misses
        return self.prefetch_used / would_miss if would_miss else 0.0


class ExpertDirectory:
    def __init__(self, capacity: int, policy: CachePolicy, num_layers: int | None = None):
        if capacity < 1:
            raise MoejaxError(f"expert cache capacity must be at least 1 expert (got {capacity})")
        self.capacity, self.policy = capacity, policy
        self.resident: set[ExpertKey] = set()
        self.pinned: set[ExpertKey] = set()
        self._miss_ticks: dict[ExpertKey, int] = {}  # tick of each miss of the step in progress
        self.unused_prefetches: set[ExpertKey] = set()
        self.now = 0
        self.total = DirectoryCounters()
        self.per_layer: dict[int, DirectoryCounters] = {}
        self.num_layers = num_layers

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self.resident

    @property
    def free(self) -> int:
        return self.capacity - len(self.resident)

    def _layer(self, layer: int) -> DirectoryCounters:
        counters = self.per_layer.get(layer)
        if counters is None:
            counters = self.per_layer[layer] = DirectoryCounters()
        return counters

    def begin_layer(self, layer: int, needed: Iterable[int]) -> tuple[list[ExpertKey], list[ExpertKey]]:
        """Counts and pins; returns (hits, misses) as keys in increasing expert order."""
        self.policy.on_layer(layer)
        hits, misses = [], []
        for expert in sorted(set(needed)):
            key = (layer, expert)
            self.now += 1
            if key in self.resident:
                hits.append(key)
                self.pinned.add(key)
                self.policy.on_access(key, self.now, hit=True)
                if key in self.unused_prefetches:
                    self.unused_prefetches.discard(key)
                    self.total.prefetch_used += 1
                    self._layer(layer).prefetch_used += 1
            else:
                misses.append(key)
                self._miss_ticks[key] = self.now
        for counters in (self.total, self._layer(layer)):
            counters.activations += len(hits) + len(misses)
            counters.hits += len(hits)
            counters.misses += len(misses)
        return hits, misses

    def admit(self, key: ExpertKey, prefetch: bool = False, pin: bool = True) -> list[ExpertKey]:
        """Makes `key` resident, evicting per the policy; returns the evicted keys.

        A demand admission (prefetch=False) is an access of the layer in progress and is pinned.
        """
        if key in self.resident:
            return []
        evicted = []
        while self.free < 1:
            victim = self.policy.select_victim(self.resident, self.pinned, self.now)
            if victim is None:
                raise MoejaxError(
                    f"expert cache of {self.capacity} experts is full of experts in use; cannot admit {key}"
                )
            self.evict(victim)
            evicted.append(victim)
        self.resident.add(key)
        self.policy.on_insert(key, self.now)
        if prefetch:
            self.unused_prefetches.add(key)
            self.total.prefetch_issued += 1
            self._layer(key[0]).prefetch_issued += 1
        else:
            # A miss is an access at its own tick of begin_layer: a step's accesses are in expert order.
            self.policy.on_access(key, self._miss_ticks.pop(key, self.now), hit=False)
            if pin:
                self.pinned.add(key)
        return evicted

    def evict(self, key: ExpertKey) -> None:
        self.resident.discard(key)
        self.pinned.discard(key)
        self.policy.on_evict(key)
        self.total.evictions += 1
        self._layer(key[0]).evictions += 1
        if key in self.unused_prefetches:
            self.unused_prefetches.discard(key)
            self.total.prefetch_wasted += 1
            self._layer(key[0]).prefetch_wasted += 1

    def unpin(self, keys: Iterable[ExpertKey]) -> None:
        self.pinned.difference_update(keys)

    def end_layer(self) -> None:
        self.pinned.clear()
        self._miss_ticks.clear()

    def evictable(self) -> int:
        """How many resident experts could be evicted now."""
        return len(self.resident) - len(self.pinned)
