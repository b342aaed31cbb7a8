"""DeepSeek-V2 (multi-head latent attention) beyond the zoo's parity with transformers (test_decoder_reference):
the engine's KV cache holds the compressed latent, offloading changes no bit, and `moejax info` and the
statistics report the cache's bytes per token against full per-head keys and values."""

import json

import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax.cli import main as cli

LATENT_CASE = ("deepseek_v2", "q_lora_yarn_layer_freq")  # 4 layers, 1 MoE
OFFLOAD_CASE = ("deepseek_v2", "lite_dense_first")  # 3 layers, 2 MoE layers of 5 experts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("deepseek")


def bytes_per_token(hf) -> tuple[int, int]:
    """(latent cache, full keys and values) bytes of one token over all layers, float32, from the HF config."""
    latent = hf.num_hidden_layers * (hf.kv_lora_rank + hf.qk_rope_head_dim) * 4
    full = hf.num_hidden_layers * hf.num_attention_heads * (hf.qk_nope_head_dim + hf.qk_rope_head_dim + hf.v_head_dim) * 4
    return latent, full


def test_kv_cache_holds_the_compressed_latent_and_stats_say_so(root):
    model, _, ckpt = build(LATENT_CASE, root)
    hf = model.config
    engine = moejax.load(ckpt, slots=2, max_seq_len=32)
    assert sum(latent.shape[0] for latent, _ in engine.kv) == hf.num_hidden_layers
    for latent, rope_key in engine.kv:
        assert latent.shape[1:] == (3, 32, hf.kv_lora_rank) and rope_key.shape[1:] == (3, 32, hf.qk_rope_head_dim)
    latent, full = bytes_per_token(hf)
    stats = engine.generate([[5, 6, 7]], max_new_tokens=2).stats
    assert stats["kv_cache"] == {"bytes": 3 * 32 * latent, "latent": True, "bytes_per_token": latent,
                                 "full_heads_bytes_per_token": full}


