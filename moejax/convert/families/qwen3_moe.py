"""Qwen3-MoE: per-head q/k RMSNorm, optional attention biases (q, k, v and o), routing weights
renormalised only with `norm_topk_prob`, dense layers as in Qwen2-MoE, one sliding window for
all layers when `use_sliding_window`."""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families.common import (
    Target,
    check_exportable,
    common_fields,
    decoder_tensor_map,
    single_window,
    sparse_layer_fields,
    sparse_moe_fields,
)
from moejax.errors import MoejaxError

MODEL_TYPE = "qwen3_moe"


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, MODEL_TYPE)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is not None and not (isinstance(window, int) and window >= 1):
        raise MoejaxError(f"config.json: sliding_window must be an integer >= 1 (got {window!r})")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **fields,
        **sparse_moe_fields(hf, fields["num_layers"], MODEL_TYPE),
        sliding_windows=(window,) * fields["num_layers"],
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
    )


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    return decoder_tensor_map(cfg)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    check_exportable(cfg, o_bias=cfg.qkv_bias, qk_norm="head", clip_qkv=None, has_shared_expert=False)
    window = single_window(cfg)
    if window is not None and None in cfg.sliding_windows:
        raise MoejaxError("a qwen3_moe config.json cannot express sliding windows on some layers only")
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.expert_intermediate_size,
        "intermediate_size": cfg.dense_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "attention_bias": cfg.qkv_bias,
        **sparse_layer_fields(cfg),
        "use_sliding_window": window is not None,
        "sliding_window": window,
    }
