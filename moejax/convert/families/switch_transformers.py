"""Switch Transformers: T5 with a top-1 MoE FFN in every `*_sparse_step`-th layer.

T5 norms (RMS, no bias), a relative-position bias computed by the first layer of each stack and
shared by all its layers, unscaled attention scores, no biases; tied embeddings scale the decoder
output by d_model**-0.5 before the vocabulary projection.
"""

from __future__ import annotations

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

MODEL_TYPE = "switch_transformers"
TABLES = {
    "shared": "shared.weight",
    "encoder_embed": "encoder.embed_tokens.weight",
    "decoder_embed": "decoder.embed_tokens.weight",
    "lm_head": "lm_head.weight",
}


def sparse_layers(num_layers: int, num_sparse: int) -> list[bool]:
    """Which layers of a stack are sparse, exactly as transformers decides (quirks included: with
    num_sparse = 0 layer 1 is still sparse; with num_sparse > num_layers none is)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    return [(i % step == 1 or step == 1) if step > 0 else False for i in range(num_layers)]


def config_from_hf(hf: dict[str, Any]) -> EncDecConfig:
    d = positive_int(hf, "d_model", MODEL_TYPE)
    n_enc = positive_int(hf, "num_layers", MODEL_TYPE)
    n_dec = hf.get("num_decoder_layers") or n_enc
    vocab = positive_int(hf, "vocab_size", MODEL_TYPE)
    tied = bool(hf.get("tie_word_embeddings", True))
    require_float32_router(hf)
    ffn = positive_int(hf, "d_ff", MODEL_TYPE)
    return EncDecConfig(
        family=MODEL_TYPE,
        vocab_size=vocab,
        hidden_size=d,
        num_heads=positive_int(hf, "num_heads", MODEL_TYPE),
        head_dim=positive_int(hf, "d_kv", MODEL_TYPE),
        num_encoder_layers=n_enc,
        num_decoder_layers=n_dec,
        moe_layers=tuple(
            sparse_layers(n_enc, int(hf.get("num_sparse_encoder_layers", 3)))
            + sparse_layers(n_dec, int(hf.get("num_sparse_decoder_layers", 3)))
        ),
        num_experts=positive_int(hf, "num_experts", MODEL_TYPE),
        top_k=1,
        encoder_ffn_size=ffn,
        decoder_ffn_size=ffn,
        norm="rms",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        position="relative",
        relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        scale_attention=False,
        hidden_act=activation(hf, "dense_act_fn", "relu"),
        logit_scale=d**-0.5 if tied else 1.0,
        own_tables=() if tied else ("encoder_embed", "decoder_embed", "lm_head"),
        router_bias=bool(hf.get("router_bias", False)),
        norm_topk_prob=False,
        capacity_group="sequence",
        expert_capacity=int(hf.get("expert_capacity", 64)),
        route_padding_tokens=True,
        decoder_start_token_id=token_id(hf, "decoder_start_token_id", None, MODEL_TYPE, vocab),
        pad_token_id=token_id(hf, "pad_token_id", 0, MODEL_TYPE, vocab),
        eos_token_ids=special_token_ids(hf, "eos_token_id", vocab),
    )


def tensor_map(cfg: EncDecConfig, tables: dict[str, str] = TABLES) -> dict[str, Target]:
    out = table_targets(cfg, tables)
    h = cfg.num_heads
    for stack, layer_ids in (("encoder", cfg.encoder_layer_ids), ("decoder", cfg.decoder_layer_ids)):
        out.update(norm_targets(cfg, f"{stack}.final_layer_norm", GLOBALS, (f"{stack}_norm",)))
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = Target(
            GLOBALS, (f"{stack}_relative_bias", "embedding"), (cfg.relative_buckets, h)
        )
        for i, g in enumerate(layer_ids):
            pre, group = f"{stack}.block.{i}.layer", ("layer", g)
            out.update(norm_targets(cfg, f"{pre}.0.layer_norm", group, ("self_norm",)))
            out.update(attention_targets(cfg, f"{pre}.0.SelfAttention", group, "self_attn", ("q", "k", "v", "o")))
            ff = 1
            if stack == "decoder":
                out.update(norm_targets(cfg, f"{pre}.1.layer_norm", group, ("cross_norm",)))
                out.update(attention_targets(cfg, f"{pre}.1.EncDecAttention", group, "cross_attn", ("q", "k", "v", "o")))
                ff = 2
            out.update(norm_targets(cfg, f"{pre}.{ff}.layer_norm", group, ("ffn_norm",)))
            out.update(ffn_targets(cfg, g, f"{pre}.{ff}.mlp", "wi", "wo"))
    return out


def resolve_tensors(cfg: EncDecConfig, tensors: dict[str, TensorInfo]):
    """(cfg, tensor map, ignored HF names) once the checkpoint's tensors are known (tied tables)."""
    return resolve_tables(cfg, TABLES, tensors, tensor_map)

