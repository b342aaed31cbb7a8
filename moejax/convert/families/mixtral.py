"""Mixtral: every layer MoE, softmax-top-k routing always renormalised, optional sliding window."""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families.common import (
    Target,
    attention_map,
    common_fields,
    experts_map,
    globals_map,
    require,
)

MODEL_TYPE = "mixtral"


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, MODEL_TYPE)
    window = hf.get("sliding_window")
    return ModelConfig(
        **fields,
        num_experts=int(require(hf, "num_local_experts", MODEL_TYPE)),
        top_k=int(require(hf, "num_experts_per_tok", MODEL_TYPE)),
        expert_intermediate_size=int(require(hf, "intermediate_size", MODEL_TYPE)),
        moe_layers=(True,) * fields["num_layers"],
        sliding_windows=(int(window) if window else None,) * fields["num_layers"],
        norm_topk_prob=True,
    )


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    out = globals_map(cfg)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}.block_sparse_moe"
        out.update(attention_map(cfg, i))
        out[f"{pre}.gate.weight"] = Target(("layer", i), ("router", "kernel"), (cfg.hidden_size, cfg.num_experts), True)
        out.update(experts_map(cfg, i, f"{pre}.experts", names=("w1", "w3", "w2")))
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    window = cfg.sliding_windows[0]
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": MODEL_TYPE,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "intermediate_size": cfg.expert_intermediate_size,
        "sliding_window": window,
    }
