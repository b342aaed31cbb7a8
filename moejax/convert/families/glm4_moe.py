"""GLM-4.5 / GLM-4.5-Air (`glm4_moe`): the DeepSeek-V3-style router (sigmoid scores, e_score_correction_bias for
selection only, top-k within the best expert groups, weights renormalised and scaled by routed_scaling_factor),
one ungated shared expert of n_shared_experts x moe_intermediate_size per MoE layer, the first
`first_k_dense_replace` layers dense, rope on the first partial_rotary_factor of each head, q/k/v biases
(`attention_bias`), per-head q/k norms where `use_qk_norm`. The checkpoint's multi-token-prediction layers
(`num_nextn_predict_layers`, stored as layers past the last) are skipped with a note."""

from __future__ import annotations

import dataclasses
from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families.common import (
    Target,
    check_exportable,
    common_fields,
    decoder_tensor_map,
    gated_mlp_map,
    require,
    tensors_past_last_layer,
)
from moejax.convert.safetensors_file import TensorInfo
from moejax.errors import MoejaxError

MODEL_TYPE = "glm4_moe"
# transformers' Glm4MoeConfig default when config.json leaves it out.
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5
# The router GLM-4.5 always runs; a config.json that names another is refused rather than silently run otherwise.
ROUTER = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def partial_rotary_factor(hf: dict[str, Any]) -> float:
    """From `rope_parameters` (transformers 5), else the top level (the published config.json), else 0.5."""
    rope = hf.get("rope_parameters") or {}
    value = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MoejaxError(f"config.json: partial_rotary_factor must be a number (got {value!r})")
    return float(value)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    for name, value in ROUTER.items():
        if hf.get(name, value) != value:
            raise MoejaxError(f"config.json: {MODEL_TYPE} {name} {hf[name]!r} is not supported (GLM-4.5 routes with {value})")
    without_partial = {k: v for k, v in hf.items() if k != "partial_rotary_factor"}
    without_partial["rope_parameters"] = {k: v for k, v in (hf.get("rope_parameters") or {}).items()
                                          if k != "partial_rotary_factor"}
    fields = common_fields(without_partial, MODEL_TYPE)
    num_layers = fields["num_layers"]
    dense_first = require(hf, "first_k_dense_replace", MODEL_TYPE)
    if not (isinstance(dense_first, int) and 0 <= dense_first < num_layers):
        raise MoejaxError(f"config.json: first_k_dense_replace must be an integer in [0, {num_layers}) (got {dense_first!r})")
    shared = hf.get("n_shared_experts", 1)
    if not (isinstance(shared, int) and shared >= 1):
        raise MoejaxError(f"config.json: n_shared_experts must be an integer >= 1 (got {shared!r})")
    expert_size = int(require(hf, "moe_intermediate_size", MODEL_TYPE))
    return ModelConfig(
        **fields,
        num_experts=int(require(hf, "n_routed_experts", MODEL_TYPE)),
        top_k=int(require(hf, "num_experts_per_tok", MODEL_TYPE)),
        expert_intermediate_size=expert_size,
        moe_layers=tuple(i >= dense_first for i in range(num_layers)),
        sliding_windows=(None,) * num_layers,
        dense_intermediate_size=int(require(hf, "intermediate_size", MODEL_TYPE)) if dense_first else 0,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        shared_expert_intermediate_size=shared * expert_size,
        shared_expert_gate=False,
        qkv_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head" if hf.get("use_qk_norm", False) else "none",
        **ROUTER,
        n_group=int(hf.get("n_group", 1)),
        topk_group=int(hf.get("topk_group", 1)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        router_correction_bias=True,
        partial_rotary_factor=partial_rotary_factor(hf),
    )


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """The common decoder tensors plus each MoE layer's router correction bias and shared expert. The router's
    weight and bias stay float32 in every dtype, as transformers keeps them (its router runs in float32: a bfloat16
    router would round the scores that choose the experts)."""
    d, out = cfg.hidden_size, decoder_tensor_map(cfg)
    for i in cfg.moe_layer_ids:
        group, pre = ("layer", i), f"model.layers.{i}.mlp"
        out[f"{pre}.gate.weight"] = dataclasses.replace(out[f"{pre}.gate.weight"], keep_float32=True)
        out[f"{pre}.gate.e_score_correction_bias"] = Target(group, ("router", "e_score_correction_bias"),
                                                            (cfg.num_experts,), keep_float32=True)
        out.update(gated_mlp_map(f"{pre}.shared_experts", group, ("shared_expert",), d, cfg.shared_expert_intermediate_size))
    return out


def resolve_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo]):
    """(cfg, tensor map, ignored HF names): the multi-token-prediction layers and a tied lm_head are ignored."""
    ignored = tensors_past_last_layer(cfg, tensors)
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")
    return cfg, tensor_map(cfg), ignored


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    dense_first = cfg.moe_layers.index(True)
    check_exportable(cfg, o_bias=False, clip_qkv=None, has_shared_expert=True, shared_expert_gate=False,
                     router_correction_bias=True, sliding_windows=(None,) * cfg.num_layers,
                     moe_layers=tuple(i >= dense_first for i in range(cfg.num_layers)), **ROUTER)
    if cfg.qk_norm == "full" or cfg.shared_expert_intermediate_size % cfg.expert_intermediate_size:
        raise MoejaxError(f"a {MODEL_TYPE} config.json cannot express qk_norm={cfg.qk_norm!r} or a shared expert of "
                          f"{cfg.shared_expert_intermediate_size} (a multiple of {cfg.expert_intermediate_size})")
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.expert_intermediate_size,
        "intermediate_size": cfg.dense_intermediate_size,
        "n_shared_experts": cfg.shared_expert_intermediate_size // cfg.expert_intermediate_size,
        "first_k_dense_replace": dense_first,
        "norm_topk_prob": cfg.norm_topk_prob,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "attention_bias": cfg.qkv_bias,
        "use_qk_norm": cfg.qk_norm == "head",
        "rope_parameters": {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.scaling_type, **dict(cfg.rope.scaling),
                            "partial_rotary_factor": cfg.partial_rotary_factor},
    }
