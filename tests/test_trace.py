"""EAMs against hand counts, the EAM collection (replacement, atomic save/load, corrupt files), routing traces."""

import os

import numpy as np
import pytest

from moejax.errors import MoejaxError
from moejax.routing import traces as trace_mod
from moejax.routing.eams import EAMCollection, EAMMatcher, eam_counts, layer_transitions
from moejax.routing.traces import RoutingTrace, load_routing


def test_eam_counts_equal_a_hand_count():
    # 2 layers, 3 tokens, top-2, 4 experts; id 4 marks a dropped pair; token 2 is padding.
    experts = np.array([
        [[0, 1], [1, 2], [3, 3]],
        [[2, 4], [2, 0], [1, 1]],
    ])
    valid = np.array([True, True, False])
    expected = np.array([
        [1, 2, 1, 0],  # layer 0: token 0 -> 0, 1; token 1 -> 1, 2
        [1, 0, 2, 0],  # layer 1: token 0 -> 2 (4 dropped); token 1 -> 2, 0
    ])
    counts = eam_counts(experts, 4, valid)
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(eam_counts(experts, 4)[1], [1, 2, 2, 0])


def test_layer_transitions_equal_a_loop():
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 6, size=(4, 7, 2))
    experts[1, 3, 0] = 6  # dropped
    got = layer_transitions(experts, 6, depth=2)
    want = np.zeros_like(got)
    for d in (1, 2):
        for layer in range(d, 4):
            for t in range(7):
                for a in experts[layer - d, t]:
                    for b in experts[layer, t]:
                        if a < 6 and b < 6:
                            want[d - 1, layer, a, b] += 1
    np.testing.assert_array_equal(got, want)


def random_eams(n, seed=0, layers=3, experts=5):
    return np.random.default_rng(seed).integers(0, 9, size=(n, layers, experts))


def test_collection_save_load_round_trip(tmp_path):
    collection = EAMCollection(3, 5, capacity=8)
    routing = np.random.default_rng(1).integers(0, 5, size=(3, 4, 2))
    for i, eam in enumerate(random_eams(5)):
        collection.add(eam, task=None if i % 2 else f"task{i}", experts=routing if i == 0 else None)
    path = tmp_path / "eams.npz"
    collection.save(path)
    loaded = EAMCollection.load(path)
    np.testing.assert_array_equal(loaded.eams, collection.eams)
    assert loaded.tasks == ["task0", None, "task2", None, "task4"]
    assert loaded.capacity == 8 and len(loaded) == 5
    np.testing.assert_array_equal(loaded.transitions, collection.transitions)
    assert loaded.transitions.sum() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["eams.npz"]  # no temporary file left


def test_full_collection_drops_the_older_of_the_closest_pair():
    collection = EAMCollection(1, 4, capacity=3)
    a, b, near_b, c = ([[9, 0, 0, 0]], [[0, 9, 1, 0]], [[0, 9, 2, 0]], [[0, 0, 0, 9]])
    for eam, task in ((a, "a"), (b, "b"), (c, "c")):
        collection.add(np.array(eam), task)
    collection.add(np.array(near_b), "near_b")
    assert collection.tasks == ["a", "c", "near_b"]
    assert len(collection) == collection.capacity == 3


