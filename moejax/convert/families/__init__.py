"""Registry of the HF model families moejax converts, keyed by config.json `model_type`.

Each family module provides `MODEL_TYPE`, `config_from_hf(hf_config) -> ModelConfig`,
`tensor_map(cfg) -> {hf_name: Target}` and `hf_config(cfg)` (its own config.json fields).
Encoder-decoder families return an `EncDecConfig` and provide `resolve_tensors(cfg, tensors) ->
(cfg, tensor map, ignored names)`, which settles tied embedding tables from the checkpoint itself.
Families whose experts are fused tensors (gpt-oss) leave them out of the tensor map and provide
`fused_experts(cfg, tensors)`: an object with `tensor_names`, `nbytes` and `groups(dtype)`, which
yields each expert's group (see `gpt_oss.FusedExperts`).

`ALIASES` maps the model_type of a checkpoint that publishes a family's architecture under its own name to that
family (Kimi-K2's config.json says kimi_k2 for DeepseekV3ForCausalLM); the converted config names the family.
"""

from __future__ import annotations

from types import ModuleType

from moejax.convert.families import (
    deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, mixtral, nllb_moe, olmoe, qwen2_moe, qwen3_moe, switch_transformers,
)
from moejax.errors import MoejaxError

FAMILIES: dict[str, ModuleType] = {
    module.MODEL_TYPE: module
    for module in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, switch_transformers,
                   nllb_moe)
}

ALIASES: dict[str, str] = {"kimi_k2": deepseek_v3.MODEL_TYPE}


def family(model_type: str | None) -> ModuleType:
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in FAMILIES:
        supported = sorted([*FAMILIES, *(f"{alias} (as {name})" for alias, name in ALIASES.items())])
        raise MoejaxError(f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(supported)})")
    return FAMILIES[model_type]
