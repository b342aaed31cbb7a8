"""DeepSeek-V2 (and V2-Lite): multi-head latent attention (`models.mla`), the first `first_k_dense_replace`
layers dense, then a MoE layer every `moe_layer_freq` layers with `n_shared_experts` shared experts added
ungated (one MLP of n_shared_experts x moe_intermediate_size) and a softmax router: greedy top-k, or
group_limited_greedy (the k best experts within the topk_group of n_group groups with the best single expert),
weights times routed_scaling_factor and never renormalised (`router_fields`). The router's weight stays float32
in every dtype, as transformers keeps it (its router computes in float32)."""

from __future__ import annotations

import dataclasses
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


def router_fields(hf: dict[str, Any], model_type: str, scoring_func: str, topk_methods: tuple[str, ...],
                  defaults: dict[str, Any]) -> dict[str, Any]:
    """The router's ModelConfig fields from a DeepSeek config.json: `scoring_func` and `topk_method` must be the
    family's (one of `topk_methods`, the first when absent), n_group, topk_group, routed_scaling_factor and
    norm_topk_prob as given or `defaults` (transformers' when config.json leaves them out). A greedy router has one
    group."""
    found = hf.get("scoring_func") or scoring_func
    if found != scoring_func:
        raise MoejaxError(f"config.json: {model_type} scoring_func {found!r} is not supported ({model_type} scores "
                          f"by {scoring_func})")
    method = hf.get("topk_method") or topk_methods[0]
    if method not in topk_methods:
        raise MoejaxError(f"config.json: {model_type} topk_method {method!r} is not supported "
                          f"(supported: {', '.join(topk_methods)})")
    value = lambda name: defaults[name] if hf.get(name) is None else hf[name]  # noqa: E731
    groups = (1, 1) if method == "greedy" else (value("n_group"), value("topk_group"))
    for name, number in zip(("n_group", "topk_group"), groups, strict=True):
        if not isinstance(number, int) or isinstance(number, bool):
            raise MoejaxError(f"config.json: {model_type} {name} must be an integer (got {number!r})")
    scale = value("routed_scaling_factor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise MoejaxError(f"config.json: {model_type} routed_scaling_factor must be a number (got {scale!r})")
    return dict(scoring_func=scoring_func, topk_method=method, n_group=groups[0], topk_group=groups[1],
                routed_scaling_factor=float(scale), norm_topk_prob=bool(value("norm_topk_prob")))


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
        shared_expert_intermediate_size=shared * expert_size,
        shared_expert_gate=False,
    )


# transformers' DeepseekV2Config defaults for the router fields config.json may leave out (its n_group and
# topk_group default to none: one group here).
ROUTER_DEFAULTS = {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    router = router_fields(hf, MODEL_TYPE, "softmax", ("greedy", "group_limited_greedy"), ROUTER_DEFAULTS)
    if router["norm_topk_prob"]:
        raise MoejaxError(f"config.json: {MODEL_TYPE} norm_topk_prob=true is not supported (transformers' DeepseekV2, "
                          "the reference, ignores it and never renormalises the top-k weights)")
    return ModelConfig(**deepseek_fields(hf, MODEL_TYPE), **router)


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
    """Embeddings, each layer's MLA and feed-forward half (`mlp.gate`, float32, with its selection bias
    `mlp.gate.e_score_correction_bias` where the router has one, `mlp.experts.E.*` and `mlp.shared_experts.*`, or the
    dense `mlp.*_proj`)."""
    out = globals_map(cfg)
    for i in range(cfg.num_layers):
        out.update(latent_attention_map(cfg, i))
        out.update(feed_forward_map(cfg, i))
        if not cfg.moe_layers[i]:
            continue
        pre = f"model.layers.{i}.mlp"
        out[f"{pre}.gate.weight"] = dataclasses.replace(out[f"{pre}.gate.weight"], keep_float32=True)
        if cfg.router_correction_bias:
            out[f"{pre}.gate.e_score_correction_bias"] = Target(("layer", i), ("router", "e_score_correction_bias"),
                                                                (cfg.num_experts,), keep_float32=True)
        if cfg.has_shared_expert:
            out.update(gated_mlp_map(f"{pre}.shared_experts", ("layer", i), ("shared_expert",),
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


def deepseek_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields DeepSeek-V2 and V3 share (export), router included."""
    check_exportable(cfg, is_mla=True, shared_expert_gate=False, qkv_bias=False, o_bias=False, qk_norm="none",
                     clip_qkv=None, sliding_windows=(None,) * cfg.num_layers, softmax_after_topk=False,
                     router_bias=False, expert_bias=False, swiglu_limit=None, attention_sinks=False,
                     partial_rotary_factor=1.0)
    if cfg.shared_expert_intermediate_size % cfg.expert_intermediate_size:
        raise MoejaxError(f"a {cfg.family} config.json cannot express shared experts of "
                          f"{cfg.shared_expert_intermediate_size} (not a multiple of {cfg.expert_intermediate_size})")
    return {
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
        "scoring_func": cfg.scoring_func,
        "topk_method": cfg.topk_method,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
    }


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to load this model (export)."""
    check_exportable(cfg, scoring_func="softmax", norm_topk_prob=False, router_correction_bias=False)
    if cfg.topk_method not in ("greedy", "group_limited_greedy"):
        raise MoejaxError(f"a {MODEL_TYPE} config.json cannot express topk_method={cfg.topk_method!r}")
    return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": MODEL_TYPE, **deepseek_hf_config(cfg)}
