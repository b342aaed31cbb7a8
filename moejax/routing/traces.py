"""Routing traces: which experts every token of every sequence chose at every MoE layer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.routing.eams import EAMCollection, eam_counts, layer_transitions
from moejax.routing.files import EAMS_FILE, ROUTING_CONTENTS, ROUTING_FILE, read_npz, trace_file, write_npz_atomic

ROUTING_FORMAT = 1
NO_PREDICTION = -1  # in a trace's `lookahead`: nothing was predicted there (the first MoE layer of a stack)


@dataclasses.dataclass
class RoutingTrace:
    """Routing of a run, all sequences concatenated along the token axis.

    experts: int16 [L, T, k] experts each token chose at each MoE layer (ids >= num_experts: dropped);
    seq_lens: int64 [S] tokens per sequence, summing to T; tasks: a label per sequence, or None;
    lookahead: int16 [L, T, k] or None: row l holds the experts MoE layer l's router picked when
    applied to MoE layer l-1's input (one layer early); row 0 is unused (-1); prompt_lens: int64 [S] or
    None: how many of each sequence's tokens were its prompt (the rest were generated one per step);
    token_ids: int32 [T] or None: each token's id; router_probs: float32 [L, T, k] or None: the router's
    probability (softmax over all experts) of each chosen expert, the soft labels the predictors distil.
    """

    experts: np.ndarray
    seq_lens: np.ndarray
    num_experts: int
    tasks: list[str | None] | None = None
    lookahead: np.ndarray | None = None
    prompt_lens: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    router_probs: np.ndarray | None = None

    def __post_init__(self):
        self.experts = np.asarray(self.experts)
        self.seq_lens = np.asarray(self.seq_lens)
        _check_routing("routing trace", self.experts, self.seq_lens, self.num_experts, self.tasks, self.lookahead,
                       self.prompt_lens)
        self.experts = self.experts.astype(np.int16)
        self.seq_lens = self.seq_lens.astype(np.int64)
        if self.lookahead is not None:
            self.lookahead = np.asarray(self.lookahead).astype(np.int16)
        if self.prompt_lens is not None:
            self.prompt_lens = np.asarray(self.prompt_lens).astype(np.int64)
        if self.token_ids is not None:
            self.token_ids = np.asarray(self.token_ids)
            if self.token_ids.shape != self.experts.shape[1:2] or not np.issubdtype(self.token_ids.dtype, np.integer):
                raise MoejaxError(f"routing trace: token_ids must be integers [{self.experts.shape[1]}], got "
                                  f"{self.token_ids.dtype} {self.token_ids.shape}")
            self.token_ids = self.token_ids.astype(np.int32)
        if self.router_probs is not None:
            self.router_probs = np.asarray(self.router_probs)
            if self.router_probs.shape != self.experts.shape or not np.issubdtype(self.router_probs.dtype, np.floating):
                raise MoejaxError(f"routing trace: router_probs must be floats shaped like experts {self.experts.shape}, "
                                  f"got {self.router_probs.dtype} {self.router_probs.shape}")
            self.router_probs = self.router_probs.astype(np.float32)

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_lens)

    def offsets(self) -> np.ndarray:
        """int64 [S + 1]: token offset of each sequence, then T."""
        return np.concatenate([[0], np.cumsum(self.seq_lens)])

    def select(self, start: int, stop: int) -> RoutingTrace:
        """The sub-trace of sequences [start, stop)."""
        if not 0 <= start <= stop <= self.num_sequences:
            raise MoejaxError(f"sequences {start}:{stop} are out of range for a trace of {self.num_sequences}")
        offsets = self.offsets()
        tokens = slice(int(offsets[start]), int(offsets[stop]))
        return RoutingTrace(
            experts=self.experts[:, tokens],
            seq_lens=self.seq_lens[start:stop],
            num_experts=self.num_experts,
            tasks=None if self.tasks is None else self.tasks[start:stop],
            lookahead=None if self.lookahead is None else self.lookahead[:, tokens],
            prompt_lens=None if self.prompt_lens is None else self.prompt_lens[start:stop],
            token_ids=None if self.token_ids is None else self.token_ids[tokens],
            router_probs=None if self.router_probs is None else self.router_probs[:, tokens],
        )

    def sequence_eams(self) -> np.ndarray:
        """int32 [S, L, E]: the EAM of every sequence."""
        offsets = self.offsets()
        return np.stack(
            [eam_counts(self.experts[:, offsets[s] : offsets[s + 1]], self.num_experts) for s in range(self.num_sequences)]
        ) if self.num_sequences else np.zeros((0, self.num_layers, self.num_experts), np.int32)

    def collection(self, capacity: int = 1024) -> EAMCollection:
        """An EAMCollection of this trace's sequences, with their transitions (added in order)."""
        collection = EAMCollection(self.num_layers, self.num_experts, capacity)
        for s, eam in enumerate(self.sequence_eams()):
            collection.add(eam, None if self.tasks is None else self.tasks[s])
        collection.transitions += layer_transitions(self.experts, self.num_experts, len(collection.transitions))
        return collection

    def save(self, path: str | Path) -> None:
        """Writes the trace to `path` (npz) atomically."""
        arrays = {
            "format": np.int32(ROUTING_FORMAT),
            "experts": self.experts,
            "seq_lens": self.seq_lens,
            "num_experts": np.int64(self.num_experts),
        }
        if self.tasks is not None:
            arrays["tasks"] = np.array([t or "" for t in self.tasks], dtype=np.str_).reshape(self.num_sequences)
            arrays["has_task"] = np.array([t is not None for t in self.tasks], bool).reshape(self.num_sequences)
        if self.lookahead is not None:
            arrays["lookahead"] = self.lookahead
        if self.prompt_lens is not None:
            arrays["prompt_lens"] = self.prompt_lens
        if self.token_ids is not None:
            arrays["token_ids"] = self.token_ids
        if self.router_probs is not None:
            arrays["router_probs"] = self.router_probs
        write_npz_atomic(path, arrays)


