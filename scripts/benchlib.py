"""Shared helpers of the benchmark scripts: random models on the device, peers, tables, JSON.

Benchmarks are scripts, not tests: each prints a table last and writes JSON. Run them from the
repository root with `PYTHONPATH=.`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig, RopeConfig
from moejax.models.decoder import decoder_layer, EmbedHead, kv_cache_shape
from moejax.models.moe import EXPERT_WEIGHTS

ROOT = Path(__file__).resolve().parent.parent


def mixtral_8x7b(num_layers: int) -> ModelConfig:
    """Mixtral-8x7B's architecture (mistralai/Mixtral-8x7B-v0.1) with `num_layers` layers, bf16."""
    return ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=num_layers, num_heads=32, num_kv_heads=8,
        head_dim=128, num_experts=8, top_k=2, expert_intermediate_size=14336, moe_layers=(True,) * num_layers,
        sliding_windows=(None,) * num_layers, norm_topk_prob=True, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=1e6), max_position_embeddings=32768, dtype="bfloat16",
    )


def tiny_mixtral(num_layers: int) -> ModelConfig:
    """A toy Mixtral for CPU smoke runs of the benchmark scripts."""
    return mixtral_8x7b(num_layers).replace(vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                                            expert_intermediate_size=128)


def model_config(dims: str, num_layers: int) -> ModelConfig:
    return {"mixtral-8x7b": mixtral_8x7b, "tiny": tiny_mixtral}[dims](num_layers)


def random_dense_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02):
    """Random non-expert weights (globals, layers) on the default device, normal(0, std), norms ones."""
    key = jax.random.PRNGKey(seed)

    def fill(tree, key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        keys = jax.random.split(key, len(leaves))
        out = []
        for (path, leaf), k in zip(leaves, keys, strict=True):
            if str(path[-1].key) == "weight":
                out.append(jnp.ones(leaf.shape, leaf.dtype))
            else:
                out.append((jax.random.normal(k, leaf.shape, jnp.float32) * std).astype(leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    tokens = jnp.zeros((1, 1), jnp.int32)
    kv = (jnp.zeros(kv_cache_shape(cfg, 1, 1), cfg.dtype),) * 2
    x = jnp.zeros((1, 1, cfg.hidden_size), cfg.dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    keys = jax.random.split(key, cfg.num_layers + 1)
    globals_ = fill(jax.eval_shape(EmbedHead(cfg).init, keys[0], tokens)["params"], keys[0])
    layers = [
        fill(jax.eval_shape(decoder_layer(cfg, i).init, keys[i + 1], x, kv, positions)["params"], keys[i + 1])
        for i in range(cfg.num_layers)
    ]
    return globals_, layers


def random_expert(cfg: ModelConfig, key, std: float = 0.02) -> dict:
    """One expert's weights on the default device, normal(0, std) in the model dtype."""
    d, f = cfg.hidden_size, cfg.expert_intermediate_size
    shapes = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    keys = jax.random.split(key, 3)
    return {
        name: (jax.random.normal(k, shapes[name], jnp.float32) * std).astype(cfg.dtype)
        for name, k in zip(EXPERT_WEIGHTS, keys, strict=True)
    }


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "code": code_digest(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # e.g. the autotuner's level changes speed and rounding
    }


def code_digest() -> str:
    """The first 12 hex digits of a SHA-256 over the moejax package's and the scripts' Python files
    (paths and contents): which code a result came from, where no current git history travels with
    the files (the GPU machine's copy of the tree)."""
    import moejax

    digest = hashlib.sha256()
    for root in (Path(moejax.__file__).resolve().parent, ROOT / "scripts"):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def tiny_widths(cfg):
    """The same card with every width shrunk (the scripts' --tiny: a CPU smoke run)."""
    return cfg.replace(vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, expert_intermediate_size=32,
                       dense_intermediate_size=64, shared_expert_intermediate_size=64)


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    headers = [h for _, h, _ in columns]
    cells = [[("-" if row.get(k) is None else format(row[k], f)) for k, _, f in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def run_peer(args: list[str], timeout: float) -> dict:
    """Runs a peer script in its own process (torch and JAX must not share the GPU) and returns its JSON."""
    out = Path(os.environ.get("OUT", "/tmp")) / f"peer-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, *args, "--out", str(out)]
    print("peer:", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
        data = json.loads(out.read_text())
    except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as err:
        data = {"error": f"{type(err).__name__}: {err}"}
    finally:
        out.unlink(missing_ok=True)
    return data
