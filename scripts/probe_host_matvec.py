"""How fast the host's CPU can read one bf16 expert matrix times one row, by library: the question behind
`--cpu-experts auto` (issue 24) is whether any host path reads a Mixtral-sized bf16 expert faster than the link.

Times (median of --repeats) x [1, D] @ W [D, F] for W of the given dims (default one Mixtral-8x7B projection,
4096 x 14336, 117 MB in bf16) through: XLA:CPU on float32 weights and on bf16 weights (f32 accumulation); numpy
float32 (BLAS sgemv); numpy widening bf16 blocks to float32 then sgemv, on 1 and on --threads threads; torch's
CPU bf16 and float32 matmul where torch is importable. Also the host's memory copy rate and its CPU flags.

    PYTHONPATH=. python scripts/probe_host_matvec.py --out out/probe_host_matvec.json
    PYTHONPATH=. python scripts/probe_host_matvec.py --dims 512x1024 --repeats 2 --out /tmp/p.json   # smoke
"""

from __future__ import annotations

import argparse
import os
from concurrent import futures
from pathlib import Path

import numpy as np

from scripts.benchlib import environment, median_seconds, write_json


def widened_matvec(x: np.ndarray, bits: np.ndarray, start: int, stop: int, block: int) -> np.ndarray:
    """x[start:stop] @ bf16 rows start:stop of W (bits: uint16 [D, F]), widened block by block to float32."""
    total = np.zeros(bits.shape[1], np.float32)
    for row in range(start, stop, block):
        end = min(row + block, stop)
        wide = (bits[row:end].astype(np.uint32) << 16).view(np.float32)
        total += x[row:end] @ wide
    return total


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
            return [f for f in line.split(":", 1)[1].split() if f in wanted]
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="4096x14336")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--block", type=int, default=64, help="rows widened at a time by the numpy path")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    D, F = (int(v) for v in args.dims.split("x"))
    rng = np.random.default_rng(0)
    w32 = (rng.standard_normal((D, F), np.float32) * 0.02)
    bits = (w32.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16
    w32 = (bits.astype(np.uint32) << 16).view(np.float32)  # the same values in float32
    x = rng.standard_normal(D).astype(np.float32)
    want = x @ w32
    bf16_bytes = bits.nbytes
    rows = {}

    def record(name, fn, weight_bytes):
        try:
            seconds = median_seconds(fn, args.repeats)
        except Exception as error:  # a library or dtype this host lacks: say so, go on
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            print(f"{name:34s} error {rows[name]['error']}", flush=True)
            return
        rows[name] = {"ms": seconds * 1e3, "weight_gb_per_s": weight_bytes / seconds / 1e9,
                      "bf16_gb_per_s": bf16_bytes / seconds / 1e9}
        print(f"{name:34s} {seconds * 1e3:9.2f} ms  {weight_bytes / seconds / 1e9:7.1f} GB/s of its weights  "
              f"{bf16_bytes / seconds / 1e9:7.1f} GB/s of bf16", flush=True)

    big = np.empty(max(w32.nbytes, 1 << 28) // 4, np.float32)
    big[:] = 1.0
    dst = np.empty_like(big)
    record("memcpy 1 thread", lambda: np.copyto(dst, big), big.nbytes * 2)
    pool = futures.ThreadPoolExecutor(args.threads)
    cuts = np.linspace(0, big.size, args.threads + 1).astype(int)
    record(f"memcpy {args.threads} threads",
           lambda: list(pool.map(lambda i: np.copyto(dst[cuts[i]:cuts[i + 1]], big[cuts[i]:cuts[i + 1]]),
                                 range(args.threads))), big.nbytes * 2)

    record("numpy f32 sgemv", lambda: x @ w32, w32.nbytes)
    record("numpy bf16 widened, 1 thread", lambda: widened_matvec(x, bits, 0, D, args.block), bf16_bytes)
    row_cuts = np.linspace(0, D, args.threads + 1).astype(int)

    def numpy_threads():
        parts = pool.map(lambda i: widened_matvec(x, bits, row_cuts[i], row_cuts[i + 1], args.block),
                         range(args.threads))
        return np.sum(list(parts), axis=0)
    record(f"numpy bf16 widened, {args.threads} threads", numpy_threads, bf16_bytes)
    err = float(np.max(np.abs(numpy_threads() - want)) / np.max(np.abs(want)))
    rows[f"numpy bf16 widened, {args.threads} threads"]["relative_error"] = err

    import jax
    import jax.numpy as jnp
    cpu = jax.devices("cpu")[0]
    xj = jax.device_put(x, cpu)
    w32j = jax.device_put(w32, cpu)
    wbj = jax.device_put(jnp.asarray(w32, jnp.bfloat16), cpu)
    f32_dot = jax.jit(lambda a, w: a @ w)
    bf_dot = jax.jit(lambda a, w: jnp.dot(a.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32))
    record("xla:cpu f32", lambda: f32_dot(xj, w32j).block_until_ready(), w32.nbytes)
    record("xla:cpu bf16 (f32 accumulation)", lambda: bf_dot(xj, wbj).block_until_ready(), bf16_bytes)

    try:
        import torch
    except ImportError:
        rows["torch"] = {"error": "not importable"}
    else:
        torch.set_num_threads(args.threads)
        xt = torch.from_numpy(x)[None]
        wt_bf = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        wt_bf_t = wt_bf.t().contiguous()  # [F, D]: linear's layout
        xt_bf = xt.to(torch.bfloat16)
        record("torch bf16 x @ W", lambda: xt_bf @ wt_bf, bf16_bytes)
        record("torch bf16 linear(x, W^T)", lambda: torch.nn.functional.linear(xt_bf, wt_bf_t), bf16_bytes)
        wt32 = torch.from_numpy(w32)
        record("torch f32 x @ W", lambda: xt @ wt32, w32.nbytes)
        got = (xt_bf @ wt_bf).float().numpy()[0]
        rows["torch bf16 x @ W"]["relative_error"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        rows["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                         "mkldnn_bf16": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())}
    out = {"environment": environment(), "cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(),
           "dims": [D, F], "rows": rows}
    print(f"cpu: {out['cpu']}, flags {out['flags']}, {out['cores']} cores", flush=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
