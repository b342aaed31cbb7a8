"""Per MoE layer, how likely each expert is to be used next, from the running sequence's counts and a prior."""

from __future__ import annotations

import numpy as np


class ExpertUsage:
    """Per MoE layer, the probability p(l, e) that the next step of layer l uses expert e.

        q(l, e) = (c(l, e) + a * m(l) * prior(l, e)) / (C(l) + a * m(l)),   p = clip(m(l) * q, 1e-4, 1)

    c: the running sequence's token counts of layer l, older steps weighted down by `decay` per step
    of that layer (1: plain counts; below 1 favours the recent tokens: temporal locality); C(l) =
    sum_e c(l, e); m(l): experts a step of layer l uses, on average over everything observed (a
    decode step uses top-k); prior: expert shares [E] of layer l, given by the caller (they sum to
    1); a = `prior_tokens`, the prior's weight in tokens.
    """

    def __init__(self, num_layers: int, num_experts: int, prior_tokens: float = 4.0, decay: float = 1.0):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.prior_tokens, self.decay = prior_tokens, decay
        self.step_experts = np.zeros(num_layers)  # experts used, summed over steps
        self.steps = np.zeros(num_layers)
        self.reset()

    def reset(self) -> None:
        """A new sequence: forget its counts (m, learned across sequences, stays)."""
        self.counts = np.zeros((self.num_layers, self.num_experts))

    def observe(self, layer: int, counts: np.ndarray) -> None:
        """Adds the token counts [E] of one step of MoE layer `layer`."""
        counts = np.asarray(counts)
        if self.decay != 1.0:
            self.counts[layer] *= self.decay
        self.counts[layer] += counts
        self.step_experts[layer] += np.count_nonzero(counts)
        self.steps[layer] += 1

    def observe_step(self, counts: np.ndarray) -> None:
        """Adds the token counts [L, E] of one step of every MoE layer that ran in it (had tokens), as `observe` of
        each such layer."""
        ran = counts.any(axis=1)
        if self.decay != 1.0:
            self.counts[ran] *= self.decay
        self.counts += counts
        self.step_experts += np.count_nonzero(counts, axis=1)
        self.steps += ran

    def experts_per_step(self, layer: int) -> float:
        """m(layer): experts a step of MoE layer `layer` uses, on average (1 before any step)."""
        return self.step_experts[layer] / self.steps[layer] if self.steps[layer] else 1.0

    def probabilities(self, layer: int, prior: np.ndarray) -> np.ndarray:
        """float [E]: p(layer, e), given the prior shares [E] of that layer."""
        return self._probabilities(self.counts[layer], self.experts_per_step(layer), prior)

    def all_probabilities(self, prior: np.ndarray) -> np.ndarray:
        """float [L, E]: p(l, e) of every layer, given the prior shares [L, E]."""
        m = np.where(self.steps > 0, self.step_experts / np.maximum(self.steps, 1), 1.0)[:, None]
        return self._probabilities(self.counts, m, prior)

    def _probabilities(self, counts: np.ndarray, m, prior: np.ndarray) -> np.ndarray:
        """The class docstring's p, of counts [..., E] with m [..., 1] (or a number)."""
        weight = self.prior_tokens * m
        q = (counts + weight * prior) / (counts.sum(axis=-1, keepdims=True) + weight)
        return np.minimum(np.maximum(m * q, 1e-4), 1.0)  # np.clip, without its Python wrapper's cost
