"""The host cache between the disk tier (`offload.expert_files`) and the device cache: three tiers,
disk -> host -> device, for models whose experts exceed host memory (`host_budget`, `--host-budget`).

`HostCache` keeps `num_slots` experts in one page-aligned host buffer, any MoE layer's in any slot (one pool for
all layers, so a skewed layer takes the room it needs), with a table key -> slot (key = MoE layer x E + expert).
It evicts the expert used least by decayed token counts, not the least recently used: the GPU cache's misses
cycle through the layers, a loop larger than the host cache, on which LRU evicts exactly what comes next.
A background thread reads experts ahead of use (`prefetch`: the device prefetcher's staged picks for the next
step, and the experts used most, by decayed token counts, that are not held): the host tier looks one step
further ahead than the device tier. Within a step, a MoE layer's program hands the host the misses it is about
to fetch, in order (`stage`, through `TieredHost.stage`), before fetching the first: the thread reads them one
after another, ahead of any speculative prefetch and kept from eviction until fetched, so the disk reads the
next one while the runtime copies the last to the device, instead of waiting for each copy. Right after, it hands
the host the next MoE layer's likely misses, the next router's guess on this layer's input (`hint`, through
`TieredHost.hint`): read once the staged keys are, so the disk goes on with the next layer's experts while this
layer's are copied and computed, instead of waiting for the next layer's routing; a guess that proves wrong
gives way to the next layer's staged reads at its next chunk.

The step programs read the host tier through `TieredHost.fetch`, a host callback: a hit hands the runtime the
slot's bytes (no copy; see `HostCache`); a miss (the expert is neither held nor arriving) reads it from disk
right there into a slot, so a step never computes with an expert it does not have and results are exact at
every host budget. The buffer is plain (not page-locked) memory, which the runtime copies from. The cost of that miss path is
the device waiting for the disk (counted as `stall_s`, with `disk_misses`), plus, on every fetch through the
tier, a host round trip and the runtime's copy from unpinned host memory instead of the DMA from pinned stacks.
With `cpu_experts='auto'` the misses the host computes (`offload.cpu_experts`) read the cache the same way
(`get_or_record`), from the host's expert-compute callback instead of the device fetch's.

A read that fails its checks (missing file, wrong size, CRC-32) inside a step is recorded rather than raised
through XLA (a traceback from deep inside JAX): the step gets zeros for that expert, and the engine raises
the recorded one-line error (`raise_failure`) when it reads the step, before any of its tokens is returned.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from moejax.errors import MoejaxError
from moejax.offload.expert_files import ExpertFiles, ReadCancelled, aligned_buffer

USAGE_DECAY = 0.9  # per step, for the usage scores the host prefetcher ranks by
HINT_PRECISION = 0.5  # hints are read while at least this share of the recent guesses' keys proved right
HINT_DECAY = 0.8  # per MoE layer step, for that share's running mean
FINISH_PAST = 0.5  # a speculative read past this share of its file is finished, not given up (`_prefetch_loop`)


class HostCache:
    """`num_slots` experts of `files` in host memory. Thread-safe: the step programs' callbacks and the prefetch
    thread share it. `get` returns an expert's weights as read-only arrays over its slot (no copy): a slot is not
    refilled while an array lent from it is alive (a finalizer per array gives it back), so what a reader holds
    never changes under it, however the runtime that receives it copies or keeps it. `prefetch` queues reads."""

    def __init__(self, files: ExpertFiles, num_slots: int, prefetch_per_step: int = 0):
        if num_slots < 1:
            raise MoejaxError("the host cache needs at least one slot")
        self.files, self.num_slots, self.prefetch_per_step = files, num_slots, prefetch_per_step
        self.num_experts = files.num_experts
        self.num_keys = files.num_layers * files.num_experts
        self._buffer = aligned_buffer(num_slots * files.file_bytes)
        self._lock = threading.Condition(threading.RLock())  # re-entrant: a lent array's finalizer may run under it
        self._lent = np.zeros(num_slots, np.int64)  # arrays lent over each slot and still alive
        self._ready: collections.OrderedDict[int, int] = collections.OrderedDict()  # key -> slot, least recent first
        self._loading: dict[int, int] = {}  # key -> slot being read into
        self._owner = np.full(num_slots, -1, np.int64)  # slot -> key (ready or loading), -1: free
        self._free = list(range(num_slots - 1, -1, -1))
        self._unused: dict[int, str] = {}  # key -> the read ahead that brought it (prefetch, hint), until fetched
        self.scores = np.zeros(self.num_keys)  # decayed token counts per key
        self._queue: list[int] = []
        self._staged: list[int] = []  # a layer's misses to read before anything in _queue (`stage`)
        self._hinted: list[int] = []  # the next layer's likely misses, read after _staged, before _queue (`hint`)
        self._guessed: set[int] = set()  # the last hint's keys, judged by the next `stage`
        self.hint_precision = 1.0  # running mean share of a hint's keys that its layer staged
        self._awaited: set[int] = set()  # staged keys not yet fetched: never evicted
        self._read_ahead: set[int] = set()  # of those, the ones not held when staged (their fetch is a disk miss)
        self._wanted: collections.Counter[int] = collections.Counter()  # keys `get`s are fetching: never evicted
        self.staging = True  # False: `stage` does nothing (to measure what staging gains)
        self.hints = True  # False: `hint` does nothing (likewise)
        self.finish_past = FINISH_PAST  # 1: a speculative read is given up wherever it is (likewise)
        self._stop = False
        self._reading, self._busy_since = 0, 0.0  # disk reads under way, since when (`_disk_busy`)
        self._thread: threading.Thread | None = None
        self.failure: MoejaxError | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.counts = dict(gets=0, host_hits=0, disk_misses=0, prefetch_waits=0, disk_reads=0, prefetch_reads=0,
                           prefetch_used=0, prefetch_cancelled=0, staged_reads=0, hint_reads=0, hint_used=0,
                           hint_cancelled=0, evictions=0, uncached_reads=0)
        self.bytes_read = self.bytes_cancelled = 0
        self.disk_read_s = self.stall_s = self.disk_busy_s = 0.0
        self._stats_since = time.perf_counter()  # a read under way at a reset counts from then on

    # -- reads ---------------------------------------------------------------------------------------
    def _slot_view(self, slot: int) -> memoryview:
        size = self.files.file_bytes
        return memoryview(self._buffer)[slot * size : (slot + 1) * size]

    def get(self, layer: int, expert: int) -> dict:
        """Expert `expert` of MoE layer `layer` as read-only {name: array}: from its slot, after waiting for the
        read under way if another thread is reading it, or read from disk now (a stall) into a slot, or past the
        cache when every slot is lent or being read into."""
        key = layer * self.num_experts + expert
        start = time.perf_counter()
        with self._lock:
            self.counts["gets"] += 1
            staged, waited = key in self._read_ahead, False
            self._read_ahead.discard(key)
            # Wanted until lent: once the read under way is done, another thread (the prefetch thread reading the
            # next staged key) may take the lock before this one wakes, and must not evict it meanwhile.
            self._wanted[key] += 1
            try:
                while key in self._loading:
                    waited = True
                    self._lock.wait()
                if key in self._ready:
                    if staged:  # read ahead for this very fetch (`stage`): a miss of the host cache all the same
                        self._ready.move_to_end(key)
                        self.counts["disk_misses"] += 1
                        self.stall_s += time.perf_counter() - start
                    else:
                        self._count_hit(key, waited, start)
                    return self._lend(self._ready[key])
                self.counts["disk_misses"] += 1
                slot = self._reserve(key)
            finally:
                self._wanted[key] -= 1
                if not self._wanted[key]:
                    del self._wanted[key]
        try:
            return self._read_uncached(key) if slot is None else self._read(key, slot)
        finally:
            with self._lock:
                self.stall_s += time.perf_counter() - start

    def get_or_record(self, layer: int, expert: int) -> dict | None:
        """`get` inside a step program: None instead of raising when the read fails, the error kept in `failure`
        (the first of a step; the engine raises it when it reads the step, see the module's docstring)."""
        try:
            return self.get(layer, expert)
        except MoejaxError as err:
            self.failure = self.failure or err
            return None

    def _count_hit(self, key: int, waited: bool, start: float) -> None:
        self._ready.move_to_end(key)
        if waited:
            self.counts["prefetch_waits"] += 1
            self.stall_s += time.perf_counter() - start
        else:
            self.counts["host_hits"] += 1
        kind = self._unused.pop(key, None)
        if kind is not None:
            self.counts[f"{kind}_used"] += 1

    def _lend(self, slot: int) -> dict:
        """The slot's expert as read-only arrays over the slot (lock held); the slot counts them until they die."""
        weights = self.files.unpack(self._slot_view(slot))
        for w in weights.values():
            w.flags.writeable = False
            self._lent[slot] += 1
            weakref.finalize(w, self._give_back, slot)
        return weights

    def _give_back(self, slot: int) -> None:
        with self._lock:
            self._lent[slot] -= 1
            self._lock.notify_all()

    def _victim(self, spare_hints: bool = False) -> int | None:
        """The ready expert used least (decayed token counts; the least recently used of equals) whose slot is not
        lent, that a step has not staged, that no `get` is fetching and, with spare_hints, that no hint brought
        and no fetch has used yet (lock held), or None."""
        candidates = [key for key, slot in self._ready.items() if not self._lent[slot] and key not in self._awaited
                      and key not in self._wanted and not (spare_hints and self._unused.get(key) == "hint")]
        return min(candidates, key=lambda key: self.scores[key]) if candidates else None

    def _reserve(self, key: int, spare_hints: bool = False) -> int | None:
        """A slot for `key` (lock held): a free one, else `_victim(spare_hints)`'s; None if there is neither."""
        if self._free:
            slot = self._free.pop()
        else:
            victim = self._victim(spare_hints)
            if victim is None:
                return None
            slot = self._ready.pop(victim)
            self._unused.pop(victim, None)
            self.counts["evictions"] += 1
        self._loading[key] = slot
        self._owner[slot] = key
        return slot

    def _read(self, key: int, slot: int, prefetch: str | None = None, cancelled=None) -> dict | None:
        """Reads `key` into its reserved `slot` (lock not held) -> its weights (lent before another thread can
        evict it), or None for a read ahead (prefetch 'prefetch': speculative; 'staged': a step's, `stage`; 'hint':
        the next layer's guess, `hint`). On failure, or once `cancelled()` (ReadCancelled), the slot is freed and
        the error raised."""
        layer, expert = divmod(key, self.num_experts)
        start = time.perf_counter()
        try:
            with self._disk_busy():
                self.files.read_into(layer, expert, self._slot_view(slot), cancelled=cancelled)
        except BaseException:
            with self._lock:
                del self._loading[key]
                self._owner[slot] = -1
                self._free.append(slot)
                self._lock.notify_all()
            raise
        with self._lock:
            self.disk_read_s += time.perf_counter() - start
            self.bytes_read += self.files.file_bytes
            self.counts[f"{prefetch}_reads" if prefetch else "disk_reads"] += 1
            del self._loading[key]
            self._ready[key] = slot
            self._lock.notify_all()
            if prefetch in ("prefetch", "hint"):
                self._unused[key] = prefetch
            return None if prefetch else self._lend(slot)

    @contextlib.contextmanager
    def _disk_busy(self):
        """Around a disk read (lock not held): adds to `disk_busy_s` the wall time during which any read was under
        way (the steps' reads and the prefetch thread's overlap: `disk_read_s` sums their durations)."""
        with self._lock:
            if not self._reading:
                self._busy_since = time.perf_counter()
            self._reading += 1
        try:
            yield
        finally:
            with self._lock:
                self._reading -= 1
                if not self._reading:
                    self.disk_busy_s += time.perf_counter() - max(self._busy_since, self._stats_since)

    def _read_uncached(self, key: int) -> dict:
        """Reads `key` into a buffer of its own, not cached (every slot is lent or being read into)."""
        layer, expert = divmod(key, self.num_experts)
        buffer, start = aligned_buffer(self.files.file_bytes), time.perf_counter()
        with self._disk_busy():
            self.files.read_into(layer, expert, buffer)
        with self._lock:
            self.disk_read_s += time.perf_counter() - start
            self.bytes_read += self.files.file_bytes
            self.counts["disk_reads"] += 1
            self.counts["uncached_reads"] += 1
        return self.files.unpack(buffer)

    # -- prefetching ---------------------------------------------------------------------------------
    def observe(self, counts: np.ndarray, staged_keys=None) -> None:
        """After a step: its token counts [L, E] update the usage scores; queues the device prefetcher's staged keys
        for the next step (int [P], -1: none), then the most used experts not held, up to `prefetch_per_step`."""
        self.scores = USAGE_DECAY * self.scores + counts.reshape(-1)
        if not self.prefetch_per_step:
            return
        wanted = [int(k) for k in (() if staged_keys is None else np.asarray(staged_keys).reshape(-1)) if k >= 0]
        with self._lock:
            held = set(self._ready) | set(self._loading)
        for key in np.argsort(-self.scores, kind="stable"):
            if len(wanted) >= self.prefetch_per_step or self.scores[key] <= 0:
                break
            if int(key) not in held and int(key) not in wanted:
                wanted.append(int(key))
        self.prefetch(wanted[: self.prefetch_per_step])

    def prefetch(self, keys: list[int]) -> None:
        """Queues reads of `keys` (replacing the reads queued before and not begun), best first."""
        with self._lock:
            self._queue = [k for k in keys if k not in self._ready and k not in self._loading]
            self._wake_reader(self._queue)

    def stage(self, keys) -> None:
        """A step's misses of one MoE layer (int [P], -1: none), in the order it is about to fetch them: read by the
        prefetch thread one after another before any queued prefetch, without `_worth_a_slot`'s test, and not
        evicted until fetched (the keys staged before and not yet read are dropped: their layer is done). Nothing
        while `staging` is False."""
        keys = [int(k) for k in np.asarray(keys).reshape(-1) if k >= 0]
        with self._lock:
            if self._guessed:  # the guess for this layer, judged whether or not it was read
                right = len(self._guessed & set(keys)) / len(self._guessed)
                self.hint_precision = HINT_DECAY * self.hint_precision + (1 - HINT_DECAY) * right
                self._guessed = set()
            if not self.staging:
                return
            self._awaited = set(keys)
            self._staged = [k for k in keys if k not in self._ready and k not in self._loading]
            self._read_ahead = set(self._staged)
            self._hinted = []  # this layer's guesses: its misses are known now
            self._wake_reader(self._staged)

    def hint(self, keys) -> None:
        """The next MoE layer's likely misses (int [P], -1: none; most likely first), handed over right after this
        layer's `stage`: read by the prefetch thread once the staged keys are, before any queued prefetch and
        without `_worth_a_slot`'s test, but like a speculative read given up at its next chunk when a layer
        stages keys it is not one of (the hints before are dropped). Nothing while `hints` is False, nor while
        `hint_precision` (the running share of the guessed keys that the next `stage` named, updated whether
        the hints were read or not) is below HINT_PRECISION: wrong guesses would cost disk time and evict
        experts."""
        keys = [int(k) for k in np.asarray(keys).reshape(-1) if k >= 0]
        with self._lock:
            self._guessed = set(keys)
            if not self.hints or self.hint_precision < HINT_PRECISION:
                return
            self._hinted = [k for k in keys if k not in self._ready and k not in self._loading]
            self._wake_reader(self._hinted)

    def _wake_reader(self, work: list[int]) -> None:
        """Starts the prefetch thread if there is `work` and none runs yet, and wakes it (lock held)."""
        if work and self._thread is None:
            self._thread = threading.Thread(target=self._prefetch_loop, name="moejax-host-prefetch", daemon=True)
            self._thread.start()
        self._lock.notify_all()

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                while not self._staged and not self._hinted and not self._queue and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                kind = "staged" if self._staged else "hint" if self._hinted else "prefetch"
                key = (self._staged or self._hinted or self._queue).pop(0)
                if key in self._ready or key in self._loading or (kind == "prefetch" and not self._worth_a_slot(key)):
                    continue
                if kind == "staged" and key not in self._awaited:
                    continue  # fetched already (read by the step itself)
                # A speculative prefetch never evicts a guess of the next layer read for a hint and not fetched yet.
                slot = self._reserve(key, spare_hints=kind == "prefetch")
                if slot is None:
                    continue  # every slot lent or staged: the step reads it itself
            # A speculative read or a hint's gives way to a step's staged ones (unless its key is staged or being
            # fetched): it would otherwise delay them by up to a whole read. Giving up wastes the disk time spent,
            # so a speculative read (a used expert, most often used later) is finished once past `finish_past` of
            # its file, delaying the staged reads by less than the rest of it; a hint proven wrong is given up.
            finish_at = self.finish_past * self.files.file_bytes if kind == "prefetch" else float("inf")
            cancelled = None if kind == "staged" else (
                lambda done, key=key: done < finish_at and bool(self._staged) and key not in self._awaited
                and key not in self._wanted)
            try:
                self._read(key, slot, prefetch=kind, cancelled=cancelled)
            except ReadCancelled as err:
                with self._lock:
                    self.counts[f"{kind}_cancelled"] += 1
                    self.bytes_cancelled += err.bytes_read
            except MoejaxError:
                pass  # a bad file is reported by the step that needs it (its read is repeated there)

    def _worth_a_slot(self, key: int) -> bool:
        """A prefetch takes a free slot, or evicts `_victim` (sparing unfetched hints) only if that one is used
        less."""
        if self._free:
            return True
        victim = self._victim(spare_hints=True)
        return victim is not None and self.scores[victim] < self.scores[key]

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- state ---------------------------------------------------------------------------------------
    def held(self) -> set[int]:
        """Keys whose weights are in a slot."""
        with self._lock:
            return set(self._ready)

    def check_invariants(self) -> None:
        """Raises AssertionError unless every slot holds at most one key, every key at most one slot, and the
        tables agree (tests)."""
        with self._lock:
            slots = list(self._ready.values()) + list(self._loading.values())
            assert len(slots) == len(set(slots)), "a slot holds two experts"
            assert not set(self._ready) & set(self._loading), "an expert both ready and loading"
            assert sorted(slots + self._free) == list(range(self.num_slots)), "slots lost or duplicated"
            for key, slot in list(self._ready.items()) + list(self._loading.items()):
                assert self._owner[slot] == key, f"slot {slot} owned by {self._owner[slot]}, table says {key}"
            assert all(self._owner[s] == -1 for s in self._free), "a free slot has an owner"
            assert (self._lent >= 0).all(), "a slot given back more often than lent"
            assert not any(self._lent[s] for s in self._free + list(self._loading.values())), "a lent slot refilled"

    def stats(self) -> dict:
        """Counters since the last reset (and host_slots, host_bytes, file_bytes: one expert's file, padded, in the
        engine's expert format): gets (expert fetches through the tier), host_hits, disk_misses (read from disk while
        a step waited, by its own read or the one it staged), prefetch_waits (the step waited for a prefetch under
        way), host_hit_rate, disk_reads / prefetch_reads / prefetch_used / staged_reads (the reads of what steps
        staged: `stage`), prefetch_cancelled (speculative reads given up for staged ones), hint_reads / hint_used /
        hint_cancelled (the same of the next layer's guesses: `hint`; hint_precision: the running share of their keys
        that proved right), evictions, uncached_reads (disk reads past the cache: every slot was lent or being read
        into), bytes_read_disk (all reads but the given-up ones), bytes_cancelled (what the given-up reads had read:
        disk time spent for nothing), disk_read_s (seconds reading, summed over the threads), disk_busy_s (seconds
        during which any read was under way), stall_s (seconds steps waited on the disk)."""
        with self._lock:
            counts = dict(self.counts)
            gets = counts["gets"]
            return {"host_slots": self.num_slots, "host_bytes": self.num_slots * self.files.file_bytes,
                    "file_bytes": self.files.file_bytes, **counts,
                    "host_hit_rate": counts["host_hits"] / gets if gets else 0.0, "hint_precision": self.hint_precision,
                    "bytes_read_disk": self.bytes_read, "bytes_cancelled": self.bytes_cancelled,
                    "disk_read_s": self.disk_read_s, "disk_busy_s": self.disk_busy_s, "stall_s": self.stall_s,
                    "expert_dir": str(self.files.root)}


_CACHES: weakref.WeakValueDictionary[int, HostCache] = weakref.WeakValueDictionary()  # what a tier id names
_TIER_IDS = itertools.count(1)


@jax.tree_util.register_pytree_node_class
class TieredHost:
    """What the step programs take as `host` when experts live on disk: one leaf, the id of `cache` (int32), and
    `fetch`, the host callback that reads the cache the id names. The programs depend only on the experts'
    shapes, so engines of one model share them whatever their host cache."""

    def __init__(self, cache: HostCache):
        self.cache, self.shapes = cache, cache.files.shapes
        self.tier_id = next(_TIER_IDS)
        _CACHES[self.tier_id] = cache

    def tree_flatten(self):
        return (self.tier_id,), tuple((name, shape, dtype) for name, (shape, dtype) in self.shapes.items())

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Inside a program: the tier without its cache (the callback finds it by id)."""
        tier = object.__new__(cls)
        tier.cache, tier.shapes = None, {name: (shape, dtype) for name, shape, dtype in aux}
        (tier.tier_id,) = children
        return tier

    def stage(self, keys, after):
        """Inside a step program, before a MoE layer's misses are fetched: hands the host cache their keys
        (`HostCache.stage`; int32 [U], layer x E + expert, in fetch order, -1: none) -> `after` (any array) once
        the call is made: what the fetches are computed from, so that they follow it."""
        done = io_callback(_stage, jax.ShapeDtypeStruct((), jnp.int32), jnp.asarray(self.tier_id, jnp.int32), keys,
                           ordered=False)
        return jax.lax.optimization_barrier((after, done))[0]

    def hint(self, keys, after):
        """Inside a step program, after a MoE layer's `stage`: hands the host cache the next layer's likely misses
        (`HostCache.hint`; int32 [P], layer x E + expert, -1: none) -> `after` once the call is made."""
        done = io_callback(_hint, jax.ShapeDtypeStruct((), jnp.int32), jnp.asarray(self.tier_id, jnp.int32), keys,
                           ordered=False)
        return jax.lax.optimization_barrier((after, done))[0]

    def fetch(self, layer, expert) -> dict:
        """Inside a step program: expert `expert` of MoE layer `layer` (traced ints) on the device."""
        result = {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in self.shapes.items()}
        return jax.pure_callback(functools.partial(_get, self.shapes), result, jnp.asarray(self.tier_id, jnp.int32),
                                 layer, expert)

    def raise_failure(self) -> None:
        """Raises the first failed read since the last call (see the module's docstring)."""
        failure, self.cache.failure = self.cache.failure, None
        if failure is not None:
            raise failure


def _stage(tier_id, keys) -> np.ndarray:
    _CACHES[int(tier_id)].stage(keys)
    return np.int32(0)


def _hint(tier_id, keys) -> np.ndarray:
    _CACHES[int(tier_id)].hint(keys)
    return np.int32(0)


def _get(shapes: dict, tier_id, layer, expert) -> dict:
    weights = _CACHES[int(tier_id)].get_or_record(int(layer), int(expert))
    if weights is None:
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
    return weights