def _check_routing(where, experts, seq_lens, num_experts, tasks, lookahead, prompt_lens) -> None:
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
        raise MoejaxError(f"{where}: experts must be integer [layers, tokens, k], got {experts.dtype} {experts.shape}")
    if experts.shape[0] < 1 or experts.shape[2] < 1:
        raise MoejaxError(f"{where}: experts must have at least one layer and one slot, got shape {experts.shape}")
    if seq_lens.ndim != 1 or not np.issubdtype(seq_lens.dtype, np.integer) or (seq_lens < 0).any():
        raise MoejaxError(f"{where}: seq_lens must be non-negative integers [sequences], got {seq_lens.dtype} {seq_lens.shape}")
    if int(seq_lens.sum()) != experts.shape[1]:
        raise MoejaxError(f"{where}: seq_lens sum to {int(seq_lens.sum())} but experts has {experts.shape[1]} tokens")
    if not 1 <= num_experts <= np.iinfo(np.int16).max:
        raise MoejaxError(f"{where}: num_experts must be in 1..32767, got {num_experts}")
    if experts.size and int(experts.min()) < 0:
        raise MoejaxError(f"{where}: experts holds negative ids")
    if tasks is not None and len(tasks) != len(seq_lens):
        raise MoejaxError(f"{where}: {len(tasks)} task labels for {len(seq_lens)} sequences")
    if lookahead is not None and np.shape(lookahead) != experts.shape:
        raise MoejaxError(f"{where}: lookahead must have the shape of experts {experts.shape}, got {np.shape(lookahead)}")
    if prompt_lens is not None:
        prompt_lens = np.asarray(prompt_lens)
        if prompt_lens.shape != seq_lens.shape or not np.issubdtype(prompt_lens.dtype, np.integer):
            raise MoejaxError(f"{where}: prompt_lens must be integers [{len(seq_lens)}] like seq_lens, got "
                              f"{prompt_lens.dtype} {prompt_lens.shape}")
        if ((prompt_lens < 0) | (prompt_lens > seq_lens)).any():
            raise MoejaxError(f"{where}: prompt_lens must be within 0..seq_lens (a prompt is part of its sequence)")


def load_routing(path: str | Path) -> RoutingTrace:
    """Reads a routing trace: moejax's own files (routing.npz, or the directory `moejax trace` wrote),
    or any npz with `experts` [L, T, k] and `seq_lens` [S] (optional: `num_experts`, `tasks`, `lookahead`,
    `prompt_lens`, `token_ids`, `router_probs`).

    Without a `num_experts` array, the number of experts is the largest id + 1 rounded up to a multiple
    of 4 (expert counts of real MoE models are: 8, 16, 60, 64, 128, 160, 256, ...); experts never
    routed to only enlarge the denominator of a capacity fraction.
    """
    path = trace_file(path, ROUTING_FILE)
    arrays = read_npz(path, "routing trace", ROUTING_CONTENTS)
    missing = [k for k in ("experts", "seq_lens") if k not in arrays]
    if missing and "eams" in arrays:
        raise MoejaxError(f"{path}: an EAM collection (like {EAMS_FILE}), not the routing trace wanted here: "
                          f"give {ROUTING_FILE} or the directory `moejax trace` wrote")
    if missing:
        raise MoejaxError(f"{path}: not a routing trace, missing arrays {', '.join(missing)}; {ROUTING_CONTENTS}")
    experts, seq_lens = arrays["experts"], arrays["seq_lens"]
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer) or not experts.size:
        raise MoejaxError(f"{path}: experts must be non-empty integer [layers, tokens, k], got {experts.dtype} {experts.shape}")
    if "num_experts" in arrays:
        if arrays["num_experts"].shape != () or not np.issubdtype(arrays["num_experts"].dtype, np.integer):
            raise MoejaxError(f"{path}: num_experts must be an integer scalar")
        num_experts = int(arrays["num_experts"])
    else:
        num_experts = -(-(int(experts.max()) + 1) // 4) * 4
    tasks = None
    if "tasks" in arrays:
        labels = arrays["tasks"]
        labelled = arrays.get("has_task", np.ones(labels.shape, bool))
        if labels.shape != seq_lens.shape or labelled.shape != seq_lens.shape:
            raise MoejaxError(f"{path}: tasks must be [{len(seq_lens)}] like seq_lens, got {labels.shape}")
        tasks = [str(t) if keep else None for t, keep in zip(labels, labelled, strict=True)]
    try:
        return RoutingTrace(experts, seq_lens, num_experts, tasks, arrays.get("lookahead"), arrays.get("prompt_lens"),
                            arrays.get("token_ids"), arrays.get("router_probs"))
    except MoejaxError as err:
        raise MoejaxError(f"{path}: {str(err).removeprefix('routing trace: ')}") from None
