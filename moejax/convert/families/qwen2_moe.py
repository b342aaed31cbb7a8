"""Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, a shared expert behind a sigmoid gate in every MoE
layer, dense layers from `decoder_sparse_step` / `mlp_only_layers`, per-layer sliding windows."""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families.common import (
    Target,
    check_exportable,
    common_fields,
    decoder_tensor_map,
    LAYER_TYPES,
    gated_mlp_map,
    layer_windows,
    require,
    single_window,
    sparse_layer_fields,
    sparse_moe_fields,
)
from moejax.errors import MoejaxError

MODEL_TYPE = "qwen2_moe"


def sliding_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows as transformers 5 derives them: `layer_types`, or when absent, every even
    layer below `max_window_layers` if `use_sliding_window`; the window is 0 unless that is set."""
    use = bool(hf.get("use_sliding_window", False))
    window = hf.get("sliding_window") if use else 0
    layer_types = hf.get("layer_types")
    if layer_types is None:
        below = int(hf.get("max_window_layers", 28))
        layer_types = [LAYER_TYPES[bool(use and i % 2 == 0 and i < below)] for i in range(num_layers)]
    return layer_windows(layer_types, window, num_layers, f" (use_sliding_window={use})")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, MODEL_TYPE)
    shared = int(require(hf, "shared_expert_intermediate_size", MODEL_TYPE))
    if shared < 1:
        raise MoejaxError(f"config.json: shared_expert_intermediate_size must be >= 1 (got {shared})")
    return ModelConfig(
        **fields,
        **sparse_moe_fields(hf, fields["num_layers"], MODEL_TYPE),
        sliding_windows=sliding_windows(hf, fields["num_layers"]),
        shared_expert_intermediate_size=shared,
        qkv_bias=bool(hf.get("qkv_bias", True)),
    )


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """The common decoder tensors plus each MoE layer's shared expert and its gate."""
    d, out = cfg.hidden_size, decoder_tensor_map(cfg)
    for i in cfg.moe_layer_ids:
        group, pre = ("layer", i), f"model.layers.{i}.mlp"
        out.update(gated_mlp_map(f"{pre}.shared_expert", group, ("shared_expert",), d, cfg.shared_expert_intermediate_size))
        out[f"{pre}.shared_expert_gate.weight"] = Target(group, ("shared_expert_gate", "kernel"), (d, 1), True)
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    check_exportable(cfg, o_bias=False, qk_norm="none", clip_qkv=None, has_shared_expert=True, shared_expert_gate=True)
    window = single_window(cfg)
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.expert_intermediate_size,
        "intermediate_size": cfg.dense_intermediate_size,
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "qkv_bias": cfg.qkv_bias,
        **sparse_layer_fields(cfg),
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": cfg.num_layers,
        "layer_types": [LAYER_TYPES[w is not None] for w in cfg.sliding_windows],
    }
