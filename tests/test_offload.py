"""Offloading never changes results: every mode, budget and policy equals resident, bit for bit."""

import json
import time

import numpy as np
import pytest
from hf_zoo import CASES, build, case_id, random_prompts

import moejax
from moejax import checkpoint
from moejax.cli import main as cli
from moejax.errors import MoejaxError
from moejax.runtime import budget as budget_module
from moejax.runtime.engine import Engine
from moejax.runtime.host_routed import HostRoutedExecutor
from moejax.runtime.loading import expert_runner
from moejax.runtime.policies import ONLINE_POLICIES, make_policy
from moejax.runtime.store import HostExpertStore

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("offload")


def offloaded_engine(ckpt, cfg, store, mode, budget=None, policy="lru"):
    globals_ = checkpoint.load_globals(ckpt)
    layers = [checkpoint.load_layer(ckpt, i) for i in range(cfg.num_layers)]
    policy = make_policy(policy, num_layers=len(cfg.moe_layer_ids), num_experts=cfg.num_experts)
    return Engine(cfg, HostRoutedExecutor(cfg, globals_, layers, expert_runner(cfg, store, mode, budget, policy)))


def every_mode(cfg, store):
    """(mode, budget, policy): each mode, cached at the minimum budget and at half."""
    minimum = f"{cfg.top_k * store.expert_bytes}B"
    return [("on-demand", None, "lru"), ("dense-offload", None, "lru"), ("cached", minimum, "lru"), ("cached", "0.5", "lifo")]


def every_policy_and_budget(cfg, store):
    """Each engine policy (belady is lab only) at the minimum, a small, a middle and the full budget."""
    budgets = (f"{cfg.top_k * store.expert_bytes}B", "0.2", "0.5", "1.0")
    return [("cached", budget, policy) for budget in budgets for policy in ONLINE_POLICIES]


def check_counters(stats, cfg):
    total = stats["total"]
    assert total["hits"] + total["misses"] == total["activations"] > 0
    assert sum(layer["activations"] for layer in stats["per_layer"]) == total["activations"]
    expert_bytes = stats["expert_bytes"]
    if stats["mode"] == "cached":
        assert total["demand_fetches"] == total["misses"]
        assert total["bytes_h2d"] == (total["misses"] + total["prefetch_fetches"]) * expert_bytes
    if stats["mode"] == "on-demand":
        assert total["hits"] == 0 and total["bytes_h2d"] == total["misses"] * expert_bytes
    if stats["mode"] == "dense-offload":
        assert total["bytes_h2d"] == (total["misses"] + total["streamed"]) * expert_bytes
        assert (total["misses"] + total["streamed"]) % cfg.num_experts == 0


def assert_all_equal_resident(case, root, combinations):
    _, _, ckpt = build(case, root)
    resident = moejax.load(ckpt)
    cfg = resident.cfg
    prompts = random_prompts(cfg.vocab_size, [9, 3, 5], seed=4)
    expected = resident.generate(prompts, max_new_tokens=NEW_TOKENS).tokens
    expected_single = resident.generate(prompts[:1], max_new_tokens=NEW_TOKENS).tokens
    expected_logits = resident.logits(prompts)
    store = HostExpertStore.from_checkpoint(ckpt, cfg, resident.executor.device)
    for mode, budget, policy in combinations(cfg, store):
        engine = offloaded_engine(ckpt, cfg, store, mode, budget, policy)
        label = f"{mode} budget={budget} policy={policy}"
        result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        assert result.tokens == expected, label
        check_counters(result.stats, cfg)
        assert engine.generate(prompts[:1], max_new_tokens=NEW_TOKENS).tokens == expected_single, label
        for ours, ref in zip(engine.logits(prompts), expected_logits):
            np.testing.assert_array_equal(ours, ref, err_msg=label)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_mode_equals_resident(case, root):
    assert_all_equal_resident(case, root, every_mode)


def test_every_policy_and_budget_equals_resident(root):
    assert_all_equal_resident(("mixtral", "sliding_window"), root, every_policy_and_budget)


