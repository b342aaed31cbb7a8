"""Tiny random HF models for reference tests: configs per family, saved with `save_pretrained`.

Each entry builds a transformers config that exercises some option of its family. Weights use
a larger init std than transformers' default so logits and routing have clear margins (no
near-ties that float rounding could flip).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import transformers as T
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP

from moejax.cli import main as moejax_cli

# These models are tiny: torch's intra-op threads only add overhead (10x on a busy 2-core machine).
torch.set_num_threads(1)

INIT_STD = 0.15
COMMON = dict(vocab_size=101, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, initializer_range=INIT_STD,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

# family -> {name: config factory}
ZOO = {
    "mixtral": {
        "basic": lambda: T.MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                                         num_experts_per_tok=2),
        "sliding_window": lambda: T.MixtralConfig(**COMMON, intermediate_size=40, num_hidden_layers=3, num_local_experts=6,
                                                  num_experts_per_tok=2, sliding_window=5),
        "top1_mha_tied": lambda: T.MixtralConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=24,
                                                 num_hidden_layers=2, num_local_experts=3, num_experts_per_tok=1,
                                                 tie_word_embeddings=True),
        "rope_linear": lambda: T.MixtralConfig(**COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=4,
                                               num_experts_per_tok=3,
                                               rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    },
    "qwen2_moe": {
        "basic": lambda: T.Qwen2MoeConfig(**COMMON, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=24, shared_expert_intermediate_size=40),
        # layer_types derived: layer 0 (even, below max_window_layers) slides, layers 1 and 2 attend fully.
        "dense_first_window": lambda: T.Qwen2MoeConfig(**COMMON, num_hidden_layers=3, num_experts=5, num_experts_per_tok=2,
                                                       moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                                       intermediate_size=40, mlp_only_layers=[0], norm_topk_prob=True,
                                                       qkv_bias=False, use_sliding_window=True, sliding_window=4,
                                                       max_window_layers=2),
        "sparse_step_yarn": lambda: T.Qwen2MoeConfig(**COMMON, num_hidden_layers=4, num_experts=4, num_experts_per_tok=3,
                                                     moe_intermediate_size=24, shared_expert_intermediate_size=16,
                                                     intermediate_size=36, decoder_sparse_step=2, use_sliding_window=True,
                                                     sliding_window=6, layer_types=["full_attention", "sliding_attention",
                                                                                    "sliding_attention", "full_attention"],
                                                     rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                                                      "original_max_position_embeddings": 64,
                                                                      "truncate": False, "attention_factor": 1.2}),
    },
    "qwen3_moe": {
        "basic_head_dim": lambda: T.Qwen3MoeConfig(**COMMON, head_dim=16, num_hidden_layers=2, num_experts=4,
                                                   num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
        "dense_bias_window": lambda: T.Qwen3MoeConfig(**COMMON, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, intermediate_size=40, mlp_only_layers=[1],
                                                      attention_bias=True, use_sliding_window=True, sliding_window=5),
        "sparse_step_llama3_tied": lambda: T.Qwen3MoeConfig(**COMMON, head_dim=16, num_hidden_layers=2, num_experts=3,
                                                            num_experts_per_tok=1, moe_intermediate_size=24,
                                                            intermediate_size=32, decoder_sparse_step=2,
                                                            tie_word_embeddings=True,
                                                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                                             "factor": 8.0, "low_freq_factor": 1.0,
                                                                             "high_freq_factor": 4.0,
                                                                             "original_max_position_embeddings": 256}),
    },
    "olmoe": {
        "basic": lambda: T.OlmoeConfig(**COMMON, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                       intermediate_size=24),
        "clip_bias_yarn": lambda: T.OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=2, num_experts=5,
                                                num_experts_per_tok=2, intermediate_size=16, clip_qkv=0.5,
                                                attention_bias=True, norm_topk_prob=True,
                                                rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                                                 "original_max_position_embeddings": 64}),
    },
    "gpt_oss": {
        # gpt-oss's own layout and rope (yarn, factor 32, untruncated) with a window shorter than the prompts.
        "alternating_window": lambda: T.GptOssConfig(**COMMON, head_dim=8, num_hidden_layers=2, num_local_experts=4,
                                                     num_experts_per_tok=2, intermediate_size=24, sliding_window=4),
        # A binding clamp (limit below the projections' spread), another alpha, no attention biases, top-3,
        # default rope, a full layer first and two sliding layers of another window.
        "clamped_top3": lambda: T.GptOssConfig(**COMMON, head_dim=16, num_hidden_layers=3, num_local_experts=5,
                                               num_experts_per_tok=3, intermediate_size=16, swiglu_limit=0.3,
                                               swiglu_alpha=1.1, attention_bias=False, sliding_window=3,
                                               layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                               rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    },
    "glm4_moe": {
        # GLM-4.5's shape: a dense first layer, q/k norms, q/k/v biases, 4 groups of 2 experts (top-3 within the
        # best 2 groups), two shared experts' width, half the head rotated, weights scaled by 2.5.
        "qk_norm_groups": lambda: T.Glm4MoeConfig(**COMMON, head_dim=16, num_hidden_layers=3, n_routed_experts=8,
                                                  num_experts_per_tok=3, moe_intermediate_size=16, intermediate_size=40,
                                                  n_shared_experts=2, first_k_dense_replace=1, n_group=4, topk_group=2,
                                                  routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True),
        # GLM-4.5-Air's: no q/k norm, one group; here every layer MoE, top-k weights not renormalised, a quarter of
        # the head rotated, tied embeddings.
        "air_all_moe_tied": lambda: T.Glm4MoeConfig(**COMMON, num_hidden_layers=2, n_routed_experts=6, num_experts_per_tok=2,
                                                    moe_intermediate_size=24, intermediate_size=24, first_k_dense_replace=0,
                                                    norm_topk_prob=False, tie_word_embeddings=True,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                     "partial_rotary_factor": 0.25}),
    },
    # Multi-head latent attention (transformers needs num_key_value_heads == num_attention_heads for it).
    "deepseek_v2": {
        # DeepSeek-V2's router: top-3 within the best 2 of 3 groups (by their best expert; with topk_group >= top_k
        # the choice would be greedy's), weights scaled by 3.
        "lite_dense_first_groups": lambda: T.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=3,
                                                               first_k_dense_replace=1, intermediate_size=40,
                                                               n_routed_experts=6, num_experts_per_tok=3,
                                                               moe_intermediate_size=16, n_shared_experts=2,
                                                               topk_method="group_limited_greedy", n_group=3, topk_group=2,
                                                               routed_scaling_factor=3.0, q_lora_rank=None,
                                                               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                               v_head_dim=6, rms_norm_eps=1e-5),
        # Layers 0 (first_k_dense_replace), 1 and 3 (moe_layer_freq) dense; see `hf_model`.
        "q_lora_yarn_layer_freq": lambda: T.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=4,
                                                             first_k_dense_replace=1, moe_layer_freq=2, intermediate_size=24,
                                                             n_routed_experts=4, num_experts_per_tok=3,
                                                             moe_intermediate_size=16, n_shared_experts=1, q_lora_rank=20,
                                                             kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=8,
                                                             v_head_dim=10, max_position_embeddings=256,
                                                             rope_parameters={"rope_type": "yarn", "rope_theta": 100.0,
                                                                              "factor": 4.0, "mscale": 0.9,
                                                                              "original_max_position_embeddings": 64,
                                                                              "mscale_all_dim": 0.6}),
    },
    "deepseek_v3": {
        # DeepSeek-V3's shape: a dense first layer, a query latent, sigmoid scores with a (random) selection bias,
        # top-3 within the best 2 of 4 groups (by their two best), renormalised and scaled by 2.5, its yarn rope.
        "q_lora_groups_bias": lambda: T.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=3,
                                                         first_k_dense_replace=1, intermediate_size=40, n_routed_experts=8,
                                                         num_experts_per_tok=3, moe_intermediate_size=16,
                                                         n_shared_experts=1, n_group=4, topk_group=2,
                                                         norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=24,
                                                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                         v_head_dim=6, max_position_embeddings=256,
                                                         rope_parameters={"rope_type": "yarn", "rope_theta": 100.0,
                                                                          "factor": 4.0, "mscale": 1.0,
                                                                          "mscale_all_dim": 1.0,
                                                                          "original_max_position_embeddings": 64}),
        # One group (as Kimi-K2), top-2 weights not renormalised; every layer MoE, no query latent.
        "one_group_all_moe": lambda: T.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=2,
                                                        first_k_dense_replace=0, n_routed_experts=5, num_experts_per_tok=2,
                                                        moe_intermediate_size=24, n_shared_experts=1, n_group=1,
                                                        topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
                                                        q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6,
                                                        qk_rope_head_dim=6, v_head_dim=8),
    },
}

CASES = [(family, name) for family, configs in ZOO.items() for name in configs]


def hf_model(config):
    """The transformers model of a zoo config (random weights). transformers' DeepseekV2 ignores `moe_layer_freq`,
    which DeepSeek's reference code applies (layer i has experts iff i >= first_k_dense_replace and
    i % moe_layer_freq == 0): those layers get a dense MLP here, as the reference code builds them."""
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    freq = getattr(config, "moe_layer_freq", 1)
    for i, layer in enumerate(model.model.layers if freq > 1 else ()):
        if i >= config.first_k_dense_replace and i % freq:
            layer.mlp = DeepseekV2MLP(config)
    return model


def case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


@functools.lru_cache(maxsize=None)
def _build(family: str, name: str, root: str):
    torch.manual_seed(1234)
    config = ZOO[family][name]()
    model = hf_model(config).eval()
    randomize_biases_and_norms(model)
    hf_dir = Path(root) / f"{family}-{name}-hf"
    model.save_pretrained(hf_dir)
    out = Path(root) / f"{family}-{name}-mj"
    assert moejax_cli(["convert", str(hf_dir), str(out), "--quiet"]) == 0
    return model, hf_dir, out


def randomize_biases_and_norms(model) -> None:
    """transformers initialises biases to 0 and norm weights to 1, which would hide a bias or a
    norm applied to the wrong axis; random values do not. Attention sinks (gpt-oss) get logits of
    the scores' size, so that they take a clear share of the attention."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".bias", "_proj_bias")):
                param.normal_(0.0, INIT_STD)
            elif name.endswith(".sinks"):
                param.normal_(0.0, 1.0)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the router's selection bias (DeepSeek-V3, GLM-4.5)
                buffer.normal_(0.0, INIT_STD)


def build(case, root: Path):
    """(transformers model in float32 eval mode, HF checkpoint dir, converted moejax checkpoint dir)."""
    return _build(case[0], case[1], str(root))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens after `ids` (every prompt token attended: with pad_token_id=0 and no mask,
    generate() would take a token 0 of the prompt for padding and mask it)."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=new_tokens)
    return out[0, len(ids):].tolist()


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x max |logit| {scale:.3g}"


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]
