"""DeepSeek-V3 (also DeepSeek-R1, Kimi-K2): DeepSeek-V2's layers (`deepseek_v2`: latent attention, dense first
layers, ungated shared experts) with a sigmoid router that picks experts by group (noaux_tc) with a selection
bias and scales their weights. That router is not supported yet, so `config_from_hf` refuses every V3 config by
the router field it cannot honour; the rest is ready for it. Multi-token-prediction layers
(`num_nextn_predict_layers`, stored after the last layer) are not part of the model served: conversion skips
them with a note."""

from __future__ import annotations

import logging
import re
from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families import deepseek_v2
from moejax.convert.families.common import Target
from moejax.convert.safetensors_file import TensorInfo
from moejax.errors import MoejaxError

MODEL_TYPE = "deepseek_v3"
# What V3 configs imply when they do not say it (transformers' DeepseekV3 always routes this way).
IMPLIED_ROUTER = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
log = logging.getLogger(__name__)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    deepseek_v2.check_router({**IMPLIED_ROUTER, **hf}, MODEL_TYPE)
    if hf.get("rope_interleave") is False:
        raise MoejaxError(f"config.json: {MODEL_TYPE} rope_interleave=false is not supported")
    return ModelConfig(**deepseek_v2.deepseek_fields(hf, MODEL_TYPE))


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """DeepSeek-V2's tensors (the router's selection bias `mlp.gate.e_score_correction_bias` comes with the router)."""
    return deepseek_v2.tensor_map(cfg)


def resolve_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo]):
    """(cfg, tensor map, ignored names): the tensors of layers past the last one (multi-token prediction) are
    ignored, with a note."""
    layer_of = {name: int(match.group(1)) for name in tensors if (match := LAYER_NAME.match(name))}
    skipped = {name for name, layer in layer_of.items() if layer >= cfg.num_layers}
    if skipped:
        layers = sorted({layer_of[name] for name in skipped})
        log.warning(f"skipping {len(skipped)} multi-token-prediction tensors of layer(s) {', '.join(map(str, layers))} "
                    f"(not used for decoding)")
    ignored = skipped | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return cfg, tensor_map(cfg), ignored


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    raise MoejaxError(f"a {MODEL_TYPE} config.json cannot be written yet: its router has no moejax fields")
