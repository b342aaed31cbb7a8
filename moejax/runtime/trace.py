"""Expert-activation traces: per-sequence Expert Activation Matrices (EAMs), a bounded EAM collection,
routing traces (which experts every token chose at every MoE layer) and matching against the collection.

An EAM of a sequence is an int32 matrix [MoE layers, experts] of token counts: entry (l, e) is how
many of the sequence's tokens MoE layer l routed to expert e (MoE-Infinity's sequence-level trace).
Expert ids >= num_experts in routing arrays mark dropped (token, slot) pairs and are ignored.

Files are .npz archives written atomically (a temporary file in the same directory, then
os.replace): a failed save leaves the previous file as it was.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.outputs import atomic_file
from moejax.runtime.recorder import EAMS_FILE, ROUTING_FILE

COLLECTION_FORMAT = 1
ROUTING_FORMAT = 1


def write_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` to `path` as an uncompressed npz; the old file survives any failure."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


# What each kind of trace file holds, for the errors that refuse a file of another kind.
COLLECTION_CONTENTS = (f"an EAM collection holds eams [sequences, MoE layers, experts] and their tasks, like the "
                       f"{EAMS_FILE} that `moejax trace` writes")
ROUTING_CONTENTS = (f"a routing trace holds experts [MoE layers, tokens, k] and seq_lens [sequences], like the "
                    f"{ROUTING_FILE} that `moejax trace` writes")


def trace_file(path: str | Path, file_name: str) -> Path:
    """`path`, or `path / file_name` when `path` is a directory (the one `moejax trace --out` wrote)."""
    path = Path(path)
    return path / file_name if path.is_dir() else path


def read_npz(path: str | Path, what: str, contents: str) -> dict[str, np.ndarray]:
    """All arrays of an npz file; MoejaxError naming the file and what it should hold (`contents`) if it
    is missing or not a readable npz. Pickled objects are never loaded."""
    path = Path(path)
    if not path.is_file():
        raise MoejaxError(f"{path}: no such {what} file")
    try:
        if not zipfile.is_zipfile(path):
            raise MoejaxError(f"{path}: not an .npz archive; {contents}")
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as err:
        if "allow_pickle" in str(err):  # an object array, which only unpickling could read
            raise MoejaxError(f"{path}: holds Python objects, which moejax never loads; {contents}") from None
        raise MoejaxError(f"{path}: not a readable {what} ({err}); {contents}") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise MoejaxError(f"{path}: not a readable {what} ({type(err).__name__}: {err}); {contents}") from None


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


@dataclasses.dataclass
class RoutingTrace:
    """Routing of a run, all sequences concatenated along the token axis.

    experts: int16 [L, T, k] experts each token chose at each MoE layer (ids >= num_experts: dropped);
    seq_lens: int64 [S] tokens per sequence, summing to T; tasks: a label per sequence, or None;
    lookahead: int16 [L, T, k] or None: row l holds the experts MoE layer l's router picked when
    applied to MoE layer l-1's input (one layer early); row 0 is unused (-1).
    """

    experts: np.ndarray
    seq_lens: np.ndarray
    num_experts: int
    tasks: list[str | None] | None = None
    lookahead: np.ndarray | None = None

    def __post_init__(self):
        self.experts = np.asarray(self.experts)
        self.seq_lens = np.asarray(self.seq_lens)
        _check_routing("routing trace", self.experts, self.seq_lens, self.num_experts, self.tasks, self.lookahead)
        self.experts = self.experts.astype(np.int16)
        self.seq_lens = self.seq_lens.astype(np.int64)
        if self.lookahead is not None:
            self.lookahead = np.asarray(self.lookahead).astype(np.int16)

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
        write_npz_atomic(path, arrays)


def _check_routing(where, experts, seq_lens, num_experts, tasks, lookahead) -> None:
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


def load_routing(path: str | Path) -> RoutingTrace:
    """Reads a routing trace: moejax's own files (routing.npz, or the directory `moejax trace` wrote),
    or any npz with `experts` [L, T, k] and `seq_lens` [S].

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
        return RoutingTrace(experts, seq_lens, num_experts, tasks, arrays.get("lookahead"))
    except MoejaxError as err:
        raise MoejaxError(f"{path}: {str(err).removeprefix('routing trace: ')}") from None



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

    def experts_per_step(self, layer: int) -> float:
        """m(layer): experts a step of MoE layer `layer` uses, on average (1 before any step)."""
        return self.step_experts[layer] / self.steps[layer] if self.steps[layer] else 1.0

    def probabilities(self, layer: int, prior: np.ndarray) -> np.ndarray:
        """float [E]: p(layer, e), given the prior shares [E] of that layer."""
        m = self.experts_per_step(layer)
        weight = self.prior_tokens * m
        counts = self.counts[layer]
        q = (counts + weight * prior) / (counts.sum() + weight)
        return np.minimum(np.maximum(m * q, 1e-4), 1.0)  # np.clip, without its Python wrapper's cost
