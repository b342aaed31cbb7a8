"""Copies of rows of pinned host memory into slots of a device array, chosen on the device, inside a step program:
the FFI target `moejax_host_rows_to_slots` (host_rows.cu), a CUDA kernel built with nvcc on first use.

XLA's own in-program fetch of an expert at an offset the routing chose (`offload.expert_stacks.fetch_expert`)
slices the pinned host stack into a temporary on the device and then writes the temporary into the slab's slot.
The kernel reads the host rows over the link (pinned host memory is mapped into the GPU's address space) and
stores them straight into the slot: no temporary, and no second pass over the expert's bytes in GPU memory.

  table = row_table([(stack, E), ...])  # uint32 [K, 2] on the device: the host address of every row (expert)
  slab_w = host_rows_to_slots(table, keys int32 [C], slots int32 [C], slab_w [S, ...])   # in place when donated

A key or slot of -1 copies nothing. The host arrays must outlive every program that reads the table.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "moejax_host_rows_to_slots"
SOURCES = {"cuda": pathlib.Path(__file__).with_name("host_rows.cu"),  # the kernel
           "cpu": pathlib.Path(__file__).with_name("host_rows_cpu.cc")}  # its twin for the CPU tests (memcpy)
SYMBOLS = {"cuda": "MoejaxHostRowsToSlots", "cpu": "MoejaxHostRowsToSlotsCpu"}


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here (no GPU, no nvcc, or its build failed); the message says which."""


def library_path(platform: str = "cuda") -> pathlib.Path:
    """Where the built library of `platform` ('cuda' or 'cpu') lies: $MOEJAX_KERNEL_DIR or ~/.cache/moejax/kernels,
    under a name made of the source's and jax's versions (a changed source or jax builds anew)."""
    digest = hashlib.sha256(SOURCES[platform].read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    root = pathlib.Path(os.environ.get("MOEJAX_KERNEL_DIR") or pathlib.Path.home() / ".cache" / "moejax" / "kernels")
    return root / f"libmoejax_host_rows_{platform}-{digest}.so"


def compiler(platform: str) -> list[str]:
    """The compiler command of `platform`'s source (nvcc for Hopper, sm_90, with the CUDA runtime linked in; g++);
    KernelUnavailable when it is not installed."""
    if platform == "cpu":
        found = shutil.which(os.environ.get("CXX", "g++"))
        flags = ["-O2", "-std=c++17", "-shared", "-fPIC"]
    else:
        found = shutil.which("nvcc") or shutil.which(
            "nvcc", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"))
        flags = ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90",
                 "-shared", "-Xcompiler", "-fPIC", "-cudart", "static"]
    if found is None:
        wanted = "$CXX or g++" if platform == "cpu" else "nvcc"
        raise KernelUnavailable(f"no compiler for {SOURCES[platform].name} ({wanted})")
    return [found, *flags]


def build(platform: str, path: pathlib.Path) -> None:
    """`platform`'s source compiled into `path` (written under a temporary name, then renamed); KernelUnavailable
    when the compiler is missing or fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        partial = pathlib.Path(work) / path.name
        command = [*compiler(platform), "-I", jax.ffi.include_dir(), str(SOURCES[platform]), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"{command[0]} failed on {SOURCES[platform].name}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, path)


@functools.cache
def register(platform: str) -> None:
    """Builds `platform`'s library if needed, loads it and registers it as the FFI target (once per process)."""
    path = library_path(platform)
    if not path.exists():
        build(platform, path)
    library = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOLS[platform])),
                                platform="CUDA" if platform == "cuda" else "cpu")


def register_here() -> None:
    """`register` for the default backend: the kernel on a GPU, its CPU twin elsewhere."""
    register("cuda" if jax.default_backend() == "gpu" else "cpu")


def row_table(pieces) -> jax.Array:
    """The host address of every row of `pieces` ((array, rows) pairs, in order: a host array of `rows` equal
    rows, e.g. a stack [E, ...] with E, or one expert's buffer with 1) -> uint32 [total rows, 2] (low and high
    halves) on the arrays' device: row r of an array at its base + r x its bytes / rows."""
    addresses = []
    for array, rows in pieces:
        base, row_bytes = array.unsafe_buffer_pointer(), array.nbytes // rows
        addresses.extend(base + r * row_bytes for r in range(rows))
    halves = np.asarray(addresses, np.uint64).view(np.uint32).reshape(-1, 2)  # little-endian: (low, high)
    return jax.device_put(halves, next(iter(pieces[0][0].devices())))


def host_rows_to_slots(table, keys, slots, dst, *, blocks: int = 64):
    """dst [S, ...] with dst[slots[c]] = the host row table[keys[c]] for every c (keys, slots int32 [C]; -1 in
    either: no copy), the rows as many bytes as one slot of dst. `blocks` thread blocks copy each row (the GPU)."""
    register_here()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(dst.shape, dst.dtype), input_output_aliases={3: 0})
    return call(table, jnp.asarray(keys, jnp.int32), jnp.asarray(slots, jnp.int32), dst, blocks=np.int64(blocks))
