"""The policy lab: replays routing traces through the engine's expert cache, with no model.

The replay runs the engine's own cache code, `offload.device_cache` driven by `offload.replay` (on the CPU
backend), and its host side, `offload.manager.OffloadManager`: one cache shared by all MoE layers, the same
policies, prefetchers and schedule, so its counts are the engine's on the same routing. The sequences run
one after the other as the engine's `generate` runs them: a trace that records prompt lengths
(`prompt_lens`) replays each prompt as one step (in chunks, as the engine), then one step per new token;
without them every token is its own step, the first as a one-token prompt (decode order).

Policies: lru, lfu, fifo, lifo (the device's counters), activation (the `priority` policy with the
manager's activation scores) and belady (Belady's MIN: the `priority` policy with tables from the known
future, `offload.replay.BeladyFuture`). Prefetchers as in the engine: `lookahead` installs up to
`prefetch_per_layer` of the next layer's guessed experts after each layer (the trace's recorded guess, or a
simulated one); `trace` stages up to `prefetch_per_step` of the manager's picks, fetched when the next step
begins; `trace+lookahead` both. Only the trace prefetchers read the cache after each step (they stage
experts that are not resident), so only they need one call per step; otherwise the replay runs many steps
per call.

Metrics: hit_rate = hits / activations (activations: distinct experts needed per layer step; a
prefetched expert that is used counts as a hit); prefetch_precision = used / issued;
prefetch_recall = used / (used + misses), the share of would-be misses the prefetcher covered;
experts_moved = misses + prefetches issued + streamed (times expert_bytes: bytes_moved); streamed: the experts a
layer step carries past its misses when it copies its whole layer, from `whole_layer_from` misses (the engine's
default threshold, `device_cache.whole_layer_from`; an engine on a GPU measures its own).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import jax
import numpy as np

from moejax.errors import MoejaxError, ParameterError, plural
from moejax.offload import device_cache as dc
from moejax.offload.config import OffloadConfig
from moejax.offload.manager import OffloadManager
from moejax.offload.replay import BeladyFuture, Replayer, prefill_chunk_tokens, schedule
from moejax.offload.stats import experts_moved
from moejax.progress import Progress
from moejax.routing.eams import EAMCollection
from moejax.routing.traces import RoutingTrace

POLICIES = ("lru", "lfu", "fifo", "lifo", "activation", "belady")

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


def distinct_rows(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """int32 [L, T, k]: each token's experts at each layer with repeats (which a router never picks, but a
    hand-made file may hold) replaced by num_experts (none), as the engine counts a token's expert once."""
    ids = np.sort(experts.astype(np.int32), axis=-1)
    ids[..., 1:][ids[..., 1:] == ids[..., :-1]] = num_experts
    return ids


