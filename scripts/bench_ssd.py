"""The SSD tier on a model larger than host memory (issue 24): decode through disk -> host cache -> GPU cache,
against the disk's own sequential read bandwidth measured in the same run.

Sizes come from the machine at run time: the model (Mixtral-8x7B's expert shape, 8 experts top-2, as many layers
as it takes) has `--ratio` (1.5) x the host's RAM of experts (MemTotal, or the cgroup's limit if lower; x
`--scale`, for a CPU smoke run at tiny sizes with `--dims tiny`), and the host cache `--host-shares` of RAM. When
the disk cannot hold that many bytes (the expert files and 10% to spare), the model shrinks to what it can hold
and RAM is emulated: the host cache is sized as if RAM were model / ratio; the JSON says so (`ram_emulated`).
Reads bypass the page cache (O_DIRECT, `offload.expert_files`), so the disk is really read either way.

The floor: the bytes the run needed from disk (`needed_gb`: what it read, less read-ahead that nothing used) / the
disk's bandwidth, measured by reading expert files the same way the tier does (one file at a time, O_DIRECT, so
neither the page cache nor earlier writes serve them), without and with the CRC-32 check the tier applies
(`disk_gb_s`, `checked_gb_s`), once before the runs (after `sync`: the writeback of freshly written files would
share the disk), and raw again after each row (the last: `disk_gb_s_after`). The disk's speed drifts between
minutes, so each row's floor takes the faster of the raw reads just before and just after it (`disk_gb_s_around`,
the row's `floor_gb_s`), the stricter floor; the top-level `floor_gb_s` is the fastest of all. `x_floor` = the
run's time (prompt and decode, compilation excluded) over its floor; the issue's target is <= 1.3.
`cancelled_gb`: what the read-ahead given up for a step's misses had read (disk time spent for nothing; in
neither the floor nor `run_read_gb_s`).
`run_read_gb_s`: the bytes the run read over the seconds during which any of its disk reads was under way
(`disk_busy_s`: a step's reads and the prefetch thread's overlap); `disk_idle_s` = `total_s` - `disk_busy_s`.
Unused read-ahead bytes count in the run's time, not in its floor.

    PYTHONPATH=. python scripts/bench_ssd.py --out out/bench_ssd.json            # GPU: sizes from the machine
    PYTHONPATH=. python scripts/bench_ssd.py --dims tiny --scale 2e-5 --out /tmp/ssd.json   # CPU smoke run

`--expert-format int4` (or int8) keeps the experts compact on disk, in the host cache and over the link (a
checkpoint converted with `moejax convert --expert-format`, or quantized at load): the model then has 1.5x the RAM
in compact bytes (3.7x the layers in int4), the case of a model like Kimi-K2 (0.54 TB of int4 experts).

`--cpu-experts off,auto` runs each host cache size twice: copying every GPU-cache miss over the link, and with
`cpu_experts='auto'` (a miss routed few tokens computed on the CPU from the host cache, where the cost model measured
at load says that is faster; how llama.cpp's --n-cpu-moe and KTransformers run models larger than RAM): `x_copy` is
its tokens/s over the copy-only row's of the same host cache.

`--staging on,off` runs each row with and without a layer's misses staged for the disk (`HostCache.staging`: what
staging gains), `--hints on,off` with and without the next layer's guessed misses read after them
(`HostCache.hints`), `--finish-past 0.5,1` with a speculative read past half its file finished and always given
up (`HostCache.finish_past`); `--ram-gib N` sizes the model against N GiB of RAM instead of the machine's (a
shorter run).
Each phase's seconds are printed as it ends.

The expert files go to --dir (default .bench/ssd_experts) and are kept for the next run of the same sizes and format.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.offload.config import OffloadConfig
from moejax.offload.disk_tier import open_tier
from moejax.offload.expert_format import DTYPE_FORMATS, ExpertFormat, resolve_format
from moejax.offload.expert_files import MANIFEST, ExpertFiles, aligned_buffer, padded, write_expert_files
from moejax.offload.host_cache import FINISH_PAST
from moejax.cards import load_card
from moejax.engine.loading import build_engine
from moejax.models.decoder import expert_shapes
from scripts.benchlib import (
    GB, Budget, environment, print_table, random_dense_params, random_expert_stacks, start_backend, tiny_widths,
    write_json,
)

DISK_SPARE = 0.9  # the expert files take at most this share of the disk's free bytes


def host_ram_bytes() -> int:
    """The host's RAM: MemTotal, or the cgroup's memory limit where it is lower."""
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def card(layers: int, tiny: bool):
    """Mixtral-8x7B's card with `layers` layers, alike (more than its 32 where the sizing needs them: 1.5x a 128 GiB
    host's RAM is 69 of its layers in bf16); tiny: every width shrunk, the expert FFN to one quantization group."""
    one = load_card("mixtral-8x7b", num_layers=1)
    cfg = one.replace(num_layers=layers, moe_layers=one.moe_layers * layers, sliding_windows=one.sliding_windows * layers)
    return tiny_widths(cfg).replace(expert_intermediate_size=64) if tiny else cfg


