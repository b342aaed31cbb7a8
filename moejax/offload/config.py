"""How a loaded model keeps its experts: `OffloadConfig`, frozen and validated, as `moejax.load` takes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moejax.errors import MoejaxError

MODES = ("resident", "cached", "on-demand", "dense-offload")
CACHE_POLICIES = ("lru", "lfu", "fifo", "lifo", "activation")
PREFETCHERS = ("none", "lookahead", "trace", "trace+lookahead")
DEFAULT_BUDGET = "0.25"


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """Where experts live and how the GPU cache is run.

    mode: 'resident' (every expert on the GPU), 'cached' (experts in pinned host memory, a GPU cache of
        `expert_budget`), 'on-demand' (the experts a step uses fetched at every step, no cache) or
        'dense-offload' (every expert of every layer fetched at every step). Outputs are bit-identical
        across modes, budgets, policies and prefetchers.
    expert_budget: GPU memory for the cache ('cached' only; default 0.25): a fraction of all expert bytes
        (a number <= 1) or a size with a unit ('12GiB', '500MB').
    cache_policy: 'lru', 'lfu', 'fifo', 'lifo' or 'activation' (evicts the expert whose next use is
        expected farthest away, from activation frequency and layer position).
    prefetch: 'none', 'lookahead' (the next MoE layer's router applied one layer early; its guessed experts
        are fetched right away), 'trace' (the host matches the running sequences' activations against a
        trace collection and the next step fetches the likeliest experts when it begins) or
        'trace+lookahead'.
    prefetch_per_layer: most experts the lookahead fetches per MoE layer step (default: the model's top-k).
    prefetch_per_step: most experts the trace prefetcher fetches per step (default: 2 x top-k).
    prefetch_floor: the trace prefetcher proposes only experts whose probability of use is at least this
        (default 0.02).
    traces: an activation-matrix collection (`eams.npz`, or the directory `moejax trace` wrote) for the
        trace prefetcher and the activation policy; without one they learn from the sequences run.
    """

    mode: str = "resident"
    expert_budget: str | float | None = None
    cache_policy: str = "lru"
    prefetch: str = "none"
    prefetch_per_layer: int | None = None
    prefetch_per_step: int | None = None
    prefetch_floor: float | None = None
    traces: str | Path | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise MoejaxError(f"offload '{self.mode}' is not one of {', '.join(MODES)}")
        if self.cache_policy not in CACHE_POLICIES:
            raise MoejaxError(f"cache_policy '{self.cache_policy}' is not one of {', '.join(CACHE_POLICIES)}")
        if self.prefetch not in PREFETCHERS:
            raise MoejaxError(f"prefetch '{self.prefetch}' is not one of {', '.join(PREFETCHERS)}")
        cached_only = {"expert_budget": self.expert_budget is not None, "cache_policy": self.cache_policy != "lru",
                       "prefetch": self.prefetch != "none"}
        for name, given in cached_only.items():
            if given and self.mode != "cached":
                raise MoejaxError(f"{name} applies to offload='cached', not '{self.mode}'")
        for name in ("prefetch_per_layer", "prefetch_per_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise MoejaxError(f"{name} must be >= 0 (got {value})")
        if self.prefetch_floor is not None:
            if not self.prefetch.startswith("trace"):
                raise MoejaxError(f"prefetch_floor applies to prefetch='trace' or 'trace+lookahead', not '{self.prefetch}'")
            if not 0 <= self.prefetch_floor <= 1:
                raise MoejaxError(f"prefetch_floor must be a probability in [0, 1] (got {self.prefetch_floor})")

    @property
    def budget(self) -> str | float:
        return DEFAULT_BUDGET if self.expert_budget is None else self.expert_budget
