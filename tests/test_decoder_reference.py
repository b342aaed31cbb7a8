"""Decoder-only families against transformers on the same weights (float32, CPU)."""

import numpy as np
import pytest
from hf_zoo import CASES, assert_logits_close, build, case_id, hf_greedy, hf_logits, random_prompts

import moejax


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_match_transformers(case, root):
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [13, 7, 1])
    for prompt, ours in zip(prompts, engine.logits(prompts)):
        assert_logits_close(ours, hf_logits(model, prompt))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_greedy_tokens_match_transformers(case, root):
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [9, 4], seed=1)
    result = engine.generate(prompts, max_new_tokens=20)
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == hf_greedy(model, prompt, 20)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padded_batch_equals_each_prompt_alone(case, root):
    _, _, ckpt = build(case, root)
    engine = moejax.load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [11, 2, 6], seed=2)
    batched = engine.generate(prompts, max_new_tokens=8)
    batched_logits = engine.logits(prompts)
    for i, prompt in enumerate(prompts):
        assert engine.generate([prompt], max_new_tokens=8).tokens[0] == batched.tokens[i]
        np.testing.assert_allclose(engine.logits([prompt])[0], batched_logits[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("executor", ["device-routed", "whole-model"])
def test_per_layer_path_equals_whole_model(case, root, executor):
    """The per-layer engine (host-routed) against the device-routed per-layer and whole-model programs."""
    _, _, ckpt = build(case, root)
    layered, other = moejax.load(ckpt), moejax.load(ckpt, executor=executor)
    prompts = random_prompts(layered.cfg.vocab_size, [10, 3], seed=3)
    for a, b in zip(layered.logits(prompts), other.logits(prompts)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert layered.generate(prompts, max_new_tokens=12).tokens == other.generate(prompts, max_new_tokens=12).tokens
