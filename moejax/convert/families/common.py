"""What the HF decoder-only MoE families share: config fields and the Llama-style key layout.

A tensor map sends each HF tensor name to a `Target`: which group of the moejax checkpoint
it belongs to, its path inside that group, and whether the HF [out, in] matrix is
transposed to moejax's [in, out].
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moejax.config import ModelConfig, RopeConfig
from moejax.errors import MoejaxError
from moejax.models.layers import ACTIVATIONS
from moejax.models.rope import SUPPORTED_SCALING

GLOBALS = ("globals",)


@dataclasses.dataclass(frozen=True)
class Target:
    group: tuple  # ("globals",) | ("layer", i) | ("expert", i, e)
    path: tuple[str, ...]
    shape: tuple[int, ...]  # moejax shape (after transposition)
    transpose: bool = False

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape


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


def eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


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
        bos_token_id=hf.get("bos_token_id") if _in_vocab(hf.get("bos_token_id"), vocab) else None,
        eos_token_ids=tuple(i for i in eos_ids(hf.get("eos_token_id")) if _in_vocab(i, vocab)),
        pad_token_id=hf.get("pad_token_id") if _in_vocab(hf.get("pad_token_id"), vocab) else None,
    )


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
