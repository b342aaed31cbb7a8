"""DeepSeek-V3 (also DeepSeek-R1, Kimi-K2): DeepSeek-V2's layers (`deepseek_v2`: latent attention, dense first
layers, ungated shared experts) with a sigmoid router: experts chosen on their scores plus
`mlp.gate.e_score_correction_bias` (float32, for selection only) within the topk_group of n_group groups with the
best sums of two (noaux_tc), weighted by their scores, renormalised with norm_topk_prob, times
routed_scaling_factor. Rope with `rope_interleave` (the default, as published) rotates the same pairs as
DeepSeek-V2. Multi-token-prediction layers (`num_nextn_predict_layers`, stored after the last layer) are not part
of the model served: conversion skips them with a note. FP8 block-scaled checkpoints (as published) are
dequantized by `convert.fp8`."""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families import deepseek_v2
from moejax.convert.families.common import Target, check_exportable, tensors_past_last_layer
from moejax.convert.safetensors_file import TensorInfo
from moejax.errors import MoejaxError

MODEL_TYPE = "deepseek_v3"
# transformers' DeepseekV3Config defaults for the fields config.json may leave out (it always scores by sigmoid and
# selects by noaux_tc).
ROUTER_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True}
DEFAULT_FIRST_DENSE = 3


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("rope_interleave") is False:
        raise MoejaxError(f"config.json: {MODEL_TYPE} rope_interleave=false is not supported")
    router = deepseek_v2.router_fields(hf, MODEL_TYPE, "sigmoid", ("noaux_tc",), ROUTER_DEFAULTS)
    if hf.get("first_k_dense_replace") is None:
        hf = {**hf, "first_k_dense_replace": DEFAULT_FIRST_DENSE}
    return ModelConfig(**deepseek_v2.deepseek_fields(hf, MODEL_TYPE), **router, router_correction_bias=True)


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """DeepSeek-V2's tensors, with each router's selection bias `mlp.gate.e_score_correction_bias`."""
    return deepseek_v2.tensor_map(cfg)


def resolve_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo]):
    """(cfg, tensor map, ignored names): the tensors of layers past the last one (multi-token prediction) are
    ignored, with a note."""
    ignored = tensors_past_last_layer(cfg, tensors) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return cfg, tensor_map(cfg), ignored


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    check_exportable(cfg, scoring_func="sigmoid", topk_method="noaux_tc", router_correction_bias=True)
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": MODEL_TYPE, **deepseek_v2.deepseek_hf_config(cfg),
            "rope_interleave": True}
