"""The SSD tier (`host_budget`): outputs equal the all-resident engine's at every host budget, the host cache's
tables stay consistent under any sequence of reads and prefetches, and bad expert files are refused by name.

One tiny model (3 MoE layers x 6 experts, top-2) and one device budget (a layer's 6 experts, the least a prompt
step needs), so every host budget runs the same compiled programs.
"""

import json
import shutil
import threading
import time
import zlib

import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax.cli import main as cli
from moejax.errors import MoejaxError, ParameterError
from moejax.offload import expert_files as expert_files_module
from moejax.offload.expert_files import ExpertFiles, aligned_buffer, crc32_combine, expert_path, write_expert_files
from moejax.offload.host_cache import HINT_DECAY, HINT_PRECISION, HostCache

NEW_TOKENS = 5
SAMPLING = dict(temperature=0.9, top_k=20, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(checkpoint, its expert directory, prompts, device budget, resident (greedy, sampled, logits))."""
    root = tmp_path_factory.mktemp("ssd")
    ckpt = build(("mixtral", "sliding_window"), root)[2]
    resident = moejax.load(ckpt)
    prompts = random_prompts(resident.cfg.vocab_size, (7, 3), seed=5)
    reference = (resident.generate(prompts, max_new_tokens=NEW_TOKENS).tokens,
                 resident.generate(prompts, max_new_tokens=NEW_TOKENS, **SAMPLING).tokens, resident.logits(prompts))
    device_budget = f"{resident.cfg.num_experts * resident.cfg.expert_bytes}B"
    return ckpt, root / "experts", prompts, device_budget, reference


def tiered(model, host_budget, expert_dir=None, **options):
    ckpt, default_dir, _, device_budget, _ = model
    return moejax.load(ckpt, "cached", expert_budget=device_budget, host_budget=host_budget,
                       expert_dir=expert_dir or default_dir, **options)


def experts(engine, count: int) -> str:
    """A host budget of `count` experts (files are padded to 4 KiB)."""
    return f"{count * engine.host.cache.files.file_bytes}B"


def disk_reads(tier: dict) -> int:
    """Every whole read the host tier made, whatever asked for it."""
    return sum(tier[f"{kind}_reads"] for kind in ("disk", "prefetch", "staged", "hint"))


def test_outputs_equal_resident_at_every_host_budget(model):
    _, _, prompts, _, (greedy, sampled, logits) = model
    engine = tiered(model, "1.0")  # writes the expert directory; every expert fits the host cache
    for slots in (18, 5, 1):
        engine.close()
        engine = tiered(model, experts(engine, slots))
        assert engine.host.cache.num_slots == slots and engine.spec.tier_hints  # the next layer's guesses hinted
        result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        assert result.tokens == greedy, slots
        assert engine.generate(prompts, max_new_tokens=NEW_TOKENS, **SAMPLING).tokens == sampled, slots
        for ours, ref in zip(engine.logits(prompts), logits, strict=True):
            np.testing.assert_array_equal(ours, ref, err_msg=str(slots))
        tier = result.stats["host_tier"]
        device_misses = result.stats["total"]["misses"]
        assert tier["gets"] == device_misses > 0  # every device miss goes through the host tier
        assert tier["host_hits"] + tier["disk_misses"] + tier["prefetch_waits"] == tier["gets"]
        assert tier["bytes_read_disk"] == disk_reads(tier) * engine.host.cache.files.file_bytes
        if slots == 1:
            assert tier["disk_misses"] > device_misses / 2 and tier["stall_s"] > 0
        engine.host.cache.check_invariants()
    engine.close()


def test_prefetchers_through_the_host_tier_change_no_token(model):
    """The lookahead (fetches inside the step) and the trace prefetcher (staged keys, which the host tier also
    reads ahead) see the same outputs."""
    _, _, prompts, _, (greedy, _, _) = model
    engine = tiered(model, "0.3", prefetch="trace+lookahead")
    result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert result.tokens == greedy
    assert result.stats["total"]["prefetch_issued"] > 0 and result.stats["host_tier"]["prefetch_reads"] > 0
    engine.host.cache.check_invariants()
    engine.close()


# float32 experts of 33,024 bytes: 8.06 chunks of ALIGN bytes (tests that read in several chunks set CHUNK = ALIGN)
CHUNKED_SHAPES = {"gate": ((64, 64), np.dtype(np.float32)), "down": ((65, 64), np.dtype(np.float32))}


def random_files(root, shapes: dict, layers: int, experts: int, seed: int = 0):
    """An expert directory of `layers` x `experts` of random weights of `shapes`, and the weights
    {(layer, expert): {name: array}}."""
    rng = np.random.default_rng(seed)
    weights = {(m, e): {n: rng.standard_normal(s).astype(d) for n, (s, d) in shapes.items()}
               for m in range(layers) for e in range(experts)}
    write_expert_files(root, shapes, layers, experts, lambda m, e: weights[m, e])
    return ExpertFiles(root, shapes, layers, experts), weights


def wait_until(condition, seconds: float = 5.0) -> None:
    """Polls `condition()` every 10 ms until it holds (another thread's progress), at most `seconds`."""
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)


@pytest.fixture
def small_files(tmp_path):
    """An expert directory of 3 layers x 5 experts of random weights, and the weights."""
    shapes = {"gate": ((4, 8), np.dtype(np.float32)), "down": ((8, 4), np.dtype(np.float32))}
    return random_files(tmp_path / "ef", shapes, 3, 5)


def test_tier_moves_never_lose_or_duplicate_an_expert(small_files):
    """Random reads and prefetches (the prefetch thread running meanwhile): after each, the tables agree, and every
    read returns exactly the expert asked for."""
    files, weights = small_files
    rng = np.random.default_rng(1)
    for slots in (1, 2, 7):
        cache = HostCache(files, slots, prefetch_per_step=3)
        for _ in range(150):
            op = rng.integers(3)
            if op == 0:
                cache.prefetch([int(k) for k in rng.integers(0, 15, size=rng.integers(1, 5))])
            elif op == 1:
                cache.observe(rng.integers(0, 3, size=(3, 5)), rng.integers(-1, 15, size=2))
            else:
                m, e = int(rng.integers(3)), int(rng.integers(5))
                got = cache.get(m, e)
                for name, w in weights[m, e].items():
                    np.testing.assert_array_equal(got[name], w)
            cache.check_invariants()
            assert len(cache.held()) <= slots
        cache.close()
        counts = cache.stats()
        assert counts["host_hits"] + counts["disk_misses"] + counts["prefetch_waits"] == counts["gets"]


def test_a_layers_staged_misses_are_read_ahead_and_kept_until_fetched(small_files):
    """`stage` reads a layer's misses in order before any speculative prefetch and without its test of worth;
    until fetched they are never evicted (not even by each other's reads); the fetch counts a disk miss, and staged
    reads of keys fetched meanwhile, or staged again, are not repeated. Also in random order with random ops."""
    files, weights = small_files
    cache = HostCache(files, 3, prefetch_per_step=2)
    cache.scores[:] = 10.0  # held experts outrank the staged ones: a prefetch would not be worth a slot
    for m, e in [(0, 0), (0, 1), (0, 2)]:
        cache.get(m, e)
    cache.reset_stats()
    cache.prefetch([7, 8])
    cache.stage([5, -1, 6, 0])  # MoE layer 1, experts 0 and 1; (0, 0) is held
    got = [cache.get(1, 0), cache.get(1, 1), cache.get(0, 0)]
    for (m, e), expert in zip([(1, 0), (1, 1), (0, 0)], got, strict=True):
        for name, w in weights[m, e].items():
            np.testing.assert_array_equal(expert[name], w)
    counts = cache.stats()
    assert counts["staged_reads"] + counts["disk_reads"] == 2 and counts["disk_misses"] == 2
    assert counts["host_hits"] == 1 and counts["evictions"] == 2 and cache.held() == {0, 5, 6}
    cache.check_invariants()
    rng = np.random.default_rng(2)
    for _ in range(100):
        keys = sorted(set(int(k) for k in rng.integers(0, 15, size=rng.integers(1, 4))))
        cache.stage(keys)
        if rng.integers(2):
            cache.prefetch([int(k) for k in rng.integers(0, 15, size=2)])
        for key in keys:
            m, e = divmod(key, 5)
            for name, w in weights[m, e].items():
                np.testing.assert_array_equal(cache.get(m, e)[name], w)
        cache.check_invariants()
    cache.close()
    counts = cache.stats()
    assert counts["host_hits"] + counts["disk_misses"] + counts["prefetch_waits"] == counts["gets"]


def test_a_fetch_waiting_for_a_read_keeps_its_key_from_eviction(small_files, monkeypatch):
    """A fetch waiting for a read under way (staged, here): when the read is done, another thread (the prefetch
    thread, reading the next staged key) may take the lock before the fetch wakes, and must not evict the key just
    read, though it is used least (the fetch would read it again: on the H100, 16:49 UTC, a run with staging read
    32% more bytes than without). So the key stays protected while the fetch waits; every miss is read once."""
    files, _ = small_files
    real, gate = type(files).read_into, threading.Event()

    def read_into(self, layer, expert, *args, **kwargs):
        if (layer, expert) == (1, 0):
            gate.wait(10)
        return real(self, layer, expert, *args, **kwargs)

    monkeypatch.setattr(type(files), "read_into", read_into)
    cache = HostCache(files, 2)
    cache.get(0, 4)  # used more than the staged expert: the victim it should be
    cache.scores[4] = 10.0
    cache.reset_stats()
    cache.stage([5])  # MoE layer 1, expert 0: its read waits for the gate
    wait_until(lambda: 5 in cache._loading)  # the prefetch thread's staged read, not the fetch's own
    fetch = threading.Thread(target=cache.get, args=(1, 0))
    fetch.start()
    wait_until(lambda: cache.counts["gets"])
    with cache._lock:
        assert 5 in cache._loading and cache._wanted[5] == 1 and cache._victim() == 4
    gate.set()
    fetch.join(10)
    counts = cache.stats()
    cache.close()
    assert counts["staged_reads"] + counts["disk_reads"] == counts["disk_misses"] == 1, counts


@pytest.mark.parametrize("kind", ["prefetch", "hint"])
def test_a_read_ahead_gives_way_to_staged_ones(tmp_path, monkeypatch, kind):
    """A speculative prefetch, or a read of the next layer's guess (`hint`), under way when a step stages its
    misses is given up at its next chunk (not read to its end first), unless its key is among the staged ones; the
    staged read follows, the given-up key is not held, and every miss is read once."""
    files, weights = random_files(tmp_path / "ef", CHUNKED_SHAPES, 2, 3, seed=3)
    monkeypatch.setattr(expert_files_module, "CHUNK", expert_files_module.ALIGN)
    real, gate = expert_files_module._read_fully, threading.Event()

    def read_fully(fd, view, offset):
        gate.wait(10)
        return real(fd, view, offset)

    monkeypatch.setattr(expert_files_module, "_read_fully", read_fully)
    for staged, cancelled in (([3], 1), ([1, 3], 0)):  # key 1 = (0, 1), read ahead; 3 = (1, 0)
        gate.clear()
        cache = HostCache(files, 3, prefetch_per_step=1)
        getattr(cache, kind)([1])
        wait_until(lambda: 1 in cache._loading)  # the prefetch thread is reading it
        cache.stage(staged)
        gate.set()
        for key in staged:
            m, e = divmod(key, 3)
            for name, w in weights[m, e].items():
                np.testing.assert_array_equal(cache.get(m, e)[name], w)
        # The read ahead ends (given up or read) on the prefetch thread: the staged keys' fetches never wait for it.
        wait_until(lambda: cache.counts[f"{kind}_cancelled"] + cache.counts[f"{kind}_reads"] == 1, seconds=10)
        counts = cache.stats()
        cache.close()
        assert counts[f"{kind}_cancelled"] == cancelled and counts[f"{kind}_reads"] == 1 - cancelled, counts
        assert counts["staged_reads"] + counts["disk_reads"] == 1 and (1 in cache.held()) == (not cancelled)
        assert 0 < counts["bytes_cancelled"] <= files.file_bytes if cancelled else counts["bytes_cancelled"] == 0
        cache.check_invariants()


@pytest.mark.parametrize("kind", ["prefetch", "hint"])
def test_a_speculative_read_past_half_its_file_is_finished(tmp_path, monkeypatch, kind):
    """A speculative prefetch past FINISH_PAST of its file when a step stages other misses is read to its end (the
    disk time spent is not thrown away) and the staged read follows; a hint's read, a guess proven wrong, is given
    up all the same."""
    files, weights = random_files(tmp_path / "ef", CHUNKED_SHAPES, 2, 3, seed=3)
    monkeypatch.setattr(expert_files_module, "CHUNK", expert_files_module.ALIGN)
    real, gate = expert_files_module._read_fully, threading.Event()
    second_half = files.file_bytes // 2 + expert_files_module.ALIGN  # chunks from here on wait for the gate

    def read_fully(fd, view, offset):
        if offset >= second_half:
            gate.wait(10)
        return real(fd, view, offset)

    monkeypatch.setattr(expert_files_module, "_read_fully", read_fully)
    asked = []  # the bytes read so far each time the read ahead asks whether to go on
    real_read = HostCache._read

    def read(self, key, slot, prefetch=None, cancelled=None):
        def watched(done):
            asked.append(done)
            return cancelled(done)
        return real_read(self, key, slot, prefetch, watched if cancelled else None)

    monkeypatch.setattr(HostCache, "_read", read)
    cache = HostCache(files, 3, prefetch_per_step=1)
    getattr(cache, kind)([1])
    wait_until(lambda: asked and asked[-1] >= second_half)  # waiting for the first gated chunk
    cache.stage([3])
    gate.set()
    for name, w in weights[1, 0].items():
        np.testing.assert_array_equal(cache.get(1, 0)[name], w)
    wait_until(lambda: cache.counts[f"{kind}_cancelled"] + cache.counts[f"{kind}_reads"] == 1, seconds=10)
    counts = cache.stats()
    cache.close()
    finished = kind == "prefetch"
    assert counts[f"{kind}_reads"] == finished and counts[f"{kind}_cancelled"] == (not finished), counts
    assert (1 in cache.held()) == finished and (counts["bytes_cancelled"] == 0) == finished
    cache.check_invariants()


def test_the_next_layers_guesses_are_read_after_the_staged_misses(small_files, monkeypatch):
    """`hint` (the next layer's guessed misses) is read once a layer's staged misses are, before any speculative
    prefetch and without its test of worth; a speculative prefetch does not evict it before it is fetched (here it
    finds no slot: the staged keys wait for their fetch too); a fetch of a hinted key then hits (counted
    `hint_used`); a layer's `stage` drops the hints not begun; with `hints` False nothing is read."""
    files, weights = small_files
    order, real = [], type(files).read_into

    def read_into(self, layer, expert, *args, **kwargs):
        order.append(layer * 5 + expert)
        return real(self, layer, expert, *args, **kwargs)

    monkeypatch.setattr(type(files), "read_into", read_into)
    cache = HostCache(files, 4, prefetch_per_step=2)
    cache.scores[:] = 1.0
    cache.scores[10:] = 0.0  # MoE layer 2's experts are used least: not worth a slot as speculative prefetches
    with cache._lock:  # queued while the prefetch thread cannot take the lock: the order is the queues'
        cache.prefetch([1, 2])
        cache.stage([5, 6])  # MoE layer 1's misses
        cache.hint([10, 11])  # MoE layer 2's guessed misses
    wait_until(lambda: len(order) == 4 and not cache._queue)
    time.sleep(0.05)
    assert order == [5, 6, 10, 11]
    for m, e in ((1, 0), (1, 1), (2, 0)):
        np.testing.assert_array_equal(cache.get(m, e)["gate"], weights[m, e]["gate"])
    counts = cache.stats()
    assert (counts["hint_reads"], counts["hint_used"], counts["staged_reads"]) == (2, 1, 2), counts
    with cache._lock:
        cache.hint([12, 13])
        cache.stage([14])  # MoE layer 2 routed: its misses are known, the guesses not begun are dropped
    wait_until(lambda: 14 in cache.held())
    assert 12 not in cache.held() and 13 not in cache.held() and cache.stats()["hint_reads"] == 2
    cache.hints = False
    cache.hint([3])
    time.sleep(0.05)
    assert 3 not in order
    cache.close()
    cache.check_invariants()


def test_hints_pause_while_the_guesses_prove_wrong(small_files):
    """Each `stage` judges the hint before it (the share of its keys the layer staged); while the running share is
    below HINT_PRECISION, hints are not read, and they are again once guesses prove right (judged all along)."""
    files, _ = small_files
    cache = HostCache(files, 4)
    for _ in range(4):  # guesses the next layer never stages
        cache.hint([10])
        cache.stage([11])
    assert cache.hint_precision == pytest.approx(HINT_DECAY**4) and cache.hint_precision < HINT_PRECISION
    cache.hint([12])
    cache.stage([12])  # right, but not read: the guesses had been wrong
    time.sleep(0.05)
    assert cache.stats()["hint_reads"] <= 1 and cache.hint_precision >= HINT_PRECISION  # (10, read at first)
    cache.hint([13])
    wait_until(lambda: 13 in cache.held())
    assert cache.stats()["hint_reads"] >= 1 and cache.stats()["hint_precision"] == cache.hint_precision
    cache.close()


def test_lent_arrays_never_change_under_their_holder(small_files):
    """What `get` returns is a view of its slot: held, the slot is not refilled (other reads go past the cache when
    no slot is free); dropped, the slot is evictable again."""
    files, weights = small_files
    cache = HostCache(files, 2)
    held = cache.get(0, 0)
    with pytest.raises(ValueError):
        held["gate"][0, 0] = 1.0  # read-only
    for m, e in [(1, 1), (2, 2), (1, 3), (0, 4), (2, 0)]:
        cache.get(m, e)
        cache.check_invariants()
    for name, w in weights[0, 0].items():
        np.testing.assert_array_equal(held[name], w)
    both = [cache.get(1, 1), cache.get(2, 2)]  # the free slot and... past the cache (every slot lent)
    assert cache.stats()["uncached_reads"] >= 1
    del held, both
    cache.get(1, 4)
    assert cache.stats()["evictions"] >= 1 and (1 * 5 + 4) in cache.held()
    cache.check_invariants()


def test_disk_busy_time_counts_overlapping_reads_once(small_files, monkeypatch):
    """Two reads of 0.2 s each, at once: disk_read_s sums them (~0.4 s), disk_busy_s is the wall time any read was
    under way (~0.2 s)."""
    files, _ = small_files
    cache = HostCache(files, 4)
    real = type(files).read_into

    def slow(self, *args, **kwargs):
        time.sleep(0.2)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(files), "read_into", slow)
    threads = [threading.Thread(target=cache.get, args=(0, e)) for e in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert stats["disk_read_s"] >= 0.4 and 0.2 <= stats["disk_busy_s"] < 0.35


def test_concurrent_reads_return_their_own_experts(small_files):
    files, weights = small_files
    cache, errors = HostCache(files, 2), []

    def reader(seed):
        rng = np.random.default_rng(seed)
        for _ in range(60):
            m, e = int(rng.integers(3)), int(rng.integers(5))
            if not np.array_equal(cache.get(m, e)["gate"], weights[m, e]["gate"]):
                errors.append((m, e))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.check_invariants()
    assert not errors


def test_expert_files_hold_the_weights_back_to_back_with_their_crc(small_files):
    """Each file: its weights' bytes in manifest order, zero-padded to whole blocks; the manifest's CRC-32 is zlib's
    of the unpadded bytes (written by several threads: each file's own)."""
    files, weights = small_files
    manifest = json.loads((files.root / "manifest.json").read_text())
    for (m, e), expert in weights.items():
        data = b"".join(expert[name].tobytes() for name in ("gate", "down"))
        raw = expert_path(files.root, m, e).read_bytes()
        assert raw == data + bytes(files.file_bytes - len(data))
        assert manifest["crc32"][m][e] == zlib.crc32(data)


def test_crc32_combine_equals_the_whole_crc():
    rng = np.random.default_rng(0)
    for first_length, second_length in [(0, 0), (0, 9), (7, 0), (1, 1), (4096, 5000), (12345, 16 * 2**10)]:
        first, second = rng.bytes(first_length), rng.bytes(second_length)
        assert crc32_combine(zlib.crc32(first), zlib.crc32(second), second_length) == zlib.crc32(first + second)


def test_a_read_in_several_chunks_is_checked_whole(tmp_path, monkeypatch):
    """Chunks are checksummed as they arrive and the checksums combined: the read returns the weights, and a flipped
    byte in any chunk (the last one's checked part included) is caught."""
    files, weights = random_files(tmp_path / "ef", CHUNKED_SHAPES, 1, 1, seed=2)
    monkeypatch.setattr(expert_files_module, "CHUNK", expert_files_module.ALIGN)
    buffer = aligned_buffer(files.file_bytes)
    files.read_into(0, 0, buffer)
    for name, value in files.unpack(buffer).items():
        np.testing.assert_array_equal(value, weights[0, 0][name])
    victim, original = expert_path(files.root, 0, 0), expert_path(files.root, 0, 0).read_bytes()
    for position in (5, 3 * expert_files_module.ALIGN + 1, files.expert_bytes - 1):
        data = bytearray(original)
        data[position] ^= 0x01
        victim.write_bytes(bytes(data))
        with pytest.raises(MoejaxError, match=r"E0000\.bin: expert file fails its CRC-32 check"):
            files.read_into(0, 0, buffer)


def test_bad_expert_files_are_refused_by_name(small_files, tmp_path):
    files, _ = small_files
    shapes, root = files.shapes, files.root
    victim = expert_path(root, 1, 2)
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(MoejaxError, match=r"E0002\.bin: expert file fails its CRC-32 check \(MoE layer 1, expert 2\)"):
        HostCache(files, 2).get(1, 2)
    victim.write_bytes(bytes(data[:-1]))
    with pytest.raises(MoejaxError, match=r"E0002\.bin: expert file has .* bytes, expected"):
        ExpertFiles(root, shapes, 3, 5)
    victim.unlink()
    with pytest.raises(MoejaxError, match=r"L001/E0002\.bin: expert file missing"):
        ExpertFiles(root, shapes, 3, 5)
    with pytest.raises(MoejaxError, match="num_experts is 5, the model needs 6"):
        ExpertFiles(root, shapes, 3, 6)
    with pytest.raises(MoejaxError, match="has no manifest"):
        ExpertFiles(tmp_path, shapes, 3, 5)


def test_corrupt_file_in_a_step_is_one_clear_error(model, tmp_path):
    """A file corrupted after loading (same size: only its checksum can tell) fails the step that reads it with
    the error naming it, not a traceback from inside the step program."""
    ckpt, default_dir, prompts, _, _ = model
    copy = tmp_path / "experts"
    tiered(model, "1.0", expert_dir=copy).close()
    with pytest.raises(ParameterError, match="holds no expert"):
        tiered(model, "1B", expert_dir=copy)
    engine = tiered(model, "0.2", expert_dir=copy)
    files = engine.host.cache.files
    for m in range(files.num_layers):
        for e in range(files.num_experts):
            path = expert_path(copy, m, e)
            data = bytearray(path.read_bytes())
            data[0] ^= 0xFF
            path.write_bytes(bytes(data))
    with pytest.raises(MoejaxError, match=r"E0\d+\.bin: expert file fails its CRC-32 check"):
        engine.generate(prompts, max_new_tokens=2)
    engine.close()
    with pytest.raises(MoejaxError, match=r"L000/E0000\.bin: expert file fails its CRC-32 check"):
        tiered(model, "0.2", expert_dir=copy, cpu_experts="auto")  # the cost model's measurement reads it at load


@pytest.mark.parametrize("flags, expected", [
    (["--offload", "cached", "--host-budget", "lots"], "--host-budget 'lots' is not a fraction"),
    (["--offload", "resident", "--host-budget", "0.5"], "--host-budget applies to --offload cached"),
    (["--offload", "cached", "--expert-dir", "x"], "--expert-dir is the disk tier under --host-budget"),
])
def test_bad_host_budget_flags(model, capsys, flags, expected):
    assert cli(["generate", str(model[0]), "--prompt-ids", "1,2", "--max-new-tokens", "1", *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and len(err) == 1


def test_generate_json_reports_the_host_tier(model, capsys):
    ckpt, default_dir, prompts, device_budget, _ = model
    probe = tiered(model, "1.0")  # the expert directory exists
    probe.close()
    files = probe.host.cache.files
    rc = cli(["generate", str(ckpt), "--prompt-ids", ",".join(map(str, prompts[0])), "--max-new-tokens", str(NEW_TOKENS),
              "--offload", "cached", "--expert-budget", device_budget, "--host-budget", "0.25", "--expert-dir",
              str(default_dir), "--json"])
    tier = json.loads(capsys.readouterr().out)["stats"]["host_tier"]
    assert rc == 0
    assert tier["host_slots"] == int(0.25 * 18 * files.expert_bytes) // files.file_bytes
    assert tier["gets"] > 0 and tier["expert_dir"] == str(default_dir)


def test_bench_sizes_the_model_from_ram_and_the_disk():
    from scripts.bench_ssd import DISK_SPARE, card, plan
    from moejax.offload.expert_files import padded

    layer = card(1, True).num_experts * padded(card(1, True).expert_bytes)
    cfg, ram, emulated = plan(True, ram=10 * layer, ratio=1.5, free_disk=100 * layer)
    assert not emulated and ram == 10 * layer and len(cfg.moe_layer_ids) == 15
    cfg, ram, emulated = plan(True, ram=100 * layer, ratio=1.5, free_disk=20 * layer)  # the disk holds 18 layers
    assert emulated and len(cfg.moe_layer_ids) == int(DISK_SPARE * 20) and ram == int(18 * layer / 1.5)
    int4_layer = card(1, True).num_experts * padded(3 * (64 * 64 // 2 + 64 * 2))  # 64 x 64 codes + bf16 scales
    cfg, _, _ = plan(True, ram=10 * layer, ratio=1.5, free_disk=100 * layer, format_name="int4")
    assert len(cfg.moe_layer_ids) == -(-15 * layer // int4_layer) > 15  # 1.5x the RAM in int4 bytes


@pytest.mark.parametrize("fmt, cpu_experts, hints, finish_past", [("bf16", "off,auto", "on", "0.5"),
                                                                   ("int4", "off", "on,off", "1")])
def test_bench_smoke(tmp_path, monkeypatch, fmt, cpu_experts, hints, finish_past):
    """The benchmark on the CPU at tiny sizes: its JSON has a row with the floor (at the faster of the disk's measures
    around it) and the tier's counters (and one with cpu_experts 'auto', compared with the copy-only row; or one
    without the next layer's guesses read ahead)."""
    from scripts import bench_ssd

    out = tmp_path / "bench_ssd.json"
    monkeypatch.setattr("sys.argv", ["bench_ssd.py", "--dims", "tiny", "--ram-gib", "0.0003", "--new-tokens", "3",
                                     "--bandwidth-gb", "0.0005", "--dir", str(tmp_path / "experts"), "--out", str(out),
                                     "--expert-format", fmt, "--cpu-experts", cpu_experts, "--hints", hints,
                                     "--finish-past", finish_past])
    bench_ssd.main()
    data = json.loads(out.read_text())
    row = data["rows"][0]
    # 3 64 x 64 matrices: 24,576 bytes in bf16; in int4 6,528 (codes and bf16 scales), padded to 8,192
    assert data["expert_format"] == fmt and row["host_tier"]["file_bytes"] == {"bf16": 24576, "int4": 8192}[fmt]
    assert data["page_cache"] == "bypassed (O_DIRECT)" and data["disk_gb_s"] > 0
    assert data["experts_gb"] >= 1.5 * data["ram_gb"] and row["disk_gb"] > 0 and 0 <= row["host_hit_rate"] < 1
    assert row["x_floor"] == row["total_s"] / row["floor_s"] > 0 and row["run_read_gb_s"] > 0
    # each row's floor at the faster of the disk's reads just before and after it; the first row's before is the
    # measure before the runs, the last row's after the one after them, and a row's after the next row's before
    arounds = [r["disk_gb_s_around"] for r in data["rows"]]
    assert arounds[0][0] == data["disk_gb_s"] and arounds[-1][1] == data["disk_gb_s_after"]
    assert all(a[1] == b[0] for a, b in zip(arounds, arounds[1:]))
    for r in data["rows"]:
        assert r["floor_gb_s"] == max(r["disk_gb_s_around"])
        assert r["floor_s"] == pytest.approx(r["needed_gb"] / r["floor_gb_s"])
    assert data["floor_gb_s"] == max(max(a) for a in arounds) and row["needed_gb"] <= row["disk_gb"]
    runs = [(c, h == "on") for c in cpu_experts.split(",") for h in hints.split(",")]
    assert [(r["cpu_experts"], r["hints"]) for r in data["rows"]] == runs and row["x_copy"] is None
    assert all(r["finish_past"] == float(finish_past) and r["cancelled_gb"] >= 0 for r in data["rows"])
    assert all(r["hint_reads"] == r["host_tier"]["hint_reads"] >= 0 for r in data["rows"])
    if hints == "on,off":
        assert data["rows"][1]["hint_reads"] == data["rows"][1]["host_tier"]["hint_cancelled"] == 0
    if cpu_experts == "off,auto":
        auto = data["rows"][1]
        assert auto["x_copy"] == auto["tokens_per_s"] / row["tokens_per_s"] > 0 and auto["cpu_token_limit"] >= 0
        assert auto["cpu_cost_model"]["copy_s"] > 0 and auto["host_tier"]["gets"] > 0


def test_unwritable_expert_dir_is_named(model, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ParameterError, match=r"expert_dir.*a_file/experts: cannot write the expert files"):
        tiered(model, "0.5", expert_dir=tmp_path / "a_file" / "experts")


# -- compact experts through the tier -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """A float32 checkpoint whose expert widths are multiples of the group size (2 MoE layers x 4 experts, top-2),
    the same with int4 experts stored (what `convert --expert-format int4` writes), prompts, and the resident
    int4 engine's (greedy tokens, logits)."""
    import jax

    from moejax.checkpoint import group_dir, load_expert, save_checkpoint, save_group
    from moejax.config import ModelConfig
    from moejax.models.decoder import init_params
    from moejax.offload.expert_format import ExpertFormat

    root = tmp_path_factory.mktemp("compact_ssd")
    cfg = ModelConfig(family="mixtral", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=64, moe_layers=(True, True),
                      sliding_windows=(None, None), rms_norm_eps=1e-5, max_position_embeddings=64, dtype="float32")
    ckpt, stored = root / "float", root / "int4"
    save_checkpoint(ckpt, cfg, *init_params(cfg, jax.random.PRNGKey(3), std=0.15))
    shutil.copytree(ckpt, stored)
    fmt = ExpertFormat("int4", "float32")
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            shutil.rmtree(group_dir(stored, ("expert", layer, e)))
            save_group(stored, ("expert", layer, e), fmt.convert(load_expert(ckpt, layer, e), "test"))
    fmt.save(stored)
    prompts = random_prompts(cfg.vocab_size, (7, 3), seed=4)
    resident = moejax.load(ckpt, expert_format="int4", **COMPACT_SIZES)
    return ckpt, stored, prompts, (resident.generate(prompts, max_new_tokens=NEW_TOKENS).tokens, resident.logits(prompts))


COMPACT_SIZES = dict(slots=2, max_seq_len=16, prefill_chunk=8)


def test_compact_experts_through_the_tier_equal_resident(compact, tmp_path):
    """int4 experts on disk, in the host cache and over the link: the tokens and logits of the resident int4 engine
    at several device and host budgets (down to one slot less than a step's 4 experts), from a float checkpoint
    quantized as its files are written and from a checkpoint stored int4; the files hold the compact bytes."""
    from moejax.offload.expert_files import padded

    ckpt, stored, prompts, (greedy, logits) = compact
    compact_bytes = 3 * (64 * 64 // 2 + 64 * 4)  # int4 codes of 3 64 x 64 matrices + one float32 scale per group
    one = padded(compact_bytes)
    for source, expert_dir, device_experts, host_experts in ((ckpt, None, 4, 8), (ckpt, None, 4, 3), (ckpt, None, 8, 1),
                                                              (stored, tmp_path / "stored", 4, 3)):
        engine = moejax.load(source, "cached", expert_budget=f"{device_experts * compact_bytes}B", expert_dir=expert_dir,
                             host_budget=f"{host_experts * one}B", expert_format="int4", **COMPACT_SIZES)
        where = (source.name, device_experts, host_experts)
        assert engine.host.cache.num_slots == host_experts and engine.stats()["capacity_experts"] == device_experts
        result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        assert result.tokens == greedy, where
        for ours, ref in zip(engine.logits(prompts), logits, strict=True):
            np.testing.assert_array_equal(ours, ref, err_msg=str(where))
        files, tier = engine.host.cache.files, result.stats["host_tier"]
        assert result.stats["expert_format"] == "int4" and result.stats["expert_bytes"] == files.expert_bytes == compact_bytes
        assert tier["bytes_read_disk"] == disk_reads(tier) * one > 0
        assert tier["host_bytes"] == host_experts * one and tier["file_bytes"] == one
        assert {p.stat().st_size for p in files.root.glob("L*/E*.bin")} == {one}
        assert result.stats["total"]["bytes_h2d"] == result.stats["total"]["misses"] * compact_bytes
        if host_experts < 4:
            assert tier["disk_misses"] > 0
        engine.close()
    assert (ckpt / "expert_files-int4" / "manifest.json").is_file() and not (ckpt / "expert_files").exists()
    for name in ("L000/E0000.bin", "L001/E0003.bin"):  # quantized as written = stored quantized by the converter
        assert (ckpt / "expert_files-int4" / name).read_bytes() == (tmp_path / "stored" / name).read_bytes()
    manifest = json.loads((tmp_path / "stored" / "manifest.json").read_text())
    assert manifest["expert_format"] == {"name": "int4", "group_size": 64} and manifest["expert_bytes"] == compact_bytes


def test_an_expert_directory_serves_only_its_format(compact, capsys):
    ckpt, stored, _, _ = compact
    int4_dir = ckpt / "expert_files-int4"  # written by the test above, or here
    options = dict(expert_budget="0.5", host_budget="0.5", expert_dir=int4_dir, **COMPACT_SIZES)
    moejax.load(stored, "cached", **options).close()
    with pytest.raises(ParameterError, match=rf"^{int4_dir}: expert directory holds int4 \(groups of 64\) experts, not "
                                             r"the f32 asked for \(expert_format\): give another expert_dir, or delete"):
        moejax.load(ckpt, "cached", **options)
    assert cli(["generate", str(ckpt), "--prompt-ids", "1,2", "--max-new-tokens", "1", "--offload", "cached",
                "--expert-budget", "0.5", "--host-budget", "0.5", "--expert-dir", str(int4_dir), "--expert-format",
                "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"moejax: error: {int4_dir}: expert directory holds int4 (groups of 64) experts, not the int8 "
                       "(groups of 64) asked for (--expert-format): give another --expert-dir, or delete it to rebuild it")
    from moejax import checkpoint
    from moejax.engine.loading import build_engine
    from moejax.offload.config import OffloadConfig
    from moejax.offload.disk_tier import checkpoint_tier
    from moejax.offload.expert_format import ExpertFormat

    cfg = checkpoint.load_config(ckpt)  # a tier of int4 files given to an engine of float experts
    shapes = {name: ((64, 64), np.dtype(np.float32)) for name in ("gate", "up", "down")}
    tier = checkpoint_tier(ckpt, cfg, shapes, ExpertFormat("int4", "float32"), "0.5", None)
    with pytest.raises(ParameterError, match=r"^host_tier: its expert files hold other weights than expert_format 'f32'"):
        build_engine(cfg, checkpoint.load_globals(ckpt), [checkpoint.load_layer(ckpt, i) for i in range(2)], (),
                     OffloadConfig("cached", expert_budget="0.5", host_budget="0.5"), host_tier=tier)
    tier.cache.close()


def test_a_manifest_without_a_format_holds_float_weights(small_files):
    """Directories written before formats were recorded open as float ones of their dtype, and only as those."""
    files, _ = small_files
    manifest_path = files.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest.pop("expert_format") == {"name": "f32"}
    manifest_path.write_text(json.dumps(manifest))
    ExpertFiles(files.root, files.shapes, 3, 5)
    with pytest.raises(ParameterError, match="holds f32 experts, not the bf16 asked for"):
        ExpertFiles(files.root, files.shapes, 3, 5, {"name": "bf16"})


# -- CPU compute of missed experts from the host cache (cpu_experts='auto' with host_budget) --------------------
def test_host_computes_from_the_host_cache_and_records_failed_reads(tmp_path):
    """HostExperts over a one-slot host cache of int4 experts equals HostExperts over its own copy of the same
    experts, bit for bit (the same function on the same codes and scales, dequantized as the device does); every
    expert computed is one `get` of the tier; a corrupt file inside a step adds nothing, raises nothing there, and
    is raised by name when the step is read."""
    from moejax.offload.cpu_experts import HostExperts
    from moejax.offload.expert_format import ExpertFormat
    from moejax.offload.host_cache import TieredHost

    fmt, rng = ExpertFormat("int4", "float32"), np.random.default_rng(2)
    float_shapes = {"gate": ((64, 64), np.dtype(np.float32)), "up": ((64, 64), np.dtype(np.float32)),
                    "down": ((64, 64), np.dtype(np.float32))}
    experts = {(m, e): fmt.convert({n: rng.standard_normal(s).astype(d) * 0.1 for n, (s, d) in float_shapes.items()},
                                   "test") for m in range(2) for e in range(3)}
    shapes = fmt.shapes(float_shapes)
    write_expert_files(tmp_path / "ef", shapes, 2, 3, lambda m, e: experts[m, e], expert_format=fmt.record())
    cache = HostCache(ExpertFiles(tmp_path / "ef", shapes, 2, 3, fmt.record()), 1)
    stacks = [{n: np.stack([experts[m, e][n] for e in range(3)]) for n in shapes} for m in range(2)]
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ids = np.array([[0, 1], [1, 2], [2, 0], [0, 1], [2, 1]], np.int32)
    weights = rng.random((5, 2)).astype(np.float32)
    from_tier = HostExperts.from_host_cache(cache, "silu", 8)
    for layer in range(2):
        want = HostExperts.from_stacks(stacks, "silu", 8).compute(layer, x, ids, weights, np.ones(3, bool))
        np.testing.assert_array_equal(from_tier.compute(layer, x, ids, weights, np.ones(3, bool)), want)
    assert cache.stats()["gets"] == from_tier.stats()["experts"] == 6 and cache.stats()["disk_misses"] >= 5
    cache.check_invariants()
    assert not cache._lent.any()  # nothing computed keeps its slot lent
    victim = expert_path(tmp_path / "ef", 1, 2)
    data = bytearray(victim.read_bytes())
    data[3] ^= 0xFF
    victim.write_bytes(bytes(data))
    expert_1 = np.array([False, True, False])
    only_expert_1 = HostExperts.from_stacks(stacks, "silu", 8).compute(1, x, ids, weights, expert_1)
    np.testing.assert_array_equal(from_tier.compute(1, x, ids, weights, expert_1 | [False, False, True]), only_expert_1)
    with pytest.raises(MoejaxError, match=r"^\S*L001/E0002\.bin: expert file fails its CRC-32 check"):
        TieredHost(cache).raise_failure()
    cache.close()


def within_float_rounding(ours, reference):
    """Logits of CPU-computed experts against the device path's: 1e-4 of their range (float32 models)."""
    return all(np.abs(a - b).max() <= 1e-4 * (b.max() - b.min()) for a, b in zip(ours, reference, strict=True))


def test_host_experts_waiting_on_the_disk_are_not_stopped():
    """Through the tier a host expert's wait includes its disk read, which a copy pays too: the engine's check that
    stops sending the host experts (`Engine._check_host_experts`) leaves them be there."""
    from types import SimpleNamespace

    from moejax.engine.engine import Engine
    from moejax.offload.host_cache import TieredHost

    host_experts = SimpleNamespace(losing=lambda: "the device waited", overlap=True)
    engine = SimpleNamespace(spec=SimpleNamespace(cpu_experts=host_experts), host_experts_losing=None,
                             host=TieredHost.__new__(TieredHost))
    Engine._check_host_experts(engine)
    assert engine.host_experts_losing is None and engine.spec.cpu_experts is host_experts


def test_cpu_experts_through_the_tier(model, compact):
    """`cpu_experts='auto'` with the disk tier, the cost model forced: a host slower than the link beyond one token
    (misses both computed on the CPU and copied) from a one-slot host cache of float experts, and every miss on the CPU
    from a host cache of int4 experts smaller than a step needs: tokens and logits of the resident engine (of the
    same format) up to float rounding, no host-computed expert over the link, and each one a host-tier get."""
    from moejax.offload.cpu_experts import CostModel
    from moejax.offload.stats import summary_line

    ckpt, default_dir, prompts, device_budget, (greedy, _, logits) = model
    probe = tiered(model, "1.0")  # the expert directory exists
    probe.close()
    one = probe.host.cache.files.file_bytes
    cfg = probe.cfg
    at_most_one_token = CostModel(cfg.expert_bytes, cfg.expert_bytes, 0.0, 0.6)  # copy 1 s, host 0.6 s a token
    int4_ckpt, _, int4_prompts, (int4_greedy, int4_logits) = compact
    int4_bytes = 3 * (64 * 64 // 2 + 64 * 4)  # a file of 8,192 bytes, padded
    runs = [("float", tiered(model, f"{one}B", cpu_experts="auto", cpu_cost=at_most_one_token), prompts, greedy,
             logits),
            ("int4", moejax.load(int4_ckpt, "cached", expert_budget=f"{4 * int4_bytes}B", host_budget=f"{3 * 8192}B",
                                 expert_format="int4", cpu_experts="auto", cpu_cost=CostModel(int4_bytes, 1e3, 0, 0),
                                 **COMPACT_SIZES), int4_prompts, int4_greedy, int4_logits)]
    for name, engine, prompts, want_tokens, want_logits in runs:
        result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        stats, tier, host = result.stats, result.stats["host_tier"], result.stats["cpu_experts"]
        assert result.tokens == want_tokens, name
        assert within_float_rounding(engine.logits(prompts), want_logits), name
        assert host["experts"] > 0 and host["seconds"] > 0 and tier["gets"] == stats["total"]["misses"] + host["experts"]
        assert "; host tier " in summary_line(stats, NEW_TOKENS) and " computed on the CPU in " in summary_line(stats, 1)
        assert tier["host_hits"] + tier["disk_misses"] + tier["prefetch_waits"] == tier["gets"]
        assert tier["disk_misses"] > 0, name
        assert stats["total"]["bytes_h2d"] == stats["total"]["misses"] * stats["expert_bytes"]
        if name == "float":  # the cost model's choice: some misses on the CPU, the others copied
            assert engine.spec.cpu_experts.token_limit == 1 and stats["total"]["misses"] > 0
        else:  # every miss on the CPU: nothing crosses the link
            assert stats["total"]["misses"] == 0 and host["tokens"] > host["experts"]
        assert engine.host.cache.num_slots == {"float": 1, "int4": 3}[name]
        engine.host.cache.check_invariants()
        engine.close()
