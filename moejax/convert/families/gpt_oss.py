"""gpt-oss (OpenAI): attention sinks, alternating sliding-window and full-attention layers, q/k/v/o biases, yarn
rope, and in every layer a biased router whose top-k logits are softmaxed, over experts with biases and a clamped
SwiGLU.

A layer's experts are fused tensors, not per-expert keys: `model.layers.N.mlp.experts.gate_up_proj` [E, D, 2F]
(gate in the even columns, up in the odd ones), `gate_up_proj_bias` [E, 2F], `down_proj` [E, F, D] and
`down_proj_bias` [E, D] as transformers' save_pretrained writes them; in the published checkpoints the two weights
are MXFP4 instead (`moejax.convert.mxfp4`): `gate_up_proj_blocks` / `gate_up_proj_scales` hold the weight
[E, 2F, D] ([out, in]) and `down_proj_blocks` / `down_proj_scales` the weight [E, D, F]. `FusedExperts` checks
them against the config, then reads and dequantizes one expert at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from moejax.config import ModelConfig
from moejax.convert import mxfp4
from moejax.convert.families.common import (
    LAYER_TYPES,
    Target,
    attention_map,
    check_exportable,
    common_fields,
    globals_map,
    layer_windows,
    num_routed_experts,
    require,
    single_window,
)
from moejax.convert.safetensors_file import TensorInfo, read_entry
from moejax.errors import MoejaxError

MODEL_TYPE = "gpt_oss"
# transformers' defaults for configs that leave them out (older gpt-oss configs have no swiglu_alpha)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = common_fields(hf, MODEL_TYPE)
    n = fields["num_layers"]
    quant = hf.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "mxfp4":
        raise MoejaxError(f"config.json: gpt_oss quantization_config quant_method {quant.get('quant_method')!r} "
                          "is not supported (supported: mxfp4)")
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers' default: the even layers slide
        layer_types = [LAYER_TYPES[i % 2 == 0] for i in range(n)]
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        **fields,
        num_experts=num_routed_experts(hf, MODEL_TYPE),
        top_k=int(require(hf, "num_experts_per_tok", MODEL_TYPE)),
        expert_intermediate_size=int(require(hf, "intermediate_size", MODEL_TYPE)),
        moe_layers=(True,) * n,
        sliding_windows=layer_windows(layer_types, hf.get("sliding_window"), n),
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        router_bias=True,
        softmax_after_topk=True,
        expert_bias=True,
        swiglu_limit=float(hf.get("swiglu_limit", SWIGLU_LIMIT)),
        swiglu_alpha=float(hf.get("swiglu_alpha", SWIGLU_ALPHA)),
    )


def tensor_map(cfg: ModelConfig) -> dict[str, Target]:
    """Every tensor but the fused experts (`FusedExperts`): globals, attention with its sinks, and the router."""
    d, out = cfg.hidden_size, globals_map(cfg)
    for i in range(cfg.num_layers):
        group, pre = ("layer", i), f"model.layers.{i}."
        out.update(attention_map(cfg, i))
        out[pre + "self_attn.sinks"] = Target(group, ("attn", "sinks"), (cfg.num_heads,))
        out[pre + "mlp.router.weight"] = Target(group, ("router", "kernel"), (d, cfg.num_experts), True)
        out[pre + "mlp.router.bias"] = Target(group, ("router", "bias"), (cfg.num_experts,))
    return out


def fused_experts(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> FusedExperts:
    """The converter's hook for families whose experts are fused tensors (see `FusedExperts`)."""
    return FusedExperts(cfg, tensors)