def test_minimum_budget_streams_long_prefill_in_waves(root):
    """A prompt whose tokens need every expert of a layer runs through a 2-slot cache."""
    _, _, ckpt = build(("mixtral", "sliding_window"), root)
    resident = moejax.load(ckpt)
    prompt = random_prompts(resident.cfg.vocab_size, [40], seed=5)
    tiny = moejax.load(ckpt, offload="cached", expert_budget=f"{2 * resident.cfg.expert_bytes}B")
    assert tiny.executor.runner.cache.capacity == 2
    result = tiny.generate(prompt, max_new_tokens=4)
    assert result.tokens == resident.generate(prompt, max_new_tokens=4).tokens
    prefill_layer0 = [layer for layer in result.stats["per_layer"] if layer["moe_layer"] == 0][0]
    assert prefill_layer0["activations"] > 2  # more experts than slots: waves happened


def test_generate_json_reports_stats(root, capsys):
    _, _, ckpt = build(("mixtral", "basic"), root)
    rc = cli(["generate", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--offload", "cached",
              "--expert-budget", "0.5", "--cache-policy", "lfu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    stats = out["stats"]
    assert stats["mode"] == "cached" and stats["policy"] == "lfu" and stats["capacity_experts"] == 4
    for key in ("hit_rate", "hits", "misses", "bytes_h2d", "stall_s", "prefetch_issued", "prefetch_used", "prefetch_wasted"):
        assert key in stats["total"]
    assert len(stats["per_layer"]) == 2


def test_summary_line_on_stderr(root, capsys):
    _, _, ckpt = build(("mixtral", "basic"), root)
    assert cli(["generate", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--offload", "on-demand"]) == 0
    err = capsys.readouterr().err
    assert "on-demand: hit rate 0.0%" in err and "host->GPU" in err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--offload", "cached", "--expert-budget", "-0.1"], "not a fraction"),
        (["--offload", "cached", "--expert-budget", "0"], "must be positive"),
        (["--offload", "cached", "--expert-budget", "lots"], "not a fraction"),
        (["--offload", "cached", "--expert-budget", "12 parsecs"], "not a fraction"),
        (["--offload", "cached", "--expert-budget", "10B"], "holds 0 experts; one layer needs at least 2"),
        (["--offload", "cached", "--expert-budget", "10"], "a bare number is a fraction of all expert bytes, at most 1"),
        (["--offload", "swap"], "resident, cached, on-demand, dense-offload"),
        (["--offload", "cached", "--cache-policy", "random"], "lru, lfu, fifo, lifo"),
        (["--offload", "on-demand", "--expert-budget", "0.5"], "applies to --offload cached"),
        (["--offload", "cached", "--executor", "whole-model"], "needs --offload resident"),
    ],
)
def test_bad_offload_flags_are_one_line_errors(root, capsys, flags, message):
    _, _, ckpt = build(("mixtral", "basic"), root)
    assert cli(["generate", str(ckpt), "--prompt-ids", "1,2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moejax: error:") and message in err and "\n" not in err


def test_budget_above_device_memory_is_refused(root, monkeypatch):
    _, _, ckpt = build(("mixtral", "basic"), root)
    # 50,000 bytes free: room for 2 of the 8 experts (18,432 bytes each), not for all of them.
    fake = budget_module.DeviceMemory(limit=400_000, in_use=200_000, kv_cache=50_000, workspace=100_000)
    monkeypatch.setattr("moejax.runtime.loading.device_memory", lambda *args: fake)
    with pytest.raises(MoejaxError, match="more than the device holds"):
        moejax.load(ckpt, offload="cached", expert_budget="1GiB")  # capped at all experts, still too many
    assert moejax.load(ckpt, offload="cached", expert_budget="36864B").executor.runner.cache.capacity == 2


def test_budget_parsing():
    parse = budget_module.parse_budget
    assert parse("0.25", 4000) == 1000
    assert parse(1.0, 4000) == 4000
    assert parse("12GiB", 1) == 12 * 2**30
    assert parse("500MB", 1) == 500 * 10**6
    assert parse("2048B", 1) == 2048
    with pytest.raises(MoejaxError, match="a bare number is a fraction"):
        parse("2048", 1)


@pytest.mark.parametrize("fast", [True, False])
def test_copy_experts_equals_device_put(monkeypatch, fast):
    """The engine's copy call (jaxlib's batched copy, or jax.device_put where that is missing) gives
    the same values, shapes and memory as jax.device_put, for gated and biased experts alike."""
    import jax

    from moejax.runtime import store as store_module

    if not fast:
        monkeypatch.setattr(store_module, "_batched_copy", None)
    device = jax.devices()[0]
    rng = np.random.default_rng(0)
    experts = [
        jax.device_put({"gate": rng.normal(size=(4, 6)).astype(np.float32), "up": rng.normal(size=(4, 6)).astype(np.float32),
                        "down": rng.normal(size=(6, 4)).astype(np.float32)}, store_module.host_sharding(device)),
        jax.device_put({"up": rng.normal(size=(4, 6)).astype(np.float32), "up_bias": rng.normal(size=6).astype(np.float32)},
                       store_module.host_sharding(device)),
    ]
    target = store_module.device_sharding(device)
    copies = store_module.copy_experts(experts, target)
    reference = jax.device_put(experts, target)
    assert store_module.copy_experts([], target) == []
    for copy, ref in zip(copies, reference, strict=True):
        assert list(copy) == list(ref)
        for name in ref:
            assert copy[name].aval == ref[name].aval and copy[name].sharding == ref[name].sharding
            np.testing.assert_array_equal(np.asarray(copy[name]), np.asarray(ref[name]))
            # Usable by a jitted function beside device arrays (the aval's memory space is the device's).
            np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b: a + b)(copy[name], ref[name])), 2 * np.asarray(ref[name]))


