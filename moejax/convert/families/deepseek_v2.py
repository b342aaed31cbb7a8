"""DeepSeek-V2 (and V2-Lite): multi-head latent attention (`models.mla`), the first `first_k_dense_replace`
layers dense, then a MoE layer every `moe_layer_freq` layers with `n_shared_experts` shared experts added
ungated (one MLP of n_shared_experts x moe_intermediate_size) and a softmax top-k router.

The router's group-limited selection and routed scaling are not yet supported (`check_router`)."""

from __future__ import annotations

from typing import Any

from moejax.config import ModelConfig
from moejax.convert.families.common import (
    Target,
    check_exportable,
    common_fields,
    feed_forward_map,
    gated_mlp_map,
    globals_map,
    require,
)
from moejax.errors import MoejaxError

MODEL_TYPE = "deepseek_v2"


def check_router(hf: dict[str, Any], model_type: str) -> None:
    """Refuses router settings other than plain softmax top-k without renormalisation or scaling.

    # router fields: see the glm branch (scoring_func, topk_method, n_group, topk_group, routed_scaling_factor)
    """
    wanted = {"scoring_func": "softmax", "topk_method": "greedy", "routed_scaling_factor": 1.0, "norm_topk_prob": False}
    for field, value in wanted.items():
        found = hf.get(field)
        if found is not None and found != value:
            raise MoejaxError(f"config.json: {model_type} {field}={found!r} is not supported yet (only {value!r})")


def positive(hf: dict[str, Any], name: str, model_type: str) -> int:
    value = require(hf, name, model_type)
    if not isinstance(value, int) or value < 1:
        raise MoejaxError(f"config.json: {model_type} {name} must be an integer >= 1 (got {value!r})")
    return value


def latent_attention_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The MLA fields of a DeepSeek config (V2 and V3 alike); num_key_value_heads is ignored (MLA expands the
    latent to every head)."""
    if hf.get("attention_bias"):
        raise MoejaxError(f"config.json: {model_type} attention_bias=true is not supported")
    q_lora_rank = hf.get("q_lora_rank")
    if q_lora_rank is not None and (not isinstance(q_lora_rank, int) or q_lora_rank < 1):
        raise MoejaxError(f"config.json: {model_type} q_lora_rank must be null or an integer >= 1 (got {q_lora_rank!r})")
    nope = positive(hf, "qk_nope_head_dim", model_type)
    rope_dim = positive(hf, "qk_rope_head_dim", model_type)
    if rope_dim % 2:
        raise MoejaxError(f"config.json: {model_type} qk_rope_head_dim must be even (got {rope_dim})")
    return dict(
        kv_lora_rank=positive(hf, "kv_lora_rank", model_type),
        q_lora_rank=q_lora_rank or 0,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=positive(hf, "v_head_dim", model_type),
        head_dim=nope + rope_dim,
    )


def moe_layer_pattern(hf: dict[str, Any], num_layers: int, model_type: str) -> tuple[bool, ...]:
    """Layer i has experts iff i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    first_dense = hf.get("first_k_dense_replace") or 0
    freq = hf.get("moe_layer_freq", 1)
    if not isinstance(first_dense, int) or first_dense < 0:
        raise MoejaxError(f"config.json: {model_type} first_k_dense_replace must be an integer >= 0 (got {first_dense!r})")
    if not isinstance(freq, int) or freq < 1:
        raise MoejaxError(f"config.json: {model_type} moe_layer_freq must be an integer >= 1 (got {freq!r})")
    return tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))


