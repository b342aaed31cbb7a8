"""How a loaded model keeps its experts: `OffloadConfig`, frozen and validated, as `moejax.load` takes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moejax.errors import ParameterError

MODES = ("resident", "cached", "on-demand", "dense-offload")
CACHE_POLICIES = ("lru", "lfu", "fifo", "lifo", "activation")
PREFETCHERS = ("none", "lookahead", "trace", "trace+lookahead", "predictor")
STEP_PREFETCHERS = ("trace", "trace+lookahead", "predictor")  # stage experts when a step begins
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
    cache_policy: 'lru' (None: the default), 'lfu', 'fifo', 'lifo' or 'activation' (evicts the expert whose
        next use is expected farthest away, from activation frequency and layer position).
    prefetch: 'none', 'lookahead' (the next MoE layer's router applied one layer early; its guessed experts
        are fetched right away), 'trace' (the host matches the running sequences' activations against a
        trace collection and the next step fetches the likeliest experts when it begins),
        'trace+lookahead', or 'predictor' (a learned predictor, `Engine.use_predictor`, predicts on a host
        thread the experts of the next steps' tokens; they are fetched when the step begins).
    prefetch_per_layer: most experts the lookahead fetches per MoE layer step (default: the model's top-k).
    prefetch_per_step: most experts the trace prefetcher or the predictor fetches per step (default: 2 x top-k).
    prefetch_floor: the trace prefetcher and the predictor propose only experts whose probability of use
        is at least this (default 0.02).
    traces: an activation-matrix collection (`eams.npz`, or the directory `moejax trace` wrote) for the
        trace prefetcher and the activation policy; without one they learn from the sequences run.
    host_budget: host memory for experts ('cached' only; default: all of them, in pinned host memory): a
        fraction of all expert bytes (in the checkpoint's float dtype) or a size, like `expert_budget`. With it,
        the experts stay on local disk (`expert_dir`) under a host cache of this size (`offload.host_cache`;
        outputs unchanged).
    expert_dir: the disk tier's directory of per-expert files in the engine's expert format
        (`offload.expert_files`; default `expert_files/` in the checkpoint, `expert_files-int4/` etc. for another
        format, `offload.disk_tier.default_dir`; written from it on first use).
    """

    mode: str = "resident"
    expert_budget: str | float | None = None
    cache_policy: str | None = None
    prefetch: str = "none"
    prefetch_per_layer: int | None = None
    prefetch_per_step: int | None = None
    prefetch_floor: float | None = None
    traces: str | Path | None = None
    host_budget: str | float | None = None
    expert_dir: str | Path | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ParameterError.not_one_of("offload", self.mode, MODES)
        if self.prefetch not in PREFETCHERS:
            raise ParameterError.not_one_of("prefetch", self.prefetch, PREFETCHERS)
        if self.cache_policy is not None and self.cache_policy not in CACHE_POLICIES:
            hint = " (belady needs the future: it runs in the policy lab only)" if self.cache_policy == "belady" else ""
            raise ParameterError.not_one_of("cache_policy", self.cache_policy, CACHE_POLICIES, hint)
        if self.expert_dir is not None and self.host_budget is None:
            raise ParameterError("{expert_dir} is the disk tier under {host_budget}: give {host_budget} too")
        for parameter, value in (("expert_budget", self.expert_budget), ("cache_policy", self.cache_policy),
                                 ("host_budget", self.host_budget)):
            if value is not None and self.mode != "cached":
                raise ParameterError("{" + parameter + "} applies to {offload} cached, not {mode!r}", mode=self.mode)
        if self.prefetch != "none" and self.mode != "cached":
            raise ParameterError("{prefetch} {name!r} fills the expert cache: it needs {offload} cached (not {mode!r})",
                                 name=self.prefetch, mode=self.mode)
        for parameter, value, readers in (("prefetch_per_layer", self.prefetch_per_layer, ("lookahead", "trace+lookahead")),
                                          ("prefetch_per_step", self.prefetch_per_step, STEP_PREFETCHERS)):
            if value is None:
                continue
            if self.prefetch not in readers:
                raise ParameterError("{" + parameter + "} applies to {prefetch} " + ", ".join(readers[:-1]) + " or "
                                     + readers[-1] + ", not {name!r}",
                                     name=self.prefetch)
            if value < 0:
                raise ParameterError("{" + parameter + "} must be >= 0 (got {value})", value=value)
        if self.prefetch_floor is not None:
            if self.prefetch not in STEP_PREFETCHERS:
                raise ParameterError("{prefetch_floor} applies to {prefetch} trace, trace+lookahead or predictor, not {name!r}",
                                     name=self.prefetch)
            if not 0 <= self.prefetch_floor <= 1:
                raise ParameterError("{prefetch_floor} must be a probability in [0, 1], got {floor}", floor=self.prefetch_floor)
        if self.traces is not None and not self.reads_traces:
            raise ParameterError("{traces} feeds {prefetch} trace / trace+lookahead and {cache_policy} activation: "
                                 "give one of them, or leave {traces} out")

    @property
    def policy(self) -> str:
        return self.cache_policy or "lru"

    @property
    def reads_traces(self) -> bool:
        """Whether the trace prefetcher or the activation policy runs (what an EAM collection feeds)."""
        return self.prefetch.startswith("trace") or self.cache_policy == "activation"

    @property
    def budget(self) -> str | float:
        return DEFAULT_BUDGET if self.expert_budget is None else self.expert_budget
