"""One float (bf16 or float32) routed expert's FFN on the host through torch's CPU matmul, where torch is
importable (`cpu_experts='auto'` or 'auto-float32', `offload.cpu_experts.HostExperts`).

Why torch, an optional dependency: XLA:CPU computes a bfloat16 matmul by widening to float32 and reads a bf16
weight matrix at a few GB/s, and even widened block by block (`offload.host_ffn`) one expert on 16 cores reads
~8 GB/s; torch's CPU bf16 matmul (oneDNN, using AVX512-BF16 / AMX where the CPU has them) reads it near the
host's memory bandwidth, as fast as the PCIe link copies it (`scripts/probe_host_matvec.py`; BENCHMARKS.md,
"The host's expert compute"). Without torch the host uses `offload.host_ffn`.

The arithmetic is the device's: rows and products in the weights' dtype (bf16 with float32 accumulation inside
the matmul; float32 for 'auto-float32's widened copy, closer to exact than the device), the activation in
float32 (torch's function of the same name; gpt-oss's through the device's own), the hidden units rounded to the
weights' dtype for the down projection; output float32. One expert at a time, each product on torch's intra-op
threads (every core but two).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import jax
import numpy as np

from moejax.models.quantized import QUANTIZED_WEIGHTS, SCALE_SUFFIX

LINEAR = "_linear"  # suffix of a matrix as a torch tensor in linear's layout [out, in] (the faster)
STORED = "_stored"  # suffix of a matrix as a torch tensor over the array as stored, [in, out]
GATE_UP = "gate_up"  # gate and up stacked, [2F, D], in linear's layout
# `models.layers.ACTIVATIONS` by torch.nn.functional's (name, keywords); others (gpt-oss's) run the device's own
TANH = ("gelu", {"approximate": "tanh"})
TORCH_ACTIVATIONS = {"silu": ("silu", {}), "swish": ("silu", {}), "gelu": ("gelu", {}), "relu": ("relu", {}),
                     "gelu_new": TANH, "gelu_pytorch_tanh": TANH}


TORCH_THREADS = max(1, (os.cpu_count() or 1) - 2)
_this_thread = threading.local()


@functools.cache
def torch_module():
    """torch, or None where it is not importable. Its intra-op threads leave two cores to the process's other
    work: the thread dispatching the step programs and the runtime's own, which wait behind a matmul that
    holds every core (the host's experts would then no longer run while the link copies)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(TORCH_THREADS)
    return torch


def _threads_set_here() -> None:
    """Sets torch's thread count once in the calling thread. Without it, in a thread torch did not start (the
    runtime's, where an inline host callback computes its experts), the same step's float32 host output differed
    in its last bits from run to run on a loaded 2-core CPU (why, inside torch's threading, is not known); with it,
    none did."""
    if not getattr(_this_thread, "threads_set", False):
        torch_module().set_num_threads(TORCH_THREADS)
        _this_thread.threads_set = True


def usable(dtypes: dict) -> bool:
    """Whether torch computes experts of these weights ({name: dtype}): bf16 or float32 matrices, not compact, torch
    present."""
    compact = any(name.endswith(SCALE_SUFFIX) for name in dtypes)
    kinds = {np.dtype(dtypes[name]) for name in QUANTIZED_WEIGHTS if name in dtypes}
    one_float = kinds in ({np.dtype(jax.numpy.bfloat16)}, {np.dtype(np.float32)})
    return one_float and not compact and torch_module() is not None


def _tensor(w: np.ndarray):
    """A torch tensor over a bf16 (or its bits, uint16) or float32 NumPy array, no copy where it is contiguous."""
    torch = torch_module()
    w = np.ascontiguousarray(w)
    with warnings.catch_warnings():  # a read-only array (a lent host-cache slot): the products only read it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        if w.dtype == np.float32:
            return torch.from_numpy(w)
        return torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)


