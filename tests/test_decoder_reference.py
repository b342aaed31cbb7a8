"""Decoder-only families against transformers on the same weights (float32, CPU), and the step engine
against the whole-model program.

Every engine is loaded once per checkpoint and mode and every prompt fits one prefill bucket (16 tokens),
so each engine compiles few programs: compilation dominates these tests' time. The offloaded engine is the
cached mode at its smallest budget (one layer's experts: every layer's step evicts), with prompts in chunks
of 5 tokens (attention across chunks and sliding windows) and 2 slots (the third prompt waits).

Paths that must agree up to float32 rounding (the engine against the whole-model program) differ only in
how XLA orders the sums of differently shaped matmuls: they are compared to 1e-5 of the logits' scale,
10x tighter than against transformers.
"""

import functools

import numpy as np
import pytest
from hf_zoo import CASES, assert_logits_close, build, case_id, hf_greedy, hf_logits, random_prompts
from whole_model import whole_model_greedy, whole_model_logits

import moejax
from moejax import checkpoint

SAME_PATH_REL = 1e-5
MODES = ["resident", "chunked-smallest-cache"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@functools.lru_cache(maxsize=None)
def load(ckpt, mode="resident"):
    """One engine per checkpoint and mode: what an engine keeps between calls never changes its outputs."""
    if mode == "resident":
        return moejax.load(ckpt)
    cfg = checkpoint.load_config(ckpt)
    engine = moejax.load(ckpt, "cached", expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B", prefill_chunk=5, slots=2)
    assert engine.cache.num_slots == cfg.num_experts
    return engine


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_match_transformers(case, root, mode):
    model, _, ckpt = build(case, root)
    engine = load(ckpt, mode)
    prompts = random_prompts(engine.cfg.vocab_size, [13, 7, 1])
    for prompt, ours in zip(prompts, engine.logits(prompts), strict=True):
        assert_logits_close(ours, hf_logits(model, prompt))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_greedy_tokens_match_transformers(case, root, mode):
    model, _, ckpt = build(case, root)
    engine = load(ckpt, mode)
    prompts = random_prompts(engine.cfg.vocab_size, [9, 4, 12], seed=1)
    prompts[1][1] = 0  # transformers is given 0 as its pad id: a prompt's token 0 must still be attended
    result = engine.generate(prompts, max_new_tokens=20)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        assert tokens == hf_greedy(model, prompt, 20)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padded_batch_equals_each_prompt_alone(case, root):
    """Prompts decoded together (a padded 4-row step) give each prompt's tokens alone (1-row steps), and a
    prompt's logits do not depend on what its slot held before (stale positions stay hidden)."""
    _, _, ckpt = build(case, root)
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [11, 2, 6], seed=2)
    batched = engine.generate(prompts, max_new_tokens=8)
    batched_logits = engine.logits(prompts)
    for i, prompt in enumerate(prompts):
        assert engine.generate([prompt], max_new_tokens=8).tokens[0] == batched.tokens[i]
        np.testing.assert_array_equal(engine.logits([prompt])[0], batched_logits[i])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_engine_equals_whole_model_program(case, root):
    """The step engine (layer runs scanned, experts gathered from the slab, KV slots) against the whole-model
    program on the same checkpoint: logits to float32 rounding, the same greedy tokens."""
    _, _, ckpt = build(case, root)
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [10, 3, 14], seed=3)
    for ours, ref in zip(engine.logits(prompts), whole_model_logits(ckpt, prompts), strict=True):
        assert_logits_close(ours, ref, rel=SAME_PATH_REL)
    assert engine.generate(prompts, max_new_tokens=12).tokens == whole_model_greedy(ckpt, prompts, 12)


def test_kimi_k2_layout_converts_as_deepseek_v3(root):
    """Kimi-K2 publishes DeepSeek-V3's architecture under model_type kimi_k2 (with remote code in auto_map): the zoo's
    one-group DeepSeek-V3 checkpoint relabelled so, with tiktoken tokenizer files, converts to the same model, family
    deepseek_v3, with transformers' DeepseekV3ForCausalLM's logits and greedy tokens on the same weights, and a
    tokenizer.json (test_tiktoken_bpe)."""
    import json
    import shutil

    from moejax.cli import main as cli

    model, hf_dir, ckpt = build(("deepseek_v3", "one_group_all_moe"), root)
    assert type(model).__name__ == "DeepseekV3ForCausalLM" and model.config.n_group == model.config.topk_group == 1
    kimi_dir, out = root / "kimi-k2-hf", root / "kimi-k2-mj"
    kimi_dir.mkdir()
    shutil.copyfile(hf_dir / "model.safetensors", kimi_dir / "model.safetensors")
    hf = json.loads((hf_dir / "config.json").read_text())
    hf.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                              "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (kimi_dir / "config.json").write_text(json.dumps(hf))
    from test_tiktoken_bpe import reference_encode, write_tiktoken_files

    write_tiktoken_files(kimi_dir)  # and its tokenizer files
    assert cli(["convert", str(kimi_dir), str(out), "--quiet"]) == 0
    cfg = checkpoint.load_config(out)
    assert cfg.family == "deepseek_v3" and cfg == checkpoint.load_config(ckpt)
    engine = moejax.load(out)
    assert engine.tokenizer.encode("Kimi 中文 🙂") == reference_encode("Kimi 中文 🙂")
    prompts = random_prompts(cfg.vocab_size, [13, 6], seed=6)
    for prompt, ours in zip(prompts, engine.logits(prompts), strict=True):
        assert_logits_close(ours, hf_logits(model, prompt))
    assert engine.generate(prompts, max_new_tokens=20).tokens == [hf_greedy(model, prompt, 20) for prompt in prompts]
