"""Shared helpers of the benchmark scripts: random models on the device, engines from them, bandwidths,
floors, time budgets, peers, tables and JSON.

Benchmarks are scripts, not tests: each prints a table last and writes JSON (after every row, so a run
cut short keeps what it measured). Run them from the repository root with `PYTHONPATH=.`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.cards import load_card
from moejax.engine.compilation import use_compilation_cache
from moejax.engine.loading import build_engine, prepare_backend
from moejax.models.decoder import (
    EmbedHead, decoder_layer, empty_kv_caches, kv_cache_bytes, normal_init, parameter_counts, random_experts,
)
from moejax.models.layers import param_dtype
from moejax.offload.config import OffloadConfig
from moejax.offload.expert_stacks import host_sharding

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
# The tests' settings (tests/conftest.py): tiny programs compile 3x faster on the CPU without LLVM's
# optimisations and XLA's fusion emitters.
CPU_SMOKE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def start_backend(expert_bytes: int | None = None, smoke: bool = False) -> None:
    """What must happen before JAX starts its backend: the engine's XLA flags and pinned-pool size for
    `expert_bytes` of host experts (`engine.loading.prepare_backend`), the persistent compilation cache
    where MOEJAX_COMPILATION_CACHE says (as `moejax.load` does), and, for a smoke run (`--dims tiny`, on
    the CPU), the fast-compile flags."""
    if smoke and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = CPU_SMOKE_FLAGS
    prepare_backend(expert_bytes)
    use_compilation_cache()


SMOKE_LAYERS = 3


def model_config(card: str, num_layers: int | None, tiny: bool):
    """A card's config with its first `num_layers` layers (None: all); tiny (a CPU smoke run): every width
    shrunk and at most SMOKE_LAYERS layers."""
    if tiny:
        num_layers = min(num_layers or SMOKE_LAYERS, SMOKE_LAYERS)
    cfg = load_card(card, num_layers=num_layers)
    return tiny_widths(cfg) if tiny else cfg


def tiny_widths(cfg):
    """The same card with every width shrunk (the scripts' `--dims tiny`: a CPU smoke run)."""
    latent = dict(kv_lora_rank=16, q_lora_rank=16 if cfg.q_lora_rank else 0, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=16) if cfg.is_mla else {}
    return cfg.replace(vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, expert_intermediate_size=32,
                       dense_intermediate_size=64 if cfg.dense_intermediate_size else 0,
                       shared_expert_intermediate_size=64 if cfg.shared_expert_intermediate_size else 0, **latent)


# -- random weights, made on the device -------------------------------------------------------------------
def random_dense_params(cfg, seed: int = 0, std: float = 0.02):
    """Random non-expert weights (globals, layers) on the default device: normal(0, std) in the model dtype,
    norm weights one, biases zero (`models.decoder.normal_init`)."""
    dtype = param_dtype(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    kv = empty_kv_caches(cfg, 1, 1)[0]
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(seed), cfg.num_layers + 1)
    globals_ = normal_init(jax.eval_shape(EmbedHead(cfg).init, keys[0], tokens)["params"], keys[0], std, dtype)
    layers = [normal_init(jax.eval_shape(decoder_layer(cfg, i).init, keys[i + 1], x, kv, positions)["params"],
                          keys[i + 1], std, dtype) for i in range(cfg.num_layers)]
    return globals_, layers


def random_expert_stacks(cfg, seed: int = 1, sharding=None) -> Iterator[dict]:
    """Each MoE layer's experts {name: [E, ...]}, drawn on the device one layer at a time (normal(0, 0.02),
    a key per layer) and moved to `sharding` if given (e.g. pinned host memory)."""
    for m in range(len(cfg.moe_layer_ids)):
        stack = random_experts(cfg, jax.random.PRNGKey(seed * 100_003 + m))
        if sharding is not None:
            stack = jax.device_put(stack, sharding)
            jax.block_until_ready(stack)
        yield stack


def pinned_stacks(cfg, device, seed: int = 1) -> list[dict]:
    """Every MoE layer's random experts in pinned host memory (made on the device, moved layer by layer)."""
    return list(random_expert_stacks(cfg, seed, host_sharding(device)))


def build_random_engine(cfg, offload, dense, stacks, *, slots: int = 1, max_seq_len: int = 256,
                        prefill_chunk: int = 512, expert_compute: str = "auto", **options):
    """An Engine (`engine.loading.build_engine`) of random weights: dense = (globals, layers), stacks = each
    MoE layer's experts (an iterable: device stacks are consumed one at a time, pinned ones are shared);
    offload: a mode name, with `options` the other `OffloadConfig` fields, and `whole_layer_from` (`ProgramSpec`'s;
    default build_engine's), `cpu_experts`, `layer_stream`, `host_layout` and `miss_copy` (build_engine's) if given."""
    globals_, layers = dense
    spec = {key: options.pop(key)
            for key in ("whole_layer_from", "cpu_experts", "layer_stream", "host_layout", "miss_copy")
            if key in options}
    return build_engine(cfg, globals_, layers, stacks, OffloadConfig(offload, **options), slots=slots,
                        max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, expert_compute=expert_compute, **spec)


# -- measurements -----------------------------------------------------------------------------------------
def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def median_seconds(run, repeats: int) -> float:
    """Median seconds of run() (its result waited for: `jax.block_until_ready`) over `repeats` calls, after one
    warming call."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return median(times)


def hbm_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device memory bytes/s of an elementwise bf16 op over `nbytes` (it reads and writes them): the fastest of
    `repeats` calls after three untimed ones, as a floor wants the best the memory does (the median of ten gave an
    H100 1,443 GB/s in one run and 2,489 in another)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    double = jax.jit(lambda a: a * 2)
    for _ in range(3):
        double(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        double(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / min(times)


def pinned_bandwidth(cfg, device, experts: int = 8, repeats: int = 5, least_bytes: float = 1e9) -> float:
    """Pinned host -> device bytes/s, from copies of `experts` expert-sized pinned buffers in one call, each
    copied as many times (at most 16) as makes `least_bytes`: a copy of a few milliseconds measures its start-up
    as much as the link (DeepSeek-V2-Lite's 8 experts, 138 MB, gave 28 to 44 GB/s where Mixtral's 2.8 GB gave 53)."""
    stack = next(random_expert_stacks(cfg.replace(num_experts=experts), seed=7))
    host = [jax.device_put({n: w[e] for n, w in stack.items()}, host_sharding(device)) for e in range(experts)]
    del stack
    jax.block_until_ready(host)
    copies = min(16, math.ceil(least_bytes / (experts * cfg.expert_bytes)))  # 16: a CPU smoke run's tiny experts
    on_device = jax.sharding.SingleDeviceSharding(device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(host * copies, on_device))
        times.append(time.perf_counter() - start)
    return copies * experts * cfg.expert_bytes / median(times[1:])


def active_bytes_per_token(cfg, context: int) -> dict:
    """Bytes one decode token at batch 1 must read from device memory (the HBM floor's numerator): every
    non-expert weight but the embedding table (one row of it is read) -- attention, norms, routers, shared
    experts, dense MLPs, the final norm, lm_head (the embedding itself when tied) --, top_k experts of every
    MoE layer, and the K and V of `context` positions in every layer."""
    counts = parameter_counts(cfg)
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    dense = (counts["dense"] - embedding) * cfg.dtype_bytes
    experts = len(cfg.moe_layer_ids) * cfg.top_k * cfg.expert_bytes
    kv = kv_cache_bytes(cfg, 1, context)
    return {"dense_bytes": dense, "expert_bytes": experts, "kv_bytes": kv, "total_bytes": dense + experts + kv}


# A prefill and two decode steps compile the programs a run uses (and what a longer run might compile later is
# left out of its times anyway: `Timing` excludes compilation).
WARM_UP_TOKENS = 3


def time_generate(engine, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """A short warm-up generate (compiles the programs the timed ones use), then `repeats` timed ones; medians
    of TTFT and TPOT (compilation excluded, `engine.results.Timing`)."""
    engine.generate([prompt], max_new_tokens=min(new_tokens, WARM_UP_TOKENS), ignore_eos=True)
    runs = [engine.generate([prompt], max_new_tokens=new_tokens, ignore_eos=True) for _ in range(repeats)]
    return {"ttft_s": median([r.timing.ttft_s for r in runs]), "tpot_s": median([r.timing.tpot_s for r in runs]),
            "tokens": runs[0].tokens[0]}


def decode_stats(result) -> dict:
    """A generate result's decode-only traffic: its statistics' totals less those after the prompts."""
    total, prefill = result.stats["total"], result.stats.get("prefill") or {}
    decode = {key: total[key] - prefill.get(key, 0) for key in ("activations", "hits", "misses", "prefetch_issued",
                                                                 "prefetch_used", "streamed", "bytes_h2d")}
    decode["steps"] = result.timing.decode_steps
    return decode


class Budget:
    """The wall seconds a script may still spend (its `--time-budget`): it starts a part only if the time
    left covers `need` seconds, e.g. what the last like part took."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, need: float, what: str) -> bool:
        if self.left() >= need:
            return True
        print(f"skipped {what}: {self.left():.0f} s left of the time budget, it needs ~{need:.0f} s", flush=True)
        return False


# -- output -----------------------------------------------------------------------------------------------
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


def parse_models(text: str) -> list[tuple[str, int | None]]:
    """--models 'card[:layers],...' -> [(card, layers or None)]."""
    models = []
    for item in text.split(","):
        card, _, layers = item.partition(":")
        if layers and not layers.isdigit():
            raise SystemExit(f"--models: '{item}' is not card or card:layers")
        models.append((card, int(layers) if layers else None))
    return models


def model_label(card: str, layers: int | None) -> str:
    return card if layers is None else f"{card}:{layers}"


def run_peers(models: list[tuple[str, int | None]], args: list[str], dims: str, timeout: float, budget: Budget) -> dict:
    """{model label: the transformers peer's JSON or {'error': ...}}: scripts/peers/hf_peer.py `args` on each model
    (--card label --dims dims), each in its own process within `timeout` seconds; together they take at most half
    of what is left of `budget` (the rest is the engine's)."""
    peers, engine_share = {}, budget.left() / 2
    for card, layers in models:
        label = model_label(card, layers)
        seconds = min(timeout, budget.left() - engine_share)
        peers[label] = (run_peer("scripts/peers/hf_peer.py", ["--card", label, "--dims", dims, *args], seconds)
                        if seconds > 1 else {"error": "no time left"})
        print(f"peer {label}:", json.dumps(peers[label]), flush=True)
    return peers


def run_peer(script: str, args: list[str], timeout: float) -> dict:
    """Runs a peer script (a path in the repository) in its own process group (torch and JAX must not share the
    GPU: call it before JAX starts its backend) and returns its JSON, or {'error': ...}. Past `timeout` seconds
    the whole group is killed (the offload peer runs a process per fraction)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"peer-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, str(ROOT / script), *args, "--out", str(out)]
    print("peer:", " ".join(cmd), flush=True)
    process = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
        data = json.loads(out.read_text()) if code == 0 else {"error": f"exit status {code}"}
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        data = {"error": f"timed out after {timeout:.0f} s"}
    except (OSError, json.JSONDecodeError) as err:
        data = {"error": f"{type(err).__name__}: {err}"}
    finally:
        for leftover in out.parent.glob(out.name + "*"):  # the offload peer writes one file per fraction too
            leftover.unlink(missing_ok=True)
    return data
