"""What the encoder-decoder families share: config checks, embedding-table tying, expert key maps.

Tied tables follow transformers 5: with `tie_word_embeddings`, the encoder and decoder embeddings
and the output projection are the shared table, except that a table present in the checkpoint
with different values stays separate (transformers then refuses to tie it); without it every
table is its own tensor and the shared one is unused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moejax.convert.families.common import GLOBALS, Target, require
from moejax.convert.safetensors_file import TensorInfo, read_tensor
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError
from moejax.models.layers import ACTIVATIONS


def activation(hf: dict[str, Any], name: str, default: str) -> str:
    act = hf.get(name, default)
    if act not in ACTIVATIONS:
        raise MoejaxError(f"config.json: {name} '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    return act


def require_float32_router(hf: dict[str, Any]) -> None:
    if hf.get("router_dtype", "float32") != "float32":
        raise MoejaxError(f"config.json: router_dtype '{hf['router_dtype']}' is not supported (only float32)")


def token_id(hf: dict[str, Any], name: str, default: int, model_type: str, vocab: int) -> int:
    value = hf.get(name, default)
    if not isinstance(value, int) or not 0 <= value < vocab:
        raise MoejaxError(f"config.json: {model_type} needs '{name}' in [0, {vocab}), got {value!r}")
    return value


def positive_int(hf: dict[str, Any], name: str, model_type: str) -> int:
    value = require(hf, name, model_type)
    if not isinstance(value, int) or value < 1:
        raise MoejaxError(f"config.json: '{name}' must be a positive integer, got {value!r}")
    return value


def table_targets(cfg: EncDecConfig, names: dict[str, str]) -> dict[str, Target]:
    """The embedding tables of cfg, from HF names {'shared', 'encoder_embed', 'decoder_embed', 'lm_head'}."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = {}
    if set(cfg.own_tables) != {"encoder_embed", "decoder_embed", "lm_head"}:
        out[names["shared"]] = Target(GLOBALS, ("shared", "embedding"), (v, d))
    for table in cfg.own_tables:
        if table == "lm_head":
            out[names[table]] = Target(GLOBALS, ("lm_head", "kernel"), (d, v), transpose=True)
        else:
            out[names[table]] = Target(GLOBALS, (table, "embedding"), (v, d))
    return out


def resolve_tables(cfg: EncDecConfig, names: dict[str, str], tensors: dict[str, TensorInfo], tensor_map):
    """Decides which tables are separate weights, as transformers 5 ties them when loading.

    cfg: as config_from_hf made it (own_tables empty when the config ties the tables); names: HF
    tensor name of each table {'shared', 'encoder_embed', 'decoder_embed', 'lm_head'};
    tensor_map(cfg, names): the family's map. Returns (cfg with own_tables set, tensor map, HF
    names present in the checkpoint but not used).
    """
    tables = ("encoder_embed", "decoder_embed", "lm_head")
    if cfg.own_tables:  # untied: every table is its own tensor
        cfg = cfg.replace(own_tables=tables)
        return cfg, tensor_map(cfg, names), {names["shared"]}
    present = [t for t in ("shared", *tables) if names[t] in tensors]
    if not present:  # validation then reports the missing shared table
        return cfg, tensor_map(cfg, names), set()
    # A missing shared table is taken from the first tied table present (transformers swaps them).
    source = tensors[names[present[0]]]
    source_value = read_tensor(source)
    own, ignored = [], set()
    for table in present[1:]:
        info = tensors[names[table]]
        if info.shape == source.shape and np.array_equal(read_tensor(info), source_value):
            ignored.add(names[table])
        else:
            own.append(table)
    cfg = cfg.replace(own_tables=tuple(t for t in tables if t in own))
    return cfg, tensor_map(cfg, {**names, "shared": names[present[0]]}), ignored


def norm_targets(cfg: EncDecConfig, prefix: str, group: tuple, path: tuple[str, ...]) -> dict[str, Target]:
    """A norm `prefix.weight` (+ `prefix.bias` for LayerNorm)."""
    d = cfg.hidden_size
    out = {f"{prefix}.weight": Target(group, (*path, "weight"), (d,))}
    if cfg.norm == "layer":
        out[f"{prefix}.bias"] = Target(group, (*path, "bias"), (d,))
    return out


def linear_targets(prefix: str, group: tuple, path: tuple[str, ...], n_in: int, n_out: int, bias: bool) -> dict[str, Target]:
    """A HF linear `prefix.weight` [out, in] (+ bias) -> Flax Dense kernel [in, out] (+ bias)."""
    out = {f"{prefix}.weight": Target(group, (*path, "kernel"), (n_in, n_out), transpose=True)}
    if bias:
        out[f"{prefix}.bias"] = Target(group, (*path, "bias"), (n_out,))
    return out


def attention_targets(cfg: EncDecConfig, prefix: str, group: tuple, module: str, names: tuple[str, str, str, str]):
    """q, k, v, o projections `prefix.{name}` -> `module.{q,k,v,o}_proj`."""
    d, inner = cfg.hidden_size, cfg.inner_size
    out = {}
    for hf_name, ours in zip(names, ("q_proj", "k_proj", "v_proj", "o_proj"), strict=True):
        n_in, n_out = (inner, d) if ours == "o_proj" else (d, inner)
        out.update(linear_targets(f"{prefix}.{hf_name}", group, (module, ours), n_in, n_out, cfg.attention_bias))
    return out


def ffn_targets(cfg: EncDecConfig, layer: int, prefix: str, up: str, down: str) -> dict[str, Target]:
    """The FFN of a layer: a dense FFN `prefix.{up,down}`, or the router `prefix.router.classifier` and
    the experts `prefix.experts.expert_{e}.{up,down}` of a MoE layer."""
    d, f = cfg.hidden_size, cfg.ffn_size(layer)
    group = ("layer", layer)
    if not cfg.moe_layers[layer]:
        out = linear_targets(f"{prefix}.{up}", group, ("ffn", "up"), d, f, cfg.ffn_bias)
        out.update(linear_targets(f"{prefix}.{down}", group, ("ffn", "down"), f, d, cfg.ffn_bias))
        return out
    out = linear_targets(f"{prefix}.router.classifier", group, ("router",), d, cfg.num_experts, cfg.router_bias)
    for e in range(cfg.num_experts):
        expert, pre = ("expert", layer, e), f"{prefix}.experts.expert_{e}"
        out[f"{pre}.{up}.weight"] = Target(expert, ("up",), (d, f), transpose=True)
        out[f"{pre}.{down}.weight"] = Target(expert, ("down",), (f, d), transpose=True)
        if cfg.ffn_bias:
            out[f"{pre}.{up}.bias"] = Target(expert, ("up_bias",), (f,))
            out[f"{pre}.{down}.bias"] = Target(expert, ("down_bias",), (d,))
    return out
