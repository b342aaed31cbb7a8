"""Runtime statistics as plain dicts (for `--json`) and a one-line summary (for logs)."""

from __future__ import annotations

import dataclasses

from moejax.errors import plural
from moejax.runtime.cache import ExpertCache, TransferCounters
from moejax.runtime.directory import DirectoryCounters
from moejax.runtime.store import HostExpertStore


def _layer_entry(directory: DirectoryCounters, transfers: TransferCounters) -> dict:
    entry = {**dataclasses.asdict(directory), **dataclasses.asdict(transfers)}
    for name in ("hit_rate", "prefetch_precision", "prefetch_recall"):
        entry[name] = getattr(directory, name)
    return entry


def cache_stats(mode: str, cache: ExpertCache, store: HostExpertStore, prefetch: str = "none") -> dict:
    """Totals and per-MoE-layer counters since the last reset.

    Keys: activations (distinct experts needed per layer step), hits, misses, hit_rate, evictions,
    prefetch_issued / prefetch_used / prefetch_wasted, prefetch_precision, prefetch_recall, bytes_h2d, demand_fetches, prefetch_fetches,
    streamed, stall_s (seconds the host waited for copies its dispatched compute needed).
    """
    directory = cache.directory
    layers = sorted(set(directory.per_layer) | set(cache.transfers))
    per_layer = [
        {"moe_layer": m, **_layer_entry(directory.per_layer.get(m, DirectoryCounters()), cache.transfers.get(m, TransferCounters()))}
        for m in layers
    ]
    total_transfers = TransferCounters()
    for counters in cache.transfers.values():
        for field in dataclasses.fields(TransferCounters):
            setattr(total_transfers, field.name, getattr(total_transfers, field.name) + getattr(counters, field.name))
    return {
        "mode": mode,
        "policy": directory.policy.name if mode == "cached" else None,
        "capacity_experts": cache.capacity if mode == "cached" else None,
        "prefetch": prefetch,
        "expert_bytes": store.expert_bytes,
        "host_experts": len(store),
        "total": _layer_entry(directory.total, total_transfers),
        "per_layer": per_layer,
    }


def summary_line(stats: dict, new_tokens: int) -> str:
    """E.g. 'cached lru, 12 slots: hit rate 63.2%, 1.23 GB host->GPU (45.6 MB/token), stall 0.120 s'."""
    if "total" not in stats:
        return f"{stats.get('mode', 'resident')}: all experts on the device, no transfers"
    total = stats["total"]
    head = stats["mode"]
    if stats["mode"] == "cached":
        slots = plural(stats["capacity_experts"], "slot")
        if stats["capacity_experts"] >= stats["host_experts"]:
            slots += " (all experts)"
        head += f" {stats['policy']}, {slots}, prefetch {stats.get('prefetch', 'none')}"
    per_token = total["bytes_h2d"] / max(new_tokens, 1)
    line = (
        f"{head}: hit rate {total['hit_rate'] * 100:.1f}% ({total['hits']}/{total['activations']}), "
        f"{total['bytes_h2d'] / 1e9:.3f} GB host->GPU ({per_token / 1e6:.2f} MB/token), stall {total['stall_s']:.3f} s"
    )
    if total["prefetch_issued"]:
        line += (f", prefetch {total['prefetch_issued']} issued / {total['prefetch_used']} used "
                 f"(precision {total['prefetch_precision'] * 100:.0f}%, recall {total['prefetch_recall'] * 100:.0f}%)")
    return line
