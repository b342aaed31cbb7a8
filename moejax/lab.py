"""The policy lab: replays routing traces through the engine's cache policies and prefetchers, with no model.

A replay walks the trace in decode order, token by token and, within a token, MoE layer by MoE
layer, through the real `ExpertDirectory` (one cache shared by all layers, as in the engine) and
the same policy and prefetcher objects the engine uses. Per layer step:

  policy.on_routing(l, counts) -> directory.begin_layer(l, experts) -> admit the misses
  -> prefetcher.observe(l, counts, lookahead) -> prefetch_into(directory, prefetcher.predict(l), N)
  -> directory.end_layer()

A prefetch issued at layer l for a later layer counts as arrived when that layer runs, but at most
N experts are prefetched per layer step (default: the model's top-k), so what scores is the
quality of the prediction, not the volume of copies.

Metrics: hit_rate = hits / activations (activations: distinct experts needed per layer step; a
prefetched expert that is used counts as a hit); prefetch_precision = used / issued;
prefetch_recall = used / (used + misses), the share of would-be misses the prefetcher covered;
experts_moved = misses + prefetches issued (times expert_bytes: bytes_moved).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError, ParameterError, plural
from moejax.progress import Progress
from moejax.runtime.directory import ExpertDirectory
from moejax.runtime.policies import POLICIES, CachePolicy, make_policy
from moejax.routing.prefetchers import NoPrefetcher, make_prefetcher
from moejax.runtime.prefetch import prefetch_into
from moejax.routing.eams import EAMCollection, eam_counts
from moejax.routing.traces import RoutingTrace

# The next MoE layer's router applied one layer early picked 78.3% of the experts it went on to use on
# the shipped tiny-moe over ../shared/data/prompts/tasks.jsonl (`moejax trace`, summary.json).
DEFAULT_LOOKAHEAD_ACCURACY = 0.78


def capacity_experts(trace: RoutingTrace, capacity_fraction: float) -> int:
    """Cache slots for a fraction of all (MoE layer, expert) pairs; at least one layer step's experts."""
    if not 0 < capacity_fraction <= 1:
        raise ParameterError("{capacity_fraction} must be a fraction in (0, 1], got {value}", value=capacity_fraction)
    slots = int(round(capacity_fraction * trace.num_layers * trace.num_experts))
    if slots < trace.top_k:
        raise ParameterError("{capacity_fraction} {value} gives {slots}, fewer than the {needed} one layer step may need",
                             value=capacity_fraction, slots=plural(slots, "expert slot"), needed=plural(trace.top_k, "expert"))
    return slots


def simulate_lookahead(trace: RoutingTrace, accuracy: float, seed: int = 0) -> np.ndarray:
    """int16 [L, T, k]: each true expert of row l >= 1 kept with probability `accuracy`, else replaced by a
    random expert not among that token's true experts of layer l (seeded); row 0 is -1."""
    if not 0 <= accuracy <= 1:
        raise ParameterError("{lookahead_accuracy} must be in [0, 1], got {value}", value=accuracy)
    rng = np.random.default_rng(seed)
    experts = trace.experts.astype(np.int64)
    guess = experts.copy()
    if trace.num_experts <= trace.top_k:
        return _row0_unused(guess)
    replace = rng.random(experts.shape) >= accuracy
    todo = replace.copy()
    while todo.any():
        draws = rng.integers(0, trace.num_experts, size=experts.shape)
        guess = np.where(todo, draws, guess)
        collides = (guess[..., :, None] == experts[..., None, :]).any(axis=-1)
        todo = todo & collides
    return _row0_unused(guess)


def _row0_unused(guess: np.ndarray) -> np.ndarray:
    guess[0] = -1
    return guess.astype(np.int16)


def future_steps(trace: RoutingTrace) -> Iterator[tuple[int, list[int]]]:
    """(MoE layer, experts needed) for every layer step of the replay, in order (Belady's future)."""
    num_experts = trace.num_experts
    for token in np.swapaxes(trace.experts, 0, 1):
        for layer, row in enumerate(token.tolist()):
            yield layer, [e for e in row if e < num_experts]


