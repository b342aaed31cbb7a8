"""Runtime statistics of the expert cache as plain dicts (for `--json`) and a one-line summary (for logs)."""

from __future__ import annotations

import numpy as np

from moejax.errors import plural
from moejax.models.moe import resolve_expert_compute
from moejax.offload.device_cache import COUNTERS


def experts_moved(counters) -> int:
    """Experts the link carried, from counter totals by name (`device_cache.COUNTERS`): misses, prefetches issued
    and the experts a copy of a whole layer carried past its misses (streamed)."""
    return counters["misses"] + counters["prefetch_issued"] + counters["streamed"]


def _entry(row: np.ndarray, expert_bytes: int) -> dict:
    entry = {name: int(value) for name, value in zip(COUNTERS, row, strict=True)}
    entry["bytes_h2d"] = experts_moved(entry) * expert_bytes
    entry["hit_rate"] = entry["hits"] / entry["activations"] if entry["activations"] else 0.0
    issued, used = entry["prefetch_issued"], entry["prefetch_used"]
    entry["prefetch_precision"] = used / issued if issued else 0.0
    entry["prefetch_recall"] = used / (used + entry["misses"]) if used + entry["misses"] else 0.0
    return entry


def per_device_entry(counters: np.ndarray, expert_bytes: int) -> dict:
    """One device's totals (as `cache_stats`' 'total') from its counters [L, len(COUNTERS)] (expert parallelism)."""
    return _entry(counters.sum(axis=0), expert_bytes)


def cache_stats(spec, counters: np.ndarray, expert_bytes: int, num_slots: int, manager=None, host_wait_s: float = 0.0,
                info: dict | None = None) -> dict:
    """Totals and per-MoE-layer counters since the last reset, from the device counters [L, len(COUNTERS)].

    Per entry: activations (distinct experts needed per layer step), hits, misses, hit_rate, evictions,
    prefetch_issued / prefetch_used / prefetch_wasted (prefetch_staged: issued from the host's picks),
    prefetch_precision (used / issued), prefetch_recall (used / (used + misses)), streamed (experts copied without
    being used: dense-offload's, and those a wide step's whole-layer copy carries past its misses) and bytes_h2d
    (everything the step programs moved from the host).
    host_wait_s: seconds the host waited for step results (the device was busy: computing or moving experts).
    expert_compute: the spec's (`engine.decoder_programs`), with its capacity_factor where it is 'capacity'
    (approximate); decode_expert_compute: what it computes a one-token step with ('auto' resolved);
    whole_layer_from: the misses of a layer step from which it moves the whole layer (None: never).
    host_layout: the pinned host stacks' layout, 'stacked' or 'per-expert' (`expert_stacks.per_expert_layout`);
    miss_copy (cached and on-demand, pinned host stacks): how a miss reaches its slot, 'xla' or 'kernel' ('auto'
    resolved; `engine.loading.resolve_miss_copy`);
    fetch_seconds (on a GPU): one miss's fetch and the whole layer's copy, where the engine timed them at load to
    set whole_layer_from.
    """
    cached = spec.mode == "cached"
    return {
        "mode": spec.mode,
        "policy": (manager.policy if manager is not None else spec.policy) if cached else None,
        "capacity_experts": num_slots if cached else None,
        "whole_layer_from": spec.whole_layer_from if cached else None,
        "prefetch": manager.prefetch if cached and manager is not None else "none",
        "expert_bytes": expert_bytes,
        "expert_compute": spec.expert_compute,
        "decode_expert_compute": resolve_expert_compute(spec.expert_compute, 1, spec.inplace),
        **({"capacity_factor": spec.capacity_factor} if spec.expert_compute == "capacity" else {}),
        **(info or {}),
        "host_wait_s": host_wait_s,
        "total": _entry(counters.sum(axis=0), expert_bytes),
        "per_layer": [{"moe_layer": m, **_entry(row, expert_bytes)} for m, row in enumerate(counters)],
    }


def summary_line(stats: dict, new_tokens: int) -> str:
    """E.g. 'cached lru, 12 slots, prefetch none: hit rate 63.2% (...), 1.23 GB host->GPU (45.6 MB/token)', and
    under static capacity gating a warning that tokens over capacity were dropped."""
    line = _offload_line(stats, new_tokens) + _parallel_part(stats)
    tier = stats.get("host_tier")
    if tier is not None:
        line += (f"; host tier {tier['host_slots']} slots: hit rate {tier['host_hit_rate'] * 100:.1f}%, "
                 f"{tier['bytes_read_disk'] / 1e9:.3f} GB from disk in {tier['disk_busy_s']:.2f} s, "
                 f"steps stalled {tier['stall_s']:.2f} s")
    if stats.get("expert_compute") == "capacity":
        line += (f"; expert compute capacity (factor {stats['capacity_factor']:g}): approximate, "
                 "tokens over an expert's capacity dropped")
    if stats.get("expert_format_approximate"):
        line += f"; experts {stats['expert_format']}: approximate"
    host = stats.get("cpu_experts")
    if host and host["experts"]:
        line += (f"; {plural(host['experts'], 'missed expert')} ({plural(host['tokens'], 'token')}) computed on the CPU "
                 f"in {host['seconds']:.3f} s")
    return line


def _parallel_part(stats: dict) -> str:
    """E.g. '; 4 devices (balanced, 2 hot replicas): pairs 310/298/305/301 (max/mean 1.02), hit rate 61/58/60/63%,
    MB moved 12.1/13.0/11.8/12.5' (expert parallelism), else ''."""
    parallel = stats.get("expert_parallel")
    if not parallel:
        return ""
    devices = parallel["per_device"]
    head = parallel["placement"] + (f", {parallel['hot_replicas']} hot replicas" if parallel["hot_replicas"] else "")
    spread = parallel["max_over_mean"]
    line = (f"; {parallel['devices']} devices ({head}): pairs " + "/".join(str(d["pairs"]) for d in devices)
            + (f" (max/mean {spread['total']:.2f})" if spread else ""))
    if stats.get("mode") != "resident":
        line += (", hit rate " + "/".join(f"{d['hit_rate'] * 100:.0f}" for d in devices) + "%, MB moved "
                 + "/".join(f"{d['bytes_h2d'] / 1e6:.1f}" for d in devices))
    return line


def _offload_line(stats: dict, new_tokens: int) -> str:
    total = stats.get("total")
    if total is None or stats.get("mode") == "resident":
        return "resident: all experts on the device, no transfers"
    head = stats["mode"]
    if stats["mode"] == "cached":
        slots = plural(stats["capacity_experts"], "slot") + " per device" * ("expert_parallel" in stats)
        if stats["capacity_experts"] >= stats["host_experts"]:
            slots += " (all experts)"
        head += f" {stats['policy']}, {slots}, prefetch {stats.get('prefetch', 'none')}"
    per_token = total["bytes_h2d"] / max(new_tokens, 1)
    line = (f"{head}: hit rate {total['hit_rate'] * 100:.1f}% ({total['hits']}/{total['activations']}), "
            f"{total['bytes_h2d'] / 1e9:.3f} GB host->GPU ({per_token / 1e6:.2f} MB/token)")
    if total["prefetch_issued"]:
        line += (f", prefetch {total['prefetch_issued']} issued / {total['prefetch_used']} used "
                 f"(precision {total['prefetch_precision'] * 100:.0f}%, recall {total['prefetch_recall'] * 100:.0f}%)")
    return line
