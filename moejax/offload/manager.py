"""The host side of the expert cache: learns from each step's routing after the step, and prepares the
next steps' inputs — the priority policy's scores and the trace prefetcher's picks, which the next step
fetches when it begins.

Nothing here runs inside a step: the engine hands the manager a step's routing once the step is done
(`observe`), and takes `next_inputs()` when it dispatches a later one, so the device never waits for it.
The policy lab drives the same manager with the same schedule (`offload.replay`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from moejax.errors import MoejaxError
from moejax.offload import device_cache as dc
from moejax.predictors.base import request_probabilities
from moejax.predictors.run_ahead import NEXT, PROMPT
from moejax.routing.prefetchers import DEFAULT_FLOORS, make_prefetcher
from moejax.routing.eams import EAMCollection
from moejax.routing.usage import ExpertUsage

# The policies a user picks, and the device policy each runs as ("activation" is the priority policy with
# the activation-aware scores; "belady" too, with scores from the known future: lab and benchmarks only).
POLICIES = {"lru": "lru", "lfu": "lfu", "fifo": "fifo", "lifo": "lifo", "activation": "priority"}
PREFETCHERS = ("none", "lookahead", "trace", "trace+lookahead", "predictor")


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What the host gives a step (device arrays or None): keys int32 [P] to prefetch when it begins (-1:
    none) and the priority policy's scores."""

    staged_keys: jax.Array | None = None
    priorities: dc.Priorities | None = None


