"""SiDA's approximate mode: the predicted experts replace the routers' choice. Outputs change: it is an
approximation, measured here by perplexity against exact routing, and by the expert memory it never loads.

`PredictedRouting` is an `Engine.routing_override`: every token of a prompt goes to the k experts the
predictor finds likeliest for it (weighted by the router's own probabilities of them, renormalised, as any
override), chosen among an expert budget: per MoE layer, the `budget` share of the experts with the largest
predicted use over the whole prompt (SiDA's per-batch hash table); the others are never needed, so never
loaded.
"""

from __future__ import annotations

import numpy as np

from moejax.errors import MoejaxError
from moejax.predictors.base import Predictor, id_strings


class PredictedRouting:
    """Routing override (module docstring). The engine tells it each sequence's prompt (`prompt`, when the
    prefill starts) and new tokens (`extend`); `Engine.logits` callers give the prompt themselves (slot None:
    any slot). A prompt token's experts come from the whole prompt; a generated token's from the tokens the
    host has when its step is dispatched: up to and including it, if it has been read; else the predictor's
    next-token prediction from the tokens read (`Predictor.predict_next`), or where it has none the last read
    token's prediction standing for it."""

    approximate = True  # outputs may differ from the model's: the server reports it (`ServingLoop.approximate_routing`)

    def __init__(self, predictor: Predictor, top_k: int, budget: float = 1.0):
        if not 0 < budget <= 1:
            raise MoejaxError(f"the expert budget must be a share in (0, 1], got {budget}")
        self.predictor, self.top_k, self.budget = predictor, top_k, budget
        self._sequences: dict = {}  # slot -> {"tokens", "prompt_len", "allowed" [L, E], "chosen" [L, T, k]}
        self.saved: list[float] = []  # per prompt: the share of all experts its prompt never used

    def _top(self, probabilities: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """int32 [L, T, k]: the k likeliest allowed experts of probabilities [T, L, E]."""
        scores = np.where(allowed[None], probabilities, -1.0)
        return np.argsort(-scores, axis=-1, kind="stable")[..., : self.top_k].transpose(1, 0, 2).astype(np.int32)

    def prompt(self, token_ids, slot=None) -> None:
        tokens = id_strings(token_ids)
        probabilities = self.predictor.predict(tokens)  # [T, L, E]
        keep = max(self.top_k, int(round(self.budget * probabilities.shape[-1])))
        ranked = np.argsort(-probabilities.sum(axis=0), axis=-1, kind="stable")[:, :keep]  # [L, keep]
        allowed = np.zeros(probabilities.shape[1:], bool)
        np.put_along_axis(allowed, ranked, True, axis=-1)
        chosen = self._top(probabilities, allowed)
        used = np.zeros_like(allowed)
        used[np.arange(len(allowed))[:, None, None], chosen] = True
        self.saved.append(1.0 - float(used.mean()))
        self._sequences[slot] = {"tokens": tokens, "prompt_len": len(tokens), "allowed": allowed, "chosen": chosen}

    def extend(self, slot, token: int) -> None:
        self._sequences[slot]["tokens"].append(str(int(token)))

    def _experts(self, slot, position: int) -> np.ndarray:
        """int32 [L, k] for one token position of `slot`'s sequence."""
        sequence = self._sequences.get(slot, self._sequences.get(None))
        if sequence is None:
            raise MoejaxError("predicted routing: give the prompt first (PredictedRouting.prompt)")
        if position < sequence["prompt_len"]:
            return sequence["chosen"][:, position]
        known = sequence["tokens"][: position + 1]
        ahead = self.predictor.predict_next(known) if len(known) <= position else None
        if ahead is not None:  # the token itself is not read yet
            return self._top(ahead[None], sequence["allowed"])[:, 0]
        return self._top(self.predictor.predict(known)[-1:], sequence["allowed"])[:, 0]

    def __call__(self, slots, positions) -> np.ndarray:
        """[L, rows * T, k] for a step's rows (slot -1: padding) and positions [rows, T] (a prompt step's padding
        positions repeat its last token's experts)."""
        positions = np.asarray(positions)
        out = np.zeros((self.predictor.num_layers, positions.size, self.top_k), np.int32)
        unread = int(positions.shape[1] == 1)  # a decode step's token may be past the tokens read
        for row, slot in enumerate(slots):
            if slot < 0:
                continue
            sequence = self._sequences.get(slot, self._sequences.get(None))
            last = max(sequence["prompt_len"], len(sequence["tokens"])) - 1 + unread if sequence else 0
            for t, position in enumerate(positions[row]):
                out[:, row * positions.shape[1] + t] = self._experts(slot, min(int(position), last))
        return out


def perplexity(engine, texts: list[list[int]], routing: PredictedRouting | None = None) -> float:
    """exp(mean next-token negative log-likelihood) of token sequences, each prefilled alone (`Engine.logits`),
    with the model's routing or `routing` in its place."""
    engine.routing_override = routing
    total, count = 0.0, 0
    try:
        for ids in texts:
            if routing is not None:
                routing.prompt(ids)
            logits = engine.logits([ids])[0][:-1].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(logits).sum(axis=-1))
            total += float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            count += len(ids) - 1
    finally:
        engine.routing_override = None
    return float(np.exp(total / max(count, 1)))
