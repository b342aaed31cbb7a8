"""Encoder-decoder families against transformers on the same weights (float32, CPU).

Cases whose transformers config drops tokens at these sizes (small expert capacity) are compared
in capacity routing; the others in the default dropless routing (transformers drops nothing there).
The comparisons run the device-routed executor; `test_per_layer_paths_equal_whole_model` shows the
host-routed one (the default) and the whole-model programs give the same results.
"""

import numpy as np
import pytest
from hf_zoo import assert_logits_close
from hf_zoo_encdec import CASES, LANGS, build, case_id, hf_forward, hf_generate, random_sources

import moejax
from moejax.runtime.buckets import batch_bucket

EXECUTOR = "device-routed"
DROPPING = {("switch_transformers", "untied"), ("nllb-moe", "untied"), ("nllb-moe", "capacity")}


def routing(case) -> str:
    return "capacity" if case in DROPPING else "dropless"


def forced(case):
    """NLLB targets start with the target language, as transformers' forced_bos_token_id does."""
    return LANGS["fra_Latn"] if case[0] == "nllb-moe" else None


def decoder_inputs(engine, n: int, length: int = 7, seed: int = 9):
    return [[engine.cfg.decoder_start_token_id, *s] for s in random_sources([length - 1] * n, seed)]


def dropped_pairs(engine, sources) -> int:
    """(token, expert) pairs of real source tokens that the encoder's MoE layers dropped in the last call."""
    cfg, batch, total = engine.cfg, batch_bucket(len(sources)), 0
    for g in cfg.moe_layer_ids:
        if not cfg.is_decoder_layer(g):
            ids = np.asarray(engine.executor.last_routing[g]).reshape(batch, -1, cfg.top_k)
            total += sum(int((ids[b, : len(s)] == cfg.num_experts).sum()) for b, s in enumerate(sources))
    return total


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_encdec")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_outputs_and_greedy_tokens_match_transformers(case, root):
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt, routing=routing(case), executor=EXECUTOR)
    sources = random_sources([13, 1])
    targets = decoder_inputs(engine, len(sources))
    enc_ref, logits_ref = hf_forward(model, sources, targets)
    for ours, ref in zip(engine.encoder_outputs(sources), enc_ref, strict=True):
        assert_logits_close(ours, ref)
    logits = engine.logits(sources, targets)
    for ours, ref in zip(logits, logits_ref, strict=True):
        assert_logits_close(ours, ref)
    if case in DROPPING:
        assert dropped_pairs(engine, sources) > 0

    sources = random_sources([9, 4], seed=1)
    ours = engine.generate(sources, max_new_tokens=20, ignore_eos=True, forced_bos_id=forced(case)).tokens
    assert ours == hf_generate(model, sources, 20, forced_bos_token_id=forced(case))


def test_stopped_rows_match_transformers(root):
    """A row that stops early is fed the pad token afterwards; with capacity shared by the batch
    (NLLB) that changes the other rows' routing, exactly as in transformers."""
    case = ("nllb-moe", "capacity")
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt, routing="capacity", executor=EXECUTOR)
    sources = random_sources([9, 4], seed=4)
    stop = hf_generate(model, sources, 12, forced_bos_token_id=forced(case))[0][2]
    expected = hf_generate(model, sources, 12, eos_token_id=stop, forced_bos_token_id=forced(case))
    result = engine.generate(sources, max_new_tokens=12, stop_token_ids=(stop,), ignore_eos=True, forced_bos_id=forced(case))
    assert result.tokens == expected
    assert result.finish_reasons[0] == "stop" and len(result.tokens[0]) < 12


@pytest.mark.parametrize("case", [("switch_transformers", "basic"), ("nllb-moe", "basic")], ids=case_id)
def test_padded_batch_equals_each_source_alone(case, root):
    _, _, ckpt = build(case, root)
    engine = moejax.load(ckpt, executor=EXECUTOR)
    sources = random_sources([11, 2], seed=2)
    batched = engine.generate(sources, max_new_tokens=8, ignore_eos=True, forced_bos_id=forced(case))
    targets = decoder_inputs(engine, len(sources), seed=3)
    batched_logits = engine.logits(sources, targets)
    for i, source in enumerate(sources):
        alone = engine.generate([source], max_new_tokens=8, ignore_eos=True, forced_bos_id=forced(case))
        assert alone.tokens[0] == batched.tokens[i]
        assert_logits_close(engine.logits([source], [targets[i]])[0], batched_logits[i], rel=1e-5)


def test_per_layer_paths_equal_whole_model(root):
    """Device-routed per-layer calls, host-routed expert waves and the whole-model programs agree
    (in capacity routing, so dropped pairs flow through every path). The executors are
    family-agnostic; this case has dense and MoE layers in both stacks."""
    case = ("switch_transformers", "untied")
    _, _, ckpt = build(case, root)
    device = moejax.load(ckpt, routing="capacity", executor="device-routed")
    whole = moejax.load(ckpt, routing="capacity", executor="whole-model")
    host = moejax.load(ckpt, routing="capacity")  # the default executor
    resident_cfg = host.cfg
    # The offloading runtime at its smallest cache: several waves per layer, every expert a copy.
    offloaded = moejax.load(ckpt, routing="capacity", offload="cached", expert_budget=f"{resident_cfg.top_k * resident_cfg.expert_bytes}B")
    sources = random_sources([10, 3], seed=5)
    targets = decoder_inputs(device, len(sources), seed=6)
    reference = whole.logits(sources, targets)
    for engine in (device, host, offloaded):
        for a, b in zip(engine.logits(sources, targets), reference, strict=True):
            assert_logits_close(a, b, rel=1e-5)
    for a, b in zip(offloaded.logits(sources, targets), host.logits(sources, targets), strict=True):
        np.testing.assert_array_equal(a, b)  # offloading changes nothing, bit for bit
    tokens = whole.generate(sources, max_new_tokens=10, ignore_eos=True, forced_bos_id=forced(case)).tokens
    for engine in (device, host, offloaded):
        assert engine.generate(sources, max_new_tokens=10, ignore_eos=True, forced_bos_id=forced(case)).tokens == tokens
    stats = offloaded.generate(sources, max_new_tokens=4, forced_bos_id=forced(case)).stats["total"]
    assert stats["misses"] > 0 and stats["hits"] + stats["misses"] == stats["activations"]
