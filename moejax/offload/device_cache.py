"""The expert cache's bookkeeping as pure JAX: which (MoE layer, expert) sits in which slot, and the
replacement policy, updated inside the engine's step programs (and replayed by the policy lab).

A key is `layer * E + expert`. `CacheState` holds the slot table (key -> slot), each slot's key and
the per-slot numbers the policies rank by, and per-layer counters. The engine pairs it with a slab
of expert weights (`offload.slab`): `access` calls `move(slab, expert, slot)` for every miss, in a
loop whose trip count is the number of misses, so a step that hits everywhere moves nothing.

Per MoE layer step (one call of `access`): the distinct experts the step needs, in increasing order,
each take one tick of the clock; hits are pinned first (a layer never evicts what it uses), then
each miss evicts the policy's victim among unpinned slots (empty slots first, lowest index first)
and is pinned in turn. Prefetches (`install`) admit experts the same way, marked as prefetched: a
prefetched expert counts as used at its first hit and as wasted if evicted before one. A wide step (one
needing so many of its layer's experts that missing them would copy the layer whole) evicts nothing: its
misses take empty slots, else it copies its layer whole and lets its resident experts go (`copies_whole`,
`access`): under wide batches, which need every layer in turn, recency would evict each layer just before its
next use; this way the cache comes to hold whole layers and copies only the others.

Policies (static names), each the victim with the smallest score, ties to the lowest slot:
  lru        last use
  lfu        uses since insertion, then last use
  fifo       insertion order
  lifo       reverse insertion order
  priority   a score per key from the host, `Priorities`: the activation-aware policy's expected
             next use and, where the future is known (lab, benchmarks), Belady's next use; the
             largest expected next use is evicted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Per MoE layer: distinct experts needed per step (activations), hits, misses, evictions, prefetches admitted
# (issued; of which `prefetch_staged` came from the host's staging), used and wasted, and experts copied only to
# be streamed past (dense-offload).
COUNTERS = ("activations", "hits", "misses", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted",
            "prefetch_staged", "streamed")
(ACTIVATIONS, HITS, MISSES, EVICTIONS, PREFETCH_ISSUED, PREFETCH_USED, PREFETCH_WASTED, PREFETCH_STAGED,
 STREAMED) = range(len(COUNTERS))
DEVICE_POLICIES = ("lru", "lfu", "fifo", "lifo", "priority")


@flax.struct.dataclass
class CacheState:
    """The cache of S slots over L MoE layers of E experts (all int32 unless stated)."""

    table: jax.Array  # [L * E]: slot of each key, -1 when not resident
    slot_key: jax.Array  # [S]: key of each slot, -1 when empty
    last_use: jax.Array  # [S]: clock tick of the last access (or of the prefetch)
    uses: jax.Array  # [S]: accesses since insertion
    inserted: jax.Array  # [S]: insertion order
    prefetched: jax.Array  # bool [S]: admitted by a prefetch and not used since
    clock: jax.Array  # []: accesses so far
    inserts: jax.Array  # []: insertions so far
    counters: jax.Array  # [L, len(COUNTERS)]

    @property
    def num_slots(self) -> int:
        return self.slot_key.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counters.shape[0]


@flax.struct.dataclass
class Priorities:
    """Host-given eviction scores for the `priority` policy, float32 [L, E] each: the expected next use
    of a key (larger: evicted sooner) while a layer before its own runs (`ahead`) and while its own
    layer or a later one runs (`behind`)."""

    ahead: jax.Array
    behind: jax.Array


def empty_state(num_layers: int, num_experts: int, num_slots: int) -> CacheState:
    """A cache with every slot empty (each field its own buffer: the state is donated to step programs)."""
    slots = lambda: jnp.zeros(num_slots, jnp.int32)  # noqa: E731
    return CacheState(
        table=jnp.full(num_layers * num_experts, -1, jnp.int32), slot_key=jnp.full(num_slots, -1, jnp.int32),
        last_use=slots(), uses=slots(), inserted=slots(), prefetched=jnp.zeros(num_slots, bool),
        clock=jnp.int32(0), inserts=jnp.int32(0), counters=jnp.zeros((num_layers, len(COUNTERS)), jnp.int32))


def full_state(num_layers: int, num_experts: int) -> CacheState:
    """A cache of L * E slots holding every key in its own slot (slot = key): the resident mode."""
    state = empty_state(num_layers, num_experts, num_layers * num_experts)
    keys = jnp.arange(num_layers * num_experts, dtype=jnp.int32)
    return state.replace(table=keys, slot_key=keys)


def reset_counters(state: CacheState) -> CacheState:
    """Zero counters; prefetches admitted before stay in their slots but are no longer marked, so that counts
    since a reset never call used or wasted a prefetch issued before it (used + wasted <= issued)."""
    return state.replace(counters=jnp.zeros_like(state.counters), prefetched=jnp.zeros_like(state.prefetched))


def _count(counters, layer, column, amount):
    """counters [L, len(COUNTERS)] with `amount` added to column `column` (an int, or a tuple of ints: each of them)
    of row `layer`: one update of the row, however many columns."""
    return counters.at[layer].add(jnp.where(_columns(counters, column), amount.astype(jnp.int32), 0))


def _columns(counters, column) -> np.ndarray:
    """bool [len(COUNTERS)]: which columns of counters [L, len(COUNTERS)] `column` (an int or a tuple) names."""
    return np.isin(np.arange(counters.shape[1]), column)


def _ranks(state: CacheState, pinned, policy: str, priorities: Priorities | None, layer, num_experts: int):
    """Each slot's eviction rank (primary [S], secondary [S] or None, and the primary of a slot that may not
    be filled): the policy fills the slot of the smallest primary, ties to the smallest secondary, then to
    the lowest slot. Empty slots come first, pinned ones never."""
    key = jnp.maximum(state.slot_key, 0)
    if policy == "priority":
        ahead = priorities.ahead.reshape(-1)[key]
        behind = priorities.behind.reshape(-1)[key]
        primary = -jnp.where(key // num_experts > layer, ahead, behind)
        secondary = None
    elif policy == "lru":
        primary, secondary = state.last_use, None
    elif policy == "lfu":
        primary, secondary = state.uses, state.last_use
    elif policy == "fifo":
        primary, secondary = state.inserted, None
    elif policy == "lifo":
        primary, secondary = -state.inserted, None
    else:
        raise ValueError(f"unknown device cache policy {policy!r}")
    info = jnp.finfo if jnp.issubdtype(primary.dtype, jnp.floating) else jnp.iinfo
    lowest, highest = info(primary.dtype).min, info(primary.dtype).max
    primary = jnp.where(state.slot_key < 0, lowest, primary)
    return jnp.where(pinned, highest, primary), secondary, highest


def _first(primary, secondary):
    """The lowest slot of the smallest rank."""
    if jnp.issubdtype(primary.dtype, jnp.floating):  # finite ranks: min reductions, not argmin's slower NaN-aware one
        slots = jnp.arange(primary.shape[0], dtype=jnp.int32)
        return jnp.min(jnp.where(primary == jnp.min(primary), slots, primary.shape[0]))
    if secondary is None:
        return jnp.argmin(primary).astype(jnp.int32)
    tied = primary == jnp.min(primary)
    return jnp.argmin(jnp.where(tied, secondary, jnp.iinfo(secondary.dtype).max)).astype(jnp.int32)


def _fill(state: CacheState, pinned, count, size: int, policy: str, priorities, layer, num_experts: int,
          each=None, slab=None):
    """The slots the next `count` admissions fill, in order: each the policy's victim among the slots neither
    pinned nor filled before it (the ranks of the others do not change meanwhile). -> (int32 [size], S past
    `count`; slab). each(slab, i, slot) -> slab runs for each (the move of the i-th key's weights).
    Callers make sure `count` slots are unpinned."""
    primary, secondary, highest = _ranks(state, pinned, policy, priorities, layer, num_experts)

    def pick(i, carry):
        primary, slots, slab = carry
        slot = _first(primary, secondary)
        if each is not None:
            slab = each(slab, i, slot)
        return primary.at[slot].set(highest), slots.at[i].set(slot), slab

    empty = jnp.full(size, state.num_slots, jnp.int32)
    _, slots, slab = lax.fori_loop(0, count, pick, (primary, empty, slab))
    return slots, slab


def _at(slots, num_slots: int):
    """bool [S, n]: slot s is slots[i] (entries outside [0, S) match none). Updates of a few slots are made as
    `where`s over this mask rather than scatters: fewer, fusable operations."""
    return jnp.arange(num_slots, dtype=jnp.int32)[:, None] == slots[None, :]


def _put(at, values, old):
    """old [S] with slot s set to values[i] where at[s, i] (each slot matched at most once)."""
    return jnp.where(at.any(axis=1), jnp.sum(jnp.where(at, values, 0), axis=1).astype(old.dtype), old)


def _admit(state: CacheState, pinned, keys, slots, count, ticks, *, prefetch: bool, num_experts: int,
           staged: bool = False):
    """Puts keys[i] (int32 [n]) into slots[i] for i < count, evicting what they held; ticks [n]: their last
    use. -> (state, pinned)."""
    S, n = state.num_slots, keys.shape[0]
    admitted = jnp.arange(n) < count
    slots = jnp.where(admitted, slots, S)  # S: no slot
    safe = jnp.minimum(slots, S - 1)
    old = jnp.where(admitted, state.slot_key[safe], -1)
    evicting = old >= 0
    old_layer, new_layer = jnp.maximum(old, 0) // num_experts, keys // num_experts
    counts = [(old_layer, EVICTIONS, evicting), (old_layer, PREFETCH_WASTED, evicting & state.prefetched[safe])]
    if prefetch:
        counts.append((new_layer, PREFETCH_ISSUED, admitted))
    if staged:
        counts.append((new_layer, PREFETCH_STAGED, admitted))
    rows, columns, amounts = zip(*counts, strict=True)
    counters = state.counters.at[jnp.concatenate(rows), jnp.repeat(jnp.asarray(columns), n)].add(
        jnp.concatenate(amounts).astype(jnp.int32))
    nowhere = state.table.shape[0]
    table = state.table.at[jnp.concatenate([jnp.where(evicting, old, nowhere), jnp.where(admitted, keys, nowhere)])].set(
        jnp.concatenate([jnp.full(n, -1, jnp.int32), slots]), mode="drop")  # an evicted key is never an admitted one
    at = _at(slots, S)
    filled = at.any(axis=1)
    state = state.replace(
        table=table, slot_key=_put(at, keys, state.slot_key), last_use=_put(at, ticks, state.last_use),
        uses=jnp.where(filled, 0 if prefetch else 1, state.uses),
        inserted=_put(at, state.inserts + jnp.arange(n, dtype=jnp.int32), state.inserted),
        prefetched=jnp.where(filled, prefetch, state.prefetched), inserts=state.inserts + count, counters=counters)
    return state, pinned | filled


Move = Callable[[object, jax.Array, jax.Array], object]  # (slab, expert, slot) -> slab with expert in slot


def resident_slots(state: CacheState, layer, experts, num_experts: int):
    """The slot of each of MoE layer `layer`'s `experts` (int32 [U], padded with num_experts): int32 [U], -1 where
    the expert is not resident (a miss) and for padding."""
    real = experts < num_experts
    return jnp.where(real, state.table[layer * num_experts + jnp.where(real, experts, 0)], -1)


def access(state: CacheState, layer, experts, *, policy: str, num_experts: int, priorities: Priorities | None = None,
           move: Move | None = None, slab=None, pinned=None, whole=None, carried=None):
    """One MoE layer step needing `experts` (int32 [U]: distinct, increasing, padded with num_experts).

    Counts hits and misses, admits the misses (calling `move` for each, in increasing expert order)
    and returns (state, slab, slots int32 [U]: each expert's slot, -1 for padding, pinned bool [S]:
    the slots this step uses, for `install` after it).

    whole: None, or a traced bool: the step reads the layer out of a copy of all its experts (the experts it
    carries past the misses count as `streamed`; `copies_whole` says when). Then its misses take empty slots
    only, all of them or none (slot -1), and where they do not all fit, its resident experts are evicted as well
    (slot -1): a layer copied whole saves nothing by them, and their slots let a later layer stay whole.
    carried: None (as True), or a traced bool: whether that copy holds the whole layer; False: only the step's
    own experts (the host computing the others: `decoder_programs.admit_misses`), nothing counted as streamed.
    """
    E, S, U = num_experts, state.num_slots, experts.shape[0]
    real = experts < E
    keys = layer * E + jnp.where(real, experts, 0)
    slots = resident_slots(state, layer, experts, E)
    hit = real & (slots >= 0)
    miss = real & ~hit
    ticks = state.clock + jnp.cumsum(real.astype(jnp.int32))  # one tick per access, in expert order
    at_hit = _at(jnp.where(hit, slots, S), S)
    used = at_hit.any(axis=1)
    used_prefetch = hit & state.prefetched[jnp.maximum(slots, 0)]
    counters = state.counters.at[layer, jnp.asarray([ACTIVATIONS, HITS, MISSES, PREFETCH_USED])].add(
        jnp.stack([real.sum(), hit.sum(), miss.sum(), used_prefetch.sum()]).astype(jnp.int32))
    state = state.replace(last_use=_put(at_hit, ticks, state.last_use), uses=state.uses + used,
                          prefetched=state.prefetched & ~used, counters=counters)
    pinned = used if pinned is None else pinned | used
    order = jnp.argsort(~miss, stable=True)  # the misses' positions first, in expert order
    count = miss.sum()
    if whole is not None:
        carries = whole if carried is None else whole & carried
        state = state.replace(counters=_count(state.counters, layer, STREAMED, jnp.where(carries, E - count, 0)))
        release = whole & (count > jnp.sum((state.slot_key < 0) & ~pinned))
        count = jnp.where(release, 0, count)
        state, pinned = _release(state, pinned, jnp.where(release & hit, slots, S), layer)
        slots = jnp.where(release, -1, slots)
    each = None if move is None else (lambda slab, i, slot: move(slab, experts[order[i]], slot))
    filled, slab = _fill(state, pinned, count, U, policy, priorities, layer, E, each, slab)
    state, pinned = _admit(state, pinned, keys[order], filled, count, ticks[order], prefetch=False, num_experts=E)
    slots = slots.at[order].set(jnp.where(jnp.arange(U) < count, filled, slots[order]))
    return state.replace(clock=state.clock + real.sum()), slab, slots, pinned


def _release(state: CacheState, pinned, slots, layer):
    """Empties slots (int32 [n]; S or more: none) of MoE layer `layer`'s keys, counted as its evictions, and unpins
    them. -> (state, pinned)."""
    at = _at(slots, state.num_slots)
    freed = at.any(axis=1)
    table = state.table.at[jnp.where(freed, state.slot_key, state.table.shape[0])].set(-1, mode="drop")
    counters = _count(state.counters, layer, EVICTIONS, freed.sum())
    return state.replace(table=table, slot_key=jnp.where(freed, -1, state.slot_key), counters=counters), pinned & ~freed


WHOLE_LAYER_PERCENT = 60  # of a layer's experts: missing at least that many, a step moves the whole layer


def whole_layer_from(num_experts: int, num_slots: int, fetch_times: tuple[float, float] | None = None) -> int | None:
    """The engine's `ProgramSpec.whole_layer_from` (`copies_whole`) for a cache of num_slots: None below four
    layers' worth (a buffer of one layer's experts, which the copy needs, then costs at most a quarter of the
    cache's memory): misses always fetched one by one. fetch_times: (one miss's fetch, the whole layer's copy) in
    seconds as measured on the engine's device (`expert_stacks.time_layer_fetches`): the fewest misses whose
    fetches take at least the copy's time (None when even all of a layer's do not); None: WHOLE_LAYER_PERCENT of
    the experts, rounded up (what the link's rates gave on an H100)."""
    if num_slots < 4 * num_experts:
        return None
    if fetch_times is None:
        return -(-num_experts * WHOLE_LAYER_PERCENT // 100)
    one_s, whole_s = fetch_times
    fewest = max(1, math.ceil(whole_s / max(one_s, 1e-12)))
    return fewest if fewest <= num_experts else None


def can_copy_whole(distinct: int, whole_from: int | None) -> bool:
    """Whether a layer step whose distinct-expert list has `distinct` entries may copy its layer whole (static: the
    list's length, not what it holds; `copies_whole` says whether it does)."""
    return whole_from is not None and distinct >= whole_from


def copies_whole(state: CacheState, layer, experts, num_experts: int, whole_from: int | None):
    """Whether MoE layer `layer`'s step needing `experts` (int32 [U], as `access`) moves the whole layer: it needs at
    least `whole_from` experts (a wide step) and misses that many, or more than the empty slots hold (a wide step
    evicts nothing, `access`). None where whole_from is None or U below it: never. -> bool [] or None (`access`'s
    `whole`)."""
    if not can_copy_whole(experts.shape[0], whole_from):
        return None
    real = experts < num_experts
    missing = jnp.sum(resident_slots(state, layer, experts, num_experts) < 0, where=real)
    wide = jnp.sum(real) >= whole_from
    return wide & ((missing >= whole_from) | (missing > jnp.sum(state.slot_key < 0)))


def install(state: CacheState, keys, *, policy: str, num_experts: int, layer, priorities: Priorities | None = None,
            pinned=None, move: Callable | None = None, slab=None, limit: int | None = None, staged: bool = False):
    """Prefetches: admits the keys (int32 [P], in order; -1 or a repeat: nothing) that are not resident,
    at most `limit`, while unpinned slots remain, evicting only unpinned slots. `layer`: the MoE layer in
    progress (the priority policy's reference point). move(slab, i, slot) puts keys[i]'s weights in
    `slot`; staged: the keys come from the host's staging (counted as `prefetch_staged` too).
    -> (state, slab, pinned)."""
    S, P = state.num_slots, keys.shape[0]
    pinned = jnp.zeros(S, bool) if pinned is None else pinned
    valid = keys >= 0
    safe = jnp.maximum(keys, 0)
    earlier = jnp.arange(P)[None, :] < jnp.arange(P)[:, None]
    first = ~jnp.any((keys[None, :] == keys[:, None]) & earlier, axis=1)  # first occurrence of each key
    needed = valid & first & (state.table[safe] < 0)
    count = jnp.minimum(needed.sum(), (~pinned).sum())
    if limit is not None:
        count = jnp.minimum(count, limit)
    order = jnp.argsort(~needed, stable=True)
    each = None if move is None else (lambda slab, i, slot: move(slab, order[i], slot))
    filled, slab = _fill(state, pinned, count, P, policy, priorities, layer, num_experts, each, slab)
    state, pinned = _admit(state, pinned, safe[order], filled, count, jnp.full(P, state.clock), prefetch=True,
                           num_experts=num_experts, staged=staged)
    return state, slab, pinned


def distinct_experts(ids, valid_rows, num_experts: int, size: int):
    """The distinct experts chosen by valid rows: ids int32 [N, k], valid_rows bool [N] or None ->
    int32 [size], increasing, padded with num_experts (size >= the most that can occur)."""
    keep = (ids >= 0) & (ids < num_experts)
    if valid_rows is not None:
        keep = keep & valid_rows[:, None]
    flat = jnp.where(keep, ids, num_experts).reshape(-1)
    if flat.shape[0] == size and ids.shape[0] == 1:  # one row of top-k: already distinct
        return jnp.sort(flat)
    return jnp.unique(flat, size=size, fill_value=num_experts)


def count_layers(counters, ids, valid_rows, num_experts: int, columns: tuple):
    """counters [L, len(COUNTERS)] with each of `columns` of every MoE layer raised by the number of distinct experts
    valid rows chose there: ids int32 [L, N, k] (a step's routing), valid_rows bool [N] or None. What `access`
    counts as activations one layer at a time, for all the layers at once (the resident mode's only bookkeeping)."""
    size = min(ids.shape[1] * ids.shape[2], num_experts)
    distinct = jax.vmap(lambda layer_ids: distinct_experts(layer_ids, valid_rows, num_experts, size))(ids)
    counts = (distinct < num_experts).sum(axis=-1, dtype=jnp.int32)
    return counters + jnp.where(_columns(counters, columns), counts[:, None], 0)


def guessed_keys(guess_ids, valid_rows, layer, num_experts: int, limit: int):
    """Keys of MoE layer `layer` that a router guess picked for valid rows, most rows first (ties: lower
    expert), at most `limit`: guess_ids int32 [N, k] -> int32 [limit], -1 past the guessed ones."""
    keep = (guess_ids >= 0) & (guess_ids < num_experts)
    if valid_rows is not None:
        keep = keep & valid_rows[:, None]
    experts = jnp.arange(num_experts, dtype=jnp.int32)
    counts = jnp.sum((jnp.where(keep, guess_ids, -1).reshape(-1)[None, :] == experts[:, None]), axis=1)  # [E]
    # Each expert's place in the order (more rows first, then the lower expert), by comparisons: no sort.
    before = (counts[None, :] > counts[:, None]) | ((counts[None, :] == counts[:, None]) & (experts[None, :] < experts[:, None]))
    place = jnp.sum(before, axis=1)
    chosen = place[None, :] == jnp.arange(limit)[:, None]  # [limit, E]: the expert in each place
    picked = jnp.sum(jnp.where(chosen, experts, 0), axis=1)
    return jnp.where(jnp.sum(jnp.where(chosen, counts, 0), axis=1) > 0, layer * num_experts + picked, -1).astype(jnp.int32)