def float_shapes(cfg) -> dict:
    """One expert's {name: (shape, dtype)} in the model's dtype."""
    return {name: (shape, np.dtype(cfg.np_dtype)) for name, shape in expert_shapes(cfg).items()}


def expert_format(cfg, name: str | None) -> ExpertFormat:
    """The format `--expert-format` names (None: the model's dtype), checked against the experts' widths."""
    fmt = resolve_format(name, ExpertFormat(DTYPE_FORMATS[cfg.dtype], cfg.dtype))
    fmt.check(float_shapes(cfg))
    return fmt


def plan(tiny: bool, ram: int, ratio: float, free_disk: int, format_name: str | None = None):
    """(config with the MoE layers for ratio x ram of experts in format `format_name`, ram used for sizing, whether
    it is emulated)."""
    cfg = card(1, tiny)
    layer_bytes = cfg.num_experts * padded(expert_format(cfg, format_name).expert_bytes(float_shapes(cfg)))
    target = ratio * ram
    emulated = target > DISK_SPARE * free_disk
    if emulated:
        target = DISK_SPARE * free_disk
    layers = max(2, math.ceil(target / layer_bytes))
    if emulated:
        layers = max(2, int(target // layer_bytes))
        ram = int(layers * layer_bytes / ratio)
    return card(layers, tiny), ram, emulated


def ensure_files(root: Path, cfg, fmt: ExpertFormat) -> ExpertFiles:
    """The model's expert files of random weights (normal(0, 0.02), made on the device a layer at a time and
    quantized there to `fmt`), written unless `root` holds them for these sizes and format already."""
    shapes = fmt.shapes(float_shapes(cfg))
    moe = len(cfg.moe_layer_ids)
    try:
        return ExpertFiles(root, shapes, moe, cfg.num_experts, fmt.record())
    except Exception as err:  # absent, or of other sizes or another format: written anew
        if (root / MANIFEST).exists():
            print(f"rewriting {root}: {err}", flush=True)
            shutil.rmtree(root)
    stacks, layer = random_expert_stacks(cfg), {}

    def load(m: int, e: int) -> dict:
        if layer.get("m") != m:
            stack = fmt.convert(next(stacks), "random experts", xp=jnp)
            layer.update(m=m, stack={name: np.asarray(w) for name, w in stack.items()})
        return {name: w[e] for name, w in layer["stack"].items()}

    start = time.monotonic()
    write_expert_files(root, shapes, moe, cfg.num_experts, load, show_progress=True, expert_format=fmt.record())
    total = moe * cfg.num_experts * padded(fmt.expert_bytes(float_shapes(cfg)))
    print(f"wrote {total / GB:.3g} GB of expert files ({fmt.name}) in {time.monotonic() - start:.0f} s", flush=True)
    return ExpertFiles(root, shapes, moe, cfg.num_experts, fmt.record())


def disk_bandwidth(files: ExpertFiles, max_bytes: float, verify: bool) -> float:
    """Bytes/s reading expert files one at a time as the tier does (O_DIRECT), up to `max_bytes`, from the last
    layer backwards (the engine's first steps read the first layers: these are the least likely in any cache)."""
    buffer, done = aligned_buffer(files.file_bytes), 0
    start = time.perf_counter()
    for m in range(files.num_layers - 1, -1, -1):
        for e in range(files.num_experts):
            files.read_into(m, e, buffer, verify=verify)
            done += files.file_bytes
            if done >= max_bytes:
                return done / (time.perf_counter() - start)
    return done / (time.perf_counter() - start)


def run(cfg, dense, files: ExpertFiles, fmt: ExpertFormat, host_bytes: int, cpu_experts: str, staging: bool,
        hints: bool, finish_past: float, args) -> dict:
    """One engine with a host cache of `host_bytes` (and `cpu_experts`; staging False: a layer's misses not staged,
    `HostCache.staging`; hints False: the next layer's guesses not read ahead, `HostCache.hints`; `finish_past`:
    `HostCache.finish_past`): a warm-up generate, then the timed one. Prints each phase's seconds as it ends."""
    total = files.num_layers * files.num_experts * files.file_bytes
    started = time.monotonic()
    tier = open_tier(files, f"{host_bytes}B", cfg.top_k * files.num_layers)
    tier.cache.staging, tier.cache.hints, tier.cache.finish_past = staging, hints, finish_past
    step_need = cfg.num_experts  # a prompt step of prompt_len >= E / top_k tokens can use a whole layer
    gpu_experts = max(int(args.expert_budget * files.num_layers * files.num_experts), step_need)
    config = OffloadConfig("cached", expert_budget=f"{gpu_experts * files.expert_bytes}B", host_budget=f"{host_bytes}B")
    engine = build_engine(cfg, *dense, (), config, slots=1, max_seq_len=args.prompt_len + args.new_tokens + 8,
                          prefill_chunk=args.prompt_len, host_tier=tier, expert_format=fmt, cpu_experts=cpu_experts)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    phase(f"built the engine (host cache {host_bytes / GB:.3g} GB, cpu-experts {cpu_experts}, "
          f"staging {'on' if staging else 'off'}, hints {'on' if hints else 'off'}, finish past {finish_past})",
          started)
    started = time.monotonic()
    engine.generate([prompt], max_new_tokens=2, ignore_eos=True)
    phase(f"warm-up (compiles; prompt and 2 tokens, {tier.cache.bytes_read / GB:.3g} GB read)", started)
    engine.reset_stats()
    started = time.monotonic()
    result = engine.generate([prompt], max_new_tokens=args.new_tokens, ignore_eos=True)
    phase(f"timed run ({tier.cache.bytes_read / GB:.3g} GB read)", started)
    stats = result.stats
    tier_stats, timing, host = stats["host_tier"], result.timing, stats.get("cpu_experts") or {}
    busy = tier_stats["disk_busy_s"]
    engine.close()
    return {
        "cpu_experts": cpu_experts, "staging": staging, "hints": hints, "finish_past": finish_past,
        "cpu_experts_computed": host.get("experts"),
        "cpu_seconds": host.get("seconds"), "cpu_wait_s": host.get("wait_s"), "cpu_stopped": host.get("stopped"),
        "cpu_token_limit": host.get("token_limit"), "cpu_cost_model": host.get("cost_model"),
        "gpu_misses": stats["total"]["misses"], "host_gb": host_bytes / GB,
        "host_share_of_experts": tier.cache.num_slots * files.file_bytes / total,
        "gpu_experts": gpu_experts, "gpu_hit_rate": stats["total"]["hit_rate"], "host_hit_rate": tier_stats["host_hit_rate"],
        "disk_gb": tier_stats["bytes_read_disk"] / GB, "needed_gb": needed_gb(tier_stats),
        "cancelled_gb": tier_stats["bytes_cancelled"] / GB,
        "disk_read_s": tier_stats["disk_read_s"],
        "disk_busy_s": busy, "disk_idle_s": timing.total_s - busy,
        "run_read_gb_s": tier_stats["bytes_read_disk"] / GB / busy if busy else None,
        "stall_s": tier_stats["stall_s"], "ttft_s": timing.ttft_s, "tpot_s": timing.tpot_s, "total_s": timing.total_s,
        "tokens_per_s": timing.tokens_per_s, "new_tokens": args.new_tokens, "host_tier": tier_stats,
        "hint_reads": tier_stats["hint_reads"], "hint_used": tier_stats["hint_used"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
    parser.add_argument("--scale", type=float, default=1.0, help="sizes as if RAM were this share of it (smoke runs)")
    parser.add_argument("--ram-gib", type=float, help="the host RAM to size against (default: the machine's)")
    parser.add_argument("--ratio", type=float, default=1.5, help="experts / RAM")
    parser.add_argument("--host-shares", default="0.5", help="host cache sizes, shares of RAM (comma-separated)")
    parser.add_argument("--expert-budget", type=float, default=0.1,
                        help="the GPU cache, a share of the experts (default 0.1; at least the one layer a prompt step needs)")
    parser.add_argument("--expert-format", help="bf16 | int8 | int4: the experts on disk, in host and over the link "
                        "(default: the model's dtype, bf16)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--bandwidth-gb", type=float, default=8.0, help="GB read to measure the disk (each time)")
    parser.add_argument("--dir", type=Path, default=Path(".bench/ssd_experts"), help="where the expert files go")
    parser.add_argument("--cpu-experts", default="off",
                        help="off | auto | off,auto: each host cache size with these cpu_experts values (default off)")
    parser.add_argument("--staging", default="on",
                        help="on | off | on,off: each row with a layer's misses staged for the disk or not "
                        "(default on)")
    parser.add_argument("--hints", default="on",
                        help="on | off | on,off: each row with the next layer's guessed misses read ahead or not "
                        "(default on)")
    parser.add_argument("--finish-past", default=str(FINISH_PAST),
                        help="each row with a speculative read past this share of its file finished rather than "
                        f"given up for a step's misses (`HostCache.finish_past`; 1: always given up), e.g. "
                        f"{FINISH_PAST},1 (default {FINISH_PAST})")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: host shares that would not fit are skipped")
    parser.add_argument("--out", default="bench_ssd.json")
    args = parser.parse_args()
    if not set(args.cpu_experts.split(",")) <= {"off", "auto"}:
        parser.error(f"--cpu-experts {args.cpu_experts!r}: give off, auto or off,auto")
    for flag, value in (("--staging", args.staging), ("--hints", args.hints)):
        if not set(value.split(",")) <= {"on", "off"}:
            parser.error(f"{flag} {value!r}: give on, off or on,off")
    try:
        finish_pasts = [float(v) for v in args.finish_past.split(",")]
    except ValueError:
        finish_pasts = []
    if not finish_pasts or not all(0 <= v <= 1 for v in finish_pasts):
        parser.error(f"--finish-past {args.finish_past!r}: give shares of a file from 0 to 1, e.g. {FINISH_PAST},1")
    budget = Budget(args.time_budget)
    tiny = args.dims == "tiny"
    machine_ram = host_ram_bytes()
    ram = int((args.ram_gib * 2**30 if args.ram_gib else machine_ram) * args.scale)
    args.dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir.parent).free + (_size(args.dir) if args.dir.exists() else 0)
    cfg, ram, emulated = plan(tiny, ram, args.ratio, free, args.expert_format)
    fmt = expert_format(cfg, args.expert_format)
    start_backend(None, smoke=tiny)
    files = ensure_files(args.dir, cfg, fmt)
    total = files.num_layers * files.num_experts * files.file_bytes
    print(f"{total / GB:.3g} GB of {fmt.name} experts ({len(cfg.moe_layer_ids)} MoE layers x {cfg.num_experts}) = {args.ratio} x "
          f"{ram / GB:.3g} GB of RAM{' (emulated: the disk holds no more)' if emulated else ''}", flush=True)
    os.sync()  # the files' writeback done before the disk is measured
    raw = disk_bandwidth(files, args.bandwidth_gb * GB, verify=False)
    checked = disk_bandwidth(files, args.bandwidth_gb * GB, verify=True)
    print(f"disk: {raw / GB:.3g} GB/s sequential (O_DIRECT), {checked / GB:.3g} GB/s with the CRC-32 check", flush=True)
    out = {"environment": environment(), "machine_ram_gb": machine_ram / GB, "ram_gb": ram / GB, "ram_emulated": emulated,
           "experts_gb": total / GB, "expert_format": fmt.name, "moe_layers": len(cfg.moe_layer_ids), "expert_mb": files.expert_bytes / 1e6,
           "disk_gb_s": raw / GB, "checked_gb_s": checked / GB, "disk_gb_s_after": None, "floor_gb_s": raw / GB,
           "page_cache": "bypassed (O_DIRECT)", "rows": []}
    dense = random_dense_params(cfg)
    last, before = 0.0, raw
    configs = [(float(share), cpu, staging == "on", hints == "on", finish)
               for share in args.host_shares.split(",") for cpu in args.cpu_experts.split(",")
               for staging in args.staging.split(",") for hints in args.hints.split(",")
               for finish in finish_pasts]
    for share, cpu_experts, staging, hints, finish_past in configs:
        if not budget.allows(2 * last, f"host share {share}, cpu-experts {cpu_experts}, staging "
                                       f"{'on' if staging else 'off'}, hints {'on' if hints else 'off'}, "
                                       f"finish past {finish_past}"):
            continue
        start = time.monotonic()
        row = {"host_share_of_ram": share,
               **run(cfg, dense, files, fmt, int(share * ram), cpu_experts, staging, hints, finish_past, args)}
        after = disk_bandwidth(files, args.bandwidth_gb * GB, verify=False)
        row["disk_gb_s_around"] = [before / GB, after / GB]
        set_floor(row, max(before, after))
        before = after
        copying = [r for r in out["rows"] if r["host_share_of_ram"] == share and r["cpu_experts"] == "off"
                   and (r["staging"], r["hints"], r["finish_past"]) == (staging, hints, finish_past)]
        row["x_copy"] = row["tokens_per_s"] / copying[0]["tokens_per_s"] if copying else None
        out["rows"].append(row)
        write_json(Path(args.out), out)
        last = time.monotonic() - start
        gc.collect()
        jax.clear_caches()
    out.update(disk_gb_s_after=before / GB, floor_gb_s=max([raw] + [r["floor_gb_s"] * GB for r in out["rows"]]) / GB)
    write_json(Path(args.out), out)
    print()
    print(f"SSD tier: {total / GB:.3g} GB of {fmt.name} experts, {ram / GB:.3g} GB RAM{' (emulated)' if emulated else ''}, "
          f"disk {raw / GB:.3g} GB/s before the runs (checked {checked / GB:.3g}), {before / GB:.3g} after; "
          "each row's floor at the faster of the measures around it")
    print_table(out["rows"], [("host_share_of_ram", "host/RAM", ".2f"), ("host_share_of_experts", "host/experts", ".2f"),
                              ("cpu_experts", "cpu", "s"), ("staging", "staged", ""), ("hints", "hints", ""),
                              ("finish_past", "finish past", ".2g"),
                              ("hint_reads", "hint reads", "d"), ("hint_used", "used", "d"),
                              ("cpu_experts_computed", "cpu experts", "d"),
                              ("gpu_hit_rate", "GPU hit", ".2f"), ("host_hit_rate", "host hit", ".2f"),
                              ("disk_gb", "disk GB", ".3g"), ("needed_gb", "needed GB", ".3g"),
                              ("cancelled_gb", "given-up GB", ".3g"),
                              ("run_read_gb_s", "read GB/s", ".3g"), ("floor_gb_s", "floor GB/s", ".3g"),
                              ("disk_idle_s", "disk idle s", ".1f"),
                              ("stall_s", "stall s", ".2f"), ("total_s", "time s", ".2f"),
                              ("floor_s", "floor s", ".2f"), ("x_floor", "x floor", ".2f"),
                              ("tokens_per_s", "tok/s", ".2f"), ("x_copy", "x copy", ".2f")])


def phase(what: str, started: float) -> None:
    print(f"{what}: {time.monotonic() - started:.1f} s", flush=True)


def needed_gb(tier: dict) -> float:
    """GB a run read from disk less its read-ahead that nothing used (speculative prefetches and hints; each kind's
    unused reads, at least 0: a read before the counters' reset may be used after it)."""
    unused = sum(max(tier[f"{kind}_reads"] - tier[f"{kind}_used"], 0) for kind in ("prefetch", "hint"))
    return (tier["bytes_read_disk"] - unused * tier["file_bytes"]) / GB


def set_floor(row: dict, bandwidth: float) -> None:
    """A run's floor at `bandwidth` bytes/s (`floor_gb_s`, `floor_s`, `x_floor`): the bytes it needed (`needed_gb`)."""
    row["floor_gb_s"] = bandwidth / GB
    row["floor_s"] = row["needed_gb"] * GB / bandwidth
    row["x_floor"] = row["total_s"] / row["floor_s"] if row["floor_s"] else None


def _size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
