"""`moejax trace`: run a prompt file through the engine and keep the experts every token activated.

Writes the output directory all at once (built under a temporary name, then renamed), with three files:
  eams.npz      the activation-matrix collection (one EAM [MoE layers, experts] per prompt, with its
                task), which `--prefetch trace`, `--cache-policy activation` and `moejax lab --fit` read;
  routing.npz   per-token routing: experts [MoE layers, tokens, k] of all sequences concatenated, with
                seq_lens, prompt_lens and token_ids (decoder-only models) and tasks (the layout `moejax lab
                --traces` replays, and `moejax train-predictor` learns from), and the lookahead guess of
                every layer (the next MoE layer's router one layer early); with `--router-probs`, the
                router's probability of every chosen expert (router_probs, for distillation);
  summary.json  counts, per-task expert usage, and the lookahead guess's accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError, ParameterError, is_integer, plural
from moejax.jsonl import json_objects
from moejax.outputs import atomic_directory
from moejax.progress import Progress
from moejax.engine.engine import Engine
from moejax.engine.results import GenerationConfig
from moejax.routing.eams import EAMCollection, eam_counts
from moejax.routing.files import EAMS_FILE, ROUTING_FILE
from moejax.routing.traces import NO_PREDICTION, RoutingTrace

SUMMARY_FILE = "summary.json"
TRACE_FILES = (EAMS_FILE, ROUTING_FILE, SUMMARY_FILE)


def read_prompts(path: Path) -> list[tuple[str | list[int], str | None]]:
    """(prompt, task) pairs of a JSONL file: one object a line with `prompt` (text) or `prompt_ids`
    (token ids) and an optional `task`."""
    prompts = []
    for number, record in json_objects(path, "the prompt file"):
        if "prompt_ids" in record:  # ids, never text: "1,2,3" or true would be read as something else
            prompt = record["prompt_ids"]
            if not (isinstance(prompt, list) and prompt and all(is_integer(t) for t in prompt)):
                raise MoejaxError(f"{path}:{number}: 'prompt_ids' must be a non-empty list of integer token ids, "
                                  f"got {json.dumps(prompt)[:40]}")
        else:
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise MoejaxError(f"{path}:{number}: 'prompt' must be non-empty text (or 'prompt_ids' a list of token ids)")
        task = record.get("task")
        if task is not None and not isinstance(task, str):
            raise MoejaxError(f"{path}:{number}: 'task' must be a string (a task label), got {json.dumps(task)}")
        prompts.append((prompt, task))
    if not prompts:
        raise MoejaxError(f"{path}: no prompts")
    return prompts


def prepare_prompts(engine: Engine, prompts, path: Path, max_new_tokens: int, max_prompt_tokens: int | None = None):
    """Token ids of every prompt, checked before any work: ids within the vocabulary, text only with a
    tokenizer, and each fits the model's positions with `max_new_tokens` (after keeping its first
    `max_prompt_tokens` tokens, when given). Prompts are numbered from 1 in the errors."""
    limit, vocab = getattr(engine, "max_seq_len", engine.cfg.max_position_embeddings), engine.cfg.vocab_size
    if max_new_tokens >= limit:
        raise ParameterError("{max_new_tokens} {max_new} leaves no room for a prompt in a sequence's {limit} positions "
                             "({max_seq_len})", max_new=max_new_tokens, limit=limit)
    prepared = []
    for n, (prompt, task) in enumerate(prompts, 1):
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise MoejaxError(f"{path}: prompt {n} is text, but the checkpoint has no tokenizer.json: give 'prompt_ids'")
            ids = engine.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise MoejaxError(f"{path}: prompt {n} has no tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise MoejaxError(f"{path}: prompt {n}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        ids = ids[:max_prompt_tokens]
        if len(ids) + max_new_tokens > limit:
            raise ParameterError("{where}: prompt {n} has {tokens}; with {max_new} new tokens that exceeds the model's "
                                 "{limit} positions (set {max_prompt_tokens} to {fit})", where=path, n=n,
                                 tokens=plural(len(ids), "token"), max_new=max_new_tokens, limit=limit,
                                 fit=limit - max_new_tokens)
        prepared.append((ids, task))
    return prepared


def trace_prompts(
    engine: Engine,
    prompts: Sequence[tuple[str | list[int], str | None]],
    config: GenerationConfig,
    batch_size: int = 1,
    show_progress: bool = True,
) -> tuple[RoutingTrace, EAMCollection, dict]:
    """Generates for every prompt and returns (routing trace, EAM collection, summary)."""
    cfg = engine.cfg
    decoder_only = hasattr(engine, "record_guesses")
    if decoder_only:
        engine.record_guesses()  # the lookahead guess too, to measure it and replay it in the lab
        routing = engine.routing
    else:  # an encoder-decoder model, on the host-routed engine until it moves to the step engine
        engine.executor.runner.record_lookahead = True
        routing = engine.executor.routing
    num_moe = len(cfg.moe_layer_ids)
    collection = EAMCollection(num_moe, cfg.num_experts, capacity=max(len(prompts), 1))
    experts, lookaheads, seq_lens, prompt_lens, tasks, token_ids = [], [], [], [], [], []
    progress = Progress("trace prompts", len(prompts), enabled=show_progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk_tasks = [task for _, task in chunk]
        result = engine.generate([p for p, _ in chunk], config, tasks=chunk_tasks)
        for b, task in enumerate(chunk_tasks):
            routed, lookahead = routing(b)
            if decoder_only:  # the routed tokens: the prompt, then the new tokens fed back (not the last one)
                prompt_ids = engine.encode(chunk[b][0])[0]
                token_ids.append(np.asarray(prompt_ids + result.tokens[b], np.int32)[: routed.shape[1]])
            experts.append(routed)
            lookaheads.append(lookahead)
            seq_lens.append(routed.shape[1])
            prompt_lens.append(len(chunk[b][0]))
            tasks.append(task)
            collection.add(eam_counts(routed, cfg.num_experts), task, experts=routed)
        progress.advance(len(chunk))
    progress.close()
    lookahead = None
    if all(a is not None for a in lookaheads):
        lookahead = np.concatenate(lookaheads, axis=1)
    trace = RoutingTrace(
        experts=np.concatenate(experts, axis=1), seq_lens=np.asarray(seq_lens, np.int64), num_experts=cfg.num_experts,
        tasks=tasks, lookahead=lookahead, prompt_lens=np.asarray(prompt_lens, np.int64) if decoder_only else None,
        token_ids=np.concatenate(token_ids) if decoder_only else None,
    )
    return trace, collection, summarize(trace, collection)


def router_probabilities(checkpoint_path: Path, token_ids: np.ndarray, seq_lens: np.ndarray,
                         experts: np.ndarray) -> np.ndarray:
    """float32 [L, T, k]: the router's score (`moe.router_scores`: softmax over all experts, or a sigmoid) of
    each expert in `experts` [L, T, k] (ids >= num_experts: 0), from a teacher-forced pass of the whole-model
    program over each sequence's tokens (`token_ids` [T], sequences of `seq_lens`). Every expert is loaded: for models that fit
    in memory (the step programs return only the chosen ids, not their weights)."""
    import jax

    from moejax import checkpoint
    from moejax.engine.buckets import next_power_of_two
    from moejax.models.decoder import empty_kv_caches, forward_with_router_logits
    from moejax.models.moe import router_scores

    cfg = checkpoint.load_config(checkpoint_path)
    weights = jax.device_put((checkpoint.load_globals(checkpoint_path),
                              [checkpoint.load_layer(checkpoint_path, i) for i in range(cfg.num_layers)],
                              [checkpoint.load_stacked_experts(checkpoint_path, cfg, i) if cfg.moe_layers[i] else None
                               for i in range(cfg.num_layers)]))

    @jax.jit
    def scored_routers(weights, tokens):
        positions = jax.numpy.arange(tokens.shape[1], dtype=np.int32)[None]
        _, _, logits = forward_with_router_logits(cfg, *weights, tokens, empty_kv_caches(cfg, 1, tokens.shape[1]),
                                                  positions)
        return jax.numpy.stack([router_scores(x, cfg.scoring_func) for x in logits])  # [L, T, E]

    out = np.zeros(experts.shape, np.float32)
    start = 0
    for length in seq_lens.tolist():
        tokens = np.zeros((1, next_power_of_two(max(length, 1), 16)), np.int32)
        tokens[0, :length] = token_ids[start : start + length]
        probs = np.asarray(scored_routers(weights, tokens))[:, :length]
        ids = experts[:, start : start + length].astype(np.int64)
        valid = ids < cfg.num_experts
        out[:, start : start + length] = np.where(valid, np.take_along_axis(probs, np.where(valid, ids, 0), -1), 0.0)
        start += length
    return out


def lookahead_accuracy(experts: np.ndarray, lookahead: np.ndarray, num_experts: int) -> float:
    """Share of the experts actually used at MoE layers >= 1 that the one-layer-early router guessed.

    experts, lookahead: [L, T, k]; rows of `lookahead` with NO_PREDICTION are not counted."""
    hits = total = 0
    for layer in range(1, experts.shape[0]):
        for actual, guess in zip(experts[layer], lookahead[layer], strict=True):
            actual = set(actual[actual < num_experts].tolist())
            if not actual or (guess == NO_PREDICTION).all():
                continue
            hits += len(actual & set(guess.tolist()))
            total += len(actual)
    return hits / total if total else 0.0


def summarize(trace: RoutingTrace, collection: EAMCollection) -> dict:
    """Counts, the share of tokens each task routes to each expert, and the lookahead accuracy."""
    eams = np.asarray(collection.eams, np.float64)
    usage = {}
    for task in sorted({t for t in trace.tasks if t is not None}):
        rows = [i for i, t in enumerate(collection.tasks) if t == task]
        summed = eams[rows].sum(0)
        usage[task] = (summed / np.maximum(summed.sum(-1, keepdims=True), 1)).round(4).tolist()
    summary = {
        "sequences": int(len(trace.seq_lens)),
        "tokens": int(trace.seq_lens.sum()),
        "moe_layers": int(trace.experts.shape[0]),
        "num_experts": int(trace.num_experts),
        "top_k": int(trace.experts.shape[2]),
        "task_expert_share": usage,
    }
    if trace.lookahead is not None and (trace.lookahead != NO_PREDICTION).any():  # one MoE layer: nothing to guess
        summary["lookahead_accuracy"] = lookahead_accuracy(trace.experts, trace.lookahead, trace.num_experts)
    return summary


def is_trace_directory(path: Path) -> bool:
    """Whether `path` holds only what `moejax trace` writes (what `--overwrite` may replace)."""
    return Path(path).is_dir() and all(entry.name in TRACE_FILES for entry in Path(path).iterdir())


TRACE_OUTPUT = ("trace directory", is_trace_directory)


def write_traces(
    out_dir: Path, trace: RoutingTrace, collection: EAMCollection, summary: dict, overwrite: bool = False, inputs=()
) -> None:
    """Writes routing.npz, eams.npz and summary.json as the directory `out_dir`, all at once: built under a
    temporary name and renamed at the end. overwrite: replace an earlier trace directory; inputs: the
    files the trace was made from (checkpoint, prompt file, traces), which `out_dir` may not touch."""
    with atomic_directory(out_dir, overwrite, inputs, TRACE_OUTPUT) as tmp:
        trace.save(tmp / ROUTING_FILE)
        collection.save(tmp / EAMS_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
