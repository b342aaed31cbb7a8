"""The policy lab: against brute-force references and the Python twin, against `offload.replay.Replayer`
driven by hand, Belady as an upper bound, prompt steps, prefetcher rules, the CLI."""

import json

import jax
import numpy as np
import pytest
import reference_cache

from moejax.cli import main
from moejax.errors import MoejaxError, ParameterError
from moejax.tools.lab import POLICIES, replay, simulate_lookahead
from moejax.offload import device_cache as dc
from moejax.offload.manager import OffloadManager
from moejax.offload.replay import BeladyFuture, Replayer, prefill_chunk_tokens, schedule
from moejax.routing.prefetchers import PREFETCHERS, make_prefetcher
from moejax.routing.traces import RoutingTrace, load_routing
from reference_policies import Belady

NEVER = float("inf")


def random_trace(seed, layers=3, experts=6, k=2, seq_lens=(7, 5, 9), skew=1.5):
    """Zipf-like routing (so caching has something to find) with distinct experts per token and layer."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1) ** skew
    tokens = sum(seq_lens)
    ids = np.empty((layers, tokens, k), np.int64)
    for layer in range(layers):
        perm = rng.permutation(experts)
        for t in range(tokens):
            ids[layer, t] = perm[rng.choice(experts, size=k, replace=False, p=weights / weights.sum())]
    return RoutingTrace(ids, np.array(seq_lens), experts)


def steps(trace):
    """[(step, layer, sorted distinct experts)] in decode order (every layer step of every token)."""
    by_token = np.swapaxes(trace.experts, 0, 1)
    rows = by_token.reshape(-1, trace.top_k).tolist()
    return [(i, i % trace.num_layers, sorted({e for e in row if e < trace.num_experts})) for i, row in enumerate(rows)]


def reference_lru_hits(trace, capacity):
    """LRU by hand: recency is (step, expert) (a step's accesses are in expert order)."""
    last, hits = {}, 0
    for step, layer, experts in steps(trace):
        for e in experts:
            key = (layer, e)
            if key in last:
                hits += 1
            elif len(last) >= capacity:
                victim = min((k for k in last if k[0] != layer or k[1] not in experts), key=lambda k: last[k])
                del last[victim]
            last[key] = (step, e)
    return hits


def reference_belady_hits(trace, capacity):
    """Belady's MIN by hand: on a miss, evict the cached expert needed farthest ahead (ties: largest key)."""
    all_steps = steps(trace)

    def next_use(key, after):
        for step, layer, experts in all_steps[after + 1:]:
            if layer == key[0] and key[1] in experts:
                return step
        return NEVER

    cache, hits = set(), 0
    for step, layer, experts in all_steps:
        for e in experts:
            key = (layer, e)
            if key in cache:
                hits += 1
                continue
            if len(cache) >= capacity:
                current = {(layer, x) for x in experts}
                victim = max(cache - current, key=lambda k: (next_use(k, step), k))
                cache.remove(victim)
            cache.add(key)
    return hits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_lru_and_belady_hits_equal_brute_force(seed, fraction):
    trace = random_trace(seed)
    capacity = int(round(fraction * 3 * 6))
    lru = replay(trace, capacity_fraction=fraction, policy="lru")
    belady = replay(trace, capacity_fraction=fraction, policy="belady")
    assert lru["capacity_experts"] == capacity
    assert lru["hits"] == reference_lru_hits(trace, capacity)
    assert belady["hits"] == reference_belady_hits(trace, capacity)
    assert lru["activations"] == belady["activations"] == sum(len(e) for _, _, e in steps(trace))


@pytest.mark.parametrize("seed", range(6))
def test_belady_bounds_every_policy(seed):
    trace = random_trace(seed, layers=4, experts=8, seq_lens=(12, 9, 15))
    for fraction in (0.2, 0.4, 0.6):
        best = replay(trace, capacity_fraction=fraction, policy="belady")["hits"]
        for policy in POLICIES:
            assert replay(trace, capacity_fraction=fraction, policy=policy)["hits"] <= best, (policy, fraction)


@pytest.mark.parametrize("name", PREFETCHERS)
def test_predict_never_returns_the_current_layer(name):
    trace = random_trace(1, layers=4, experts=8)
    collection = trace.collection()
    prefetcher = make_prefetcher(name, num_layers=4, num_experts=8, top_k=2, collection=collection)
    guesses = simulate_lookahead(trace, 0.5)
    predicted = 0
    for t in range(trace.experts.shape[1]):
        for layer in range(4):
            counts = np.bincount(trace.experts[layer, t], minlength=8)
            ahead = np.bincount(guesses[layer + 1, t], minlength=8) if layer < 3 else None
            prefetcher.observe(layer, counts, ahead)
            keys = prefetcher.predict(layer)
            predicted += len(keys)
            assert all(k[0] != layer and 0 <= k[0] < 4 and 0 <= k[1] < 8 for k in keys)
    assert predicted > 0 or name == "none"


def test_prefetch_floor_keeps_only_likelier_experts():
    trace = random_trace(2, layers=4, experts=8)
    collection = trace.collection()
    loose = make_prefetcher("trace", num_layers=4, num_experts=8, top_k=2, collection=collection, floor=0.0)
    strict = make_prefetcher("trace", num_layers=4, num_experts=8, top_k=2, collection=collection, floor=0.3)
    assert (loose.min_probability, strict.min_probability) == (0.0, 0.3)
    for t in range(trace.experts.shape[1]):
        for layer in range(4):
            counts = np.bincount(trace.experts[layer, t], minlength=8)
            for prefetcher in (loose, strict):
                prefetcher.observe(layer, counts)
            everything = loose.predict(layer)
            p = loose.probabilities(everything[0][0])
            # the strict list is the loose list cut where p falls below the floor
            assert strict.predict(layer) == [key for key in everything if p[key[1]] >= 0.3]
    with pytest.raises(ParameterError, match="^prefetch_floor applies to prefetch trace or trace\\+lookahead, not 'lookahead'"):
        make_prefetcher("lookahead", num_layers=2, num_experts=4, top_k=1, floor=0.1)
    with pytest.raises(ParameterError, match="^prefetch_floor must be a probability in \\[0, 1\\], got 1.5"):
        make_prefetcher("trace", num_layers=2, num_experts=4, top_k=1, floor=1.5)


def test_unknown_prefetcher_lists_valid_names():
    with pytest.raises(MoejaxError, match="none, lookahead, trace"):
        make_prefetcher("oracle", num_layers=2, num_experts=4, top_k=1)


def test_lookahead_simulation_accuracy():
    trace = random_trace(2, layers=3, experts=16, k=3, seq_lens=(200,))
    exact = simulate_lookahead(trace, 1.0)
    np.testing.assert_array_equal(exact[1:], trace.experts[1:])
    assert (exact[0] == -1).all()
    never = simulate_lookahead(trace, 0.0)
    overlap = (never[1:, :, :, None] == trace.experts[1:, :, None, :]).any(-1)
    assert not overlap.any()
    half = simulate_lookahead(trace, 0.5, seed=3)
    kept = (half[1:] == trace.experts[1:]).mean()
    assert 0.4 < kept < 0.6


def test_exact_lookahead_covers_every_miss_but_the_first_layer():
    trace = random_trace(3, layers=4, experts=8, seq_lens=(30,))
    result = replay(trace, capacity_fraction=0.5, policy="lru", prefetch="lookahead", lookahead_accuracy=1.0)
    plain = replay(trace, capacity_fraction=0.5, policy="lru")
    assert result["lookahead_source"] == "simulated" and result["lookahead_accuracy"] == 1.0
    assert result["hit_rate"] > plain["hit_rate"]
    assert result["prefetch_precision"] == 1.0
    # With capacity for 16 experts and 2 per step, every expert of layers 1-3 is prefetched in time.
    first_layer_steps = trace.experts.shape[1]
    assert result["misses"] <= 2 * first_layer_steps


def test_trace_prefetch_scores_on_repeated_sequences():
    """Sequences that repeat routing: the collection's transitions predict the next layer exactly."""
    base = random_trace(4, layers=4, experts=12, k=2, seq_lens=(40,))
    repeated = RoutingTrace(np.concatenate([base.experts] * 2, axis=1), np.array([40, 40]), 12)
    collection = base.collection()
    result = replay(repeated, capacity_fraction=0.25, policy="lru", prefetch="trace", collection=collection)
    plain = replay(repeated, capacity_fraction=0.25, policy="lru", collection=collection)
    assert result["prefetch_precision"] > 0.4
    assert result["hit_rate"] > plain["hit_rate"] + 0.05
    assert len(collection) == 1  # the replay's sequences joined a copy


def test_router_evidence_learns_how_good_the_guess_is():
    """trace+lookahead: after guesses that always come true, a guessed expert is near certain and an
    unguessed one unlikely; after guesses that never do, the guess lowers the probability."""
    for accuracy, guessed_high in ((1.0, True), (0.0, False)):
        trace = random_trace(6, layers=3, experts=16, k=2, seq_lens=(60,))
        guesses = simulate_lookahead(trace, accuracy, seed=1)
        prefetcher = make_prefetcher("trace+lookahead", num_layers=3, num_experts=16, top_k=2, collection=trace.collection())
        plain = make_prefetcher("trace", num_layers=3, num_experts=16, top_k=2, collection=trace.collection())
        for t in range(trace.experts.shape[1]):
            for layer in range(3):
                counts = np.bincount(trace.experts[layer, t], minlength=16)
                ahead = np.bincount(guesses[layer + 1, t], minlength=16) if layer < 2 else None
                prefetcher.observe(layer, counts, ahead)
                plain.observe(layer, counts, ahead)
        guessed = np.bincount(guesses[2, -1], minlength=16) > 0  # the guess of the last step (layer 1 -> 2)
        prefetcher.observe(1, np.bincount(trace.experts[1, -1], minlength=16), guessed.astype(int))
        plain.observe(1, np.bincount(trace.experts[1, -1], minlength=16), guessed.astype(int))
        p, base = prefetcher.probabilities(2), plain.probabilities(2)
        if guessed_high:
            assert (p[guessed] > 0.9).all() and (p[~guessed] < 0.1).all()
        else:
            assert (p[guessed] < base[guessed]).all()
        np.testing.assert_array_equal(plain.probabilities(1), prefetcher.probabilities(1))  # only the next layer


def reference_token_probabilities(prefetcher, layer):
    """Part 2 of TracePrefetcher's docstring, written out term by term in the log domain."""
    collection, w = prefetcher.collection, prefetcher.sequence_weight
    smoothed = collection.transitions + prefetcher.smoothing
    first = collection.transitions[0].sum(axis=1) + prefetcher.smoothing
    log_u = np.log(first[layer] / first[layer].sum())
    s = prefetcher.sequence_probabilities(layer)
    terms = []
    for d in range(1, len(smoothed) + 1):
        c = prefetcher.token_counts[layer - d] if 0 <= layer - d <= prefetcher.token_layer else np.zeros(0)
        if c.sum() == 0:
            continue
        p_d = sum(c[a] * smoothed[d - 1, layer, a] / smoothed[d - 1, layer, a].sum() for a in range(len(c))) / c.sum()
        terms.append(np.log(p_d))
    log_r = terms[0] + sum(t - log_u for t in terms[1:]) + w * (np.log(s / s.sum()) - log_u)
    r = np.exp(log_r)
    return np.minimum(prefetcher.usage.experts_per_step(layer) * r / r.sum(), 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_token_level_probabilities_equal_the_docstring_formula(seed):
    trace = random_trace(seed, layers=5, experts=10, k=3, seq_lens=(30, 20))
    prefetcher = make_prefetcher("trace", num_layers=5, num_experts=10, top_k=3, collection=trace.collection())
    rng = np.random.default_rng(seed)
    for layer in range(4):  # a token in flight that has passed layers 0..3, some of them with two rows
        prefetcher.observe(layer, np.bincount(rng.integers(0, 10, size=3 * (1 + layer % 2)), minlength=10))
        np.testing.assert_allclose(prefetcher.probabilities(layer + 1), reference_token_probabilities(prefetcher, layer + 1),
                                   rtol=1e-9)


def test_capacity_below_one_step_is_refused():
    with pytest.raises(MoejaxError, match="fewer than the 2 experts"):
        replay(random_trace(0), capacity_fraction=0.05, policy="lru")


def test_cli_lab_json(tmp_path, capsys):
    trace = random_trace(5, layers=3, experts=8, seq_lens=(6, 8, 5, 7))
    path = tmp_path / "routing.npz"
    np.savez(path, experts=trace.experts.astype(np.uint8), seq_lens=trace.seq_lens)
    args = ["lab", "--traces", str(path), "--sequences", "2:", "--fit", str(path), "--fit-sequences", ":2",
            "--policy", "activation", "--prefetch", "trace", "--json"]
    assert main(args + ["--capacity", "0.25"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert {"hit_rate", "prefetch_precision", "prefetch_recall"} <= set(one)
    assert one["sequences"] == 2 and one["collection_size"] == 2 and one["tokens"] == 12
    assert main(args + ["--capacity", "0.25,0.5", "--prefetch-per-step", "1"]) == 0
    many = json.loads(capsys.readouterr().out)["results"]
    assert [r["capacity_fraction"] for r in many] == [0.25, 0.5]
    assert many[0]["prefetch_per_step"] == 1 and many[0]["prefetch_floor"] == 0.02
    assert many[0]["prefetch_issued"] == many[0]["prefetch_staged"] <= many[0]["steps"]
    assert main(args + ["--capacity", "0.25", "--prefetch-floor", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["prefetch_floor"] == 0.5
    assert main(["lab", "--traces", str(path), "--capacity", "0.5", "--policy", "lookahead-free", "--json"]) == 2
    assert "--policy 'lookahead-free' is not one of lru, lfu" in capsys.readouterr().err
    assert main(args + ["--capacity", "0.25", "--prefetch-per-layer", "1"]) == 2
    assert "--prefetch-per-layer applies to --prefetch lookahead or trace+lookahead, not 'trace'" in capsys.readouterr().err


def test_cli_lab_corrupt_npz_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip archive")
    assert main(["lab", "--traces", str(path), "--capacity", "0.25", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.npz" in err and err.startswith("moejax: error:")


def test_recorded_lookahead_is_used_when_present():
    base = random_trace(6, layers=3, experts=8, seq_lens=(20,))
    lookahead = np.full_like(base.experts, -1)
    lookahead[1:] = base.experts[1:]  # a router that is always right one layer early
    trace = RoutingTrace(base.experts, base.seq_lens, 8, lookahead=lookahead)
    result = replay(trace, capacity_fraction=0.5, policy="lru", prefetch="lookahead")
    assert result["lookahead_source"] == "recorded" and result["lookahead_accuracy"] is None
    assert result["prefetch_precision"] == 1.0
    simulated = replay(trace, capacity_fraction=0.5, policy="lru", prefetch="lookahead", lookahead_accuracy=0.0)
    # Always-wrong guesses are used only when a later token needs them before they are evicted.
    assert simulated["lookahead_source"] == "simulated" and simulated["prefetch_precision"] < 0.5


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    trace = random_trace(8)
    path = tmp_path / "routing.npz"
    trace.save(path)
    assert main(["lab", "--traces", str(path), "--capacity", "0.5", "--plot", str(tmp_path / "c.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err == "moejax: error: plotting needs matplotlib: pip install 'moejax[plot]'\n"
    assert captured.out == ""  # refused before the replay
    assert not (tmp_path / "c.png").exists()


def by_hand(trace, *, policy, prefetch="none", capacity, guesses=None, collection=None):
    """The counters [L, C] of a Replayer driven sequence by sequence, as the engine's `generate` runs them."""
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    manager = OffloadManager(L, E, k, policy="lru" if policy == "belady" else policy, prefetch=prefetch,
                             staged_per_step=2 * k, collection=collection, device=jax.devices("cpu")[0])
    prompt_lens = trace.prompt_lens if trace.prompt_lens is not None else np.minimum(trace.seq_lens, 1)
    future = None
    if policy == "belady":
        future = BeladyFuture(trace.experts, schedule(trace.seq_lens, prompt_lens, 512), E)
    replayer = Replayer(L, E, capacity, manager, lookahead=k if manager.lookahead else 0, future=future)
    offsets = trace.offsets()
    for s in range(trace.num_sequences):
        tokens = slice(offsets[s], offsets[s + 1])
        replayer.sequence(trace.experts[:, tokens], int(prompt_lens[s]), None if guesses is None else guesses[:, tokens])
    return replayer.counters()


def with_prompts(trace, prompt_lens):
    return RoutingTrace(trace.experts, trace.seq_lens, trace.num_experts, lookahead=trace.lookahead, prompt_lens=prompt_lens)


@pytest.mark.parametrize("policy,prefetch", [
    ("lru", "none"), ("lfu", "lookahead"), ("fifo", "none"), ("lifo", "lookahead"), ("belady", "none"),
    ("belady", "lookahead"), ("activation", "none"), ("lru", "trace"), ("activation", "trace+lookahead"),
])
def test_lab_equals_the_replayer_driven_by_hand(policy, prefetch):
    """The lab (many steps per call when the manager gives steps nothing) counts what the Replayer counts
    step by step on the engine's schedule, in decode order and with prompts as steps."""
    base = random_trace(11, layers=3, experts=8, k=2, seq_lens=(9, 14, 6))
    lookahead = np.full_like(base.experts, -1)
    lookahead[1:] = np.where(np.arange(base.experts.shape[1])[:, None] % 3 == 0, 7 - base.experts[1:], base.experts[1:])
    for prompt_lens in (None, np.array([4, 9, 1])):
        trace = RoutingTrace(base.experts, base.seq_lens, 8, lookahead=lookahead, prompt_lens=prompt_lens)
        result = replay(trace, capacity_fraction=0.4, policy=policy, prefetch=prefetch)
        guesses = np.concatenate([lookahead[1:], np.full_like(lookahead[:1], -1)])  # row m: the guess for layer m + 1
        counters = by_hand(trace, policy=policy, prefetch=prefetch, capacity=result["capacity_experts"], guesses=guesses)
        for name in ("activations", "hits", "misses", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted"):
            assert result[name] == counters[:, dc.COUNTERS.index(name)].sum(), (name, prompt_lens)
        assert result["steps"] == (29 if prompt_lens is None else 29 - (4 + 9 + 1) + 3)  # a prompt is one step
        if prefetch != "none":
            assert result["prefetch_issued"] > 0


@pytest.mark.parametrize("seed", range(3))
def test_lab_belady_equals_python_belady(seed):
    """Belady as the device's priority policy hits what the Python Belady hits, token by token and with
    prompts as single steps."""
    trace = random_trace(seed, layers=3, experts=8, k=2, seq_lens=(12, 7, 10))
    for prompt_lens in (None, np.array([5, 1, 10])):
        trace = with_prompts(trace, prompt_lens)
        lens = np.minimum(trace.seq_lens, 1) if prompt_lens is None else prompt_lens
        bounds = schedule(trace.seq_lens, lens, 512)
        steps = [reference_cache.Step(trace.experts[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        for fraction in (0.4, 0.6):
            result = replay(trace, capacity_fraction=fraction, policy="belady")
            python = reference_cache.replay(steps, capacity=result["capacity_experts"],
                                            policy=Belady(reference_cache.layer_steps(steps, 3, 8)), num_layers=3, num_experts=8)
            assert result["hits"] == python.total.hits and result["misses"] == python.total.misses, (prompt_lens, fraction)


def test_a_prompt_is_one_step():
    """With prompt lengths, the prompt's layer steps need the distinct experts of all its tokens at once."""
    trace = random_trace(3, layers=2, experts=8, k=2, seq_lens=(10, 6))
    prompted = with_prompts(trace, np.array([10, 2]))
    result = replay(prompted, capacity_fraction=1.0, policy="lru")
    prompt_activations = sum(len(np.unique(trace.experts[m, :10])) + len(np.unique(trace.experts[m, 10:12])) for m in range(2))
    assert result["steps"] == 2 + 4
    assert result["activations"] == prompt_activations + 4 * 2 * 2
    assert result["misses"] == len(np.unique(trace.experts[0])) + len(np.unique(trace.experts[1]))  # cold misses only
    assert replay(trace, capacity_fraction=1.0, policy="lru")["activations"] == 16 * 2 * 2


def test_prompt_lens_are_saved_selected_and_checked(tmp_path):
    trace = with_prompts(random_trace(4), np.array([3, 5, 1]))
    trace.save(tmp_path / "routing.npz")
    loaded = load_routing(tmp_path)
    np.testing.assert_array_equal(loaded.prompt_lens, [3, 5, 1])
    np.testing.assert_array_equal(loaded.select(1, 3).prompt_lens, [5, 1])
    assert load_routing(tmp_path).select(0, 1).prompt_lens.dtype == np.int64
    with pytest.raises(MoejaxError, match="prompt_lens must be within 0..seq_lens"):
        with_prompts(trace, np.array([3, 6, 1]))  # the second sequence has 5 tokens
    with pytest.raises(MoejaxError, match="prompt_lens must be integers \\[3\\] like seq_lens"):
        with_prompts(trace, np.array([3, 5]))
    np.savez(tmp_path / "bad.npz", experts=trace.experts, seq_lens=trace.seq_lens, prompt_lens=np.array([1.5, 2, 1]))
    with pytest.raises(MoejaxError, match="bad.npz: prompt_lens must be integers"):
        load_routing(tmp_path / "bad.npz")


def test_schedule_chunks_prompts_as_the_engine():
    """Prompts in chunks of at most prefill_chunk tokens (fewer when the cache holds less than a layer's
    experts), then a step per token; Replayer.run refuses a manager whose inputs depend on the steps."""
    assert schedule(np.array([10, 3]), np.array([7, 1]), 3).tolist() == [0, 3, 6, 7, 8, 9, 10, 11, 12, 13]
    assert schedule(np.array([2]), np.array([0]), 3).tolist() == [0, 1, 2]
    assert [prefill_chunk_tokens(c, 64, 6) for c in (64, 63, 12, 5)] == [512, 10, 2, 1]
    manager = OffloadManager(2, 4, 1, policy="activation", device=jax.devices("cpu")[0])
    with pytest.raises(ValueError, match="replay with `sequence`"):
        Replayer(2, 4, 2, manager).run(np.zeros((2, 1, 1), np.int32), np.array([0, 1]))


class ReadsResidency(OffloadManager):
    """A manager that claims to read what is resident: the Replayer dispatches its steps one by one."""

    reads_residency = True


@pytest.mark.parametrize("prefetch", ["none", "lookahead"])
def test_planned_steps_equal_steps_one_by_one(prefetch):
    """The activation policy's inputs need only the routing: the Replayer takes them all, then scans the
    steps; the counters are those of dispatching each step when the engine would."""
    trace = random_trace(12, layers=3, experts=8, k=2, seq_lens=(11, 7))
    guesses = np.concatenate([trace.experts[1:], np.full_like(trace.experts[:1], -1)])
    counters = []
    for kind in (OffloadManager, ReadsResidency):
        manager = kind(3, 8, 2, policy="activation", prefetch=prefetch, device=jax.devices("cpu")[0])
        replayer = Replayer(3, 8, 9, manager, lookahead=2 if prefetch == "lookahead" else 0)
        for prompt_len, tokens in ((4, slice(0, 11)), (1, slice(11, 18))):
            replayer.sequence(trace.experts[:, tokens], prompt_len, guesses[:, tokens])
        counters.append(replayer.counters())
    np.testing.assert_array_equal(*counters)
    assert counters[0][:, dc.EVICTIONS].sum() > 10
