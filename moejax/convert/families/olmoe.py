"""OLMoE: RMSNorm over the whole q and k projections, optional `clip_qkv`, optional attention
biases (q, k, v and o), every layer MoE, routing renormalised only with `norm_topk_prob`."""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families.common import (
    Target,
    check_exportable,
    common_fields,
    decoder_tensor_map,
    num_routed_experts,
    require,
)
from moejax.errors import MoejaxError

MODEL_TYPE = "olmoe"


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, MODEL_TYPE)
    n = fields["num_layers"]
    if fields["head_dim"] * fields["num_heads"] != fields["hidden_size"]:
        # transformers sizes q_norm by hidden_size, so only this head_dim loads there.
        raise MoejaxError(
            f"config.json: olmoe needs head_dim * num_attention_heads == hidden_size "
            f"({fields['head_dim']} * {fields['num_heads']} != {fields['hidden_size']})"
        )
    clip = hf.get("clip_qkv")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **fields,
        num_experts=num_routed_experts(hf, MODEL_TYPE),
        top_k=int(require(hf, "num_experts_per_tok", MODEL_TYPE)),
        expert_intermediate_size=int(require(hf, "intermediate_size", MODEL_TYPE)),
        moe_layers=(True,) * n,
        sliding_windows=(None,) * n,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=float(clip) if clip is not None else None,
    )


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    return decoder_tensor_map(cfg)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    check_exportable(
        cfg,
        o_bias=cfg.qkv_bias,
        qk_norm="full",
        has_shared_expert=False,
        moe_layers=(True,) * cfg.num_layers,
        sliding_windows=(None,) * cfg.num_layers,
        head_dim=cfg.hidden_size // cfg.num_heads,
    )
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "intermediate_size": cfg.expert_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "attention_bias": cfg.qkv_bias,
        "clip_qkv": cfg.clip_qkv,
    }
