"""Family config mapping: HF config -> ModelConfig -> HF config round trips, and parameter counts
equal to transformers' for every zoo config."""

import numpy as np
import pytest
import torch
import transformers as T
from hf_zoo import CASES, ZOO, case_id, hf_model

from moejax.convert.families import FAMILIES, family
from moejax.convert.families.common import common_hf_config
from moejax.errors import MoejaxError
from moejax.models.decoder import parameter_counts


def moejax_config(case):
    hf = ZOO[case[0]][case[1]]().to_dict()
    return family(hf["model_type"]).config_from_hf(hf)


def exported(cfg) -> dict:
    return {**common_hf_config(cfg), **family(cfg.family).hf_config(cfg)}


# transformers' DeepseekV2 ignores moe_layer_freq: export refuses what it would load wrongly.
NOT_EXPORTABLE = {("deepseek_v2", "q_lora_yarn_layer_freq"): "transformers ignores moe_layer_freq"}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hf_config_round_trips_through_transformers(case):
    cfg = moejax_config(case)
    if case in NOT_EXPORTABLE:
        with pytest.raises(MoejaxError, match=NOT_EXPORTABLE[case]):
            exported(cfg)
        return
    hf = T.AutoConfig.for_model(**exported(cfg)).to_dict()
    assert family(hf["model_type"]).config_from_hf(hf) == cfg


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parameter_counts_equal_transformers(case):
    cfg = moejax_config(case)
    with torch.device("meta"):
        model = hf_model(ZOO[case[0]][case[1]]())
    assert parameter_counts(cfg)["total"] == model.num_parameters()


def test_every_family_has_zoo_configs():
    from hf_zoo_encdec import ZOO as ENCDEC_ZOO

    assert set(ZOO) | set(ENCDEC_ZOO) == set(FAMILIES)


@pytest.mark.parametrize(
    "model_type,fields,message",
    [
        ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer >= 1"),
        ("qwen2_moe", {"mlp_only_layers": [5]}, "mlp_only_layers entry 5"),
        ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding window is 0"),
        ("qwen2_moe", {"layer_types": ["full_attention"]}, "layer_types must list 2"),
        ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size must be >= 1"),
        ("qwen3_moe", {"num_experts": 0}, "not a MoE model"),
        ("olmoe", {"head_dim": 16}, "head_dim \\* num_attention_heads == hidden_size"),
        ("olmoe", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'dynamic'"),
        ("gpt_oss", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": None}, "sliding window is None"),
        ("gpt_oss", {"quantization_config": {"quant_method": "fp8"}}, "quant_method 'fp8' is not supported"),
        ("glm4_moe", {"first_k_dense_replace": 2}, r"first_k_dense_replace must be an integer in \[0, 2\)"),
        ("glm4_moe", {"n_shared_experts": 0}, "n_shared_experts must be an integer >= 1"),
        ("glm4_moe", {"topk_method": "group_limited_greedy"}, "glm4_moe topk_method 'group_limited_greedy' is not supported"),
        ("glm4_moe", {"scoring_func": "softmax"}, "glm4_moe scoring_func 'softmax' is not supported"),
        ("glm4_moe", {"n_group": 3}, "config: n_group 3 must divide num_experts 8"),
        ("glm4_moe", {"topk_group": 5}, r"config: topk_group 5 must be in \[1, n_group=4\]"),
        ("glm4_moe", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.1}}, "partial_rotary_factor 0.1"),
        ("deepseek_v2", {"topk_method": "noaux_tc"}, "deepseek_v2 topk_method 'noaux_tc' is not supported"),
        ("deepseek_v2", {"norm_topk_prob": True}, "deepseek_v2 norm_topk_prob=true is not supported .* never renormalises"),
        ("deepseek_v2", {"scoring_func": "sigmoid"}, "deepseek_v2 scoring_func 'sigmoid' is not supported"),
        ("deepseek_v2", {"n_group": 4}, "config: n_group 4 must divide num_experts 6"),
        ("deepseek_v2", {"routed_scaling_factor": "16"}, "deepseek_v2 routed_scaling_factor must be a number"),
        ("deepseek_v3", {"topk_method": "group_limited_greedy"}, "deepseek_v3 topk_method 'group_limited_greedy'"),
        ("deepseek_v3", {"scoring_func": "softmax"}, "deepseek_v3 scoring_func 'softmax' is not supported"),
        ("deepseek_v3", {"topk_group": 3, "num_experts_per_tok": 7}, "config: top_k 7 is more than the 3 kept group"),
        ("deepseek_v3", {"rope_interleave": False}, "deepseek_v3 rope_interleave=false is not supported"),
        ("deepseek_v2", {"attention_bias": True}, "attention_bias=true"),
        ("deepseek_v2", {"moe_layer_freq": 0}, "moe_layer_freq must be an integer >= 1"),
        ("deepseek_v2", {"first_k_dense_replace": 2}, "deepseek_v2 has no MoE layer"),
        ("deepseek_v2", {"qk_rope_head_dim": 5}, "qk_rope_head_dim must be even"),
    ],
)
def test_unsupported_config_fields_are_named(model_type, fields, message):
    hf = next(iter(ZOO[model_type].values()))().to_dict()
    hf.update(num_hidden_layers=2, **fields)
    with pytest.raises(MoejaxError, match=message):
        family(model_type).config_from_hf(hf)


def test_export_refuses_what_the_family_cannot_express():
    cfg = moejax_config(("qwen3_moe", "basic_head_dim"))
    with pytest.raises(MoejaxError, match="cannot express o_bias=True"):
        family("qwen3_moe").hf_config(cfg.replace(o_bias=True))
    with pytest.raises(MoejaxError, match="cannot express shared_expert_gate=False"):
        family("qwen2_moe").hf_config(moejax_config(("qwen2_moe", "basic")).replace(shared_expert_gate=False))
    with pytest.raises(MoejaxError, match="several"):
        family("qwen2_moe").hf_config(moejax_config(("qwen2_moe", "basic")).replace(sliding_windows=(3, 4)))


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                    "original_max_position_embeddings": 4096, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn_untruncated_attention_factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9,
                                          "original_max_position_embeddings": 128, "truncate": False},
    "yarn_gpt_oss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096},
}


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_rope_frequencies_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moejax.models.rope import inverse_frequencies

    hf_config = T.Qwen3MoeConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                                 rope_parameters={"rope_theta": 50000.0, **ROPE_CASES[name]})
    cfg = family("qwen3_moe").config_from_hf(hf_config.to_dict())
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS[ROPE_CASES[name]["rope_type"]](hf_config)
    freq, scale = inverse_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    np.testing.assert_allclose(freq, ref_freq.numpy(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-6)