def cache_with_fake_copies(monkeypatch, copy_cls, layer: int, experts: int):
    """An LRU ExpertCache with one slot per expert of one MoE layer, whose copies are `copy_cls()` objects."""
    import jax

    from moejax.models.moe import PackedExpert
    from moejax.runtime import cache as cache_module
    from moejax.runtime.cache import ExpertCache

    monkeypatch.setattr(cache_module, "copy_experts",
                        lambda weights, sharding: [PackedExpert(copy_cls(), expert.layout) for expert in weights])
    store = HostExpertStore(jax.devices()[0], expert_bytes=4)
    for e in range(experts):
        store.put((layer, e), {"w": np.zeros(1, np.float32)})
    return ExpertCache(store, experts, make_policy("lru"))


def test_prefetch_copies_in_flight_are_capped(monkeypatch):
    """At most `limit` prefetch copies are unfinished at once; finished ones make room again; a
    prediction given as a function is only made when there is room."""

    class Copy:
        done = False

        def is_ready(self):
            return Copy.done

    cache = cache_with_fake_copies(monkeypatch, Copy, layer=1, experts=8)
    keys = [(1, e) for e in range(8)]
    assert cache.prefetch(keys, limit=2) == 2
    assert cache.prefetch(keys, limit=2) == 0  # both still copying
    predictions = []
    predict = lambda: predictions.append(1) or keys  # noqa: E731
    assert cache.prefetch(predict, limit=2) == 0 and not predictions  # no room: nothing is predicted
    Copy.done = True
    assert cache.prefetch(predict, limit=2) == 2 and len(predictions) == 1
    assert cache.directory.total.prefetch_issued == 4


def test_experts_in_flight_are_given_out_at_once_and_waited_for_after(monkeypatch):
    """`ExpertCache.experts` hands out experts whose copies are in flight without waiting (the device
    waits for them); `wait_for_copies` then blocks on exactly those copies and counts the stall."""
    waited = []
    copy_seconds = 0.02

    class Copy:
        def __init__(self):
            self.done = False

        def is_ready(self):
            return self.done

        def block_until_ready(self):
            waited.append(self)
            time.sleep(copy_seconds)
            self.done = True
            return self

    cache = cache_with_fake_copies(monkeypatch, Copy, layer=0, experts=4)
    keys = cache.begin_layer(0, [0, 1])
    given = cache.experts(keys)
    assert [expert.flat.done for expert in given] == [False, False] and not waited  # nothing waited for yet
    cache.end_layer()
    cache.wait_for_copies(0)
    assert waited == [expert.flat for expert in given]
    stall = cache.transfers[0].stall_s
    assert 2 * copy_seconds <= stall < 2 * copy_seconds + 1.0  # the two copies waited for, nothing more
    cache.wait_for_copies(0)  # nothing left in flight: no second wait
    assert len(waited) == 2
    keys = cache.begin_layer(0, [0, 1])  # both resident and copied: nothing to wait for
    cache.experts(keys)
    cache.wait_for_copies(0)
    assert len(waited) == 2 and cache.transfers[0].stall_s == stall


