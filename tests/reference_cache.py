"""The device cache's slow, obviously-right twin: the Python `ExpertDirectory` and policies of
`moejax.runtime`, driven through the steps `offload.replay` runs.

A step: the keys the host staged, admitted when it begins; then per MoE layer, the distinct experts its
tokens chose (hits counted and pinned, misses admitted in increasing expert order) and the lookahead's
installs, the next layer's guessed experts (`ranked_guesses`), with the layer's experts still pinned.

The device breaks ties between equal ranks by the lowest slot; `SlotTies` gives a Python policy the same
rule (slots assigned as the device assigns them: the lowest empty slot while there is one, else the
victim's), so the twins agree whatever the ranks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reference_directory import ExpertDirectory
from reference_policies import FIFO, LFU, LIFO, LRU, Belady
from reference_prefetch import prefetch_into


@dataclasses.dataclass
class Step:
    """experts int [L, N, k]: each layer's choices for the step's N tokens (ids outside [0, E): none);
    guesses int [L, N, k] or None: row m is what layer m's router guessed for layer m + 1; staged: keys
    (layer, expert) prefetched when the step begins."""

    experts: np.ndarray
    guesses: np.ndarray | None = None
    staged: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def needed(self, layer: int, num_experts: int) -> list[int]:
        row = self.experts[layer].reshape(-1)
        return sorted({int(e) for e in row if 0 <= e < num_experts})


class SlotTies:
    """Mixin for a `RankedPolicy`: equal ranks go to the lowest slot, as on the device. `tie_fields`: how
    many leading fields of the policy's rank to keep (None: all) before the slot."""

    tie_fields: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot: dict[tuple[int, int], int] = {}
        self.freed: int | None = None
        self.filled = 0

    def on_evict(self, key):
        self.freed = self.slot.pop(key)
        super().on_evict(key)

    def on_insert(self, key, now):
        if self.freed is not None:
            self.slot[key], self.freed = self.freed, None
        else:
            self.slot[key], self.filled = self.filled, self.filled + 1
        super().on_insert(key, now)

    def set_rank(self, key, rank):
        super().set_rank(key, rank[: self.tie_fields] + (self.slot[key],))


class SlotLRU(SlotTies, LRU):
    pass


class SlotLFU(SlotTies, LFU):
    pass


class SlotFIFO(SlotTies, FIFO):
    pass


class SlotLIFO(SlotTies, LIFO):
    pass


class SlotBelady(SlotTies, Belady):
    tie_fields = 1  # the next use only: the device does not rank by key


TWINS = {"lru": SlotLRU, "lfu": SlotLFU, "fifo": SlotFIFO, "lifo": SlotLIFO, "belady": SlotBelady}


def layer_steps(steps: list[Step], num_layers: int, num_experts: int) -> list[tuple[int, list[int]]]:
    """Belady's future: (MoE layer, experts needed) of every layer step, in order."""
    return [(m, step.needed(m, num_experts)) for step in steps for m in range(num_layers)]


def ranked_guesses(rows: np.ndarray, num_experts: int, limit: int) -> list[int]:
    """The experts a router guess picked (rows [N, k]), most rows first, ties to the lower expert, at most `limit`."""
    counts = np.bincount(rows[(rows >= 0) & (rows < num_experts)].reshape(-1), minlength=num_experts)
    ranked = sorted(range(num_experts), key=lambda e: (-counts[e], e))
    return [e for e in ranked[:limit] if counts[e] > 0]


def replay(steps: list[Step], *, capacity: int, policy, num_layers: int, num_experts: int,
           lookahead: int = 0) -> ExpertDirectory:
    """Runs the steps through a directory of `capacity` experts with `policy` (an instance); -> the directory."""
    directory = ExpertDirectory(capacity, policy, num_layers)
    for step in steps:
        if step.staged:
            prefetch_into(directory, step.staged, len(step.staged))
        for m in range(num_layers):
            _, misses = directory.begin_layer(m, step.needed(m, num_experts))
            for key in misses:
                directory.admit(key)
            if lookahead and step.guesses is not None and m + 1 < num_layers:
                keys = [(m + 1, e) for e in ranked_guesses(step.guesses[m], num_experts, lookahead)]
                prefetch_into(directory, keys, len(keys))
            directory.end_layer()
    return directory


def twin(name: str, steps: list[Step], *, capacity: int, num_layers: int, num_experts: int,
         lookahead: int = 0) -> ExpertDirectory:
    """`replay` with the named policy's slot-tied twin (Belady's future from the steps)."""
    future = layer_steps(steps, num_layers, num_experts)
    policy = TWINS[name](future) if name == "belady" else TWINS[name]()
    return replay(steps, capacity=capacity, policy=policy, num_layers=num_layers, num_experts=num_experts,
                  lookahead=lookahead)