class FusedExperts:
    """A gpt-oss checkpoint's routed experts: every fused tensor checked against the config at construction
    (one-line errors naming the tensor), then read one expert at a time by `groups`.

    tensor_names: the checkpoint tensors it reads; nbytes: their bytes in the checkpoint.
    """

    def __init__(self, cfg: ModelConfig, tensors: dict[str, TensorInfo]):
        self.cfg, self.tensors = cfg, tensors
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.tensor_names: set[str] = set()
        for i in cfg.moe_layer_ids:
            for weight, shape in (("gate_up_proj", (E, D, 2 * F)), ("down_proj", (E, F, D))):
                name = _experts_prefix(i) + weight
                self.tensor_names |= self._check_weight(name, shape)
                self._check_shape(name + "_bias", (E, shape[2]))
                self.tensor_names.add(name + "_bias")
        self.nbytes = sum(tensors[name].nbytes for name in self.tensor_names)

    def _check_weight(self, name: str, shape: tuple[int, int, int]) -> set[str]:
        """The tensors that hold weight `name` of shape [E, in, out]: itself, or its MXFP4 blocks and scales."""
        if name in self.tensors:
            self._check_shape(name, shape)
            return {name}
        if name + mxfp4.BLOCKS_SUFFIX not in self.tensors and name + mxfp4.SCALES_SUFFIX not in self.tensors:
            raise MoejaxError(f"checkpoint is missing tensor '{name}' (or its MXFP4 '{name}{mxfp4.BLOCKS_SUFFIX}' "
                              f"and '{name}{mxfp4.SCALES_SUFFIX}')")
        mxfp4.check_pair(name, self.tensors, (shape[0], shape[2], shape[1]))
        return {name + mxfp4.BLOCKS_SUFFIX, name + mxfp4.SCALES_SUFFIX}

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.tensors:
            raise MoejaxError(f"checkpoint is missing tensor '{name}'")
        found = self.tensors[name]
        if found.shape != shape:
            raise MoejaxError(f"tensor '{name}' in {found.file.name}: expected shape {list(shape)}, found {list(found.shape)}")

    def groups(self, dtype) -> Iterator[tuple[tuple, dict, int]]:
        """(("expert", layer, e), {'gate', 'up', 'down', 'gate_bias', 'up_bias', 'down_bias'} NumPy arrays of
        `dtype`, checkpoint bytes read) for every expert, one at a time."""
        for i in self.cfg.moe_layer_ids:
            pre = _experts_prefix(i)
            read = sum(self.tensors[n].nbytes for n in self.tensor_names if n.startswith(pre)) // self.cfg.num_experts
            for e in range(self.cfg.num_experts):
                gate_up, gate_up_bias = self._weight(pre + "gate_up_proj", e), self._entry(pre + "gate_up_proj_bias", e)
                expert = {
                    "gate": gate_up[:, 0::2], "up": gate_up[:, 1::2], "down": self._weight(pre + "down_proj", e),
                    "gate_bias": gate_up_bias[0::2], "up_bias": gate_up_bias[1::2],
                    "down_bias": self._entry(pre + "down_proj_bias", e),
                }
                yield ("expert", i, e), {k: np.ascontiguousarray(v.astype(dtype)) for k, v in expert.items()}, read

    def _entry(self, name: str, e: int) -> np.ndarray:
        return read_entry(self.tensors[name], e)

    def _weight(self, name: str, e: int) -> np.ndarray:
        """Expert e's weight `name` as [in, out], dequantized (float32) if the checkpoint holds it in MXFP4."""
        if name in self.tensors:
            return self._entry(name, e)
        blocks, scales = self._entry(name + mxfp4.BLOCKS_SUFFIX, e), self._entry(name + mxfp4.SCALES_SUFFIX, e)
        return mxfp4.dequantize(blocks, scales).T


def _experts_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts."


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers needs to build this model (export, card checks)."""
    check_exportable(
        cfg, o_bias=cfg.qkv_bias, qk_norm="none", clip_qkv=None, has_shared_expert=False,
        moe_layers=(True,) * cfg.num_layers, attention_sinks=True, router_bias=True, softmax_after_topk=True,
        expert_bias=True,
    )
    if cfg.swiglu_limit is None:
        raise MoejaxError("a gpt_oss config.json cannot express swiglu_limit=None")
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": MODEL_TYPE,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "intermediate_size": cfg.expert_intermediate_size,
        "attention_bias": cfg.qkv_bias,
        "sliding_window": single_window(cfg),
        "layer_types": [LAYER_TYPES[w is not None] for w in cfg.sliding_windows],
        "swiglu_limit": cfg.swiglu_limit,
        "swiglu_alpha": cfg.swiglu_alpha,
    }
