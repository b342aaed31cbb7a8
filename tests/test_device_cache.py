"""The device cache (`offload.device_cache`, run by `offload.replay.replay_step` on the CPU) against its slow,
obviously-right twin, the Python directory and policies (`reference_cache`): on random routing with
multi-token steps, staged prefetches and lookahead installs, every per-layer counter and the final
resident set are equal."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference_cache

from moejax.offload import device_cache as dc
from moejax.offload.replay import BeladyFuture, replay_step
from reference_policies import Belady

LAYERS, EXPERTS = 3, 8
TOKENS = 3  # most tokens per step (steps of 1..TOKENS tokens, padded with none)
STAGED = 3  # staged keys per step


def random_steps(seed: int, k: int, count: int = 24, prefetch: bool = True) -> list[reference_cache.Step]:
    """Zipf-like routing (so caching has something to find) of k experts per token, in ids [L, TOKENS, 2]
    (k = 1 leaves a column empty: one shape, one compilation); guesses right about half the time (and
    some in the last layer's row, which guesses for no layer); a few staged keys per step, with repeats."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, EXPERTS + 1) ** 1.2
    perms = [rng.permutation(EXPERTS) for _ in range(LAYERS)]
    steps = []
    for _ in range(count):
        experts = np.full((LAYERS, TOKENS, 2), EXPERTS)
        for t in range(rng.integers(1, TOKENS + 1)):
            for m in range(LAYERS):
                experts[m, t, :k] = perms[m][rng.choice(EXPERTS, size=k, replace=False, p=weights / weights.sum())]
        guesses = rng.integers(0, EXPERTS, experts.shape)  # the last layer's row: a guess for no layer, ignored
        right = rng.random(guesses[:-1].shape) < 0.5
        guesses[:-1] = np.where(experts[1:] < EXPERTS, np.where(right, experts[1:], guesses[:-1]), -1)
        staged = [(int(rng.integers(LAYERS)), int(rng.integers(EXPERTS))) for _ in range(rng.integers(0, STAGED + 1))]
        steps.append(reference_cache.Step(experts, guesses if prefetch else None, staged if prefetch else []))
    return steps


def device_replay(steps, *, policy: str, capacity: int, lookahead: int) -> dc.CacheState:
    device_policy = "priority" if policy == "belady" else policy
    future = None
    if policy == "belady":
        experts = np.concatenate([s.experts for s in steps], axis=1)
        future = BeladyFuture(experts, np.arange(len(steps) + 1) * TOKENS, EXPERTS)
    state = dc.empty_state(LAYERS, EXPERTS, capacity)
    for i, step in enumerate(steps):
        staged = np.full(STAGED, -1, np.int32)
        staged[: len(step.staged)] = [layer * EXPERTS + e for layer, e in step.staged]
        priorities = None
        if future is not None:
            tables = future.tables(i, 1)
            priorities = dc.Priorities(jnp.asarray(tables.ahead[0]), jnp.asarray(tables.behind[0]))
        guesses = None if step.guesses is None else jnp.asarray(step.guesses, jnp.int32)
        state, _ = replay_step(state, jnp.asarray(step.experts, jnp.int32), guesses,
                               None if guesses is None else jnp.asarray(staged), priorities, policy=device_policy,
                               num_experts=EXPERTS, lookahead=lookahead)
    return state


def assert_same(state: dc.CacheState, directory, label):
    counters = np.asarray(state.counters)
    for m in range(LAYERS):
        python = directory.per_layer.get(m)
        for name in ("activations", "hits", "misses", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted"):
            expected = 0 if python is None else getattr(python, name)
            assert counters[m, dc.COUNTERS.index(name)] == expected, (label, m, name)
    table = np.asarray(state.table)
    resident = {divmod(int(key), EXPERTS) for key in np.flatnonzero(table >= 0)}
    assert resident == directory.resident, label
    slot_key = np.asarray(state.slot_key)
    assert (slot_key[table[table >= 0]] == np.flatnonzero(table >= 0)).all(), label  # the table and the slots agree


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lifo", "belady"])
def test_device_cache_equals_the_python_twin(policy):
    total_evictions = total_prefetches = 0
    for k in (1, 2):
        for seed in range(3):
            for capacity in (2 * TOKENS, 2 * LAYERS * 2 + 1):
                for lookahead in (0, 2):
                    steps = random_steps(10 * k + seed, k, prefetch=lookahead > 0)
                    label = (policy, k, seed, capacity, lookahead)
                    state = device_replay(steps, policy=policy, capacity=capacity, lookahead=lookahead)
                    directory = reference_cache.twin(policy, steps, capacity=capacity, num_layers=LAYERS,
                                                     num_experts=EXPERTS, lookahead=lookahead)
                    assert_same(state, directory, label)
                    total_evictions += directory.total.evictions
                    total_prefetches += directory.total.prefetch_issued
    assert total_evictions > 200 and total_prefetches > 100  # the comparison saw the policy choose


@pytest.mark.parametrize("seed", range(4))
def test_belady_ties_keep_the_hit_count(seed):
    """Python's Belady breaks ties by the largest key, the device by the lowest slot: on demand fetching
    either choice among keys needed equally far ahead gives the same hits."""
    steps = random_steps(seed, 2, count=40, prefetch=False)
    for capacity in (2 * TOKENS, 9):
        state = device_replay(steps, policy="belady", capacity=capacity, lookahead=0)
        future = reference_cache.layer_steps(steps, LAYERS, EXPERTS)
        directory = reference_cache.replay(steps, capacity=capacity, policy=Belady(future), num_layers=LAYERS,
                                           num_experts=EXPERTS)
        hits = int(np.asarray(state.counters)[:, dc.HITS].sum())
        assert hits == directory.total.hits, (seed, capacity)


def test_a_mutated_policy_is_caught():
    """The comparison can fail: the device's lru against the twin of lfu, fifo against lifo."""
    steps = random_steps(0, 2)
    for device, python in (("lru", "lfu"), ("fifo", "lifo")):
        state = device_replay(steps, policy=device, capacity=7, lookahead=2)
        directory = reference_cache.twin(python, steps, capacity=7, num_layers=LAYERS, num_experts=EXPERTS, lookahead=2)
        with pytest.raises(AssertionError):
            assert_same(state, directory, (device, python))


def test_prefetches_never_evict_what_the_layer_uses():
    """A full cache of pinned experts: the lookahead installs nothing, and every needed expert stays."""
    state = dc.empty_state(2, 4, 2)
    ids = jnp.asarray([[[0, 1]], [[2, 3]]], jnp.int32)
    guesses = jnp.asarray([[[0, 1]], [[-1, -1]]], jnp.int32)  # layer 0 guesses layer 1's experts 0 and 1
    state, resident = replay_step(state, ids, guesses, None, None, policy="lru", num_experts=4, lookahead=2)
    counters = np.asarray(state.counters)
    assert counters[:, dc.PREFETCH_ISSUED].sum() == 0
    assert counters[1, dc.MISSES] == 2 and counters[1, dc.EVICTIONS] == 0 and counters[0, dc.EVICTIONS] == 2
    assert np.flatnonzero(np.asarray(resident)).tolist() == [6, 7]


def test_layers_copied_whole_stay_whole():
    """Steps that need every expert of every layer and copy each layer whole (`access`'s `whole`): the cache keeps
    the layers that fit whole and never evicts them, where LRU evicts each layer before its next use; from a cache
    full of parts of every layer, the copied layers give up their parts, and two steps later the same holds."""
    L, E, S = 5, 8, 20  # room for two whole layers and half of a third
    everything = jnp.arange(E, dtype=jnp.int32)

    def step(state, whole):
        for m in range(L):
            flag = dc.copies_whole(state, m, everything, E, 4) if whole else None
            state, _, _, _ = dc.access(state, m, everything, policy="lru", num_experts=E, whole=flag)
        return state

    def hits_per_step(state, whole, steps=3):
        counts = []
        for _ in range(steps):
            state = step(dc.reset_counters(state), whole)
            counts.append(np.asarray(state.counters)[:, [dc.HITS, dc.EVICTIONS, dc.MISSES]].sum(axis=0).tolist())
        return state, counts

    state, counts = hits_per_step(dc.empty_state(L, E, S), whole=True)
    assert counts == [[0, 0, L * E], [2 * E, 0, 3 * E], [2 * E, 0, 3 * E]]  # layers 2-4 copied every step
    table = np.asarray(state.table)
    assert (table[: 2 * E] >= 0).all() and (table[2 * E:] < 0).all()
    _, lru = hits_per_step(dc.empty_state(L, E, S), whole=False)
    assert [hits for hits, _, _ in lru] == [0, 0, 0]

    keys = jnp.asarray([m * E + e for m in range(L) for e in range(4)], jnp.int32)  # half of each layer resident
    full, _, _ = dc.install(dc.empty_state(L, E, S), keys, policy="lru", num_experts=E, layer=-1)
    state, counts = hits_per_step(full, whole=True)
    table = np.asarray(state.table)
    assert sorted({int(k) // E for k in np.flatnonzero(table >= 0)}) == [1, 3]  # 0, 2, 4 gave way, 1 and 3 filled up
    assert (table[E: 2 * E] >= 0).all() and (table[3 * E: 4 * E] >= 0).all()
    assert counts[0][1] == 3 * 4 and counts[1:] == [[2 * E, 0, 3 * E]] * 2  # three layers' halves released


def test_a_wide_step_copies_its_layer_rather_than_evict():
    """A step needing at least `whole_from` experts copies its layer whole when it misses that many, or more than the
    empty slots hold (it would have to evict); else it fetches its few misses into empty slots."""
    E = 8
    keys = jnp.asarray(list(range(E - 1)) + list(range(E, 2 * E)), jnp.int32)  # layer 0 but expert 7, all of layer 1
    for slots, expected in ((15, True), (16, False)):  # no empty slot; one
        state, _, _ = dc.install(dc.empty_state(2, E, slots), keys, policy="lru", num_experts=E, layer=-1)
        everything = jnp.arange(E, dtype=jnp.int32)
        assert bool(dc.copies_whole(state, 0, everything, E, 5)) is expected
        assert dc.copies_whole(state, 0, jnp.asarray([0, 7, E, E], jnp.int32), E, 5) is None  # U below whole_from
        assert not dc.copies_whole(state, 0, jnp.asarray([0, 1, 2, 7, E], jnp.int32), E, 5)  # 4 needed: not wide
