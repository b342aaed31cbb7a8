"""One bf16 routed expert's FFN on the host through torch's CPU matmul, where torch is importable
(`cpu_experts='auto'`, `offload.cpu_experts.HostExperts`).

Why torch, an optional dependency: XLA:CPU computes a bfloat16 matmul by widening to float32 and reads a bf16
weight matrix at a few GB/s, and even widened block by block (`offload.host_ffn`) one expert on 16 cores reads
~8 GB/s; torch's CPU bf16 matmul (oneDNN, using AVX512-BF16 / AMX where the CPU has them) reads it near the
host's memory bandwidth, as fast as the PCIe link copies it (`scripts/probe_host_matvec.py`; BENCHMARKS.md,
"The host's expert compute"). Without torch the host uses `offload.host_ffn`.

The arithmetic is the device's: rows and products in bf16 (float32 accumulation inside the matmul), the
activation in float32 (`host_ffn`'s, the device's function), the hidden units rounded to bf16 for the down
projection; output float32. One expert at a time, each product on torch's intra-op threads (every core but two).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from moejax.models.quantized import QUANTIZED_WEIGHTS, SCALE_SUFFIX

LINEAR = "_linear"  # suffix of a bf16 matrix as a torch tensor in linear's layout [out, in] (the faster)
STORED = "_stored"  # suffix of a bf16 matrix as a torch tensor over the array as stored, [in, out]


@functools.cache
def torch_module():
    """torch, or None where it is not importable. Its intra-op threads leave two cores to the process's other
    work: the thread dispatching the step programs and the runtime's own, which wait behind a matmul that
    holds every core (the host's experts would then no longer run while the link copies)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 2))
    return torch


def usable(dtypes: dict) -> bool:
    """Whether torch computes experts of these weights ({name: dtype}): bf16 matrices, not compact, torch present."""
    compact = any(name.endswith(SCALE_SUFFIX) for name in dtypes)
    bf16 = all(np.dtype(dtypes[name]) == jax.numpy.bfloat16 for name in QUANTIZED_WEIGHTS if name in dtypes)
    return bf16 and not compact and torch_module() is not None


def _tensor(bits: np.ndarray):
    """A torch bf16 tensor over the bits (uint16) of a bf16 NumPy array, no copy."""
    torch = torch_module()
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def torch_operands(expert: dict, copy: bool = True) -> dict:
    """One bf16 expert {name: array} (NumPy or CPU JAX) as `torch_expert_ffn` takes it: each of gate, up, down a
    torch bf16 tensor, in linear's layout [out, in] (a transposed copy) under `name + LINEAR`, or with copy False
    over the array itself [in, out] under `name + STORED` (no copy: a host-cache slot lent for one computation);
    biases as float32 NumPy arrays."""
    out = {}
    for name, w in expert.items():
        w = np.asarray(w)
        if name not in QUANTIZED_WEIGHTS:
            out[name] = w.astype(np.float32)
        elif copy:
            out[name + LINEAR] = _tensor(np.ascontiguousarray(w.view(np.uint16).T))
        else:
            out[name + STORED] = _tensor(w.view(np.uint16))
    return out


def is_torch_operands(weights: dict) -> bool:
    return "up" + LINEAR in weights or "up" + STORED in weights


def _product(rows, weights: dict, name: str):
    """rows [N, in] bf16 tensor @ matrix `name` of `weights` -> [N, out] float32 NumPy; None if it has none."""
    torch = torch_module()
    if name + LINEAR in weights:
        return torch.nn.functional.linear(rows, weights[name + LINEAR]).float().numpy()
    if name + STORED in weights:
        return torch.matmul(rows, weights[name + STORED]).float().numpy()
    return None


def torch_expert_ffn(x: np.ndarray, weights: dict, act) -> np.ndarray:
    """The expert of `weights` (as `torch_operands` gives them) on rows x [N, D] -> [N, D] f32 (NumPy):
    gated_activation(x @ gate + gate_bias, x @ up + up_bias) @ down + down_bias (plain: act(x @ up + up_bias)),
    as `models.moe.expert_ffn`, with the products in bf16 (the module's docstring)."""
    from moejax.offload.host_ffn import host_activation
    torch = torch_module()
    bf16 = lambda a: torch.from_numpy(np.array(a, np.float32)).to(torch.bfloat16)  # noqa: E731
    biases = {name: w for name, w in weights.items() if name.endswith("_bias")}
    with torch.inference_mode():
        rows = bf16(x)
        hidden = host_activation(_product(rows, weights, "gate"), _product(rows, weights, "up"), biases, act)
        out = _product(bf16(hidden), weights, "down")
    bias = weights.get("down_bias")
    return out if bias is None else out + bias
