"""Decoder-only families against transformers on the same weights (float32, CPU).

Every batch here has 3 prompts (batch bucket 4) or 1, and all fit one prompt and one cache
bucket, so each config compiles few programs: compilation dominates these tests' time.

Paths that must agree up to float32 rounding (a batch against its prompts alone, per-layer
against whole-model) differ only in how XLA orders the sums of differently shaped matmuls:
they are compared to 1e-5 of the logits' scale, 10x tighter than against transformers.
"""

import functools

import pytest
from hf_zoo import CASES, assert_logits_close, build, case_id, hf_greedy, hf_logits, random_prompts

import moejax

SAME_PATH_REL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@functools.lru_cache(maxsize=None)
def load(ckpt, executor="host-routed"):
    """One engine per checkpoint and executor: engines keep no state between calls."""
    return moejax.load(ckpt, executor=executor)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_match_transformers(case, root):
    model, _, ckpt = build(case, root)
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [13, 7, 1])
    for prompt, ours in zip(prompts, engine.logits(prompts)):
        assert_logits_close(ours, hf_logits(model, prompt))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_greedy_tokens_match_transformers(case, root):
    model, _, ckpt = build(case, root)
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [9, 4, 12], seed=1)
    result = engine.generate(prompts, max_new_tokens=20)
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == hf_greedy(model, prompt, 20)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padded_batch_equals_each_prompt_alone(case, root):
    _, _, ckpt = build(case, root)
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [11, 2, 6], seed=2)
    batched = engine.generate(prompts, max_new_tokens=8)
    batched_logits = engine.logits(prompts)
    for i, prompt in enumerate(prompts):
        assert engine.generate([prompt], max_new_tokens=8).tokens[0] == batched.tokens[i]
        assert_logits_close(engine.logits([prompt])[0], batched_logits[i], rel=SAME_PATH_REL)


# The whole-model program for every config; the device-routed per-layer executor (its switch over
# experts is also checked against a naive loop in test_moe_block) for one config per family.
EXECUTOR_CASES = [(case, "whole-model") for case in CASES] + [
    (case, "device-routed") for case in CASES if case == next(c for c in CASES if c[0] == case[0])
]


@pytest.mark.parametrize("case,executor", EXECUTOR_CASES, ids=lambda v: case_id(v) if isinstance(v, tuple) else v)
def test_per_layer_path_equals_whole_model(case, root, executor):
    """The per-layer engine (host-routed) against the whole-model and device-routed programs."""
    _, _, ckpt = build(case, root)
    layered, other = load(ckpt), load(ckpt, executor)
    prompts = random_prompts(layered.cfg.vocab_size, [10, 3, 14], seed=3)
    for a, b in zip(layered.logits(prompts), other.logits(prompts)):
        assert_logits_close(a, b, rel=SAME_PATH_REL)
    assert layered.generate(prompts, max_new_tokens=12).tokens == other.generate(prompts, max_new_tokens=12).tokens