def test_routing_is_written_to_host_memory():
    """attend_and_route hands the host its routing in pinned host memory: the ids, then, with the next
    MoE layer's parameters, that layer's router on this layer's output (the lookahead guess)."""
    import jax
    import jax.numpy as jnp

    from moejax.cards import load_card
    from moejax.models.decoder import DecoderLayer, empty_kv_caches, init_params
    from moejax.runtime import layer_fns

    card = load_card("deepseek-v2-lite-shape")
    cfg = card.replace(num_layers=3, moe_layers=card.moe_layers[:3], sliding_windows=card.sliding_windows[:3], vocab_size=64,
                       hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16, expert_intermediate_size=16,
                       dense_intermediate_size=32, shared_expert_intermediate_size=32, dtype="float32")
    _, layers, _ = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, cfg.hidden_size))
    positions = jnp.arange(3)[None]
    alone = layer_fns.attend_and_route(cfg, True, None, layers[1], x, empty_kv_caches(cfg, 1, 8)[1], positions)
    h, _, _, _, ids, routing = layer_fns.attend_and_route(cfg, True, None, layers[1], x, empty_kv_caches(cfg, 1, 8)[1],
                                                          positions, layers[2])
    assert alone[5].sharding.memory_kind == routing.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(alone[5]), np.asarray(ids))
    _, _, guess = DecoderLayer(cfg, True, None).apply({"params": layers[2]}, h, method=DecoderLayer.route)
    np.testing.assert_array_equal(np.asarray(routing), np.concatenate([np.asarray(ids), np.asarray(guess)], axis=-1))


