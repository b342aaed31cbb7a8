"""The routed-expert step of a MoE layer, through the expert cache, for every model kind and mode.

The model executor (`runtime.host_routed`)
runs a layer's dense part on the device, then calls `ExpertRunner.run` with its routing and a
`finish` function. The runner reads the routing back, looks the distinct chosen experts up in
the GPU cache, starts copying the misses, and passes the device arrays of exactly those experts
to the expert function: `layer_fns.accumulate` for all waves but the last, `finish` for the last
(which also completes the layer). A layer that needs more experts than the cache has slots
streams them through in waves, in increasing expert order, which keeps the sums bit-identical
to one pass; every mode calls the same compiled functions with the same shapes, so outputs are
bit-identical across modes, budgets and policies. A wave's expert count is padded to a few sizes
(`buckets.expert_bucket`) with zero-weight repeats of its last expert, so prompts do not compile a
program for every count of distinct experts their layers happen to use.

Prefetching (cached mode, `prefetcher` given): after a layer's demand copies are issued and before
its compute is dispatched, the prefetcher sees the layer's routing and names experts of the layers
ahead; up to `prefetch_per_layer` of them are copied, evicting only experts the layer does not use.
The host has just read the routing back, so the GPU is idle and the prefetch copies overlap the
layer's compute and the next layers' dense parts. A `RoutingRecorder` keeps every sequence's routing;
finished sequences' activation matrices feed the trace collection the prefetcher and policy learn from.

Modes:
  resident       every expert on the device (the cache holds them all; nothing moves);
  cached         experts in host memory, a GPU cache of `capacity` experts with a policy;
  on-demand      only the current layer's experts, fetched every time (the no-cache baseline);
  dense-offload  every expert of the layer copied every step, as layer-wise offloading does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.moe import ExpertWave
from moejax.runtime import layer_fns
from moejax.runtime.buckets import expert_bucket
from moejax.runtime.cache import ExpertCache
from moejax.runtime.policies import LRU, CachePolicy
from moejax.runtime.recorder import RoutingRecorder, expert_token_counts
from moejax.runtime.stats import cache_stats
from moejax.runtime.store import HostExpertStore
from moejax.routing.eams import eam_counts

MODES = ("resident", "cached", "on-demand", "dense-offload")

# finish(ids=[N, k] int32, expert_ids=ExpertWave, experts=tuple of n PackedExperts, acc=[N, D] f32)
# -> layer output, called with keywords.
Finish = Callable[..., jax.Array]

# replay(moe_layer, ids [N, k], lookahead [N, k] or None, valid_rows [N] or None) -> (ids, lookahead,
# the same ids on the device or None): a benchmark-only routing override (scripts/bench_prefetch.py).
Replay = Callable[..., tuple[np.ndarray, np.ndarray | None, jax.Array | None]]


def split_waves(needed: list[int], capacity: int) -> list[list[int]]:
    """A layer step's experts in the waves the runner computes them in: `capacity` at a time, in
    order (a step needing none is one empty wave)."""
    return [needed[j : j + capacity] for j in range(0, len(needed), capacity)] or [[]]


class ExpertRunner:
    def __init__(self, store: HostExpertStore, mode: str, num_experts: int, act: str,
                 capacity: int | None = None, policy: CachePolicy | None = None, *,
                 prefetcher=None, prefetch_per_layer: int = 0, collection=None,
                 num_moe_layers: int | None = None, top_k: int):
        """prefetcher: a `runtime.prefetch.Prefetcher` (cached mode only); collection: the
        `EAMCollection` it and the policy read, to which finished sequences are added."""
        assert mode in MODES, mode
        self.store, self.mode, self.num_experts, self.act = store, mode, num_experts, act
        self.device = store.device
        self.prefetcher, self.prefetch_per_layer, self.collection = prefetcher, prefetch_per_layer, collection
        num_moe_layers = num_moe_layers or 1 + max((layer for layer, _ in store.keys()), default=0)
        self.recorder = RoutingRecorder(num_moe_layers, num_experts, top_k)
        self.top_k = top_k
        self.replay: Replay | None = None
        self.record_lookahead = False  # record the lookahead guess even without the lookahead prefetcher
        if mode == "cached":
            self.cache = ExpertCache(store, capacity, policy)
        elif mode == "resident":
            self.cache = ExpertCache(store, len(store), LRU())
            self.cache.prefill(sorted(store.keys()))
        else:
            self.cache = ExpertCache(store, num_experts, LRU())
        self._zeros: dict[tuple[int, int], jax.Array] = {}
        self._wave_bounds: dict[int, jax.Array] = {}
        self._valid: tuple[np.ndarray | None, jax.Array | None] = (None, None)

    def _zero_acc(self, shape) -> jax.Array:
        if shape not in self._zeros:
            self._zeros[shape] = jnp.zeros(shape, jnp.float32, device=self.device)
        return self._zeros[shape]

    def _bounds(self, wave: int) -> jax.Array:
        """The ranks of wave `wave`'s experts among the layer's, [start, stop) int32 [2], on the device."""
        if wave not in self._wave_bounds:
            capacity = self.cache.capacity
            self._wave_bounds[wave] = jax.device_put(np.array([wave * capacity, (wave + 1) * capacity], np.int32), self.device)
        return self._wave_bounds[wave]

    def _valid_on_device(self, valid_rows: np.ndarray | None) -> jax.Array | None:
        """valid_rows on the device, copied once per step (executors pass one array to all layers of a
        step), or None when every row is valid."""
        if valid_rows is None or valid_rows.all():
            return None
        if self._valid[0] is not valid_rows:
            self._valid = (valid_rows, jax.device_put(valid_rows, self.device))
        return self._valid[1]

    @property
    def wants_lookahead(self) -> bool:
        """Whether executors should pass the next MoE layer's routing of each layer's input."""
        return self.record_lookahead or getattr(self.prefetcher, "uses_lookahead", False)

    def start_sequences(self, batch: int, sequences: int, tasks=None) -> None:
        """A generation of `sequences` prompts (the first rows of a `batch`) begins; tasks: labels or None."""
        self.recorder.start(batch, sequences, tasks)
        task = next((t for t in (tasks or []) if t is not None), None)
        self.cache.directory.policy.on_sequence_start(task)
        if self.prefetcher is not None:
            self.prefetcher.on_sequence_start(task)

    def end_sequences(self) -> None:
        """The generation is over: its sequences' activation matrices join the trace collection."""
        self.recorder.stop()
        if self.collection is not None:
            for b in range(self.recorder.sequences):
                experts, _ = self.recorder.routing(b)
                self.collection.add(eam_counts(experts, self.num_experts), self.recorder.tasks[b], experts=experts)
            refit = getattr(self.prefetcher, "refit", None)
            if refit is not None:
                refit()

    def run(self, moe_layer: int, moe_in, ids, weights, valid_rows: np.ndarray | None, finish: Finish, routing=None):
        """Routed experts of MoE layer `moe_layer`, then `finish`.

        moe_in [N, D]; ids [N, k] int32 and weights [N, k] f32 on the device; valid_rows: NumPy bool
        [N], the rows whose experts are needed (None: all rows; padding never needs experts);
        routing: what the host reads instead of ids (one transfer; None: ids), int32 [N, k] ids or,
        when `wants_lookahead`, [N, 2k]: ids, then the next MoE layer's router applied to this layer's input.
        """
        k = ids.shape[-1]
        routing = np.asarray(ids if routing is None else routing)
        ids_host, lookahead_host = routing[:, :k], (routing[:, k:] if routing.shape[-1] > k else None)
        if self.replay is not None:
            ids_host, lookahead_host, staged = self.replay(moe_layer, ids_host, lookahead_host, valid_rows)
            ids = ids_host.astype(np.int32) if staged is None else staged
        counts = expert_token_counts(ids_host, valid_rows, self.num_experts)
        self.cache.directory.policy.on_routing(moe_layer, counts)
        needed = [int(e) for e in np.flatnonzero(counts)]
        cache = self.cache
        acc = self._zero_acc(moe_in.shape)
        waves = split_waves(needed, cache.capacity)
        valid = self._valid_on_device(valid_rows)
        if self.mode == "dense-offload":
            chosen = set(needed)
            cache.stream([(moe_layer, e) for e in range(self.num_experts) if e not in chosen], moe_layer)
        for n, wave in enumerate(waves):
            keys = cache.begin_layer(moe_layer, wave)
            if n == len(waves) - 1:
                self._prefetch(moe_layer, counts, lookahead_host, valid_rows)
            experts = self._pad(cache.experts(keys))
            expert_ids = ExpertWave(self._bounds(n), valid, self.num_experts)  # the program finds the ids
            if n < len(waves) - 1:
                acc = layer_fns.accumulate(moe_in, ids, weights, expert_ids, experts, acc, self.act)
            else:
                out = finish(ids=ids, expert_ids=expert_ids, experts=experts, acc=acc)
            cache.end_layer()
        if self.mode in ("on-demand", "dense-offload"):
            cache.clear()
        self.recorder.record(moe_layer, ids_host, valid_rows, lookahead_host)  # while the device computes
        cache.wait_for_copies(moe_layer)
        return out

    def _pad(self, experts: tuple) -> tuple:
        """Pads a wave to its `expert_bucket` size (fewer compiled programs) with copies of its last
        expert, which the `ExpertWave` names -1, an id no token chose: each adds exactly zero, after
        the real experts."""
        pad = expert_bucket(len(experts), self.top_k, self.num_experts) - len(experts)
        return experts + (experts[-1],) * pad if pad > 0 else experts

    def _prefetch(self, moe_layer: int, counts: np.ndarray, lookahead: np.ndarray | None, valid_rows) -> None:
        """Shows the prefetcher this layer's routing and copies what it asks for (cached mode only)."""
        if self.prefetcher is None:
            return
        ahead = None if lookahead is None else expert_token_counts(lookahead, valid_rows, self.num_experts)
        self.prefetcher.observe(moe_layer, counts, ahead)
        if self.mode == "cached" and self.prefetch_per_layer > 0:
            self.cache.prefetch(lambda: self.prefetcher.predict(moe_layer), self.prefetch_per_layer)

    def reset_stats(self) -> None:
        self.cache.reset_counters()

    def stats(self) -> dict:
        return cache_stats(self.mode, self.cache, self.store, getattr(self.prefetcher, "name", "none"))
