"""Weight-only quantization of routed experts: int8 and int4 codes with per-group scales.

A weight W [..., I, O] (I: the input dimension, the one `x @ W` contracts; O: the output one) is cut along I
into groups of GROUP_SIZE consecutive rows; each group of each output column has one scale
s = max |W| / LEVELS[format], stored in the model's dtype, and the codes are round(W / s) clipped to
[-LEVELS, LEVELS]. Dequantized, W ~ codes x s, with an error of at most s / 2 per element.

  int8  codes int8 [..., I, O] in [-127, 127]                                     8.25 bits/weight
  int4  codes in [-7, 7] + 8, two per byte: uint8 [..., I / 2, O], input row 2i in the low
        nibble of byte row i and row 2i + 1 in the high nibble                       4.25 bits/weight
  (scales: [..., I / GROUP_SIZE, O] in the model's dtype; bits/weight with bfloat16 scales)

GROUP_SIZE is 64: every routed expert dimension of the supported families is a multiple of it (Mixtral
4096 / 14336, Qwen3-30B-A3B 2048 / 768, DeepSeek-V2-Lite 2048 / 1408, the shipped model 192 / 64), and a
group this small keeps int4's error near that of llama.cpp's 32-row groups at half their scale overhead.

A quantized weight `name` is stored beside its scale `name + SCALE_SUFFIX` in the expert's dict; the codes'
dtype tells the format (int8: int8, uint8: packed int4). `dequantized` turns such a dict back into float
weights, inside the step programs right after the chosen experts are gathered (`models.moe.gathered`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

GROUP_SIZE = 64
LEVELS = {"int8": 127, "int4": 7}
QUANTIZED_FORMATS = tuple(LEVELS)
QUANTIZED_WEIGHTS = ("gate", "up", "down")  # the matrices; biases stay in the model's dtype
SCALE_SUFFIX = "_scale"
CODE_DTYPES = {"int8": np.dtype(np.int8), "int4": np.dtype(np.uint8)}


def check_quantizable(name: str, shape: tuple, group_size: int = GROUP_SIZE) -> None:
    """Raises ValueError when weight `name` of `shape` [..., I, O] cannot be cut into groups along I."""
    if shape[-2] % group_size:
        raise ValueError(f"weight {name!r} has input dimension {shape[-2]}, not a multiple of the quantization "
                         f"group size {group_size}")


def quantize(weight, fmt: str, scale_dtype, group_size: int = GROUP_SIZE, xp=np):
    """weight [..., I, O] (any float dtype) -> (codes, scales [..., I / group_size, O] of scale_dtype), computed
    with `xp` (numpy at load; jax.numpy to quantize on a device, e.g. benchmarks' random weights).

    The codes are made with the scales as stored (rounded to scale_dtype), so dequantizing the stored pair
    is within half a scale of the weight."""
    check_quantizable("weight", weight.shape, group_size)
    levels = LEVELS[fmt]
    *lead, rows, cols = weight.shape
    grouped = xp.asarray(weight).astype(np.float32).reshape(*lead, rows // group_size, group_size, cols)
    scales = (xp.abs(grouped).max(axis=-2) / levels).astype(scale_dtype)
    divisor = scales.astype(np.float32)
    divisor = xp.where(divisor > 0, divisor, 1.0)[..., None, :]
    codes = xp.clip(xp.rint(grouped / divisor), -levels, levels).astype(np.int8).reshape(weight.shape)
    if fmt == "int4":
        nibbles = (codes + 8).astype(np.uint8)
        codes = nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)
    return codes, scales


def dequantize(codes, scales, xp=jnp, dtype=None):
    """(codes, scales) as `quantize` made them -> weight [..., I, O] in `dtype` (default: scales' dtype), computed
    with `xp` (jax.numpy inside programs, numpy for the host's expert compute)."""
    codes, scales = xp.asarray(codes), xp.asarray(scales if dtype is None else xp.asarray(scales).astype(dtype))
    if codes.dtype == np.uint8:  # int4, two per byte along I
        low = (codes & 15).astype(np.int8) - 8
        high = (codes >> 4).astype(np.int8) - 8
        codes = xp.stack([low, high], axis=-2).reshape(*codes.shape[:-2], 2 * codes.shape[-2], codes.shape[-1])
    *lead, rows, cols = codes.shape
    groups = scales.shape[-2]
    grouped = codes.reshape(*lead, groups, rows // groups, cols).astype(scales.dtype) * scales[..., None, :]
    return grouped.reshape(codes.shape)


def dequantized(weights: dict, xp=jnp) -> dict:
    """An expert's (or a stack's) weights with every quantized one ({name, name + SCALE_SUFFIX}) replaced by
    its float weight (computed with `xp`); a dict of float weights comes back as it is."""
    if not any(name.endswith(SCALE_SUFFIX) for name in weights):
        return weights
    out = {}
    for name, w in weights.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = weights.get(name + SCALE_SUFFIX)
        out[name] = w if scale is None else dequantize(w, scale, xp)
    return out
