"""Cache replacement policies for experts, behind one small interface.

The same policy objects serve the engine's GPU expert cache and the policy lab's trace replay.
A key is (moe_layer, expert). The directory (`runtime.directory`) tells the policy about
every access, insertion and eviction in order, and asks it for a victim among the resident,
unpinned experts. `now` is the directory's logical clock (one tick per access).

To add a policy: subclass `CachePolicy`, implement `victim` (and whatever hooks it needs),
and register it in `POLICIES` (or pass an instance to the directory directly).
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def on_sequence_start(self) -> None:
        """A new sequence (request) begins."""

    def victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """The expert to evict, chosen among `candidates` (resident, not pinned, non-empty)."""
        raise NotImplementedError


class LRU(CachePolicy):
    """Evicts the least recently used expert."""

    name = "lru"

    def __init__(self):
        self.last_use: dict[ExpertKey, int] = {}

    def on_access(self, key, now, hit):
        self.last_use[key] = now

    def on_insert(self, key, now):
        self.last_use.setdefault(key, now)

    def on_evict(self, key):
        self.last_use.pop(key, None)

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))


class LFU(CachePolicy):
    """Evicts the expert used least often since it was inserted; ties go to the least recently used."""

    name = "lfu"

    def __init__(self):
        self.uses: dict[ExpertKey, int] = {}
        self.last_use: dict[ExpertKey, int] = {}

    def on_access(self, key, now, hit):
        self.uses[key] = self.uses.get(key, 0) + 1
        self.last_use[key] = now

    def on_insert(self, key, now):
        self.uses.setdefault(key, 0)
        self.last_use.setdefault(key, now)

    def on_evict(self, key):
        self.uses.pop(key, None)
        self.last_use.pop(key, None)

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.uses.get(k, 0), self.last_use.get(k, -1), k))


class FIFO(CachePolicy):
    """Evicts the expert that was inserted first."""

    name = "fifo"

    def __init__(self):
        self.inserted: dict[ExpertKey, int] = {}
        self.order = 0

    def on_insert(self, key, now):
        self.order += 1
        self.inserted[key] = self.order

    def on_evict(self, key):
        self.inserted.pop(key, None)

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.inserted.get(k, 0), k))


class LIFO(FIFO):
    """Evicts the expert inserted last (the expert buffering of Huang et al., "Toward Efficient Inference for MoE")."""

    name = "lifo"

    def victim(self, candidates, now):
        return max(candidates, key=lambda k: (self.inserted.get(k, 0), k))


POLICIES: dict[str, type[CachePolicy]] = {cls.name: cls for cls in (LRU, LFU, FIFO, LIFO)}


def make_policy(name: str, **options) -> CachePolicy:
    """A fresh policy by name; `options` go to its constructor."""
    if name not in POLICIES:
        raise MoejaxError(f"--cache-policy '{name}' is not one of {', '.join(POLICIES)}")
    return POLICIES[name](**options)
