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
from moejax.predictors.base import Predictor


class PredictedRouting:
    """Routing override for prompts evaluated one at a time (`Engine.logits`): `prompt(ids)` before each."""

    def __init__(self, predictor: Predictor, top_k: int, budget: float = 1.0):
        if not 0 < budget <= 1:
            raise MoejaxError(f"the expert budget must be a share in (0, 1], got {budget}")
        self.predictor, self.top_k, self.budget = predictor, top_k, budget
        self.chosen: np.ndarray | None = None  # int32 [L, T, k] for the current prompt
        self.saved: list[float] = []  # per prompt: the share of all experts it never used

    def prompt(self, token_ids) -> None:
        probabilities = self.predictor.predict([str(int(t)) for t in token_ids])  # [T, L, E]
        experts = probabilities.shape[-1]
        keep = max(self.top_k, int(round(self.budget * experts)))
        allowed = np.argsort(-probabilities.sum(axis=0), axis=-1, kind="stable")[:, :keep]  # [L, keep]
        mask = np.zeros(probabilities.shape[1:], bool)
        np.put_along_axis(mask, allowed, True, axis=-1)
        scores = np.where(mask[None], probabilities, -1.0)
        self.chosen = np.argsort(-scores, axis=-1, kind="stable")[..., : self.top_k].transpose(1, 0, 2).astype(np.int32)
        used = np.zeros_like(mask)
        used[np.arange(len(mask))[:, None, None], self.chosen] = True
        self.saved.append(1.0 - float(used.mean()))

    def __call__(self, slots, positions) -> np.ndarray:
        """[L, rows * T, k] for the prompt's positions (padding positions repeat the last token's experts)."""
        if self.chosen is None:
            raise MoejaxError("predicted routing: give the prompt first (PredictedRouting.prompt)")
        rows = np.minimum(np.asarray(positions).reshape(-1), self.chosen.shape[1] - 1)
        return self.chosen[:, rows]


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
