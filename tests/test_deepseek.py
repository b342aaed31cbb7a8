"""DeepSeek-V2/V3 (multi-head latent attention) beyond the zoo's parity with transformers (test_decoder_reference):
the engine's KV cache holds the compressed latent, offloading changes no bit, `moejax info` and the statistics
report the cache's bytes per token against full per-head keys and values, exports load in transformers, and the
published config.json files convert to the cards."""

import json

import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax.cli import main as cli

LATENT_CASE = ("deepseek_v2", "q_lora_yarn_layer_freq")  # 4 layers, 1 MoE
GROUPS_CASE = ("deepseek_v2", "lite_dense_first_groups")  # 3 layers, 2 MoE layers of 6 experts in 3 groups
OFFLOAD_CASE = ("deepseek_v3", "q_lora_groups_bias")  # 3 layers, 2 MoE layers of 8 experts, selection bias


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


def test_info_describes_the_router(root, capsys):
    _, _, ckpt = build(OFFLOAD_CASE, root)
    capsys.readouterr()
    assert cli(["info", str(ckpt)]) == 0
    assert ("router: sigmoid scores, noaux_tc top-3 within the best 2 of 4 groups, correction bias for selection, "
            "weights renormalised, x 2.5") in capsys.readouterr().out


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


@pytest.mark.parametrize("case", [GROUPS_CASE, OFFLOAD_CASE], ids=lambda case: case[0])
def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(root, case):
    import torch
    import transformers as T
    from hf_zoo import hf_logits

    model, _, ckpt = build(case, root)
    out = root / f"exported-{case[0]}"
    assert cli(["export", str(ckpt), str(out), "--quiet"]) == 0
    exported = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert type(exported) is type(model)
    ids = random_prompts(model.config.vocab_size, [7])[0]
    np.testing.assert_array_equal(hf_logits(exported.eval(), ids), hf_logits(model, ids))


def test_deepseek_v3_multi_token_prediction_layers_are_skipped(tmp_path, caplog):
    """Every tensor of a transformers DeepseekV3 checkpoint has its target (the routers' selection biases
    included, float32), and the tensors of a multi-token-prediction layer after the last are skipped."""
    import torch
    import transformers as T
    from hf_zoo import ZOO
    from safetensors.torch import load_file, save_file

    from moejax.convert.converter import index_tensors, validate
    from moejax.convert.families import deepseek_v3

    config = ZOO[OFFLOAD_CASE[0]][OFFLOAD_CASE[1]]()
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(32, 64), "model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(4, 4)}
    save_file({**load_file(tmp_path / "model.safetensors"), **mtp}, tmp_path / "model.safetensors")
    tensors = index_tensors(tmp_path)
    with caplog.at_level("WARNING"):
        cfg, targets, ignored = deepseek_v3.resolve_tensors(deepseek_v3.config_from_hf(config.to_dict()), tensors)
    assert ignored == set(mtp) and "skipping layer(s) 3 (2 tensors): multi-token-prediction" in caplog.text
    router = {name: target for name, target in targets.items() if ".mlp.gate." in name}
    assert sorted(router) == [f"model.layers.{i}.mlp.gate.{w}" for i in (1, 2) for w in ("e_score_correction_bias", "weight")]
    assert all(target.keep_float32 for target in router.values())
    validate(targets, tensors, cfg, ignored)


@pytest.mark.parametrize("case", [LATENT_CASE, GROUPS_CASE], ids=lambda case: case[1])
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


# DeepSeek-V2's (deepseek-ai/DeepSeek-V2): its fields that differ from V2-Lite's.
PUBLISHED_V2 = {
    **PUBLISHED_V2_LITE, "aux_loss_alpha": 0.003, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "n_group": 8, "n_routed_experts": 160, "num_attention_heads": 128,
    "num_hidden_layers": 60, "num_key_value_heads": 128, "q_lora_rank": 1536, "routed_scaling_factor": 16.0,
    "topk_group": 3, "topk_method": "group_limited_greedy",
}
# DeepSeek-V3's (deepseek-ai/DeepSeek-V3; DeepSeek-R1's is the same), its auto_map left out.
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

# Kimi-K2's (moonshotai/Kimi-K2-Instruct): DeepSeek-V3's architecture under model_type kimi_k2, its fields that differ.
PUBLISHED_KIMI_K2 = {
    **PUBLISHED_V3, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1, "max_position_embeddings": 131072,
    "model_type": "kimi_k2", "n_group": 1, "n_routed_experts": 384, "num_attention_heads": 64, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0, "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                                                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                    "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "topk_group": 1, "transformers_version": "4.48.3",
    "vocab_size": 163840,
}
del PUBLISHED_KIMI_K2["ep_size"]


@pytest.mark.parametrize("published,card", [(PUBLISHED_V2_LITE, "deepseek-v2-lite"), (PUBLISHED_V2, "deepseek-v2"),
                                            (PUBLISHED_V3, "deepseek-v3"), (PUBLISHED_KIMI_K2, "kimi-k2")],
                         ids=["v2-lite", "v2", "v3", "kimi-k2"])
def test_published_config_converts_to_its_card(published, card):
    from moejax.cards import load_card
    from moejax.convert.families import family

    assert family(published["model_type"]).config_from_hf(published).replace(dtype="bfloat16") == load_card(card)
