"""Records the routing of a generation, per sequence, token by token, as the engine runs it.

The `ExpertRunner` hands every MoE layer step's routing (ids [N, k] with N = batch rows x tokens)
to `RoutingRecorder.record`; the recorder keeps, for each real sequence of the batch, the experts of
each of its tokens at each MoE layer, and optionally what the next MoE layer's router predicted
one layer early (the lookahead prefetcher's guess): per-token routing traces, from which
`trace.eam_counts` makes the sequences' Expert Activation Matrices.

Padding rows and padding ids are dropped: an id >= num_experts marks a pair that went to no expert.
Layers that saw different numbers of tokens (an encoder-decoder model's encoder and decoder layers)
are padded to the longest with id num_experts in `experts`.
"""

from __future__ import annotations

import numpy as np

from moejax.routing.traces import NO_PREDICTION



class RoutingRecorder:
    def __init__(self, num_moe_layers: int, num_experts: int, top_k: int):
        self.num_moe_layers, self.num_experts, self.top_k = num_moe_layers, num_experts, top_k
        self.start(1, 0)
        self.active = False

    def start(self, batch: int, sequences: int, tasks=None) -> None:
        """A new generation: `batch` rows, of which the first `sequences` are real prompts."""
        self.batch, self.sequences = batch, sequences
        self.tasks = list(tasks) if tasks is not None else [None] * sequences
        shape = lambda: [[[] for _ in range(self.num_moe_layers)] for _ in range(sequences)]  # noqa: E731
        self._experts, self._lookahead = shape(), shape()
        self.active = True

    def stop(self) -> None:
        """Ends the generation: later steps are not recorded; what was recorded stays readable."""
        self.active = False

    def record(self, layer: int, ids: np.ndarray, valid_rows: np.ndarray | None, lookahead: np.ndarray | None = None) -> None:
        """ids [N, k]: the experts of every row at MoE layer `layer`; valid_rows bool [N] (None: rows
        with at least one real expert); lookahead [N, k]: the next MoE layer's router on these rows."""
        if not self.active:
            return
        k = ids.shape[-1]
        rows = ids.reshape(self.batch, -1, k)
        valid = (rows < self.num_experts).any(-1) if valid_rows is None else valid_rows.reshape(self.batch, -1)
        ahead = None if lookahead is None else lookahead.reshape(self.batch, -1, lookahead.shape[-1])
        for b in range(self.sequences):
            self._experts[b][layer].append(rows[b][valid[b]])
            if ahead is not None and layer + 1 < self.num_moe_layers:
                self._lookahead[b][layer + 1].append(ahead[b][valid[b]])

    def routing(self, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sequence b's routing: experts int16 [L, T, k] (T tokens in order; id num_experts pads layers
        that saw fewer tokens) and lookahead int16 [L, T, k] (NO_PREDICTION where nothing was predicted)
        or None when no lookahead was recorded."""
        per_layer = [np.concatenate(steps) if steps else np.zeros((0, self.top_k), np.int16) for steps in self._experts[b]]
        tokens = max(len(a) for a in per_layer)
        experts = np.full((self.num_moe_layers, tokens, self.top_k), self.num_experts, np.int16)
        for layer, a in enumerate(per_layer):
            experts[layer, : len(a)] = a
        if not any(self._lookahead[b]):
            return experts, None
        lookahead = np.full_like(experts, NO_PREDICTION)
        for layer, steps in enumerate(self._lookahead[b]):
            if steps:
                a = np.concatenate(steps)
                lookahead[layer, : len(a)] = a
        return experts, lookahead


def expert_token_counts(ids: np.ndarray, valid_rows: np.ndarray | None, num_experts: int) -> np.ndarray:
    """Tokens routed to each expert: ids [N, k], valid_rows bool [N] or None -> int64 [num_experts]."""
    chosen = ids if valid_rows is None else ids[valid_rows]
    chosen = chosen[(chosen >= 0) & (chosen < num_experts)]
    return np.bincount(chosen.reshape(-1), minlength=num_experts)[:num_experts]
