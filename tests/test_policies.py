"""Eviction order of each cache policy against hand-computed sequences, and directory counters."""

import pytest

from moejax.errors import MoejaxError
from moejax.runtime.directory import ExpertDirectory
from moejax.runtime.policies import make_policy

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