def replay(trace: RoutingTrace, *, capacity_fraction: float, policy: str, prefetch: str = "none",
           prefetch_per_layer: int | None = None, prefetch_per_step: int | None = None,
           prefetch_floor: float | None = None, collection: EAMCollection | None = None,
           lookahead_accuracy: float | None = None, expert_bytes: int | None = None, seed: int = 0,
           predicted: list[np.ndarray] | None = None, show_progress: bool = False) -> dict:
    """Replays `trace` once; returns the metrics as a JSON-ready dict (see the module docstring).

    predicted: for `prefetch` "predictor", each sequence's per-token expert probabilities [T_s, L, E]
    (`predictor_probabilities`); the predictor stages up to `prefetch_per_step` of the next step's
    likeliest experts when it begins.

    collection: the EAM collection the activation policy and the trace prefetcher start from (copied: the
    replayed sequences join the copy, as they would join the engine's). Bad values raise ParameterError
    naming the parameter."""
    num_layers, num_experts, top_k = trace.num_layers, trace.num_experts, trace.top_k
    if collection is not None and (collection.num_layers, collection.num_experts) != (num_layers, num_experts):
        raise ParameterError(
            "{collection} is [{found_layers} layers, {found_experts} experts] but {trace} is [{layers}, {experts}]",
            found_layers=collection.num_layers, found_experts=collection.num_experts, layers=num_layers, experts=num_experts,
        )
    if policy not in POLICIES:
        raise ParameterError.not_one_of("policy", policy, POLICIES)
    if prefetch == "predictor":
        if predicted is None:
            raise ParameterError("{prefetch} predictor needs a predictor ({predicted})")
        if prefetch_per_layer is not None:
            raise ParameterError("{prefetch_per_layer} applies to the lookahead prefetchers, not the predictor")
    else:
        OffloadConfig(mode="cached", cache_policy=None if policy == "belady" else policy, prefetch=prefetch,
                      prefetch_per_layer=prefetch_per_layer, prefetch_per_step=prefetch_per_step,
                      prefetch_floor=prefetch_floor)  # the engine's checks of the prefetch options
    capacity = capacity_experts(trace, capacity_fraction)
    if seed < 0:
        raise ParameterError("{seed} must be >= 0 (got {value})", value=seed)
    if expert_bytes is not None and expert_bytes < 1:
        raise ParameterError("{expert_bytes} must be a positive number of bytes, got {value}", value=expert_bytes)
    cpu = jax.devices("cpu")[0]
    manager = OffloadManager(
        num_layers, num_experts, top_k, policy="lru" if policy == "belady" else policy, prefetch=prefetch,
        staged_per_step=2 * top_k if prefetch_per_step is None else prefetch_per_step, prefetch_floor=prefetch_floor,
        collection=copy.deepcopy(collection), device=cpu)
    lookahead = (top_k if prefetch_per_layer is None else min(prefetch_per_layer, num_experts)) if manager.lookahead else 0
    if lookahead_accuracy is not None and not manager.lookahead:
        raise ParameterError("{lookahead_accuracy} simulates the lookahead: it applies to {prefetch} lookahead or "
                             "trace+lookahead, not {name!r}", name=prefetch)
    guesses, lookahead_source = None, None
    if manager.lookahead:
        if trace.lookahead is not None and lookahead_accuracy is None:
            recorded, lookahead_source = trace.lookahead, "recorded"
        else:
            lookahead_accuracy = DEFAULT_LOOKAHEAD_ACCURACY if lookahead_accuracy is None else lookahead_accuracy
            recorded, lookahead_source = simulate_lookahead(trace, lookahead_accuracy, seed), "simulated"
        guesses = np.concatenate([recorded[1:], np.full_like(recorded[:1], -1)]).astype(np.int32)  # row m: layer m + 1's
    experts = distinct_rows(trace.experts, num_experts)
    prompt_lens = replayed_prompt_lens(trace)
    chunk = prefill_chunk_tokens(capacity, num_experts, top_k)
    bounds = schedule(trace.seq_lens, prompt_lens, chunk)
    progress = Progress("replay", experts.shape[1], "tok", enabled=show_progress)
    start = time.perf_counter()
    future = BeladyFuture(experts, bounds, num_experts) if policy == "belady" else None
    whole_from = dc.whole_layer_from(num_experts, capacity)
    replayer = Replayer(num_layers, num_experts, capacity, manager, lookahead=lookahead, prefill_chunk=chunk,
                        future=future, whole_layer_from=whole_from)
    if manager.learns:
        offsets = trace.offsets()
        for s in range(trace.num_sequences):
            tokens = slice(int(offsets[s]), int(offsets[s + 1]))
            replayer.sequence(experts[:, tokens], int(prompt_lens[s]), None if guesses is None else guesses[:, tokens],
                              None if trace.tasks is None else trace.tasks[s],
                              None if prefetch != "predictor" else predicted[s])
            progress.advance(int(trace.seq_lens[s]))
    else:
        replayer.run(experts, bounds, guesses, advance=progress.advance)
    total = dict(zip(dc.COUNTERS, replayer.counters().sum(axis=0).tolist(), strict=True))
    progress.close()
    hits, misses, used, issued = total["hits"], total["misses"], total["prefetch_used"], total["prefetch_issued"]
    moved = experts_moved(total)
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
        "steps": len(bounds) - 1,
        "activations": total["activations"],
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / total["activations"] if total["activations"] else 0.0,
        "evictions": total["evictions"],
        "prefetch_per_layer": lookahead,
        "prefetch_per_step": manager.staged_per_step,
        "prefetch_floor": (manager.predictor_floor if prefetch == "predictor" else
                           None if manager.prefetcher is None else manager.prefetcher.min_probability),
        "prefetch_issued": issued,
        "prefetch_staged": total["prefetch_staged"],
        "prefetch_used": used,
        "prefetch_wasted": total["prefetch_wasted"],
        "prefetch_precision": used / issued if issued else 0.0,
        "prefetch_recall": used / (used + misses) if used + misses else 0.0,
        "whole_layer_from": whole_from,
        "streamed": total["streamed"],
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


def named_predictor(name: str, data):
    """The baseline predictor `name` reads from the trace itself ('lookahead': its recorded guess, the first
    MoE layer falling back to the trace's own expert frequency), fitted on `data`; None for any other name
    (a predictor directory)."""
    from moejax.predictors.base import LookaheadPredictor

    if name != LookaheadPredictor.name or Path(name).exists():
        return None
    predictor = LookaheadPredictor(data.trace.num_layers, data.trace.num_experts, data.trace.top_k)
    predictor.fit(data)
    return predictor


def replayed_prompt_lens(trace) -> np.ndarray:
    """int [sequences]: the prompt tokens the replay runs as prompt steps: the trace's, or without them one
    (every later token its own step, in decode order)."""
    return trace.prompt_lens if trace.prompt_lens is not None else np.minimum(trace.seq_lens, 1)


def predictor_probabilities(predictor, data, show_progress: bool = False) -> list[np.ndarray]:
    """Per sequence of `data` (`predictors.data.TraceData`), the probabilities [T_s, L, E] the predictor gives
    its tokens before their steps run (`predictors.base.known_token_probabilities`): the prompt whole, then
    each generated token from the tokens before it (the next-token prediction, as the engine's run-ahead
    gives it). The prompts are those the replay runs (`replayed_prompt_lens`): a trace without prompt
    lengths is replayed token by token in decode order, so its tokens after the first are predicted as
    generated ones."""
    from moejax.predictors.base import known_token_probabilities

    predictor.check_fits(data)
    trace = data.trace
    prompt_lens = replayed_prompt_lens(trace)
    progress = Progress("predict", trace.num_sequences, enabled=show_progress)
    out = []
    for s, (tokens, experts, _, lookahead) in enumerate(data.sequences()):
        out.append(known_token_probabilities(predictor, tokens, int(prompt_lens[s]), experts, lookahead))
        progress.advance()
    progress.close()
    return out


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
    directory, over a directory or a file other than a PNG (an earlier plot), or without matplotlib."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise MoejaxError(f"{path}: cannot write the plot there: {folder} is not a directory")
    if path.is_dir():
        raise MoejaxError(f"{path}: cannot write the plot there: it is a directory")
    if path.exists() and not _is_png(path):
        raise MoejaxError(f"{path}: exists and is not a PNG; --plot replaces only an earlier plot (choose another path)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MoejaxError(f"{path}: cannot write the plot there: {folder} is not writable")
    _pyplot()


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


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
