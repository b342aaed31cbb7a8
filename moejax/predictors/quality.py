"""How well a predictor names the experts tokens use: top-k recall and precision per MoE layer."""

from __future__ import annotations

import numpy as np

from moejax.predictors.base import Predictor, known_token_probabilities, next_token_rows, used_mask
from moejax.predictors.data import TraceData
from moejax.progress import Progress


def top_k_quality(predictor: Predictor, data: TraceData, k: int | None = None, show_progress: bool = False) -> dict:
    """The predictor's k likeliest experts of every (token, MoE layer) against the experts it used.

    recall(l) = hits / experts used at layer l, precision(l) = hits / (k * tokens that used any there),
    summed over all tokens of `data`; k defaults to the trace's experts per token. Returns a JSON-ready
    dict: predictor_recall, predictor_precision (means over MoE layers), their per-layer lists, k, tokens.

    Each token is predicted from what is known before its step runs (`known_token_probabilities`: the whole
    prompt, then the tokens before a generated one; a trace without prompt lengths is all prompt), or, for
    the predictors that read the recorded routing, from that (earlier tokens' experts, its lookahead guess).

    next_token_recall (mean over MoE layers, and per layer): the same for every token after a sequence's
    first, predicted from the tokens before it only, as a decode step's run-ahead must (`predict_next`, or
    where the predictor has none, the token before's own prediction standing in); not for the predictors
    that read the recorded routing or later tokens."""
    predictor.check_fits(data)
    trace = data.trace
    prompt_lens = trace.prompt_lens if trace.prompt_lens is not None else trace.seq_lens
    k = trace.top_k if k is None else k
    hits, next_hits = np.zeros(trace.num_layers), np.zeros(trace.num_layers)
    used_total, next_used = np.zeros(trace.num_layers), np.zeros(trace.num_layers)
    routed = np.zeros(trace.num_layers)
    progress = Progress(f"evaluate {predictor.name}", trace.num_sequences, enabled=show_progress)
    for s, (tokens, experts, _, lookahead) in enumerate(data.sequences()):
        probabilities = known_token_probabilities(predictor, tokens, int(prompt_lens[s]), experts, lookahead)
        top = np.argpartition(-probabilities, k - 1, axis=-1)[..., :k]
        used = used_mask(experts, trace.num_experts)
        hits += np.take_along_axis(used, top, axis=-1).sum(axis=(0, 2))
        used_total += used.sum(axis=(0, 2))
        routed += used.any(axis=-1).sum(axis=0)
        if not (predictor.reads_routing or predictor.reads_later_tokens) and len(tokens) > 1:
            whole_prompt = probabilities if prompt_lens[s] >= len(tokens) else None  # = predict(tokens)
            ahead = next_token_rows(predictor, tokens, whole_prompt)[:-1]  # row t: token t + 1
            top = np.argpartition(-ahead, k - 1, axis=-1)[..., :k]
            next_hits += np.take_along_axis(used[1:], top, axis=-1).sum(axis=(0, 2))
            next_used += used[1:].sum(axis=(0, 2))
        progress.advance()
    progress.close()
    recall = hits / np.maximum(used_total, 1)
    precision = hits / np.maximum(k * routed, 1)
    out = {
        "predictor": predictor.name,
        "k": k,
        "tokens": int(trace.experts.shape[1]),
        "predictor_recall": float(recall.mean()),
        "predictor_precision": float(precision.mean()),
        "per_layer_recall": [round(float(r), 4) for r in recall],
        "per_layer_precision": [round(float(p), 4) for p in precision],
    }
    if next_used.any():
        next_recall = next_hits / np.maximum(next_used, 1)
        out.update(next_token_recall=float(next_recall.mean()),
                   per_layer_next_token_recall=[round(float(r), 4) for r in next_recall])
    return out
