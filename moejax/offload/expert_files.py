"""The disk tier: every routed expert as one plain file, read front to back in large requests.

Layout of an expert directory (by default `expert_files/` inside the checkpoint; `moejax.load` writes it from
the checkpoint's orbax groups the first time a `host_budget` asks for it):

    manifest.json            format, expert format, weight names / shapes / dtypes, MoE layers x experts, the
                             file size, and each expert's CRC-32
    L003/E0007.bin           MoE layer 3's expert 7: its weights' raw bytes back to back (manifest order),
                             zero-padded to a multiple of 4096 bytes

Why plain files rather than the checkpoint's orbax groups or tensorstore chunks: an expert is needed whole,
and one file per expert makes that a sequential read of its exact bytes into a page-aligned host slot
(`O_DIRECT`, so the page cache neither holds a second copy of the model nor hides the disk's speed), with
no chunk index, codec or asynchronous runtime between the disk and the slot. Orbax's restore of one expert
group pays for metadata, tensorstore and threads before its first byte: 7.4 ms per expert of the shipped
model (73 KB) on the CPU, against 0.43 ms to read and check its file here.

Experts are stored in the engine's expert format (`offload.expert_format`): float weights, or compact int8 /
int4 codes beside their scales, as the format keeps them; the manifest records the format (`expert_format`:
{"name": "int4", "group_size": 64}), and a directory is opened only for the format it holds.

Checks: the manifest is validated and every file's size checked when the directory is opened (a missing or
short file is refused before any step runs); each read's CRC-32 (zlib, of the unpadded bytes, computed when
the file is written) is verified as the bytes arrive (chunk by chunk on threads of its own, combined), before
they enter the host cache.
"""

from __future__ import annotations

import collections
import functools
import json
import mmap
import os
import zlib
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError, ParameterError
from moejax.offload.expert_format import DTYPE_FORMATS
from moejax.outputs import atomic_directory
from moejax.progress import Progress

FORMAT = "moejax-expert-files/1"
ALIGN = 4096  # O_DIRECT needs reads of whole blocks into aligned memory
CHUNK = 16 * 2**20  # bytes per read request (a multiple of ALIGN)
READERS = 4  # read requests in flight
WRITERS = 4  # experts checksummed and written at once (`write_expert_files`)
MANIFEST = "manifest.json"


class ReadCancelled(Exception):
    """A read given up before its end (`ExpertFiles.read_into`'s `cancelled`): the buffer holds part of the file,
    `bytes_read` bytes (the disk's time spent for nothing)."""

    def __init__(self, message: str, bytes_read: int):
        super().__init__(message)
        self.bytes_read = bytes_read


def padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous page-aligned memory of `size` bytes (what O_DIRECT reads into)."""
    return mmap.mmap(-1, max(size, ALIGN))


def expert_path(root: Path, layer: int, expert: int) -> Path:
    """File of expert `expert` of MoE layer `layer` (MoE layer index, not the model's layer number)."""
    return Path(root) / f"L{layer:03d}" / f"E{expert:04d}.bin"


def float_format(dtypes: list) -> dict:
    """The format record of float weights of these dtypes (what a directory without a record holds)."""
    name = np.dtype(dtypes[0]).name
    return {"name": DTYPE_FORMATS.get(name, name)}


def format_label(record: dict) -> str:
    """'int4 (groups of 64)', 'bf16'."""
    return record["name"] + (f" (groups of {record['group_size']})" if "group_size" in record else "")


def write_expert_files(root: Path, shapes: dict, num_layers: int, num_experts: int,
                       load: Callable[[int, int], dict], show_progress: bool = False,
                       expert_format: dict | None = None) -> None:
    """Writes the directory (under a temporary name, renamed at the end) from `load(moe_layer, expert) ->
    {name: array}` called one expert at a time, so a model larger than host memory passes through.
    shapes: {name: (one expert's shape, dtype)} in file order, as `load` gives them in `expert_format` (the
    record `ExpertFormat.record()`; default: float weights of their dtype).

    Each expert's checksum and write run on WRITERS threads of their own (zlib and file writes release the GIL)
    while the next experts are loaded, at most WRITERS experts' weights held at once."""
    names = list(shapes)
    expert_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values())
    checksums = np.zeros((num_layers, num_experts), np.int64)
    progress = Progress("write expert files", num_layers * num_experts, enabled=show_progress)
    with atomic_directory(Path(root)) as tmp, futures.ThreadPoolExecutor(WRITERS, "moejax-write") as writers:
        pending: collections.deque[futures.Future] = collections.deque()
        for m in range(num_layers):
            (tmp / f"L{m:03d}").mkdir()
            for e in range(num_experts):
                weights = load(m, e)
                parts = []
                for name in names:
                    shape, dtype = shapes[name]
                    w = np.ascontiguousarray(np.asarray(weights[name]), dtype=np.dtype(dtype))
                    if w.shape != tuple(shape):
                        raise MoejaxError(f"expert {e} of MoE layer {m}: {name} has shape {w.shape}, expected {tuple(shape)}")
                    parts.append(w.reshape(-1).view(np.uint8))
                if len(pending) >= WRITERS:
                    pending.popleft().result()
                    progress.advance()
                pending.append(writers.submit(_write_expert, expert_path(tmp, m, e), parts,
                                              padded(expert_bytes) - expert_bytes, checksums, (m, e)))
        for job in pending:
            job.result()
            progress.advance()
        manifest = {"format": FORMAT, "expert_format": expert_format or float_format([d for _, d in shapes.values()]),
                    "num_layers": num_layers, "num_experts": num_experts,
                    "expert_bytes": expert_bytes, "file_bytes": padded(expert_bytes),
                    "weights": [{"name": n, "shape": list(shapes[n][0]), "dtype": np.dtype(shapes[n][1]).name} for n in names],
                    "crc32": checksums.tolist()}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
    progress.close()


