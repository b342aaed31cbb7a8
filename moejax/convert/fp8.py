"""FP8 checkpoints with block scales (DeepSeek-V3, Kimi-K2, GLM-4.5-FP8), dequantized tensor by tensor.

Such a checkpoint's config.json has `quantization_config` {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], ...}. Each quantized weight `<name>` [rows, cols] is stored as F8_E4M3 next to
`<name>_scale_inv` (float) [ceil(rows / 128), ceil(cols / 128)]: element (i, j) of the weight is its FP8 value times
the scale of block (i // 128, j // 128). The other tensors (embeddings, norms, routers, biases) are stored as usual.
Every quantized tensor and its scale are checked from the safetensors headers before anything is written; each is
then read and dequantized on its own (one tensor in FP8 and in float32 at a time, never a whole shard).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from moejax.convert.safetensors_file import FP8_E4M3, TensorInfo, read_tensor
from moejax.errors import MoejaxError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


@dataclasses.dataclass(frozen=True)
class BlockFp8:
    """FP8 e4m3 weights scaled per block of `block` (rows, cols) elements."""

    block: tuple[int, int] = DEFAULT_BLOCK

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1]))


def block_fp8_format(hf: dict[str, Any]) -> BlockFp8 | None:
    """The checkpoint's FP8 format from config.json, or None when its `quantization_config` is not FP8 (or absent)."""
    quant = hf.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise MoejaxError(f"config.json: quantization_config fmt {fmt!r} is not supported (only e4m3)")
    block = quant.get("weight_block_size", list(DEFAULT_BLOCK))
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)):
        raise MoejaxError(f"config.json: quantization_config weight_block_size must be two positive integers (got {block!r})")
    return BlockFp8(tuple(block))


def scale_tensors(fmt: BlockFp8 | None, names, tensors: dict[str, TensorInfo]) -> set[str]:
    """Checks the FP8 tensors among `names` and their scales; returns the names of the scales.

    Raises MoejaxError naming the tensor: an FP8 tensor in a checkpoint whose config.json declares no FP8
    quantization, an FP8 tensor that is not a matrix or has no scale, a scale of the wrong shape or dtype, or a
    scale next to a tensor that is not FP8."""
    scales = set()
    for name in names:
        info, scale = tensors.get(name), tensors.get(name + SCALE_SUFFIX)
        if info is None:
            continue
        where = f"tensor '{name}' in {info.file.name}"
        if info.dtype != FP8_E4M3:
            if scale is not None:
                raise MoejaxError(f"tensor '{scale.name}' in {scale.file.name} scales '{name}', which is {info.dtype}, not FP8")
            continue
        if fmt is None:
            raise MoejaxError(f"{where} is FP8 (e4m3) but config.json has no quantization_config with quant_method fp8")
        if len(info.shape) != 2:
            raise MoejaxError(f"{where} is FP8 with shape {list(info.shape)}: block scales need a matrix")
        if scale is None:
            raise MoejaxError(f"{where} is FP8 (e4m3) without its block scale '{name + SCALE_SUFFIX}'")
        expected = fmt.scale_shape(info.shape)
        if scale.shape != expected:
            raise MoejaxError(f"tensor '{scale.name}' in {scale.file.name}: expected shape {list(expected)} (blocks of "
                              f"{fmt.block[0]}x{fmt.block[1]} of '{name}' {list(info.shape)}), found {list(scale.shape)}")
        if scale.dtype.kind != "f" and scale.dtype.name != "bfloat16":
            raise MoejaxError(f"tensor '{scale.name}' in {scale.file.name}: a block scale must be floating point, "
                              f"found {scale.dtype}")
        scales.add(scale.name)
    return scales


def read_weight(tensors: dict[str, TensorInfo], name: str, fmt: BlockFp8 | None) -> np.ndarray:
    """Tensor `name` as stored, or dequantized to float32 [rows, cols] when it is FP8 (after `scale_tensors`)."""
    info = tensors[name]
    if info.dtype != FP8_E4M3:
        return read_tensor(info)
    weight = read_tensor(info).astype(np.float32)
    scale = read_tensor(tensors[name + SCALE_SUFFIX]).astype(np.float32)
    block_rows, block_cols = fmt.block
    for i in range(scale.shape[0]):
        rows = slice(i * block_rows, (i + 1) * block_rows)
        weight[rows] *= np.repeat(scale[i], block_cols)[: weight.shape[1]]
    return weight