def torch_operands(expert: dict, copy: bool = True) -> dict:
    """One bf16 or float32 expert {name: array} (NumPy or CPU JAX) as `torch_expert_ffn` takes it: its matrices as
    torch tensors of their dtype, in linear's layout [out, in] (transposed copies; gate and up stacked into one
    [2F, D] matrix under GATE_UP, read by one product) under `name + LINEAR`, or with copy False over the arrays
    themselves [in, out] under `name + STORED` (no copy: a host-cache slot lent for one computation); biases as
    float32 torch tensors."""
    torch = torch_module()
    out, matrices = {}, {}
    for name, w in expert.items():
        w = np.asarray(w)
        if name not in QUANTIZED_WEIGHTS:
            out[name] = torch.from_numpy(w.astype(np.float32))
        elif copy:
            matrices[name] = _plain(w).T
        else:
            out[name + STORED] = _tensor(_plain(w))
    if "gate" in matrices:
        out[GATE_UP + LINEAR] = _tensor(np.concatenate([matrices.pop("gate"), matrices.pop("up")]))
    out.update({name + LINEAR: _tensor(w) for name, w in matrices.items()})
    return out


def _plain(w: np.ndarray) -> np.ndarray:
    """A bf16 array as its bits (uint16, NumPy's own dtype), a float32 one as it is."""
    return w if w.dtype == np.float32 else w.view(np.uint16)


def is_torch_operands(weights: dict) -> bool:
    return any(name in weights for name in ("up" + LINEAR, GATE_UP + LINEAR, "up" + STORED))


def _product(rows, weights: dict, name: str):
    """rows [N, in] tensor (the weights' dtype) @ matrix `name` of `weights` -> [N, out] float32 tensor; None if
    it has none."""
    torch = torch_module()
    if name + LINEAR in weights:
        return torch.nn.functional.linear(rows, weights[name + LINEAR]).float()
    if name + STORED in weights:
        return torch.matmul(rows, weights[name + STORED]).float()
    return None


def _activation(gate, up, weights: dict, act):
    """The hidden units [N, F] f32 tensor from the projections (gate None: a plain FFN), biases added: torch's
    functions for the activations named in TORCH_ACTIVATIONS, else the device's own (`host_ffn.host_activation`)."""
    torch = torch_module()
    up = up + weights["up_bias"] if "up_bias" in weights else up
    if gate is not None and "gate_bias" in weights:
        gate = gate + weights["gate_bias"]
    function = TORCH_ACTIVATIONS.get(act) if isinstance(act, str) else None
    if function is None:
        from moejax.offload.host_ffn import host_activation
        hidden = host_activation(None if gate is None else gate.numpy(), up.numpy(), {}, act)
        return torch.from_numpy(np.array(hidden, np.float32))
    f = getattr(torch.nn.functional, function[0])
    return f(up, **function[1]) if gate is None else f(gate, **function[1]) * up


def torch_expert_ffn(x: np.ndarray, weights: dict, act) -> np.ndarray:
    """The expert of `weights` (as `torch_operands` gives them) on rows x [N, D] -> [N, D] f32 (NumPy):
    gated_activation(x @ gate + gate_bias, x @ up + up_bias) @ down + down_bias (plain: act(x @ up + up_bias)),
    as `models.moe.expert_ffn`, with the products in the weights' dtype (the module's docstring)."""
    torch = torch_module()
    _threads_set_here()
    dtype = next(w.dtype for name, w in weights.items() if name.endswith((LINEAR, STORED)))
    with torch.inference_mode():
        rows = torch.from_numpy(np.array(x, np.float32)).to(dtype)
        both = _product(rows, weights, GATE_UP)
        if both is not None:
            gate, up = both.chunk(2, dim=-1)
        else:
            gate, up = _product(rows, weights, "gate"), _product(rows, weights, "up")
        out = _product(_activation(gate, up, weights, act).to(dtype), weights, "down")
        if "down_bias" in weights:
            out = out + weights["down_bias"]
        return out.numpy()
