"""Offloading never changes results: every mode, budget, policy and prefetcher equals resident, bit for bit;
the cache counts what the routing needs, and exactly what the policy lab's replay of the same routing counts.

Engines are loaded once per (checkpoint, options) and every prompt fits one prefill bucket, so each
configuration compiles few programs (compilation dominates these tests' time).
"""

import functools
import json
import logging

import jax
import numpy as np
import pytest
from hf_zoo import build, case_id, random_prompts

import moejax
from moejax.cli import main as cli
from moejax.errors import MoejaxError, ParameterError
from moejax.offload import device_cache as dc
from moejax.offload.device_cache import COUNTERS
from moejax.offload.manager import OffloadManager
from moejax.offload.replay import Replayer
from moejax.offload import budget as budget_module

NEW_TOKENS = 6
SAMPLING = dict(temperature=0.9, top_k=20, seed=3)
# The policy matrix's model: 3 MoE layers of 6 experts (18 in all), top-2.
MATRIX_CASE = ("mixtral", "sliding_window")
# Every mode on models of other layer structures: top-1 with tied embeddings; dense and MoE layers alternating
# (shared experts, top-3 of 4); a dense layer between two MoE layers (the lookahead guesses across it); the
# group-limited sigmoid router with its correction bias (the lookahead guesses with it too).
MODE_CASES = [("mixtral", "top1_mha_tied"), ("qwen2_moe", "sparse_step_yarn"), ("qwen3_moe", "dense_bias_window"),
              ("glm4_moe", "qk_norm_groups")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("offload")


@pytest.fixture(autouse=True)
def free_compiled_programs_after_each_test():
    """Most tests here build fresh engines: their programs go with them (see conftest.free_compiled_programs);
    the cached engines below keep theirs."""
    yield
    jax.clear_caches()


@functools.lru_cache(maxsize=None)
def load(ckpt, mode="resident", **options):
    """One engine per checkpoint and options, for tests that do not count on a fresh cache."""
    return moejax.load(ckpt, mode, **options)


def budget(engine, experts: int) -> str:
    """The expert budget of `experts` experts."""
    return f"{experts * engine.cfg.expert_bytes}B"


@functools.lru_cache(maxsize=None)
def resident_outputs(ckpt, prompts: tuple[tuple[int, ...], ...], **steps):
    """(greedy tokens, sampled tokens, logits) of the resident engine with these `prefill_chunk` and `slots`."""
    engine, prompts = load(ckpt, **steps), [list(p) for p in prompts]
    return (engine.generate(prompts, max_new_tokens=NEW_TOKENS).tokens,
            engine.generate(prompts, max_new_tokens=NEW_TOKENS, **SAMPLING).tokens, engine.logits(prompts))


def assert_equals_resident(engine, ckpt, prompts, label, tokens=True, logits=True, **steps):
    """Greedy and sampled tokens of a batch of prompts, and their logits, are those of the resident engine whose
    steps are the same (`steps`: its prefill_chunk and slots), bit for bit."""
    greedy, sampled, expected_logits = resident_outputs(ckpt, tuple(map(tuple, prompts)), **steps)
    if tokens:
        result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        assert result.tokens == greedy, label
        check_counters(result.stats)
        assert engine.generate(prompts, max_new_tokens=NEW_TOKENS, **SAMPLING).tokens == sampled, label
    if logits:
        for ours, ref in zip(engine.logits(prompts), expected_logits, strict=True):
            np.testing.assert_array_equal(ours, ref, err_msg=label)


def check_counters(stats):
    """What every mode's counters must satisfy, whatever the routing."""
    total = stats["total"]
    assert total["hits"] + total["misses"] == total["activations"] > 0
    for name in COUNTERS:
        assert sum(layer[name] for layer in stats["per_layer"]) == total[name], name
    assert total["bytes_h2d"] == (total["misses"] + total["prefetch_issued"] + total["streamed"]) * stats["expert_bytes"]
    assert total["prefetch_used"] + total["prefetch_wasted"] <= total["prefetch_issued"]
    assert total["prefetch_staged"] <= total["prefetch_issued"]
    assert 0 <= total["prefetch_precision"] <= 1 and 0 <= total["prefetch_recall"] <= 1
    if stats["mode"] != "cached":
        assert total["evictions"] == total["prefetch_issued"] == 0
    if stats["mode"] == "resident":
        assert total["misses"] == total["bytes_h2d"] == 0
    if stats["mode"] in ("on-demand", "dense-offload"):
        assert total["hits"] == 0


@pytest.mark.parametrize("case", MODE_CASES, ids=case_id)
def test_every_mode_equals_resident(case, root):
    _, _, ckpt = build(case, root)
    cfg = load(ckpt).cfg
    prompts = random_prompts(cfg.vocab_size, [9, 3, 5], seed=4)
    # the copy kernel's CPU twin moves one case's on-demand fetches (`kernels.host_rows`)
    kernel = dict(miss_copy="kernel") if case == MODE_CASES[1] else {}
    for mode, options in (("on-demand", kernel), ("dense-offload", {}),
                          ("cached", dict(expert_budget="0.5", cache_policy="lfu", prefetch="lookahead"))):
        engine = load(ckpt, mode, **options)
        if mode != "dense-offload":  # (which copies whole layers)
            assert engine.stats_info["miss_copy"] == options.get("miss_copy", "xla")
        assert_equals_resident(engine, ckpt, prompts, f"{mode} {options}")


def test_grouped_compute_is_exact_in_every_mode(root):
    """Grouped expert compute (dropless dynamic gating) in every mode equals the resident engine that also computes
    grouped, bit for bit (logits; cached: also tokens, greedy and sampled); and it generates union's tokens (its
    logits differ from union's in the last bits: blocks of other row counts round differently on XLA:CPU)."""
    _, _, ckpt = build(MATRIX_CASE, root)
    resident = load(ckpt)
    prompts = random_prompts(resident.cfg.vocab_size, [9, 3, 5], seed=4)
    grouped = dict(expert_compute="grouped")
    for mode, options in (("on-demand", {}), ("dense-offload", {}),
                          ("cached", dict(expert_budget=budget(resident, 6), prefetch="lookahead"))):
        assert_equals_resident(load(ckpt, mode, **options, **grouped), ckpt, prompts, f"grouped {mode}",
                               tokens=mode == "cached", **grouped)
    greedy, _, logits = resident_outputs(ckpt, tuple(map(tuple, prompts)), **grouped)
    union_greedy, _, union_logits = resident_outputs(ckpt, tuple(map(tuple, prompts)))
    assert greedy == union_greedy
    for ours, ref in zip(logits, union_logits, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


# (capacity in experts, policy, prefetcher) on MATRIX_CASE: each policy without a prefetcher and with one or two, each
# prefetcher at least twice; a layer's experts (6: the smallest budget of the default steps), half of all
# (9) and all; and the smallest budget of all, top-k experts, which steps of one token need (one-token prompt
# chunks, one slot). BATCHED: also generates for batches, greedy and sampled.
CACHE_CONFIGS = [(6, "lru", "none"), (6, "lfu", "trace+lookahead"), (6, "fifo", "lookahead"), (6, "lifo", "trace"),
                 (6, "activation", "trace+lookahead"), (9, "lru", "trace+lookahead"), (9, "lfu", "none"),
                 (9, "fifo", "none"), (9, "lifo", "none"), (9, "activation", "none"), (2, "lru", "none"),
                 (2, "activation", "trace+lookahead"), (18, "fifo", "trace")]
BATCHED = {(6, "activation", "trace+lookahead"), (9, "lifo", "none"), (2, "activation", "trace+lookahead")}
# Configurations whose misses, lookahead guesses and staged picks the copy kernel moves (its CPU twin,
# `kernels.host_rows`): counts and outputs as every other's.
KERNEL_COPIED = {(2, "activation", "trace+lookahead"), (9, "lru", "trace+lookahead")}
ONE_TOKEN_STEPS = dict(prefill_chunk=1, slots=1)


@pytest.mark.parametrize("capacity,policy,prefetch", CACHE_CONFIGS, ids=lambda v: str(v))
def test_cached_engine_equals_resident_and_counts_what_the_lab_replays(root, capacity, policy, prefetch):
    """A fresh engine generates for one prompt, then another: the tokens are the resident engine's, and the
    per-layer counters equal those of `offload.replay.Replayer` run on the routing the engine recorded (the
    same cache code, the same step schedule, a manager with the same settings and the same history). Then
    the logits of a batch of prompts equal resident (and for BATCHED configurations, their tokens, greedy
    and sampled)."""
    _, _, ckpt = build(MATRIX_CASE, root)
    steps = ONE_TOKEN_STEPS if capacity == 2 else {}
    resident = load(ckpt, **steps)
    cfg, L = resident.cfg, len(resident.cfg.moe_layer_ids)
    copy = "kernel" if (capacity, policy, prefetch) in KERNEL_COPIED else "xla"
    engine = moejax.load(ckpt, "cached", expert_budget=budget(resident, capacity), cache_policy=policy, prefetch=prefetch,
                         miss_copy=copy, **steps)
    assert engine.cache.num_slots == capacity and engine.stats_info["miss_copy"] == copy
    manager = OffloadManager(L, cfg.num_experts, cfg.top_k, policy=policy, prefetch=prefetch, staged_per_step=2 * cfg.top_k)
    lab = Replayer(L, cfg.num_experts, capacity, manager, lookahead=engine.spec.lookahead, prefill_chunk=engine.prefill_chunk)
    for prompt in random_prompts(cfg.vocab_size, [12, 12], seed=5):  # one shape: the lab compiles less
        result = engine.generate([prompt], max_new_tokens=8, ignore_eos=True)
        assert result.tokens == resident.generate([prompt], max_new_tokens=8, ignore_eos=True).tokens
        experts, lookahead = engine.routing(0)
        guesses = None
        if lookahead is not None:  # back to what each MoE layer's step guessed for the next layer
            guesses = np.full_like(lookahead, -1)
            guesses[:-1] = lookahead[1:]
        lab.state = dc.reset_counters(lab.state)  # as generate resets the engine's
        lab.sequence(experts, len(prompt), guesses)
        engine_counters = np.array([[layer[name] for name in COUNTERS] for layer in result.stats["per_layer"]])
        np.testing.assert_array_equal(engine_counters, lab.counters())
        check_counters(result.stats)
    total = result.stats["total"]
    assert result.stats["capacity_experts"] == capacity and result.stats["policy"] == policy
    assert result.stats["prefetch"] == prefetch
    if prefetch.startswith("trace") and cfg.num_experts < capacity < L * cfg.num_experts:
        assert total["prefetch_staged"] > 0  # the second sequence's steps stage what the first taught
    if "lookahead" in prefetch and capacity >= cfg.num_experts:
        assert total["prefetch_issued"] > total["prefetch_staged"]
    assert_equals_resident(engine, ckpt, random_prompts(cfg.vocab_size, [9, 3, 5], seed=4),
                           f"{capacity} experts, {policy}, {prefetch}", tokens=(capacity, policy, prefetch) in BATCHED, **steps)


@pytest.mark.parametrize("mode", ["resident", "on-demand"])
def test_computing_the_guesses_changes_no_logit(root, mode):
    """The next layer's router guess (computed for the lookahead prefetcher, or for traces) only adds outputs:
    with it, a step program's logits are bit for bit those of the resident engine without it, in one-token
    steps too."""
    _, _, ckpt = build(MATRIX_CASE, root)
    resident = load(ckpt, **ONE_TOKEN_STEPS)
    prompts = random_prompts(resident.cfg.vocab_size, [9, 3, 5], seed=4)
    engine = moejax.load(ckpt, mode, **ONE_TOKEN_STEPS)
    engine.record_guesses()
    for ours, ref in zip(engine.logits(prompts), resident_outputs(ckpt, tuple(map(tuple, prompts)), **ONE_TOKEN_STEPS)[2],
                         strict=True):
        np.testing.assert_array_equal(ours, ref)


def activations_by_routing(experts: np.ndarray, prompt_len: int, chunk: int) -> tuple[np.ndarray, int]:
    """Distinct experts per MoE layer summed over one sequence's steps (prompt chunks, then a decode step per
    token), and the number of steps: experts [L, T, k]."""
    steps = [(start, min(start + chunk, prompt_len)) for start in range(0, prompt_len, chunk)]
    steps += [(t, t + 1) for t in range(prompt_len, experts.shape[1])]
    needed = [sum(len(np.unique(layer[start:stop])) for start, stop in steps) for layer in experts]
    return np.array(needed), len(steps)


def test_counters_are_what_the_routing_needs(root, caplog):
    """Per MoE layer and mode, on one sequence: activations are the distinct experts of each step; resident
    hits them all and moves nothing; on-demand fetches each; dense-offload moves the whole layer at every
    step; a cache of all experts (a budget above them is capped, with a note) misses only on first touch."""
    _, _, ckpt = build(MATRIX_CASE, root)
    resident = load(ckpt)
    cfg, E = resident.cfg, resident.cfg.num_experts
    prompts = random_prompts(cfg.vocab_size, [12, 7], seed=6)
    with caplog.at_level(logging.WARNING, logger="moejax"):
        full = moejax.load(ckpt, "cached", expert_budget="1TB")
    assert full.cache.num_slots == len(cfg.moe_layer_ids) * E
    assert any("the cache holds all of them" in record.getMessage() for record in caplog.records)
    touched = set()
    for engine in (resident, load(ckpt, "on-demand"), load(ckpt, "dense-offload"), full, full):
        for prompt in prompts:
            result = engine.generate([prompt], max_new_tokens=5, ignore_eos=True)
            experts, _ = engine.routing(0)
            needed, steps = activations_by_routing(experts, len(prompt), engine.prefill_chunk)
            layers = result.stats["per_layer"]
            assert [layer["activations"] for layer in layers] == needed.tolist()
            mode = result.stats["mode"]
            if mode == "on-demand":
                assert [layer["misses"] for layer in layers] == needed.tolist()
            if mode == "dense-offload":
                assert [layer["misses"] + layer["streamed"] for layer in layers] == [steps * E] * len(layers)
            if mode == "cached":
                keys = {m * E + int(e) for m in range(len(experts)) for e in np.unique(experts[m])}
                assert result.stats["total"]["misses"] == len(keys - touched)
                assert result.stats["total"]["evictions"] == 0
                touched |= keys
            check_counters(result.stats)
    assert result.stats["total"]["misses"] == 0  # the second pass over the same prompts


def test_smallest_budget_is_what_one_step_needs(root):
    """The smallest budget holds the experts one step can use at once: a layer's worth for prompt chunks of
    512 tokens, top-k experts for steps of one token (one-token chunks, one slot), where a prompt that needs
    every expert of a layer goes through with the misses evicting at every step and gives the resident tokens
    of the same steps; one expert fewer is refused, naming the parameters and the minimum."""
    _, _, ckpt = build(MATRIX_CASE, root)
    resident = load(ckpt)
    cfg = resident.cfg
    assert load(ckpt, "cached", expert_budget=budget(resident, cfg.num_experts)).cache.num_slots == cfg.num_experts
    with pytest.raises(ParameterError, match=r"^expert_budget of 76,800 bytes holds 5 experts, but a step of this engine "
                                             r"can need 6 at once \(a prompt chunk of 512 tokens, or one token of 4 "
                                             r"sequences; minimum budget 92,160 bytes\): give a larger budget, or a "
                                             r"smaller prefill_chunk and slots$"):
        moejax.load(ckpt, "cached", expert_budget=budget(resident, cfg.num_experts - 1))
    with pytest.raises(ParameterError, match=r"holds 1 expert, but a step of this engine can need 2 at once"):
        moejax.load(ckpt, "cached", expert_budget=budget(resident, cfg.top_k - 1), **ONE_TOKEN_STEPS)
    tiny = moejax.load(ckpt, "cached", expert_budget=budget(resident, cfg.top_k), **ONE_TOKEN_STEPS)
    assert tiny.cache.num_slots == cfg.top_k
    prompt = random_prompts(cfg.vocab_size, [40], seed=5)
    result = tiny.generate(prompt, max_new_tokens=4)
    assert result.tokens == load(ckpt, **ONE_TOKEN_STEPS).generate(prompt, max_new_tokens=4).tokens
    prefill = result.stats["prefill"]
    assert prefill["activations"] > len(cfg.moe_layer_ids) * cfg.num_experts  # more experts than slots, by far
    assert prefill["evictions"] == prefill["misses"] - cfg.top_k  # the cache starts empty


def test_generate_json_reports_stats(root, capsys):
    _, _, ckpt = build(("mixtral", "basic"), root)
    capsys.readouterr()  # what building the checkpoint printed
    rc = cli(["generate", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--offload", "cached",
              "--expert-budget", "0.5", "--cache-policy", "lfu", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["mode"] == "cached" and stats["policy"] == "lfu" and stats["capacity_experts"] == 4
    assert stats["host_experts"] == 8 and stats["host_wait_s"] >= 0
    for key in ("hit_rate", "hits", "misses", "evictions", "bytes_h2d", "prefetch_issued", "prefetch_used",
                "prefetch_wasted", "prefetch_precision", "prefetch_recall"):
        assert key in stats["total"] and key in stats["prefill"]
    assert len(stats["per_layer"]) == 2
    check_counters(stats)


def test_summary_line_on_stderr(root, capsys):
    _, _, ckpt = build(("mixtral", "basic"), root)
    capsys.readouterr()
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
        (["--offload", "cached", "--expert-budget", "10B"], "holds 0 experts, but a step of this engine can need 4 at once"),
        (["--offload", "cached", "--expert-budget", "10"], "a bare number is a fraction of all expert bytes, at most 1"),
        (["--offload", "swap"], "resident, cached, on-demand, dense-offload"),
        (["--offload", "cached", "--cache-policy", "random"], "lru, lfu, fifo, lifo"),
        (["--offload", "on-demand", "--expert-budget", "0.5"], "applies to --offload cached"),
        (["--offload", "cached", "--executor", "whole-model"], "unrecognized arguments: --executor"),
    ],
)
def test_bad_offload_flags_are_one_line_errors(root, capsys, flags, message):
    _, _, ckpt = build(("mixtral", "basic"), root)
    capsys.readouterr()  # what building the checkpoint printed
    assert cli(["generate", str(ckpt), "--prompt-ids", "1,2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moejax: error:") and message in err and "\n" not in err


def test_budget_above_device_memory_is_refused(root, monkeypatch):
    _, _, ckpt = build(("mixtral", "basic"), root)
    # 100,000 bytes free: room for 5 of the 8 experts (18,432 bytes each), not for all of them.
    fake = budget_module.DeviceMemory(limit=400_000, in_use=200_000, kv_cache=50_000, workspace=50_000)
    monkeypatch.setattr("moejax.engine.loading.device_memory", lambda *args: fake)
    with pytest.raises(MoejaxError, match="expert_budget of .* GiB is more than the device holds"):
        moejax.load(ckpt, offload="cached", expert_budget="1GiB")  # capped at all experts, still too many
    assert moejax.load(ckpt, offload="cached", expert_budget="73728B").cache.num_slots == 4


def test_budget_parsing():
    parse = budget_module.parse_budget
    assert parse("0.25", 4000) == 1000
    assert parse(1.0, 4000) == 4000
    assert parse("12GiB", 1) == 12 * 2**30
    assert parse("500MB", 1) == 500 * 10**6
    assert parse("2048B", 1) == 2048
    with pytest.raises(MoejaxError, match="a bare number is a fraction"):
        parse("2048", 1)