def test_corrupt_collection_is_refused_and_the_previous_file_survives_a_failed_save(tmp_path, monkeypatch):
    path = tmp_path / "eams.npz"
    good = EAMCollection(3, 5)
    good.add(random_eams(1)[0], "keep")
    good.save(path)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(trace_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        EAMCollection(3, 5).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eams.npz"]
    assert EAMCollection.load(path).tasks == ["keep"]

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(before[: len(before) // 2])
    with pytest.raises(MoejaxError, match="corrupt.npz"):
        EAMCollection.load(corrupt)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, eams=np.zeros((2, 3)))
    with pytest.raises(MoejaxError, match="wrong.npz.*missing arrays"):
        EAMCollection.load(wrong)
    with pytest.raises(MoejaxError, match="no such EAM collection"):
        EAMCollection.load(tmp_path / "absent.npz")


def test_add_refuses_a_mismatched_eam():
    with pytest.raises(MoejaxError, match=r"EAM must be \[3, 5\]"):
        EAMCollection(3, 5).add(np.zeros((3, 4), np.int32))


def test_matcher_similarity_equals_direct_cosine():
    eams = random_eams(6, seed=3)
    collection = EAMCollection(3, 5)
    for eam in eams:
        collection.add(eam)
    matcher = EAMMatcher(collection)
    rng = np.random.default_rng(4)
    running = np.zeros((3, 5))
    for layer in [0, 1, 2, 0, 1]:
        counts = np.bincount(rng.integers(0, 5, size=2), minlength=5)
        matcher.observe(layer, counts)
        running[layer] += counts
    flat = eams.reshape(6, -1).astype(float)
    direct = flat @ running.ravel() / (np.linalg.norm(flat, axis=1) * np.linalg.norm(running))
    np.testing.assert_allclose(matcher.similarities(), direct, rtol=1e-5)
    best = int(np.argmax(direct))
    np.testing.assert_allclose(matcher.predicted_shares(2), eams[best, 2] / eams[best, 2].sum(), rtol=1e-6)


def test_routing_trace_round_trip_select_and_eams(tmp_path):
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, size=(3, 10, 2))
    lookahead = rng.integers(0, 8, size=(3, 10, 2))
    trace = RoutingTrace(experts, np.array([4, 0, 6]), 8, ["a", None, "c"], lookahead)
    trace.save(tmp_path / "routing.npz")
    loaded = load_routing(tmp_path / "routing.npz")
    assert loaded.num_experts == 8 and loaded.tasks == ["a", None, "c"]
    np.testing.assert_array_equal(loaded.experts, experts)
    np.testing.assert_array_equal(loaded.lookahead, lookahead)
    part = loaded.select(1, 3)
    assert part.seq_lens.tolist() == [0, 6] and part.tasks == [None, "c"]
    np.testing.assert_array_equal(part.experts, experts[:, 4:])
    eams = loaded.sequence_eams()
    np.testing.assert_array_equal(eams[2], eam_counts(experts[:, 4:], 8))
    assert eams[1].sum() == 0


def test_deepseek_layout_is_read(tmp_path):
    experts = np.random.default_rng(0).integers(0, 62, size=(4, 9, 6)).astype(np.uint8)
    experts[0, 0, 0] = 61
    np.savez(tmp_path / "ds.npz", experts=experts, seq_lens=np.array([5, 4]), first_moe_layer=np.int32(1))
    trace = load_routing(tmp_path / "ds.npz")
    assert trace.num_experts == 64  # largest id 61, rounded up to a multiple of 4
    assert trace.experts.dtype == np.int16 and trace.tasks is None and trace.lookahead is None


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"seq_lens": np.array([2])}, "missing arrays experts"),
        ({"experts": np.zeros((2, 3), np.uint8), "seq_lens": np.array([3])}, r"experts must be non-empty integer \[layers"),
        ({"experts": np.zeros((2, 3, 1), np.uint8), "seq_lens": np.array([2])}, "seq_lens sum to 2 but experts has 3 tokens"),
        ({"experts": np.zeros((2, 3, 1), np.uint8), "seq_lens": np.array([3]),
          "lookahead": np.zeros((2, 2, 1), np.int16)}, "lookahead must have the shape"),
    ],
)
def test_bad_routing_files_name_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(MoejaxError, match=f"bad.npz.*{message}"):
        load_routing(path)


def test_save_writes_atomically_in_the_same_directory(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.dirname(src), os.path.dirname(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    RoutingTrace(np.zeros((1, 2, 1), np.int16), np.array([2]), 4).save(tmp_path / "r.npz")
    assert seen == [(str(tmp_path), str(tmp_path))]
