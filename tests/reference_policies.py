"""The slow, obviously-right twins of the device cache's policies (`moejax.offload.device_cache`): cache
replacement policies as Python objects, one decision at a time (the engine of issues 2-4 ran them).

A key is (moe_layer, expert). The directory (`reference_directory`) tells the policy about
every access, insertion and eviction in order, and asks it for a victim among the resident,
unpinned experts. `now` is the directory's logical clock (one tick per access).

`victim(candidates, now)` is the definition of a policy's choice; `select_victim(resident, pinned,
now)` is what the directory calls, and policies override it with an index (a heap, a score array)
that finds the same victim without listing every resident expert. Tests hold the two equal.

To add a policy: subclass `CachePolicy`, implement `victim` (and whatever hooks it needs),
and register it in `POLICIES` (or pass an instance to the directory directly).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence, Set

import numpy as np

from moejax.errors import MoejaxError

ExpertKey = tuple[int, int]


class CachePolicy:
    name = "base"

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        """An expert was used by a layer (after insertion on a miss)."""

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """An expert became resident (demand fetch or prefetch)."""

    def on_evict(self, key: ExpertKey) -> None:
        """An expert left the cache."""

    def on_layer(self, layer: int) -> None:
        """The engine is about to compute MoE layer `layer` (known before its accesses)."""

    def on_routing(self, layer: int, counts: np.ndarray) -> None:
        """Token counts [E] of MoE layer `layer`'s routing in the step about to run (before `on_layer`)."""

    def on_sequence_start(self, task: str | None = None) -> None:
        """A new sequence (request) begins, with an optional task label."""

    def victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """The expert to evict, chosen among `candidates` (resident, not pinned, non-empty)."""
        raise NotImplementedError

    def select_victim(self, resident: Set[ExpertKey], pinned: Set[ExpertKey], now: int) -> ExpertKey | None:
        """`victim` among resident experts that are not pinned; None if there is none."""
        candidates = [k for k in resident if k not in pinned]
        return self.victim(candidates, now) if candidates else None


class RankedPolicy(CachePolicy):
    """A policy whose order of a resident expert changes only at that expert's own events.

    Each resident key has a rank (a tuple; the smallest is evicted first, ties by key). A heap with
    lazy deletion finds the victim in O(log n): stale entries are skipped when they surface, pinned
    ones are set aside and pushed back.
    """

    def __init__(self):
        self.rank: dict[ExpertKey, tuple] = {}
        self._heap: list[tuple[tuple, ExpertKey]] = []

    def set_rank(self, key: ExpertKey, rank: tuple) -> None:
        self.rank[key] = rank
        heapq.heappush(self._heap, (rank, key))
        if len(self._heap) > 4 * len(self.rank) + 64:
            self._heap = [(r, k) for k, r in self.rank.items()]
            heapq.heapify(self._heap)

    def on_evict(self, key):
        self.rank.pop(key, None)

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.rank[k], k))

    def select_victim(self, resident, pinned, now):
        heap, set_aside, found = self._heap, [], None
        while heap:
            rank, key = heap[0]
            if self.rank.get(key) != rank or key not in resident:
                heapq.heappop(heap)
            elif key in pinned:
                set_aside.append(heapq.heappop(heap))
            else:
                found = key
                break
        for item in set_aside:
            heapq.heappush(heap, item)
        return found


class LRU(RankedPolicy):
    """Evicts the least recently used expert."""

    name = "lru"

    def on_access(self, key, now, hit):
        self.set_rank(key, (now,))

    def on_insert(self, key, now):
        if key not in self.rank:
            self.set_rank(key, (now,))


class LFU(RankedPolicy):
    """Evicts the expert used least often since it was inserted; ties go to the least recently used."""

    name = "lfu"

    def on_access(self, key, now, hit):
        uses = self.rank[key][0] if key in self.rank else 0
        self.set_rank(key, (uses + 1, now))

    def on_insert(self, key, now):
        if key not in self.rank:
            self.set_rank(key, (0, now))


class FIFO(RankedPolicy):
    """Evicts the expert that was inserted first."""

    name = "fifo"

    def __init__(self):
        super().__init__()
        self.order = 0

    def on_insert(self, key, now):
        self.order += 1
        self.set_rank(key, (self.order,))


class LIFO(FIFO):
    """Evicts the expert inserted last (the expert buffering of Huang et al., "Toward Efficient Inference for MoE")."""

    name = "lifo"

    def on_insert(self, key, now):
        self.order += 1
        self.set_rank(key, (-self.order,))


class Belady(RankedPolicy):
    """Belady's MIN: evicts the expert whose next use is farthest in the future (ties: the largest key).

    Offline optimal eviction for demand fetching, hence an upper bound for any policy without
    prefetching. `future` is the whole sequence of layer steps the replay will run, as
    (moe_layer, experts needed) pairs in order; each `on_layer` call advances one step.
    """

    name = "belady"
    NEVER = 1 << 62

    def __init__(self, future: Iterable[tuple[int, Iterable[int]]]):
        super().__init__()
        self.layers: list[int] = []
        self.uses: dict[ExpertKey, list[int]] = {}
        for step, (layer, experts) in enumerate(future):
            self.layers.append(int(layer))
            for expert in set(int(e) for e in experts):
                self.uses.setdefault((int(layer), expert), []).append(step)
        self._next: dict[ExpertKey, int] = {}  # index into uses[key] of the first use after `step`
        self.step = -1

    def on_layer(self, layer):
        self.step += 1
        if self.step >= len(self.layers) or self.layers[self.step] != layer:
            raise MoejaxError("belady: the replay left the future access sequence it was given")

    def next_use(self, key: ExpertKey) -> int:
        """The first step after the current one that needs `key` (NEVER if none)."""
        uses = self.uses.get(key, ())
        i = self._next.get(key, 0)
        while i < len(uses) and uses[i] <= self.step:
            i += 1
        self._next[key] = i
        return uses[i] if i < len(uses) else self.NEVER

    def _update(self, key):
        self.set_rank(key, (-self.next_use(key), -key[0], -key[1]))

    def on_access(self, key, now, hit):
        self._update(key)

    def on_insert(self, key, now):
        self._update(key)


POLICIES: dict[str, type[CachePolicy]] = {cls.name: cls for cls in (LRU, LFU, FIFO, LIFO, Belady)}
# What an engine can run: every policy but belady, which needs the whole future access sequence.
ONLINE_POLICIES = tuple(name for name, cls in POLICIES.items() if cls is not Belady)


def make_policy(name: str, *, future=None) -> CachePolicy:
    """A fresh policy by name; belady needs `future`, the whole access sequence."""
    if name not in POLICIES:
        raise MoejaxError(f"cache policy '{name}' is not one of {', '.join(POLICIES)}")
    if name == "belady":
        if future is None:
            raise MoejaxError("belady needs the future access sequence: lab only")
        return Belady(future)
    return POLICIES[name]()