def replay(trace: RoutingTrace, *, capacity_fraction: float, policy: str, prefetch: str = "none",
           prefetch_per_layer: int | None = None, prefetch_floor: float | None = None,
           collection: EAMCollection | None = None,
           lookahead_accuracy: float | None = None, expert_bytes: int | None = None, seed: int = 0,
           show_progress: bool = False) -> dict:
    """Replays `trace` once; returns the metrics as a JSON-ready dict (see the module docstring).

    Bad values raise ParameterError naming the parameter."""
    num_layers, num_experts, top_k = trace.num_layers, trace.num_experts, trace.top_k
    if collection is not None and (collection.num_layers, collection.num_experts) != (num_layers, num_experts):
        raise ParameterError(
            "{collection} is [{found_layers} layers, {found_experts} experts] but {trace} is [{layers}, {experts}]",
            found_layers=collection.num_layers, found_experts=collection.num_experts, layers=num_layers, experts=num_experts,
        )
    if policy not in POLICIES:
        raise ParameterError.not_one_of("policy", policy, POLICIES)
    capacity = capacity_experts(trace, capacity_fraction)
    if prefetch_per_layer is not None and prefetch_per_layer < 0:
        raise ParameterError("{prefetch_per_layer} must be >= 0, got {value}", value=prefetch_per_layer)
    if expert_bytes is not None and expert_bytes < 1:
        raise ParameterError("{expert_bytes} must be a positive number of bytes, got {value}", value=expert_bytes)
    limit = 0 if prefetch == "none" else top_k if prefetch_per_layer is None else prefetch_per_layer
    future = future_steps(trace) if policy == "belady" else None
    cache_policy = make_policy(policy, num_layers=num_layers, num_experts=num_experts, collection=collection, future=future)
    prefetcher = make_prefetcher(prefetch, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                                 collection=collection, floor=prefetch_floor)
    lookahead, lookahead_source = None, None
    if prefetcher.uses_lookahead:
        if trace.lookahead is not None and lookahead_accuracy is None:
            lookahead, lookahead_source = trace.lookahead, "recorded"
        else:
            lookahead_accuracy = DEFAULT_LOOKAHEAD_ACCURACY if lookahead_accuracy is None else lookahead_accuracy
            lookahead, lookahead_source = simulate_lookahead(trace, lookahead_accuracy, seed), "simulated"
    directory = ExpertDirectory(capacity, cache_policy, num_layers)
    wants_counts = type(cache_policy).on_routing is not CachePolicy.on_routing or not isinstance(prefetcher, NoPrefetcher)
    experts_by_token = np.swapaxes(trace.experts, 0, 1)  # [T, L, k]
    lookahead_by_token = None if lookahead is None else np.swapaxes(lookahead, 0, 1)
    offsets = trace.offsets()
    progress = Progress("replay", len(experts_by_token), "tok", enabled=show_progress)
    start = time.perf_counter()
    for s in range(trace.num_sequences):
        task = None if trace.tasks is None else trace.tasks[s]
        cache_policy.on_sequence_start(task)
        prefetcher.on_sequence_start(task)
        for t in range(offsets[s], offsets[s + 1]):
            rows = experts_by_token[t]
            needed_rows = [[e for e in row if e < num_experts] for row in rows.tolist()]
            counts = eam_counts(rows[:, None], num_experts) if wants_counts else None  # [L, E] of this token
            guesses = None if lookahead_by_token is None else eam_counts(lookahead_by_token[t][:, None], num_experts)
            for layer in range(num_layers):
                if counts is not None:
                    cache_policy.on_routing(layer, counts[layer])
                _, misses = directory.begin_layer(layer, needed_rows[layer])
                for key in misses:
                    directory.admit(key)
                if counts is not None:
                    ahead = guesses[layer + 1] if guesses is not None and layer + 1 < num_layers else None
                    prefetcher.observe(layer, counts[layer], ahead)
                    if limit:
                        prefetch_into(directory, prefetcher.predict(layer), limit)
                directory.end_layer()
        progress.advance(offsets[s + 1] - offsets[s])
    progress.close()
    total = directory.total
    moved = total.misses + total.prefetch_issued
    result = {
        "policy": policy,
        "prefetch": prefetch,
        "capacity_fraction": capacity_fraction,
        "capacity_experts": capacity,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "sequences": trace.num_sequences,
        "tokens": int(trace.seq_lens.sum()),
        "activations": total.activations,
        "hits": total.hits,
        "misses": total.misses,
        "hit_rate": total.hit_rate,
        "evictions": total.evictions,
        "prefetch_per_layer": limit,
        "prefetch_floor": getattr(prefetcher, "min_probability", None),
        "prefetch_issued": total.prefetch_issued,
        "prefetch_used": total.prefetch_used,
        "prefetch_wasted": total.prefetch_wasted,
        "prefetch_precision": total.prefetch_precision,
        "prefetch_recall": total.prefetch_recall,
        "experts_moved": moved,
        "collection_size": 0 if collection is None else len(collection),
        "replay_s": round(time.perf_counter() - start, 3),
    }
    if expert_bytes is not None:
        result["bytes_moved"] = moved * expert_bytes
    if lookahead_source is not None:
        result["lookahead_source"] = lookahead_source
        result["lookahead_accuracy"] = lookahead_accuracy
    return result


def parse_range(text: str | None, count: int, flag: str) -> tuple[int, int]:
    """'A:B' (either side may be empty; negative counts from the end) -> (start, stop) within [0, count]."""
    if text is None:
        return 0, count
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise MoejaxError(f"{flag} must be A:B (sequence indices), got {text!r}") from None
    start, stop, _ = slice(start, stop).indices(count)
    if start >= stop:
        raise MoejaxError(f"{flag} {text} selects no sequences of {count}")
    return start, stop


def check_plot_path(path: str | Path) -> None:
    """Refuses, before any work is done, a plot that could not be written: into a missing or unwritable
    directory, over a directory, or without matplotlib."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise MoejaxError(f"{path}: cannot write the plot there: {folder} is not a directory")
    if path.is_dir():
        raise MoejaxError(f"{path}: cannot write the plot there: it is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MoejaxError(f"{path}: cannot write the plot there: {folder} is not writable")
    _pyplot()


def _pyplot():
    """matplotlib.pyplot, drawing to files only (the Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoejaxError("plotting needs matplotlib: pip install 'moejax[plot]'") from None
    return plt


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "") -> None:
    """Writes a PNG of hit rate against cache capacity, one line per label: points (capacity fraction, hit rate)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot([100 * x for x in xs], [100 * y for y in ys], marker="o", label=label)
    ax.set_xlabel("cache capacity (% of all experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MoejaxError(f"{path}: cannot write the plot ({err.strerror or err})") from None
    finally:
        plt.close(fig)
