"""NLLB-MoE: a fairseq/M2M100-style transformer with a top-2 MoE FFN in every `sparse_step`-th layer.

Pre-norm LayerNorms with bias, biased attention projections and FFNs (experts too), sinusoidal
positions offset by the pad id, embeddings scaled by sqrt(d_model) (`scale_embedding`), expert
outputs scaled by 1 - moe_token_dropout at inference, routing weights renormalised over the two
choices. Capacity routing counts all tokens of a call together.
"""

from __future__ import annotations

import math
from typing import Any

from moejax.convert.families.common import GLOBALS, Target, special_token_ids
from moejax.convert.families.encdec_common import (
    activation,
    attention_targets,
    ffn_targets,
    norm_targets,
    positive_int,
    require_float32_router,
    resolve_tables,
    table_targets,
    token_id,
)
from moejax.convert.safetensors_file import TensorInfo
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError

MODEL_TYPE = "nllb-moe"
TABLES = {
    "shared": "model.shared.weight",
    "encoder_embed": "model.encoder.embed_tokens.weight",
    "decoder_embed": "model.decoder.embed_tokens.weight",
    "lm_head": "lm_head.weight",
}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which NLLB-MoE uses


def sparse_layers(num_layers: int, step: int) -> list[bool]:
    """Layer i is sparse when (i + 1) is a multiple of the step (none for step <= 0)."""
    return [(i + 1) % step == 0 if step > 0 else False for i in range(num_layers)]


def config_from_hf(hf: dict[str, Any]) -> EncDecConfig:
    d = positive_int(hf, "d_model", MODEL_TYPE)
    heads = positive_int(hf, "encoder_attention_heads", MODEL_TYPE)
    if hf.get("decoder_attention_heads", heads) != heads:
        raise MoejaxError("config.json: encoder_attention_heads != decoder_attention_heads is not supported")
    if d % heads:
        raise MoejaxError(f"config.json: d_model {d} is not a multiple of the {heads} attention heads")
    policy = hf.get("second_expert_policy", "all")
    if policy != "all":
        raise MoejaxError(f"config.json: second_expert_policy '{policy}' is random at inference; only 'all' is supported")
    require_float32_router(hf)
    vocab = positive_int(hf, "vocab_size", MODEL_TYPE)
    n_enc, n_dec = positive_int(hf, "encoder_layers", MODEL_TYPE), positive_int(hf, "decoder_layers", MODEL_TYPE)
    tied = bool(hf.get("tie_word_embeddings", True))
    return EncDecConfig(
        family=MODEL_TYPE,
        vocab_size=vocab,
        hidden_size=d,
        num_heads=heads,
        head_dim=d // heads,
        num_encoder_layers=n_enc,
        num_decoder_layers=n_dec,
        moe_layers=tuple(
            sparse_layers(n_enc, int(hf.get("encoder_sparse_step", 4))) + sparse_layers(n_dec, int(hf.get("decoder_sparse_step", 4)))
        ),
        num_experts=positive_int(hf, "num_experts", MODEL_TYPE),
        top_k=2,
        encoder_ffn_size=positive_int(hf, "encoder_ffn_dim", MODEL_TYPE),
        decoder_ffn_size=positive_int(hf, "decoder_ffn_dim", MODEL_TYPE),
        norm="layer",
        norm_eps=LAYER_NORM_EPS,
        position="sinusoidal",
        attention_bias=True,
        scale_attention=True,
        hidden_act=activation(hf, "activation_function", "relu"),
        ffn_bias=True,
        embed_scale=math.sqrt(d) if hf.get("scale_embedding", True) else 1.0,
        own_tables=() if tied else ("encoder_embed", "decoder_embed", "lm_head"),
        router_bias=bool(hf.get("router_bias", False)),
        norm_topk_prob=True,
        expert_output_scale=1.0 - float(hf.get("moe_token_dropout", 0.2)),
        capacity_group="batch",
        expert_capacity=hf.get("expert_capacity", 64),
        capacity_token_fraction=float(hf.get("moe_eval_capacity_token_fraction", 1.0)),
        batch_prioritized_routing=bool(hf.get("batch_prioritized_routing", False)),
        normalize_before_dropping=bool(hf.get("normalize_router_prob_before_dropping", False)),
        route_padding_tokens=bool(hf.get("router_ignore_padding_tokens", False)),
        decoder_start_token_id=token_id(hf, "decoder_start_token_id", 2, MODEL_TYPE, vocab),
        pad_token_id=token_id(hf, "pad_token_id", 1, MODEL_TYPE, vocab),
        eos_token_ids=special_token_ids(hf, "eos_token_id", vocab),
        max_position_embeddings=int(hf.get("max_position_embeddings", 1024)),
    )


def tensor_map(cfg: EncDecConfig, tables: dict[str, str] = TABLES) -> dict[str, Target]:
    out = table_targets(cfg, tables)
    attn = ("q_proj", "k_proj", "v_proj", "out_proj")
    for stack, layer_ids in (("encoder", cfg.encoder_layer_ids), ("decoder", cfg.decoder_layer_ids)):
        out.update(norm_targets(cfg, f"model.{stack}.layer_norm", GLOBALS, (f"{stack}_norm",)))
        for i, g in enumerate(layer_ids):
            pre, group = f"model.{stack}.layers.{i}", ("layer", g)
            out.update(norm_targets(cfg, f"{pre}.self_attn_layer_norm", group, ("self_norm",)))
            out.update(attention_targets(cfg, f"{pre}.self_attn", group, "self_attn", attn))
            if stack == "decoder":
                out.update(norm_targets(cfg, f"{pre}.cross_attention_layer_norm", group, ("cross_norm",)))
                out.update(attention_targets(cfg, f"{pre}.cross_attention", group, "cross_attn", attn))
            out.update(norm_targets(cfg, f"{pre}.ff_layer_norm", group, ("ffn_norm",)))
            out.update(ffn_targets(cfg, g, f"{pre}.ffn", "fc1", "fc2"))
    return out


def resolve_tensors(cfg: EncDecConfig, tensors: dict[str, TensorInfo]):
    """(cfg, tensor map, ignored HF names) once the checkpoint's tensors are known (tied tables)."""
    return resolve_tables(cfg, TABLES, tensors, tensor_map)