def deepseek_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """ModelConfig fields of a DeepSeek-V2/V3 config except the router's."""
    if hf.get("mlp_bias"):
        raise MoejaxError(f"config.json: {model_type} mlp_bias=true is not supported")
    fields = {**common_fields(hf, model_type), **latent_attention_fields(hf, model_type)}
    fields["num_kv_heads"] = fields["num_heads"]
    num_layers = fields["num_layers"]
    moe_layers = moe_layer_pattern(hf, num_layers, model_type)
    if not any(moe_layers):
        raise MoejaxError(f"config.json: {model_type} has no MoE layer (first_k_dense_replace, moe_layer_freq)")
    expert_size = positive(hf, "moe_intermediate_size", model_type)
    shared = hf.get("n_shared_experts") or 0
    if not isinstance(shared, int) or shared < 0:
        raise MoejaxError(f"config.json: {model_type} n_shared_experts must be an integer >= 0 (got {shared!r})")
    return dict(
        fields,
        num_experts=positive(hf, "n_routed_experts", model_type),
        top_k=positive(hf, "num_experts_per_tok", model_type),
        expert_intermediate_size=expert_size,
        moe_layers=moe_layers,
        sliding_windows=(None,) * num_layers,
        dense_intermediate_size=0 if all(moe_layers) else positive(hf, "intermediate_size", model_type),
        norm_topk_prob=False,
        shared_expert_intermediate_size=shared * expert_size,
        shared_expert_gate=False,
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_router(hf, MODEL_TYPE)
    return ModelConfig(**deepseek_fields(hf, MODEL_TYPE))


def latent_attention_map(cfg: ModelConfig, i: int) -> dict[str, Target]:
    """Norms and MLA projections of layer i, named as DeepSeek checkpoints name them."""
    d, heads, group, pre = cfg.hidden_size, cfg.num_heads, ("layer", i), f"model.layers.{i}."
    attn = pre + "self_attn."
    out = {
        pre + "input_layernorm.weight": Target(group, ("input_norm", "weight"), (d,)),
        pre + "post_attention_layernorm.weight": Target(group, ("post_norm", "weight"), (d,)),
        attn + "kv_a_proj_with_mqa.weight": Target(group, ("attn", "kv_a_proj", "kernel"),
                                                   (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), True),
        attn + "kv_a_layernorm.weight": Target(group, ("attn", "kv_a_norm", "weight"), (cfg.kv_lora_rank,)),
        attn + "kv_b_proj.weight": Target(group, ("attn", "kv_b_proj", "kernel"),
                                          (cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)), True),
        attn + "o_proj.weight": Target(group, ("attn", "o_proj", "kernel"), (heads * cfg.v_head_dim, d), True),
    }
    q_out = heads * cfg.head_dim
    if cfg.q_lora_rank:
        out[attn + "q_a_proj.weight"] = Target(group, ("attn", "q_a_proj", "kernel"), (d, cfg.q_lora_rank), True)
        out[attn + "q_a_layernorm.weight"] = Target(group, ("attn", "q_a_norm", "weight"), (cfg.q_lora_rank,))
        out[attn + "q_b_proj.weight"] = Target(group, ("attn", "q_b_proj", "kernel"), (cfg.q_lora_rank, q_out), True)
    else:
        out[attn + "q_proj.weight"] = Target(group, ("attn", "q_proj", "kernel"), (d, q_out), True)
    return out


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """Embeddings, each layer's MLA and feed-forward half (`mlp.gate`, `mlp.experts.E.*` and
    `mlp.shared_experts.*`, or the dense `mlp.*_proj`)."""
    out = globals_map(cfg)
    for i in range(cfg.num_layers):
        out.update(latent_attention_map(cfg, i))
        out.update(feed_forward_map(cfg, i))
        if cfg.moe_layers[i] and cfg.has_shared_expert:
            out.update(gated_mlp_map(f"model.layers.{i}.mlp.shared_experts", ("layer", i), ("shared_expert",),
                                     cfg.hidden_size, cfg.shared_expert_intermediate_size))
    return out


def moe_layer_fields(cfg: ModelConfig) -> dict[str, int]:
    """first_k_dense_replace giving cfg.moe_layers (export). transformers' DeepseekV2 ignores moe_layer_freq, so a
    model with dense layers after its first MoE layer is refused rather than exported to load wrongly."""
    first = cfg.moe_layers.index(True)
    if not all(cfg.moe_layers[first:]):
        raise MoejaxError(f"a {cfg.family} config.json for transformers cannot express MoE layers "
                          f"{[i for i, moe in enumerate(cfg.moe_layers) if moe]} (transformers ignores moe_layer_freq)")
    return {"first_k_dense_replace": first}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    check_exportable(cfg, is_mla=True, shared_expert_gate=False, norm_topk_prob=False, qkv_bias=False, o_bias=False,
                     qk_norm="none", clip_qkv=None, sliding_windows=(None,) * cfg.num_layers)
    if cfg.shared_expert_intermediate_size % cfg.expert_intermediate_size:
        raise MoejaxError(f"a {cfg.family} config.json cannot express shared experts of "
                          f"{cfg.shared_expert_intermediate_size} (not a multiple of {cfg.expert_intermediate_size})")
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": MODEL_TYPE,
        "head_dim": cfg.qk_rope_head_dim,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.expert_intermediate_size,
        "intermediate_size": cfg.dense_intermediate_size,
        "n_shared_experts": cfg.shared_expert_intermediate_size // cfg.expert_intermediate_size,
        **moe_layer_fields(cfg),
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "norm_topk_prob": False,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
    }