def _write_expert(path: Path, parts: list[np.ndarray], padding: int, checksums: np.ndarray, index: tuple) -> None:
    """Writes one expert's file (its weights' bytes back to back, then `padding` zero bytes) and puts the CRC-32
    of the unpadded bytes in checksums[index]."""
    checksum = 0
    with open(path, "wb") as f:
        for part in parts:
            checksum = zlib.crc32(part, checksum)
            f.write(part)
        f.write(bytes(padding))
    checksums[index] = checksum


class ExpertFiles:
    """An expert directory opened for reading: `read_into(layer, expert, buffer)`.

    Opening checks the manifest against the model (`shapes`: {name: (shape, dtype)}, layers, experts) and its
    expert format (the record `ExpertFormat.record()`; default: float weights of their dtype), and that every
    expert file exists with its size: a mismatch or a missing file is a MoejaxError naming it.
    """

    def __init__(self, root: Path, shapes: dict, num_layers: int, num_experts: int, expert_format: dict | None = None):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not self.root.is_dir():
            raise MoejaxError(f"{self.root}: not a directory (an expert directory holds {MANIFEST} and the expert files)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:  # another directory given by mistake, not one to delete
            raise MoejaxError(f"{manifest_path}: {self.root} has no manifest, so it is not an expert directory "
                              "(a new path gets the expert files written there)") from None
        except (OSError, ValueError) as err:
            raise MoejaxError(f"{manifest_path}: unreadable manifest ({err})") from None
        self._check_format(manifest, expert_format or float_format([d for _, d in shapes.values()]))
        want = {"format": FORMAT, "num_layers": num_layers, "num_experts": num_experts,
                "weights": [{"name": n, "shape": list(s), "dtype": np.dtype(d).name} for n, (s, d) in shapes.items()]}
        for field, value in want.items():
            if manifest.get(field) != value:
                raise MoejaxError(f"{manifest_path}: {field} is {manifest.get(field)!r}, the model needs {value!r} "
                                  "(an expert directory of another model or format: delete it to rebuild it)")
        self.names = [w["name"] for w in manifest["weights"]]
        self.shapes = {n: (tuple(s), np.dtype(d)) for n, (s, d) in shapes.items()}
        self.expert_bytes, self.file_bytes = int(manifest["expert_bytes"]), int(manifest["file_bytes"])
        self.checksums = np.asarray(manifest["crc32"], np.int64)
        if self.checksums.shape != (num_layers, num_experts) or self.file_bytes != padded(self.expert_bytes):
            raise MoejaxError(f"{manifest_path}: checksums or sizes do not match {num_layers} MoE layers x {num_experts} experts")
        self.num_layers, self.num_experts = num_layers, num_experts
        for m in range(num_layers):
            for e in range(num_experts):
                self._check_size(m, e)

    def _check_format(self, manifest: dict, asked: dict) -> None:
        """Refuses a directory written in another expert format (a manifest without a record holds float weights,
        written before formats were recorded)."""
        try:
            found = manifest.get("expert_format") or float_format([w["dtype"] for w in manifest["weights"]])
            format_label(found)
        except (KeyError, TypeError, IndexError):
            raise MoejaxError(f"{self.root / MANIFEST}: manifest names no valid expert format") from None
        if found != asked:
            raise ParameterError("{root}: expert directory holds {found} experts, not the {asked} asked for ({expert_format}): "
                                 "give another {expert_dir}, or delete it to rebuild it", root=str(self.root),
                                 found=format_label(found), asked=format_label(asked))

    def _check_size(self, layer: int, expert: int) -> None:
        path = expert_path(self.root, layer, expert)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MoejaxError(f"{path}: expert file missing (MoE layer {layer}, expert {expert})") from None
        if size != self.file_bytes:
            raise MoejaxError(f"{path}: expert file has {size:,} bytes, expected {self.file_bytes:,} "
                              f"(MoE layer {layer}, expert {expert}): truncated or corrupt")

    def read_into(self, layer: int, expert: int, buffer, verify: bool = True,
                  cancelled: Callable[[int], bool] | None = None) -> None:
        """Reads the expert's file into `buffer` (page-aligned, at least `file_bytes`; `aligned_buffer`) and verifies
        its CRC-32 (verify=False: the raw read, for measuring the disk). Raises MoejaxError naming the file if it is
        missing, short or corrupt; ReadCancelled, the requests not yet begun dropped, once `cancelled(bytes read so
        far)` is true (asked as each chunk arrives: a speculative read giving way to a needed one).

        The file is read in CHUNK-byte requests, READERS of them in flight (an SSD needs several outstanding
        requests to reach its bandwidth); each chunk, once read, is checksummed on other threads (`_checkers`),
        so the readers keep READERS requests in flight and the check runs on several cores, and the chunks' CRCs
        are combined (`crc32_combine`)."""
        path = expert_path(self.root, layer, expert)
        view = memoryview(buffer)[: self.file_bytes]
        try:
            fd = _open_direct(path)
        except FileNotFoundError:
            raise MoejaxError(f"{path}: expert file missing (MoE layer {layer}, expert {expert})") from None
        offsets = range(0, self.file_bytes, CHUNK)
        pending = [_readers().submit(_read_fully, fd, view[start : start + CHUNK], start) for start in offsets]
        sums = []  # (bytes checked, their CRC-32's future) per chunk, in order
        try:
            done = 0
            for start, request in zip(offsets, pending, strict=True):
                if cancelled is not None and cancelled(done):
                    for later in pending:
                        later.cancel()
                    futures.wait(pending)
                    read = sum(r.result() for r in pending if not r.cancelled() and r.exception() is None)
                    raise ReadCancelled(f"{path}: read cancelled", read)
                size = request.result()
                done += size
                checked = max(0, min(size, self.expert_bytes - start)) if verify else 0
                if checked:
                    sums.append((checked, _checkers().submit(zlib.crc32, view[start : start + checked])))
            checksum = 0
            for checked, crc in sums:
                checksum = crc32_combine(checksum, crc.result(), checked)
        finally:
            futures.wait(pending + [crc for _, crc in sums])
            os.close(fd)
        if done != self.file_bytes:
            raise MoejaxError(f"{path}: expert file has {done:,} bytes, expected {self.file_bytes:,} "
                              f"(MoE layer {layer}, expert {expert}): truncated")
        if verify and checksum != self.checksums[layer, expert]:
            raise MoejaxError(f"{path}: expert file fails its CRC-32 check (MoE layer {layer}, expert {expert}): "
                              "corrupt; delete the expert directory to rebuild it")

    def unpack(self, data) -> dict:
        """An expert's bytes (unpadded or padded) -> {name: array view} in `shapes`."""
        out, offset = {}, 0
        flat = np.frombuffer(data, np.uint8)
        for name in self.names:
            shape, dtype = self.shapes[name]
            size = int(np.prod(shape)) * dtype.itemsize
            out[name] = flat[offset : offset + size].view(dtype).reshape(shape)
            offset += size
        return out


@functools.cache
def _readers() -> futures.ThreadPoolExecutor:
    return futures.ThreadPoolExecutor(READERS, thread_name_prefix="moejax-disk")


@functools.cache
def _checkers() -> futures.ThreadPoolExecutor:
    """Threads that checksum chunks as they arrive (zlib releases the GIL over large buffers)."""
    return futures.ThreadPoolExecutor(READERS, thread_name_prefix="moejax-crc")


def _read_fully(fd: int, view: memoryview, offset: int) -> int:
    """Reads len(view) bytes of `fd` at `offset` into `view` (fewer at the end of the file) -> bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """zlib.crc32(a + b) from first = zlib.crc32(a), second = zlib.crc32(b) and len(b) (Python's zlib has no
    crc32_combine). The CRC is affine in (start value, data), so crc32(b, start=s) = Z(s) ^ crc32(b), where Z, the
    effect of len(b) zero bytes on a start value, is linear over GF(2): `_zeros_operator`."""
    return _apply(_zeros_operator(second_length), first) ^ second


def _apply(operator: tuple[int, ...], value: int) -> int:
    """A linear map on 32-bit values, given as the images of its 32 basis bits, applied to `value`."""
    out = 0
    for bit, image in enumerate(operator):
        if value >> bit & 1:
            out ^= image
    return out


@functools.cache
def _zeros_operator(length: int) -> tuple[int, ...]:
    """The linear map s -> zlib.crc32(bytes(length), s) ^ zlib.crc32(bytes(length)), by squaring the map of one
    zero byte (a few milliseconds for a chunk's length; cached, as a directory's chunks have one or two)."""
    one_byte = tuple(zlib.crc32(b"\0", 1 << bit) ^ zlib.crc32(b"\0") for bit in range(32))
    result = tuple(1 << bit for bit in range(32))  # identity
    power = one_byte
    while length:
        if length & 1:
            result = tuple(_apply(power, image) for image in result)
        power = tuple(_apply(power, image) for image in power)
        length >>= 1
    return result


def _open_direct(path: Path) -> int:
    """A read-only descriptor that bypasses the page cache (O_DIRECT), or a buffered one on a filesystem without
    O_DIRECT (tmpfs): its reads may then come from the page cache."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as err:
        if err.errno != 22:  # EINVAL: the filesystem has no O_DIRECT
            raise
        return os.open(path, os.O_RDONLY)
