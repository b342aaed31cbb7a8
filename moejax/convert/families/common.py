"""What the HF decoder-only MoE families share: config fields and the Llama-style key layout.

A tensor map sends each HF tensor name to a `Target`: which group of the moejax checkpoint
it belongs to, its path inside that group, and whether the HF [out, in] matrix is
transposed to moejax's [in, out].
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from moejax.config import ModelConfig, RopeConfig
from moejax.errors import MoejaxError
from moejax.models.layers import ACTIVATIONS
from moejax.models.rope import SUPPORTED_SCALING

GLOBALS = ("globals",)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    group: tuple  # ("globals",) | ("layer", i) | ("expert", i, e)
    path: tuple[str, ...]
    shape: tuple[int, ...]  # moejax shape (after transposition)
    transpose: bool = False
    keep_float32: bool = False  # stored in float32 whatever the model's dtype (e.g. a router's correction bias)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def dtype(self, cfg: ModelConfig):
        """The NumPy dtype this tensor has in a moejax checkpoint of `cfg`."""
        return np.dtype(np.float32) if self.keep_float32 else np.dtype(cfg.np_dtype)


def require(hf: dict[str, Any], name: str, model_type: str):
    if hf.get(name) is None:
        raise MoejaxError(f"config.json: {model_type} config lacks '{name}'")
    return hf[name]


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """RoPE from transformers 5 `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind in ("llama3", "yarn"):
        # As transformers' standardize_rope_params: the pretraining length defaults to the model's.
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
    if kind not in SUPPORTED_SCALING:
        raise MoejaxError(f"config.json: rope type '{kind}' is not supported (supported: {', '.join(SUPPORTED_SCALING)})")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise MoejaxError("config.json: partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    scaling = tuple(
        sorted((k, float(v)) for k, v in params.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    )
    if "truncate" in params:
        scaling = tuple(sorted({**dict(scaling), "truncate": float(bool(params["truncate"]))}.items()))
    return RopeConfig(theta=theta, scaling_type=kind, scaling=scaling if kind != "default" else ())


def special_token_ids(hf: dict[str, Any], name: str, vocab: int) -> tuple[int, ...]:
    """The ids config.json gives for `name` (an id, a list of ids or null) that lie in the vocabulary;
    others are left out with a note (some configs name ids beyond their embedding table)."""
    value = hf.get(name)
    values = [] if value is None else value if isinstance(value, list) else [value]
    dropped = [v for v in values if not _in_vocab(v, vocab)]
    if dropped:
        log.warning(f"config.json: {name} {', '.join(map(repr, dropped))} is outside the vocabulary [0, {vocab}): "
                    "left out of the converted config")
    return tuple(v for v in values if _in_vocab(v, vocab))


def common_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """ModelConfig fields every Llama-style family reads the same way."""
    hidden = int(require(hf, "hidden_size", model_type))
    heads = int(require(hf, "num_attention_heads", model_type))
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise MoejaxError(f"config.json: hidden_act '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    vocab = int(require(hf, "vocab_size", model_type))
    return dict(
        family=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=int(require(hf, "num_hidden_layers", model_type)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=act,
        bos_token_id=next(iter(special_token_ids(hf, "bos_token_id", vocab)), None),
        eos_token_ids=special_token_ids(hf, "eos_token_id", vocab),
        pad_token_id=next(iter(special_token_ids(hf, "pad_token_id", vocab)), None),
    )


def num_routed_experts(hf: dict[str, Any], model_type: str) -> int:
    """`num_experts`, which some configs save under its alias `num_local_experts`."""
    value = hf.get("num_experts", hf.get("num_local_experts"))
    if value is None:
        raise MoejaxError(f"config.json: {model_type} config lacks 'num_experts'")
    if int(value) < 1:
        raise MoejaxError(f"config.json: {model_type} num_experts is {value}: a model without experts is not a MoE model")
    return int(value)


def sparse_layer_pattern(hf: dict[str, Any], num_layers: int, model_type: str) -> tuple[bool, ...]:
    """Qwen-style MoE placement: layer i has experts unless listed in `mlp_only_layers`, and iff
    (i + 1) is a multiple of `decoder_sparse_step`."""
    step = hf.get("decoder_sparse_step")
    step = 1 if step is None else step
    if not isinstance(step, int) or step < 1:
        raise MoejaxError(f"config.json: {model_type} decoder_sparse_step must be an integer >= 1 (got {step!r})")
    dense = set(hf.get("mlp_only_layers") or ())
    bad = sorted(i for i in dense if not (isinstance(i, int) and 0 <= i < num_layers))
    if bad:
        raise MoejaxError(f"config.json: mlp_only_layers entry {bad[0]!r} is not a layer index in [0, {num_layers})")
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def sparse_moe_fields(hf: dict[str, Any], num_layers: int, model_type: str) -> dict[str, Any]:
    """The expert fields of Qwen-style configs (Qwen2-MoE, Qwen3-MoE): experts of
    `moe_intermediate_size`, dense layers of `intermediate_size`, top-k weights renormalised only
    with `norm_topk_prob`."""
    moe_layers = sparse_layer_pattern(hf, num_layers, model_type)
    return dict(
        num_experts=num_routed_experts(hf, model_type),
        top_k=int(require(hf, "num_experts_per_tok", model_type)),
        expert_intermediate_size=int(require(hf, "moe_intermediate_size", model_type)),
        moe_layers=moe_layers,
        dense_intermediate_size=0 if all(moe_layers) else int(require(hf, "intermediate_size", model_type)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def sparse_layer_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of `sparse_layer_pattern`: every dense layer listed in mlp_only_layers."""
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, moe in enumerate(cfg.moe_layers) if not moe]}


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(layer_types, window, num_layers: int, why: str = "") -> tuple[int | None, ...]:
    """Per-layer sliding windows from config.json `layer_types` (one of LAYER_TYPES per layer) and the window
    the sliding layers share; `why` ends the error about a missing window."""
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise MoejaxError(
            f"config.json: layer_types must list {num_layers} of {', '.join(LAYER_TYPES)} (got {layer_types!r})"
        )
    if "sliding_attention" in layer_types and not (isinstance(window, int) and window >= 1):
        raise MoejaxError(f"config.json: layer_types has sliding_attention layers but the sliding window is {window!r}{why}")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def single_window(cfg: ModelConfig) -> int | None:
    """The one sliding window all windowed layers share (for configs with a single window field)."""
    windows = {w for w in cfg.sliding_windows if w is not None}
    if len(windows) > 1:
        raise MoejaxError(f"{cfg.family} config.json has one sliding_window; this model has several {sorted(windows)}")
    return next(iter(windows), None)


def _in_vocab(token, vocab: int) -> bool:
    return isinstance(token, int) and 0 <= token < vocab


def globals_map(cfg: ModelConfig) -> dict[str, Target]:
    d, v = cfg.hidden_size, cfg.vocab_size
    out = {
        "model.embed_tokens.weight": Target(GLOBALS, ("embed", "embedding"), (v, d)),
        "model.norm.weight": Target(GLOBALS, ("final_norm", "weight"), (d,)),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = Target(GLOBALS, ("lm_head", "kernel"), (d, v), transpose=True)
    return out


def attention_map(cfg: ModelConfig, i: int) -> dict[str, Target]:
    """Norms and attention of layer i, named as in Llama-style HF checkpoints."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    group, pre = ("layer", i), f"model.layers.{i}."
    out = {
        pre + "input_layernorm.weight": Target(group, ("input_norm", "weight"), (d,)),
        pre + "post_attention_layernorm.weight": Target(group, ("post_norm", "weight"), (d,)),
    }
    for name, n_out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        out[f"{pre}self_attn.{name}.weight"] = Target(group, ("attn", name, "kernel"), (d, n_out), True)
        if cfg.qkv_bias:
            out[f"{pre}self_attn.{name}.bias"] = Target(group, ("attn", name, "bias"), (n_out,))
    out[f"{pre}self_attn.o_proj.weight"] = Target(group, ("attn", "o_proj", "kernel"), (q_out, d), True)
    if cfg.o_bias:
        out[f"{pre}self_attn.o_proj.bias"] = Target(group, ("attn", "o_proj", "bias"), (d,))
    if cfg.qk_norm != "none":
        q_dim, k_dim = (hd, hd) if cfg.qk_norm == "head" else (q_out, kv_out)
        out[f"{pre}self_attn.q_norm.weight"] = Target(group, ("attn", "q_norm", "weight"), (q_dim,))
        out[f"{pre}self_attn.k_norm.weight"] = Target(group, ("attn", "k_norm", "weight"), (k_dim,))
    return out


def gated_mlp_map(prefix: str, group: tuple, path: tuple[str, ...], d: int, f: int, names=None) -> dict[str, Target]:
    """A gate/up/down MLP stored as HF linears `prefix.{gate,up,down}_proj.weight` (or `names`)."""
    gate, up, down = names or ("gate_proj", "up_proj", "down_proj")
    return {
        f"{prefix}.{gate}.weight": Target(group, (*path, "gate_proj", "kernel"), (d, f), True),
        f"{prefix}.{up}.weight": Target(group, (*path, "up_proj", "kernel"), (d, f), True),
        f"{prefix}.{down}.weight": Target(group, (*path, "down_proj", "kernel"), (f, d), True),
    }


def experts_map(cfg: ModelConfig, i: int, prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, Target]:
    """Routed experts `prefix.{e}.{gate,up,down}.weight` of layer i -> ("expert", i, e) groups."""
    d, f = cfg.hidden_size, cfg.expert_intermediate_size
    gate, up, down = names
    out = {}
    for e in range(cfg.num_experts):
        group = ("expert", i, e)
        out[f"{prefix}.{e}.{gate}.weight"] = Target(group, ("gate",), (d, f), True)
        out[f"{prefix}.{e}.{up}.weight"] = Target(group, ("up",), (d, f), True)
        out[f"{prefix}.{e}.{down}.weight"] = Target(group, ("down",), (f, d), True)
    return out


def feed_forward_map(cfg: ModelConfig, i: int) -> dict[str, Target]:
    """Layer i's feed-forward half as Qwen-style and OLMoE checkpoints name it: the router
    `mlp.gate` and experts `mlp.experts.E.*` of a MoE layer, or the dense `mlp.*_proj`."""
    group, prefix, d = ("layer", i), f"model.layers.{i}.mlp", cfg.hidden_size
    if not cfg.moe_layers[i]:
        return gated_mlp_map(prefix, group, ("mlp",), d, cfg.dense_intermediate_size)
    return {
        f"{prefix}.gate.weight": Target(group, ("router", "kernel"), (d, cfg.num_experts), True),
        **experts_map(cfg, i, f"{prefix}.experts"),
    }


def tensors_past_last_layer(cfg: ModelConfig, tensors) -> set[str]:
    """Names of the tensors of layers past the model's last (`model.layers.{i}.*`, i >= num_layers): the
    multi-token-prediction layers GLM-4.5 and DeepSeek-V3 checkpoints carry, which moejax does not run. Logs a note
    when there are any."""
    past = {name for name in tensors if name.startswith("model.layers.")
            and name.split(".")[2].isdigit() and int(name.split(".")[2]) >= cfg.num_layers}
    if past:
        layers = sorted({int(name.split(".")[2]) for name in past})
        log.warning(f"skipping layer(s) {', '.join(map(str, layers))} ({len(past)} tensors): multi-token-prediction "
                    f"layers past the model's {cfg.num_layers}, not used for decoding")
    return past


def decoder_tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """Every tensor of a checkpoint whose layers are `attention_map` plus `feed_forward_map`."""
    out = globals_map(cfg)
    for i in range(cfg.num_layers):
        out.update(attention_map(cfg, i))
        out.update(feed_forward_map(cfg, i))
    return out


def common_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a Llama-style HF model, for export."""
    rope = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.scaling_type, **dict(cfg.rope.scaling)}
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else next(iter(cfg.eos_token_ids), None),
        "pad_token_id": cfg.pad_token_id,
        "dtype": cfg.dtype,
    }


def check_exportable(cfg: ModelConfig, **required: Any) -> None:
    """Raises unless every named ModelConfig field has the value the family's config.json implies."""
    wrong = [f"{name}={getattr(cfg, name)!r}" for name, value in required.items() if getattr(cfg, name) != value]
    if wrong:
        raise MoejaxError(f"a {cfg.family} config.json cannot express {', '.join(wrong)}")
