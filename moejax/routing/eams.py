"""Expert Activation Matrices (EAMs): per-sequence token counts [MoE layers, experts], a bounded collection
of them, and matching a running sequence against it (MoE-Infinity's sequence-level traces).

An EAM of a sequence is an int32 matrix [MoE layers, experts]: entry (l, e) is how many of the sequence's
tokens MoE layer l routed to expert e. Expert ids >= num_experts in routing arrays mark dropped (token,
slot) pairs and are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.routing.files import COLLECTION_CONTENTS, EAMS_FILE, ROUTING_FILE, read_npz, trace_file, write_npz_atomic

COLLECTION_FORMAT = 1


def eam_counts(experts: np.ndarray, num_experts: int, valid: np.ndarray | None = None) -> np.ndarray:
    """The EAM of one sequence: int32 [L, E] token counts.

    experts: int [L, T, k] expert ids chosen per MoE layer, token and slot (ids >= num_experts are
    dropped pairs); valid: bool [T] tokens to count, or None for all.
    """
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise MoejaxError(f"experts must be [layers, tokens, k], got shape {experts.shape}")
    num_layers, num_tokens, _ = experts.shape
    if valid is not None:
        valid = np.asarray(valid, bool)
        if valid.shape != (num_tokens,):
            raise MoejaxError(f"valid must be bool [{num_tokens}], got shape {valid.shape}")
        experts = experts[:, valid]
    ids = experts.reshape(num_layers, -1).astype(np.int64)
    keep = (ids >= 0) & (ids < num_experts)
    flat = (np.arange(num_layers)[:, None] * num_experts + ids)[keep]
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts).astype(np.int32)


def layer_transitions(experts: np.ndarray, num_experts: int, depth: int) -> np.ndarray:
    """int64 [depth, L, E, E]: entry (d-1, l, a, b) counts tokens routed to expert a at MoE layer l - d
    and to expert b at layer l (zero for l < d). experts: int [L, T, k]; ids >= num_experts are ignored."""
    experts = np.asarray(experts).astype(np.int64)
    num_layers, num_tokens, _ = experts.shape
    out = np.zeros((depth, num_layers, num_experts, num_experts), np.int64)
    recent: list[np.ndarray] = []  # token-by-expert counts [T, E] of the last `depth` layers, newest last
    for layer in range(num_layers):
        ids = experts[layer]
        keep = (ids >= 0) & (ids < num_experts)
        rows = np.arange(num_tokens)[:, None] * num_experts
        onehot = np.bincount((rows + ids)[keep], minlength=num_tokens * num_experts).reshape(num_tokens, num_experts)
        onehot = onehot.astype(np.float64)  # products of small integer matrices in float64 are exact
        for d, earlier in enumerate(reversed(recent), start=1):
            out[d - 1, layer] = np.rint(earlier.T @ onehot).astype(np.int64)
        recent = (recent + [onehot])[-depth:]
    return out


def _row_shares(eams: np.ndarray) -> np.ndarray:
    """float32 [..., L, E]: each layer's counts as shares of that layer's routing (rows sum to 1, or 0 if empty)."""
    totals = eams.sum(axis=-1, keepdims=True)
    return (eams / np.maximum(totals, 1)).astype(np.float32)


def _unit_rows(eams: np.ndarray) -> np.ndarray:
    """float32 [n, L*E]: each EAM flattened and scaled to unit length (zero EAMs stay zero)."""
    flat = eams.reshape(len(eams), -1).astype(np.float32)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, 1e-12)


class EAMCollection:
    """A bounded collection of EAMs [num_layers, num_experts], each with an optional task label.

    Beside the EAMs, `transitions` [depth, L, E, E] accumulates layer-to-layer statistics of
    individual tokens (`layer_transitions`) over every sequence added with its routing: they let
    the trace prefetcher condition on the experts the token in flight already chose. They are an
    aggregate, not per entry: a replaced EAM keeps its share of them.

    When full, `add` keeps the most diverse set: among the kept entries and the new one, the entry
    most similar (cosine of the flattened EAMs) to another entry is the least useful and is dropped;
    both members of the closest pair are equally redundant, so the older one goes (the collection
    follows drift in the workload). The similarity matrix is kept incrementally: O(n * L * E) per add.
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 1024, transition_depth: int = 2):
        if min(num_layers, num_experts, capacity, transition_depth) < 1:
            raise MoejaxError(
                f"EAM collection needs layers, experts, capacity and transition depth >= 1 "
                f"(got {num_layers}, {num_experts}, {capacity}, {transition_depth})"
            )
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self._eams = np.zeros((0, num_layers, num_experts), np.int32)
        self._units = np.zeros((0, num_layers * num_experts), np.float32)
        self._sims = np.zeros((0, 0), np.float32)  # cosine between kept entries, -inf on the diagonal
        self.tasks: list[str | None] = []
        self.transitions = np.zeros((transition_depth, num_layers, num_experts, num_experts), np.int64)

    def __len__(self) -> int:
        return len(self._eams)

    @property
    def eams(self) -> np.ndarray:
        """int32 [n, L, E], oldest first."""
        return self._eams

    def add(self, eam: np.ndarray, task: str | None = None, experts: np.ndarray | None = None) -> None:
        """Adds a sequence's EAM [L, E]; `experts` [L, T, k], its routing, if given, feeds `transitions`."""
        eam = np.asarray(eam)
        if eam.shape != (self.num_layers, self.num_experts):
            raise MoejaxError(f"EAM must be [{self.num_layers}, {self.num_experts}], got shape {eam.shape}")
        if not np.issubdtype(eam.dtype, np.integer) or (eam < 0).any():
            raise MoejaxError(f"EAM must hold non-negative integer token counts (got dtype {eam.dtype})")
        unit = _unit_rows(eam[None])
        sims_new = self._units @ unit[0]
        n = len(self)
        sims = np.full((n + 1, n + 1), -np.inf, np.float32)
        sims[:n, :n] = self._sims
        sims[n, :n] = sims[:n, n] = sims_new
        self._eams = np.concatenate([self._eams, eam[None].astype(np.int32)])
        self._units = np.concatenate([self._units, unit])
        self._sims = sims
        self.tasks.append(task)
        if experts is not None:
            experts = np.asarray(experts)
            if experts.ndim != 3 or experts.shape[0] != self.num_layers:
                raise MoejaxError(f"routing must be [{self.num_layers}, tokens, k], got shape {experts.shape}")
            self.transitions += layer_transitions(experts, self.num_experts, len(self.transitions))
        if len(self) > self.capacity:
            self._drop(self._least_useful())

    def _least_useful(self) -> int:
        redundancy = self._sims.max(axis=1)
        return int(np.flatnonzero(redundancy == redundancy.max())[0])  # ties: the oldest

    def _drop(self, index: int) -> None:
        keep = np.arange(len(self)) != index
        self._eams, self._units = self._eams[keep], self._units[keep]
        self._sims = self._sims[keep][:, keep]
        del self.tasks[index]

    def save(self, path: str | Path) -> None:
        """Writes the collection to `path` (npz) atomically."""
        write_npz_atomic(
            path,
            {
                "format": np.int32(COLLECTION_FORMAT),
                "eams": self._eams,
                "capacity": np.int64(self.capacity),
                "tasks": np.array([t or "" for t in self.tasks], dtype=np.str_).reshape(len(self)),
                "has_task": np.array([t is not None for t in self.tasks], bool).reshape(len(self)),
                "transitions": self.transitions,
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> EAMCollection:
        """Reads a collection file (eams.npz), or the eams.npz of a directory `moejax trace` wrote."""
        path = trace_file(path, EAMS_FILE)
        arrays = read_npz(path, "EAM collection", COLLECTION_CONTENTS)
        if "eams" not in arrays and {"experts", "seq_lens"} <= set(arrays):
            raise MoejaxError(f"{path}: a routing trace (like {ROUTING_FILE}), not the EAM collection wanted here: "
                              f"give {EAMS_FILE} or the directory `moejax trace` wrote")
        missing = [k for k in ("format", "eams", "capacity", "tasks", "has_task", "transitions") if k not in arrays]
        if missing:
            raise MoejaxError(f"{path}: not an EAM collection, missing arrays {', '.join(missing)}; {COLLECTION_CONTENTS}")
        if int(arrays["format"]) != COLLECTION_FORMAT:
            raise MoejaxError(f"{path}: EAM collection format {int(arrays['format'])}, expected {COLLECTION_FORMAT}")
        eams, tasks, has_task = arrays["eams"], arrays["tasks"], arrays["has_task"]
        if eams.ndim != 3 or not np.issubdtype(eams.dtype, np.integer) or min(eams.shape[1:], default=0) < 1:
            raise MoejaxError(f"{path}: eams must be integer [n, layers, experts], got {eams.dtype} {eams.shape}")
        if tasks.shape != (len(eams),) or has_task.shape != (len(eams),):
            raise MoejaxError(f"{path}: tasks and has_task must be [{len(eams)}], got {tasks.shape} and {has_task.shape}")
        capacity = int(arrays["capacity"])
        if capacity < max(len(eams), 1):
            raise MoejaxError(f"{path}: capacity {capacity} is smaller than the {len(eams)} EAMs it holds")
        if (eams < 0).any():
            raise MoejaxError(f"{path}: eams holds negative token counts")
        transitions = arrays["transitions"]
        if (transitions.ndim != 4 or transitions.shape[1:] != (eams.shape[1], eams.shape[2], eams.shape[2])
                or not np.issubdtype(transitions.dtype, np.integer)):
            raise MoejaxError(f"{path}: transitions must be integer [depth, {eams.shape[1]}, {eams.shape[2]}, "
                              f"{eams.shape[2]}], got {transitions.dtype} {transitions.shape}")
        collection = cls(eams.shape[1], eams.shape[2], capacity, len(transitions))
        collection.transitions = transitions.astype(np.int64)
        collection._eams = eams.astype(np.int32)
        collection._units = _unit_rows(collection._eams)
        collection._sims = collection._units @ collection._units.T
        np.fill_diagonal(collection._sims, -np.inf)
        collection.tasks = [str(t) if labelled else None for t, labelled in zip(tasks, has_task, strict=True)]
        return collection


class EAMMatcher:
    """Matches the EAM of the running sequence against a collection, incrementally.

    similarity: cosine between the running EAM (all tokens so far, all layers, including the partial
    rows of the token in progress) and each collection EAM, flattened. `observe` costs O(n * k) for
    a step that routed to k experts, so matching at every layer step is cheap.
    prediction: per-layer expert shares [E] of the best-matching EAMs (the `top` most similar, weighted
    by similarity), or the collection's mean before the sequence has routed anything.
    """

    def __init__(self, collection: EAMCollection, top: int = 1):
        eams = collection.eams.astype(np.float32)
        self.size = len(eams)
        self.shares = _row_shares(eams)  # [n, L, E]
        self.by_expert = np.ascontiguousarray(eams.transpose(1, 2, 0))  # [L, E, n]: one step's gather is contiguous
        self.norms = np.maximum(np.linalg.norm(eams.reshape(self.size, -1), axis=1), 1e-12)
        self.mean_shares = self.shares.mean(axis=0) if self.size else None
        self.top = max(1, min(top, self.size))
        self.reset()

    def reset(self) -> None:
        self.running = np.zeros(self.by_expert.shape[:2], np.float32)
        self.dots = np.zeros(self.size, np.float32)
        self.sq_norm = 0.0
        self._weights: tuple[np.ndarray, np.ndarray] | None = None

    def observe(self, layer: int, counts: np.ndarray) -> None:
        """Adds a step's token counts [E] of MoE layer `layer` to the running EAM."""
        nz = counts.nonzero()[0]
        if not len(nz):
            return
        c = counts[nz].astype(np.float32)
        row = self.running[layer]
        self.sq_norm += float(2 * row[nz] @ c + c @ c)
        row[nz] += c
        if self.size:
            self.dots += c @ self.by_expert[layer, nz]
        self._weights = None

    def similarities(self) -> np.ndarray:
        """float32 [n] cosine similarities (zeros before the first step)."""
        return self.dots / (self.norms * max(np.sqrt(self.sq_norm), 1e-12))

    def _match(self) -> tuple[np.ndarray, np.ndarray]:
        if self._weights is None:
            sims = self.similarities()
            if self.top == 1:
                self._weights = np.array([sims.argmax()]), np.ones(1, np.float32)
            else:
                best = np.argpartition(-sims, self.top - 1)[: self.top] if self.top < len(sims) else np.arange(len(sims))
                weights = np.maximum(sims[best], 1e-6)
                self._weights = best, weights / weights.sum()
        return self._weights

    def predicted_shares(self, layer: int) -> np.ndarray | None:
        """float32 [E]: the matched expert shares of MoE layer `layer`; None for an empty collection."""
        if not self.size:
            return None
        if self.sq_norm == 0.0:
            return self.mean_shares[layer]
        best, weights = self._match()
        if self.top == 1:
            return self.shares[best[0], layer]
        return weights @ self.shares[best, layer]
