"""The Python cache policies and directory (the host-routed engine's, and the device cache's twins in the
tests): eviction order against hand-computed sequences, fast victim selection against the definition,
pinning and prefetch counters."""

import numpy as np
import pytest

from moejax.errors import MoejaxError
from moejax.routing.prefetchers import make_prefetcher
from reference_directory import ExpertDirectory
from reference_policies import POLICIES, make_policy
from reference_prefetch import prefetch_into

# Capacity 2, one layer, one expert per step: 1, 2, 1 (hit), 3, 2, 4.
# Worked by hand: which expert each miss evicts (None while there is room).
SEQUENCE = [1, 2, 1, 3, 2, 4]
EXPECTED_EVICTIONS = {
    "lru": [None, None, None, 2, 1, 3],   # 1 was used at step 3, so 2 is older at step 4
    "fifo": [None, None, None, 1, None, 2],  # 2 is still resident at step 5 (a hit)
    "lifo": [None, None, None, 2, 3, 2],  # always the newest insertion
    "lfu": [None, None, None, 2, 3, 2],   # 1 has two uses; newcomers one
}
EXPECTED_HITS = {"lru": 1, "fifo": 2, "lifo": 1, "lfu": 1}


def replay(policy: str, sequence, capacity=2):
    directory = ExpertDirectory(capacity, make_policy(policy))
    evictions = []
    for expert in sequence:
        _, misses = directory.begin_layer(0, [expert])
        evicted = [v for key in misses for v in directory.admit(key)]
        evictions.append(evicted[0][1] if evicted else None)
        directory.end_layer()
    return directory, evictions


@pytest.mark.parametrize("policy", sorted(EXPECTED_EVICTIONS))
def test_eviction_order_matches_hand_computed(policy):
    directory, evictions = replay(policy, SEQUENCE)
    assert evictions == EXPECTED_EVICTIONS[policy]
    assert directory.total.hits == EXPECTED_HITS[policy]
    assert directory.total.hits + directory.total.misses == directory.total.activations == len(SEQUENCE)


def test_pinned_experts_are_never_evicted():
    directory = ExpertDirectory(2, make_policy("lru"))
    hits, misses = directory.begin_layer(0, [5, 6])
    for key in misses:
        directory.admit(key)
    with pytest.raises(MoejaxError, match="full of experts in use"):
        directory.admit((1, 7))
    directory.end_layer()
    assert directory.admit((1, 7), prefetch=True) == [(0, 5)]


def test_prefetch_used_and_wasted_are_counted():
    directory = ExpertDirectory(2, make_policy("fifo"))
    directory.admit((1, 3), prefetch=True)
    directory.admit((1, 4), prefetch=True)
    hits, misses = directory.begin_layer(1, [3])
    directory.end_layer()
    assert hits == [(1, 3)] and not misses
    directory.admit((2, 0), prefetch=True)  # FIFO evicts (1, 3), already used
    directory.admit((2, 1), prefetch=True)  # evicts (1, 4), never used
    counters = directory.total
    assert (counters.prefetch_issued, counters.prefetch_used, counters.prefetch_wasted) == (4, 1, 1)


def test_unknown_policy_lists_valid_names():
    with pytest.raises(MoejaxError, match="lru, lfu, fifo, lifo"):
        make_policy("random")


class CheckedPolicy:
    """Wraps a policy; at every eviction, its fast `select_victim` must equal its `victim` definition."""

    def __init__(self, inner):
        self.inner = inner
        self.checked = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def select_victim(self, resident, pinned, now):
        candidates = sorted(k for k in resident if k not in pinned)
        expected = self.inner.victim(candidates, now) if candidates else None
        got = self.inner.select_victim(resident, pinned, now)
        assert got == expected
        self.checked += 1
        return got


def random_layer_steps(seed: int, layers: int, experts: int, k: int, tokens: int) -> list[tuple[int, list[int]]]:
    """(MoE layer, distinct experts) of every layer step of `tokens` tokens, Zipf-like, in decode order."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1) ** 1.5
    perms = [rng.permutation(experts) for _ in range(layers)]
    return [(m, sorted(perms[m][rng.choice(experts, size=k, replace=False, p=weights / weights.sum())].tolist()))
            for _ in range(tokens) for m in range(layers)]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_fast_victim_selection_equals_the_definition(policy):
    future = random_layer_steps(7, layers=3, experts=8, k=2, tokens=20)
    inner = make_policy(policy, future=future)
    checked = CheckedPolicy(inner)
    directory = ExpertDirectory(6, checked)
    prefetcher = make_prefetcher("trace", num_layers=3, num_experts=8, top_k=2)
    for layer, experts in future:
        counts = np.bincount(experts, minlength=8)
        inner.on_routing(layer, counts)
        _, misses = directory.begin_layer(layer, experts)
        for key in misses:
            directory.admit(key)
        if policy != "belady":  # prefetches change Belady's view of nothing, but keep its replay pure
            prefetcher.observe(layer, counts)
            prefetch_into(directory, prefetcher.predict(layer), 2)
        directory.end_layer()
    assert checked.checked > 20


def test_belady_needs_its_future():
    with pytest.raises(MoejaxError, match="belady needs the future access sequence: lab only"):
        make_policy("belady")


def test_prefetch_never_evicts_pinned_experts():
    directory = ExpertDirectory(4, make_policy("lru"))
    for expert in (0, 1):  # cached from an earlier layer step
        directory.admit((1, expert), prefetch=True)
    _, misses = directory.begin_layer(0, [2, 3])
    for key in misses:
        directory.admit(key)
    admitted = prefetch_into(directory, [(1, 0), (1, 5), (1, 6), (1, 7)], limit=3)
    # (1, 0) is resident; only (1, 0) and (1, 1) are evictable, and each admitted key is pinned until all are placed.
    assert admitted == [(1, 5), (1, 6)]
    assert {(0, 2), (0, 3)} <= directory.resident
    assert directory.resident == {(0, 2), (0, 3), (1, 5), (1, 6)}
    directory.end_layer()
    assert prefetch_into(directory, [(1, 7)], limit=0) == []
