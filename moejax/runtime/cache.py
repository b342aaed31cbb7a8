"""The GPU tier: a bounded set of experts on the device, filled by asynchronous copies.

An `ExpertCache` pairs an `ExpertDirectory` (which experts are resident, the policy, the
hit/miss counters) with the device arrays of the resident experts and the host store they
are copied from. Copies (`store.copy_experts`) return at once, and the compute that uses an
expert still being copied is dispatched at once too: the device waits for the copy, while the
host spends that time dispatching (on the H200, LRU without prefetching decoded 32% faster than
when the host waited for the copies first; BENCHMARKS.md). The host then waits for those copies
(`wait_for_copies`), and counts that wait as stall time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import jax

from moejax.models.moe import PackedExpert
from moejax.runtime.directory import ExpertDirectory
from moejax.runtime.policies import CachePolicy, ExpertKey
from moejax.runtime.prefetch import select_prefetch
from moejax.runtime.store import HostExpertStore, copy_experts, device_sharding


@dataclasses.dataclass
class TransferCounters:
    bytes_h2d: int = 0  # host -> device bytes, demand and prefetch
    demand_fetches: int = 0
    prefetch_fetches: int = 0
    streamed: int = 0  # experts copied only to be streamed past (dense-offload)
    stall_s: float = 0.0  # seconds the host waited, its compute dispatched, for copies that compute needed


class ExpertCache:
    def __init__(self, store: HostExpertStore, capacity: int, policy: CachePolicy):
        self.store, self.device = store, store.device
        self.directory = ExpertDirectory(capacity, policy)
        self.sharding = device_sharding(self.device)
        self._on_device: dict[ExpertKey, PackedExpert] = {}  # the resident experts' device arrays
        self.transfers: dict[int, TransferCounters] = {}
        self._prefetches_in_flight: list[tuple[ExpertKey, PackedExpert]] = []
        self._awaited: list[jax.Array] = []  # copies the dispatched compute of the layer in progress reads

    @property
    def capacity(self) -> int:
        return self.directory.capacity

    def _counters(self, layer: int) -> TransferCounters:
        return self.transfers.setdefault(layer, TransferCounters())

    def reset_counters(self) -> None:
        """Zeroes the counters (the cache keeps its contents)."""
        self.transfers.clear()
        self.directory.per_layer.clear()
        self.directory.total = type(self.directory.total)()

    def _copy(self, keys: Sequence[ExpertKey]) -> list[PackedExpert]:
        """Issues one asynchronous host->device copy for all `keys`; returns their device arrays
        (a store already on the device, resident mode, is used as it is)."""
        experts = [self.store.get(k) for k in keys]
        return experts if self.store.on_device else copy_experts(experts, self.sharding)

    def _place(self, keys: Sequence[ExpertKey], prefetch: bool) -> None:
        for key in keys:
            for victim in self.directory.admit(key, prefetch=prefetch):
                del self._on_device[victim]
            # Pinned until all of `keys` are placed, so they cannot evict each other.
            self.directory.pinned.add(key)
        if prefetch:
            self.directory.unpin(keys)
        for key, arrays in zip(keys, self._copy(keys), strict=True):
            self._on_device[key] = arrays
        for key in keys:
            counters = self._counters(key[0])
            counters.bytes_h2d += self.store.expert_bytes
            if prefetch:
                counters.prefetch_fetches += 1
            else:
                counters.demand_fetches += 1

    def prefill(self, keys: Sequence[ExpertKey]) -> None:
        """Places `keys` without counting them (resident mode: the store already is on the device)."""
        for key, arrays in zip(keys, self._copy(keys), strict=True):
            self.directory.admit(key)
            self._on_device[key] = arrays
        self.directory.end_layer()
        self.reset_counters()

    def begin_layer(self, layer: int, experts: Iterable[int]) -> list[ExpertKey]:
        """Counts hits and misses of `experts` (at most `capacity`), pins them and starts copying the misses.

        Returns the keys in increasing expert order.
        """
        hits, misses = self.directory.begin_layer(layer, experts)
        self._place(misses, prefetch=False)
        return sorted(hits + misses)

    def prefetch(self, keys: Iterable[ExpertKey] | Callable[[], Iterable[ExpertKey]], limit: int) -> int:
        """Starts copying up to `limit` of `keys` (in order) that are not resident; returns how many.

        keys: the keys, or a function that returns them, called only when a copy can start (a
        prediction costs the host ~0.1 ms, wasted when the link is already busy).

        Only unpinned experts can be evicted for them, so the layer in progress keeps its experts. At
        most `limit` prefetch copies are unfinished at any time: copies run one after another on the
        link, so prefetches issued while it is backed up would only delay the next demand copies.
        """
        self._prefetches_in_flight = [
            (key, expert) for key, expert in self._prefetches_in_flight
            if self._on_device.get(key) is expert and not expert.flat.is_ready()
        ]
        room = limit - len(self._prefetches_in_flight)
        if room <= 0:
            return 0
        chosen = select_prefetch(self.directory, keys() if callable(keys) else keys, room)
        self._place(chosen, prefetch=True)
        self._prefetches_in_flight += [(key, self._on_device[key]) for key in chosen]
        return len(chosen)

    def experts(self, keys: Sequence[ExpertKey]) -> tuple[PackedExpert, ...]:
        """The device arrays of the resident experts `keys`, copies in flight included: a computation
        given them waits on the device for their copies. `wait_for_copies` then waits on the host."""
        experts = tuple(self._on_device[k] for k in keys)
        self._awaited += [expert.flat for expert in experts if not expert.flat.is_ready()]
        return experts

    def wait_for_copies(self, layer: int) -> None:
        """Waits for the copies the experts given out since the last call still had in flight (counted
        as MoE layer `layer`'s stall)."""
        if self._awaited:
            start = time.perf_counter()
            jax.block_until_ready(self._awaited)
            self._counters(layer).stall_s += time.perf_counter() - start
            self._awaited = []

    def stream(self, keys: Sequence[ExpertKey], layer: int) -> None:
        """Copies experts to the device only to drop them (what layer-wise offloading moves), waiting for them."""
        copies = self._copy(keys)
        counters = self._counters(layer)
        counters.bytes_h2d += len(keys) * self.store.expert_bytes
        counters.streamed += len(keys)
        start = time.perf_counter()
        jax.block_until_ready(copies)
        counters.stall_s += time.perf_counter() - start

    def end_layer(self) -> None:
        self.directory.end_layer()

    def clear(self) -> None:
        """Drops every resident expert (on-demand and dense-offload modes keep nothing between layers)."""
        for key in list(self.directory.resident):
            self.directory.evict(key)
        self._on_device.clear()
