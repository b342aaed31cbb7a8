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
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from moejax.errors import MoejaxError
from moejax.outputs import atomic_file

FP8_E4M3 = np.dtype(jnp.float8_e4m3fn)
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
    "F8_E4M3": FP8_E4M3,
}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # {"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}


def tensor_bytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.dtype, self.shape)


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
    return _read_array(info, info.offset, info.shape)


def read_entry(info: TensorInfo, index: int) -> np.ndarray:
    """Entry `index` of a tensor's first axis, reading only its bytes (one expert of a fused expert tensor)."""
    count = info.shape[0]
    if not 0 <= index < count:
        raise IndexError(f"tensor '{info.name}' has {count} entries, not {index}")
    shape = info.shape[1:]
    return _read_array(info, info.offset + index * tensor_bytes(info.dtype, shape), shape)


def _read_array(info: TensorInfo, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """The array of `shape` (info's dtype) at absolute byte `offset` of info's file."""
    nbytes = tensor_bytes(info.dtype, shape)
    with open(info.file, "rb") as f:
        f.seek(offset)
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise MoejaxError(f"{info.file}: truncated while reading tensor '{info.name}'")
    return np.frombuffer(data, dtype=info.dtype).reshape(shape).copy()


def write_tensors(
    path: Path,
    specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file one tensor at a time, atomically (a temporary name, then renamed).

    specs: (name, dtype, shape) of every tensor, in file order, from which the header is written
    first; arrays: the tensors in that order, each checked against its spec. Only the array being
    written is held, so `arrays` may read them lazily."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise MoejaxError(f"cannot write tensor '{name}' of dtype {dtype} to safetensors")
        nbytes = tensor_bytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, dtype, shape), array in zip(specs, arrays, strict=True):
            if array.dtype != dtype or array.shape != tuple(shape):
                raise MoejaxError(f"tensor '{name}' is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (in insertion order) atomically: to a temporary name, then renamed."""
    write_tensors(path, [(name, array.dtype, array.shape) for name, array in tensors.items()], tensors.values(), metadata)


def checkpoint_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a HF checkpoint: listed by model.safetensors.index.json, or the single file."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
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
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise MoejaxError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