def test_info_reports_latent_cache_bytes_per_token(root, capsys):
    model, _, ckpt = build(LATENT_CASE, root)
    latent, full = bytes_per_token(model.config)
    capsys.readouterr()
    assert cli(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "latent attention: q latent 20, kv latent 12 + rope key 8, head dims qk 6+8, v 10" in out
    assert f"KV cache per token: {latent:,} B (compressed latent; full heads {full:,} B, {full / latent:.1f}x)" in out
    assert cli(["info", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache_bytes_per_token"] == {"cached": latent, "full_heads": full}


def test_offloading_equals_resident_bit_for_bit(root):
    _, _, ckpt = build(OFFLOAD_CASE, root)
    resident = moejax.load(ckpt, slots=2)
    prompts = random_prompts(resident.cfg.vocab_size, [9, 3, 5], seed=4)
    tokens, logits = resident.generate(prompts, max_new_tokens=6).tokens, resident.logits(prompts)
    one_layer = f"{resident.cfg.num_experts * resident.cfg.expert_bytes}B"
    for mode, options in (("on-demand", {}), ("cached", {"expert_budget": one_layer})):
        engine = moejax.load(ckpt, mode, slots=2, **options)
        result = engine.generate(prompts, max_new_tokens=6)
        assert result.tokens == tokens, mode
        if mode == "cached":
            assert result.stats["capacity_experts"] == resident.cfg.num_experts and result.stats["total"]["evictions"] > 0
        for ours, ref in zip(engine.logits(prompts), logits, strict=True):
            np.testing.assert_array_equal(ours, ref, err_msg=mode)


def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(root):
    import torch
    import transformers as T
    from hf_zoo import hf_logits

    model, _, ckpt = build(OFFLOAD_CASE, root)
    assert cli(["export", str(ckpt), str(root / "exported"), "--quiet"]) == 0
    exported = T.AutoModelForCausalLM.from_pretrained(root / "exported", attn_implementation="eager", dtype=torch.float32)
    ids = random_prompts(model.config.vocab_size, [7])[0]
    np.testing.assert_array_equal(hf_logits(exported.eval(), ids), hf_logits(model, ids))


def tiny_v3_config():
    import transformers as T

    return T.DeepseekV3Config(vocab_size=101, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                              num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=40, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16, n_shared_experts=1,
                              q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def test_deepseek_v3_router_is_refused_by_its_field():
    from moejax.convert.families import family
    from moejax.errors import MoejaxError

    with pytest.raises(MoejaxError, match="deepseek_v3 scoring_func='sigmoid' is not supported yet"):
        family("deepseek_v3").config_from_hf(tiny_v3_config().to_dict())
    with pytest.raises(MoejaxError, match="deepseek_v3 routed_scaling_factor=2.5"):
        family("deepseek_v3").config_from_hf({**tiny_v3_config().to_dict(), "scoring_func": "softmax",
                                              "topk_method": "greedy"})


def test_deepseek_v3_tensors_are_mapped_and_multi_token_prediction_skipped(tmp_path, caplog):
    """Every tensor of a transformers DeepseekV3 checkpoint has its target but the router's selection bias (its
    router is not supported yet), and tensors of a multi-token-prediction layer after the last are skipped."""
    import torch
    import transformers as T
    from safetensors.torch import load_file, save_file

    from moejax.config import ModelConfig
    from moejax.convert.converter import index_tensors, validate
    from moejax.convert.families import deepseek_v2, deepseek_v3

    config = tiny_v3_config()
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(32, 64), "model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(4, 4)}
    save_file({**load_file(tmp_path / "model.safetensors"), **mtp}, tmp_path / "model.safetensors")
    cfg = ModelConfig(**deepseek_v2.deepseek_fields(config.to_dict(), "deepseek_v3"))
    tensors = index_tensors(tmp_path)
    with caplog.at_level("WARNING"):
        cfg, targets, ignored = deepseek_v3.resolve_tensors(cfg, tensors)
    assert ignored == set(mtp) and "skipping 2 multi-token-prediction tensors of layer(s) 3" in caplog.text
    router_bias = {name for name in tensors if name.endswith("e_score_correction_bias")}
    assert len(router_bias) == 2
    validate(targets, tensors, cfg, ignored | router_bias)


@pytest.mark.parametrize("case", [LATENT_CASE, OFFLOAD_CASE], ids=lambda case: case[1])
def test_absorbed_attention_equals_expanded(root, case):
    """The decode form (kv_b_proj folded into query and output) against the expanded latents, on a converted
    layer's weights, a cache of 9 earlier positions and one new token per row: the same output and cache."""
    import jax
    import jax.numpy as jnp

    from moejax import checkpoint
    from moejax.models.decoder import empty_kv_caches
    from moejax.models.mla import LatentAttention

    _, _, ckpt = build(case, root)
    cfg = checkpoint.load_config(ckpt)
    params = {"params": checkpoint.load_layer(ckpt, 0)["attn"]}
    rng = np.random.default_rng(0)
    history = jnp.asarray(rng.normal(size=(2, 9, cfg.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    expanded, absorbed = LatentAttention(cfg, None, absorb=False), LatentAttention(cfg, None, absorb=True)
    _, cache = expanded.apply(params, history, empty_kv_caches(cfg, 2, 12)[0], positions)
    x = jnp.asarray(rng.normal(size=(2, 1, cfg.hidden_size)), jnp.float32)
    step = jnp.array([[9], [10]], jnp.int32)
    (out_e, cache_e), (out_a, cache_a) = (jax.jit(m.apply)(params, x, cache, step) for m in (expanded, absorbed))
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_e), rtol=1e-5, atol=1e-5 * float(jnp.abs(out_e).max()))
    for a, e in zip(cache_a, cache_e, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# DeepSeek-V2-Lite's config.json as published (deepseek-ai/DeepSeek-V2-Lite), written out here.
PUBLISHED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 1.0,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_published_v2_lite_config_converts_to_its_card():
    from moejax.cards import load_card
    from moejax.convert.families import family

    assert family("deepseek_v2").config_from_hf(PUBLISHED_V2_LITE).replace(dtype="bfloat16") == load_card("deepseek-v2-lite")
