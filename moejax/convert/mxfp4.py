"""MXFP4 weights as gpt-oss publishes them: 4-bit e2m1 values in blocks of 32 that share a power-of-two scale.

A weight of shape [..., rows, cols] is stored as two uint8 tensors:
- `<name>_blocks` [..., rows, cols / 32, 16]: two e2m1 values per byte, the low nibble first;
- `<name>_scales` [..., rows, cols / 32]: each block's scale as an e8m0 exponent, 2 ** (scale - 127).
"""

from __future__ import annotations

import numpy as np

from moejax.convert.safetensors_file import TensorInfo
from moejax.errors import MoejaxError

BLOCK = 32  # values per scale
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
# The 16 e2m1 codes: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> float32 [..., G * 32] (exact: every value is
    an e2m1 value times a power of two)."""
    values = np.empty(blocks.shape[:-1] + (2 * blocks.shape[-1],), np.float32)
    values[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = E2M1_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * values.shape[-1])


def check_pair(name: str, tensors: dict[str, TensorInfo], shape: tuple[int, ...]) -> None:
    """Raises a one-line error unless `name`_blocks and `name`_scales are uint8 tensors that hold a weight
    of `shape` ([..., rows, cols], cols a multiple of 32)."""
    blocks, scales = name + BLOCKS_SUFFIX, name + SCALES_SUFFIX
    if scales not in tensors:
        raise MoejaxError(f"MXFP4 tensor '{blocks}' has no scales: checkpoint lacks '{scales}'")
    if blocks not in tensors:
        raise MoejaxError(f"MXFP4 scales '{scales}' have no blocks: checkpoint lacks '{blocks}'")
    *lead, cols = shape
    if cols % BLOCK:
        raise MoejaxError(f"MXFP4 tensor '{blocks}': a weight of {cols} columns is not whole blocks of {BLOCK}")
    groups = (*lead, cols // BLOCK)
    for tensor, want in ((blocks, (*groups, BLOCK // 2)), (scales, groups)):
        info = tensors[tensor]
        if info.dtype != np.uint8:
            raise MoejaxError(f"MXFP4 tensor '{tensor}' in {info.file.name}: expected dtype uint8, found {info.dtype}")
        if info.shape != want:
            raise MoejaxError(
                f"MXFP4 tensor '{tensor}' in {info.file.name}: expected shape {list(want)} for a weight of shape "
                f"{list(shape)}, found {list(info.shape)}")