def test_finish_and_attend_equals_the_two_calls_it_joins():
    """One program for a MoE layer's finish and the next MoE layer's attention and routing gives what
    accumulate_and_finish then attend_and_route give, bit for bit, in bfloat16 (no excess precision
    across the layer boundary)."""
    import jax
    import jax.numpy as jnp

    from moejax.cards import load_card
    from moejax.models.decoder import empty_kv_caches, init_params
    from moejax.runtime import layer_fns

    card = load_card("deepseek-v2-lite-shape")
    cfg = card.replace(num_layers=4, moe_layers=card.moe_layers[:4], sliding_windows=card.sliding_windows[:4], vocab_size=64,
                       hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16, expert_intermediate_size=16,
                       dense_intermediate_size=32, shared_expert_intermediate_size=32, dtype="bfloat16")
    _, layers, experts = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, cfg.hidden_size)).astype(jnp.bfloat16)
    positions = jnp.arange(3)[None]
    shape = (cfg, True, None)
    h, _, moe_in, weights, ids, _ = layer_fns.attend_and_route(*shape, layers[1], x, empty_kv_caches(cfg, 1, 8)[1], positions)
    expert_ids = np.unique(np.asarray(ids)).astype(np.int32)
    chosen = tuple({name: w[e] for name, w in experts[1].items()} for e in expert_ids)
    acc = jnp.zeros(moe_in.shape, jnp.float32)
    y = layer_fns.accumulate_and_finish(*shape, layers[1], h, moe_in, ids, weights, expert_ids, chosen, acc)
    separate = layer_fns.attend_and_route(*shape, layers[2], y, empty_kv_caches(cfg, 1, 8)[2], positions, layers[3])
    joined = layer_fns.finish_and_attend(cfg, None, None, layers[1], h, moe_in, ids, weights, expert_ids, chosen, acc,
                                         layers[2], empty_kv_caches(cfg, 1, 8)[2], positions, layers[3])
    for a, b in zip(jax.tree_util.tree_leaves(separate), jax.tree_util.tree_leaves(joined), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_packed_experts_compute_what_their_weights_do():
    """A PackedExpert (one flat array) unpacks to its weights, and the expert accumulation gives the same
    sums from packed experts as from dicts; the store packs what it is given and refuses mixed dtypes."""
    import jax
    import jax.numpy as jnp

    from moejax.models.moe import PackedExpert, accumulate_experts

    rng = np.random.default_rng(0)
    experts = [{"gate": rng.normal(size=(4, 6)), "up": rng.normal(size=(4, 6)), "down": rng.normal(size=(6, 4))},
               {"up": rng.normal(size=(4, 6)), "up_bias": rng.normal(size=6), "down": rng.normal(size=(6, 4)),
                "down_bias": rng.normal(size=4)}]
    experts = [{name: w.astype(np.float32) for name, w in e.items()} for e in experts]
    packed = [PackedExpert.pack(e) for e in experts]
    for expert, p in zip(experts, packed, strict=True):
        assert p.flat.shape == (sum(w.size for w in expert.values()),)
        unpacked = p.unpack()
        assert list(unpacked) == list(expert)
        for name in expert:
            np.testing.assert_array_equal(unpacked[name], expert[name])
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    ids = jnp.asarray([[0, 1], [1, 0], [0, 1]], jnp.int32)
    weights = jnp.asarray(rng.random((3, 2)), jnp.float32)
    acc = jnp.zeros((3, 4), jnp.float32)
    run = jax.jit(accumulate_experts, static_argnames="act")
    for first, second in ((experts[0], packed[0]), (experts[1], packed[1])):
        expected = run(x, ids[:, :1], weights[:, :1], jnp.arange(1), (first,), acc, act="silu")
        np.testing.assert_array_equal(run(x, ids[:, :1], weights[:, :1], jnp.arange(1), (second,), acc, act="silu"), expected)

    store = HostExpertStore(jax.devices()[0], expert_bytes=4 * 72)
    store.put((0, 0), experts[0])
    store.put((0, 1), {name: jnp.asarray(w) for name, w in experts[0].items()})  # JAX arrays pack on their device
    for e in (0, 1):
        assert isinstance(store.get((0, e)), PackedExpert)
        np.testing.assert_array_equal(np.asarray(store.get((0, e)).flat), packed[0].flat)
    with pytest.raises(MoejaxError, match=r"expert \(0, 2\).*dtype"):
        store.put((0, 2), {"up": np.zeros((4, 6), np.float32), "down": np.zeros((6, 4), np.float16)})


def test_expert_counts_are_padded_to_few_sizes_without_changing_sums():
    """A wave of n experts runs as expert_bucket(n) (top_k, 2 top_k, 4 top_k, ..., capped at the expert
    count) with copies of its last expert under id -1: the sums are bit-identical to the n experts alone."""
    import jax
    import jax.numpy as jnp

    from moejax.models.moe import PackedExpert, accumulate_experts
    from moejax.runtime.buckets import expert_bucket

    assert [expert_bucket(n, 6, 64) for n in (0, 1, 6, 7, 12, 13, 25, 48, 49, 64)] == [0, 6, 6, 12, 12, 24, 48, 48, 64, 64]
    assert [expert_bucket(n, 1, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert expert_bucket(3, 2, 2) == 3  # never below the count

    rng = np.random.default_rng(1)
    experts = tuple(PackedExpert.pack({"gate": rng.normal(size=(8, 4)).astype(np.float32), "up": rng.normal(size=(8, 4)).astype(np.float32),
                                       "down": rng.normal(size=(4, 8)).astype(np.float32)}) for _ in range(3))
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 3, size=(5, 2)), jnp.int32)
    weights = jnp.asarray(rng.random((5, 2)), jnp.float32)
    acc = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    run = jax.jit(accumulate_experts, static_argnames="act")
    alone = run(x, ids, weights, np.arange(3, dtype=np.int32), experts, acc, act="silu")
    padded = run(x, ids, weights, np.array([0, 1, 2, -1, -1, -1], np.int32), experts + (experts[-1],) * 3, acc, act="silu")
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(alone))


def test_store_subset_shares_or_moves_the_packed_experts():
    """`subset` keeps the chosen keys, in the memory asked for, with the same values."""
    import jax

    store = HostExpertStore(jax.devices()[0], expert_bytes=4 * 6)
    for e in range(3):
        store.put((0, e), {"up": np.full((2, 3), e, np.float32)})
    sub = store.subset([(0, 0), (0, 2)])
    assert list(sub.keys()) == [(0, 0), (0, 2)] and not sub.on_device and sub.get((0, 2)) is not None
    on_device = store.subset(on_device=True)
    assert on_device.on_device and len(on_device) == 3
    assert on_device.get((0, 1)).flat.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(on_device.get((0, 1)).flat), np.full(6, 1, np.float32))
