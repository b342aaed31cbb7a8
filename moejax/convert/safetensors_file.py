"""Reading and writing the safetensors format with strict validation.

The format: 8 bytes little-endian header length n, n bytes of JSON mapping tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section, which
follows the header), optionally "__metadata__". We parse it ourselves because the safetensors
package's NumPy API cannot return bfloat16 arrays, and so every defect is reported with the
file and tensor it concerns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from moejax.errors import MoejaxError

NUMPY_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and validates a safetensors header; raises MoejaxError naming the file and defect."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise MoejaxError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise MoejaxError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MoejaxError(f"{path}: corrupt safetensors header ({err})") from None
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = NUMPY_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MoejaxError(f"{path}: tensor '{name}' has an invalid header entry {entry!r}") from None
        info = TensorInfo(path, name, dtype, shape, data_start + begin)
        if end - begin != info.nbytes or begin < 0:
            raise MoejaxError(
                f"{path}: tensor '{name}' spans {end - begin} bytes but {entry['dtype']}{list(shape)} needs {info.nbytes}"
            )
        tensors[name] = info
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise MoejaxError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {data_start + data_end})"
        )
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor from disk (a fresh array, not a view of a mapping)."""
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.nbytes)
    if len(data) != info.nbytes:
        raise MoejaxError(f"{info.file}: truncated while reading tensor '{info.name}'")
    return np.frombuffer(data, dtype=info.dtype).reshape(info.shape).copy()


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (in insertion order) atomically: to a temporary name, then renamed."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, array in tensors.items():
        if array.dtype not in SAFETENSORS_DTYPES:
            raise MoejaxError(f"cannot write tensor '{name}' of dtype {array.dtype} to safetensors")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    os.replace(tmp, path)


def checkpoint_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a HF checkpoint: listed by model.safetensors.index.json, or the single file."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise MoejaxError(f"{index}: not a valid safetensors index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise MoejaxError(f"{index}: 'weight_map' must map tensor names to file names")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise MoejaxError(f"{index}: lists missing shard(s) {', '.join(missing)}")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise MoejaxError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
