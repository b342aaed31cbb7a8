"""The model kinds moejax runs, and the one place that tells them apart.

A kind says how its moejax config.json is recognised and parsed, how to count its parameters, how
`moejax info` describes it, whether the source is a prompt or a source sentence (encoder-decoder), and
which engine serves it. Code that must treat kinds differently asks `kind_of(cfg)` (or
`kind_of_json(data)`) instead of testing config classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from moejax.config import ModelConfig
from moejax.encdec_config import KIND as ENCDEC, EncDecConfig


@dataclasses.dataclass(frozen=True)
class ModelKind:
    name: str  # 'decoder' or 'encdec', as config.json's "kind" (absent: decoder)
    config_class: type
    encoder_decoder: bool  # the prompt is a source to translate/transform, not a prefix to continue
    parameter_counts: Callable[[Any], dict]  # cfg -> counts and bytes (models.*.parameter_counts)
    describe: Callable[[Any], list[str]]  # cfg -> the lines of `moejax info` after the first

    def from_json(self, data: dict):
        return self.config_class.from_json(data)


def _decoder_counts(cfg: ModelConfig) -> dict:
    from moejax.models.decoder import parameter_counts

    return parameter_counts(cfg)


def _encdec_counts(cfg: EncDecConfig) -> dict:
    from moejax.models.encdec import parameter_counts

    return parameter_counts(cfg)


def _describe_decoder(cfg: ModelConfig) -> list[str]:
    moe = sum(cfg.moe_layers)
    windows = sorted({w for w in cfg.sliding_windows if w is not None})
    windowed = sum(w is not None for w in cfg.sliding_windows)
    return [
        f"layers {cfg.num_layers} ({moe} MoE), hidden {cfg.hidden_size}, heads {cfg.num_heads} "
        f"(kv {cfg.num_kv_heads}, dim {cfg.head_dim}), vocab {cfg.vocab_size}"
        + (f", sliding window {'/'.join(map(str, windows))} on {windowed} layers" if windows else "")
        + (", attention sinks" if cfg.attention_sinks else ""),
        f"experts {cfg.num_experts} per MoE layer, top-{cfg.top_k}, expert FFN {cfg.expert_intermediate_size}"
        + (f", shared expert {cfg.shared_expert_intermediate_size}" if cfg.has_shared_expert else "")
        + (", expert biases" if cfg.expert_bias else "")
        + (f", clamped SwiGLU (alpha {cfg.swiglu_alpha}, limit {cfg.swiglu_limit})" if cfg.swiglu_limit is not None else ""),
        *([f"latent attention: q latent {cfg.q_lora_rank or 'none'}, kv latent {cfg.kv_lora_rank} + rope key "
           f"{cfg.qk_rope_head_dim}, head dims qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, v {cfg.v_head_dim}"]
          if cfg.is_mla else []),
    ] + _describe_router(cfg)


def _describe_router(cfg: ModelConfig) -> list[str]:
    """A line on the router, for routers other than the softmax top-k of most families."""
    if cfg.router_options == ModelConfig.router_defaults() and not cfg.router_correction_bias:
        return []
    if cfg.softmax_after_topk:
        return [f"router: softmax over the top-{cfg.top_k} logits"]
    groups = f" within the best {cfg.topk_group} of {cfg.n_group} groups" if cfg.topk_method != "greedy" else ""
    return [f"router: {cfg.scoring_func} scores, {cfg.topk_method} top-{cfg.top_k}{groups}"
            + (", correction bias for selection" if cfg.router_correction_bias else "")
            + f", weights {'renormalised, ' if cfg.norm_topk_prob else ''}x {cfg.routed_scaling_factor:g}"]


def _describe_encdec(cfg: EncDecConfig) -> list[str]:
    n_moe = lambda ids: sum(cfg.moe_layers[g] for g in ids)  # noqa: E731
    return [
        f"encoder {cfg.num_encoder_layers} layers ({n_moe(cfg.encoder_layer_ids)} MoE), decoder {cfg.num_decoder_layers} "
        f"({n_moe(cfg.decoder_layer_ids)} MoE), hidden {cfg.hidden_size}, heads {cfg.num_heads} (dim {cfg.head_dim}), "
        f"vocab {cfg.vocab_size}",
        f"experts {cfg.num_experts} per MoE layer, top-{cfg.top_k}, expert FFN {cfg.encoder_ffn_size}/{cfg.decoder_ffn_size} "
        f"(encoder/decoder), {cfg.routing} routing",
    ]


DECODER = ModelKind("decoder", ModelConfig, False, _decoder_counts, _describe_decoder)
ENCODER_DECODER = ModelKind(ENCDEC, EncDecConfig, True, _encdec_counts, _describe_encdec)
KINDS = (DECODER, ENCODER_DECODER)


def kind_of_json(data: dict) -> ModelKind:
    """The kind a moejax config.json describes (its "kind" field; absent: decoder)."""
    return ENCODER_DECODER if data.get("kind") == ENCDEC else DECODER


def kind_of(cfg) -> ModelKind:
    """The kind of a parsed config."""
    return next(kind for kind in KINDS if isinstance(cfg, kind.config_class))