class ActivationScores:
    """The activation-aware policy's scores: the expected number of MoE layer steps until each expert's
    next use, from activation frequency and layer position.

    If every visit of layer l uses expert e with probability p(l, e), a resident expert is next needed
    d(l) + L (1 - p) / p layer steps ahead, d(l) = ((l - c - 1) mod L) + 1 while layer c runs. The device
    evicts the largest; dropping the -c common to every key leaves `ahead` = l + L (1 - p) / p for keys of
    layers after c and `behind` = ahead + L for the others. p is `trace.ExpertUsage`: the running
    sequences' token counts (older steps weighted down by `decay`), smoothed towards the collection's mean
    expert shares (of the sequence's task, when labelled) worth `prior_tokens` tokens.
    """

    def __init__(self, num_layers: int, num_experts: int, collection: EAMCollection | None = None,
                 prior_tokens: float = 4.0, decay: float = 0.9):
        self.num_layers, self.num_experts, self.collection = num_layers, num_experts, collection
        self.usage = ExpertUsage(num_layers, num_experts, prior_tokens, decay)
        self.start_sequence(None)

    def start_sequence(self, task: str | None) -> None:
        collection = self.collection
        if collection is None or not len(collection):
            self.prior = np.full((self.num_layers, self.num_experts), 1.0 / self.num_experts)
        else:
            eams = collection.eams
            if task is not None and task in collection.tasks:
                eams = eams[[t == task for t in collection.tasks]]
            self.prior = (eams / np.maximum(eams.sum(axis=2, keepdims=True), 1)).mean(axis=0)
        self.usage.reset()

    def observe(self, counts: np.ndarray) -> None:
        """Token counts [L, E] of one step (a layer without any did not run in it: not observed)."""
        self.usage.observe_step(counts)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(ahead, behind) float32 [L, E]."""
        p = self.usage.all_probabilities(self.prior)
        ahead = np.arange(self.num_layers)[:, None] + self.num_layers * (1 - p) / p
        return ahead.astype(np.float32), (ahead + self.num_layers).astype(np.float32)


class OffloadManager:
    """Host-side decisions for a cached engine (and the lab's replay of one).

    policy: a name of `POLICIES`; prefetch: a name of `PREFETCHERS`; staged_per_step: most experts the
    trace prefetchers and the predictor stage per step (the predictor: the likeliest experts of the next
    step's tokens that are not resident, from the per-token probabilities given to `start_sequence` in the
    lab, from the run-ahead thread in the engine); collection: the EAM collection the trace prefetcher and
    the activation scores read, to which finished sequences are added; device: where inputs go (None: the
    default device).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, policy: str = "lru", prefetch: str = "none",
                 staged_per_step: int = 0, prefetch_floor: float | None = None, collection: EAMCollection | None = None,
                 device=None):
        if policy not in POLICIES:
            raise MoejaxError(f"cache_policy '{policy}' is not one of {', '.join(POLICIES)}")
        if prefetch not in PREFETCHERS:
            raise MoejaxError(f"prefetch '{prefetch}' is not one of {', '.join(PREFETCHERS)}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.policy, self.prefetch = policy, prefetch
        self.collection = collection
        if collection is None and (policy == "activation" or prefetch.startswith("trace")):
            self.collection = EAMCollection(num_layers, num_experts)
        self.scores = ActivationScores(num_layers, num_experts, self.collection) if policy == "activation" else None
        self.prefetcher = None
        if prefetch.startswith("trace"):
            self.prefetcher = make_prefetcher("trace", num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                                              collection=self.collection,
                                              floor=DEFAULT_FLOORS["trace"] if prefetch_floor is None else prefetch_floor)
        staged_per_step = min(staged_per_step, num_layers * num_experts)  # more than every expert stages them all
        self.staged_per_step = staged_per_step if self.prefetcher is not None or prefetch == "predictor" else 0
        self.predictor_floor = DEFAULT_FLOORS["trace"] if prefetch_floor is None else prefetch_floor
        self.predicted: np.ndarray | None = None  # the sequence's per-token probabilities [T, L, E] (predictor)
        self._resident: np.ndarray | None = None
        self.run_ahead = None  # predictors.run_ahead.RunAhead: the engine's prediction thread (predictor)
        self._prompts: dict = {}  # owner -> the run-ahead's prediction of its prompt [T, L, E]
        self._tokens: dict = {}  # owner -> its token ids so far
        self.device = device or jax.devices()[0]
        self._pending = StepInputs(priorities=self._priorities())  # what a step before any sequence gets

    @property
    def device_policy(self) -> str:
        return POLICIES[self.policy]

    @property
    def lookahead(self) -> bool:
        return self.prefetch in ("lookahead", "trace+lookahead")

    @property
    def reads_residency(self) -> bool:
        """Whether `observe` reads what is resident (the trace prefetcher and the predictor stage only experts
        that are not)."""
        return self.prefetcher is not None or self.prefetch == "predictor"

    @property
    def learns(self) -> bool:
        """Whether steps' inputs depend on the routing observed (activation scores, trace prefetcher): if
        not, steps can run without the manager (`offload.replay.Replayer.run`)."""
        return self.scores is not None or self.reads_residency

    def start_sequence(self, task: str | None = None, predicted: np.ndarray | None = None) -> None:
        """A new sequence; predicted: its tokens' expert probabilities [T, L, E] (`predictors.base.Predictor`),
        which the predictor prefetcher stages from."""
        self.predicted, self._resident = predicted, None
        if self.scores is not None:
            self.scores.start_sequence(task)
        if self.prefetcher is not None:
            self.prefetcher.on_sequence_start(task)
        self._pending = StepInputs(priorities=self._priorities())

    def end_sequence(self, experts: np.ndarray, task: str | None = None) -> None:
        """A finished sequence's routing [L, T, k] joins the collection."""
        if self.collection is None or experts.shape[1] == 0:
            return
        from moejax.routing.eams import eam_counts

        # The layer transitions (costly to count) feed only the trace prefetcher.
        self.collection.add(eam_counts(experts, self.num_experts), task,
                            experts=experts if self.prefetcher is not None else None)
        if self.prefetcher is not None:
            self.prefetcher.refit()

    def observe(self, counts: np.ndarray, resident: np.ndarray) -> None:
        """A finished step: token counts [L, E] per MoE layer and expert, resident bool [L * E] after it (None
        when not `reads_residency`). Prepares the inputs of the next step dispatched. Layers without tokens did
        not run in the step (an encoder-decoder model's encoder during decode steps, its decoder while
        encoding): not observed."""
        if self.scores is not None:
            self.scores.observe(counts)
        self._resident = resident
        staged_keys = None
        if self.prefetcher is not None:
            for layer in range(self.num_layers):
                if counts[layer].any():
                    self.prefetcher.observe(layer, counts[layer])
            keys = self._predicted(resident)
            if keys:
                padded = np.full(self.staged_per_step, -1, np.int32)
                padded[: len(keys)] = keys
                staged_keys = self._put(padded)
        self._pending = StepInputs(staged_keys, self._priorities())

    @property
    def staged_next(self) -> jax.Array | None:
        """The keys the next step dispatched stages when it begins (int32 [P], -1: none), or None."""
        return self._pending.staged_keys

    def _predicted(self, resident: np.ndarray) -> list[int]:
        """Keys to stage: the prefetcher's probabilities of use for the next token, best first, not resident."""
        floor = self.prefetcher.min_probability
        probabilities = np.stack([self.prefetcher.sequence_probabilities(layer) for layer in range(self.num_layers)])
        flat = np.where(resident.reshape(-1), 0.0, probabilities.reshape(-1))
        order = np.argsort(-flat, kind="stable")[: self.staged_per_step]
        return [int(k) for k in order if flat[k] >= floor and flat[k] > 0]

    def _put(self, tree):
        where = self.device  # a device, or a sharding (replicated over expert parallelism's devices)
        return jax.device_put(tree, where if isinstance(where, jax.sharding.Sharding) else
                              jax.sharding.SingleDeviceSharding(where))

    def _priorities(self):
        if self.scores is None:
            return None
        return self._put(dc.Priorities(*self.scores.tables()))

    # -- the engine's run-ahead predictor (prefetch 'predictor'); owners name sequences ------------------
    def expect_prompt(self, owner, token_ids) -> None:
        """A prompt about to be prefilled: the run-ahead starts predicting its experts."""
        if self.run_ahead is not None:
            self._tokens[owner] = list(token_ids)
            self.run_ahead.submit(owner, PROMPT, token_ids)

    def extend(self, owner, token: int) -> None:
        """A new token of `owner`'s sequence: predict the experts of the step after the one it feeds."""
        if self.run_ahead is not None and owner in self._tokens:
            self._tokens[owner].append(token)
            self.run_ahead.submit(owner, NEXT, self._tokens[owner])

    def forget(self, owner) -> None:
        self._prompts.pop(owner, None)
        self._tokens.pop(owner, None)
        if self.run_ahead is not None:
            self.run_ahead.forget(owner)

    def close(self) -> None:
        """Stops the run-ahead thread (if any) and waits for it."""
        if self.run_ahead is not None:
            self.run_ahead.close()

    def _run_ahead_rows(self, owners, tokens: tuple[int, int] | None) -> np.ndarray | None:
        """The finished predictions [n, L, E] for a step: prompt rows [start, stop) of the one owner of a
        prefill chunk (`tokens`), or the next token of each owner of a decode step; None if none is ready."""
        if tokens is not None:
            owner = owners[0]
            if owner not in self._prompts:
                ready = self.run_ahead.take(owner, PROMPT)
                if ready is None:
                    return None
                self._prompts[owner] = ready
            return self._prompts[owner][tokens[0] : tokens[1]]
        rows = [r for r in (self.run_ahead.take(owner, NEXT) for owner in owners) if r is not None]
        return np.concatenate(rows) if rows else None

    def next_inputs(self, tokens: tuple[int, int] | None = None, owners=None) -> StepInputs:
        """The inputs for the next step dispatched (staged prefetches are handed out once). For the predictor:
        tokens, the positions [start, stop) of the sequence's tokens a prompt step runs (the lab's sequence, or
        the one of `owners`); owners, the sequences of an engine step (the run-ahead's finished predictions)."""
        inputs = self._pending
        self._pending = dataclasses.replace(inputs, staged_keys=None)
        rows = None
        if self.predicted is not None and tokens is not None:
            rows = self.predicted[tokens[0] : tokens[1]]
        elif self.run_ahead is not None and owners:
            rows = self._run_ahead_rows(owners, tokens)
        if rows is not None:
            inputs = dataclasses.replace(inputs, staged_keys=self._predicted_keys(rows))
        return inputs

    def _predicted_keys(self, rows: np.ndarray):
        """The predictor's staged keys for a step's tokens' probabilities [n, L, E]: the likeliest experts of
        any of them (at least `predictor_floor`), not resident after the last step read, best first (None: none)."""
        if not len(rows):
            return None
        flat = request_probabilities(rows).reshape(-1)  # some token of the step uses it
        if self._resident is not None:
            flat = np.where(self._resident.reshape(-1), 0.0, flat)
        order = np.argsort(-flat, kind="stable")[: self.staged_per_step]
        keys = [int(k) for k in order if flat[k] >= self.predictor_floor and flat[k] > 0]
        if not keys:
            return None
        padded = np.full(self.staged_per_step, -1, np.int32)
        padded[: len(keys)] = keys
        return self._put(padded)
