"""The routed-expert step of a MoE layer, through the expert cache, for every model kind and mode.

Model executors (decoder-only: `runtime.host_routed`; encoder-decoder: `runtime.encdec_executors`)
run a layer's dense part on the device, then call `ExpertRunner.run` with its routing and a
`finish` function. The runner reads the routing back, looks the distinct chosen experts up in
the GPU cache, starts copying the misses, and passes the device arrays of exactly those experts
to the expert function: `layer_fns.accumulate` for all waves but the last, `finish` for the last
(which also completes the layer). A layer that needs more experts than the cache has slots
streams them through in waves, in increasing expert order, which keeps the sums bit-identical
to one pass; every mode calls the same compiled functions with the same shapes, so outputs are
bit-identical across modes, budgets and policies.

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

from moejax.runtime import layer_fns
from moejax.runtime.cache import ExpertCache
from moejax.runtime.policies import LRU, CachePolicy
from moejax.runtime.stats import cache_stats
from moejax.runtime.store import HostExpertStore

MODES = ("resident", "cached", "on-demand", "dense-offload")

# finish(expert_ids=[n] int32, experts=tuple of n per-expert dicts, acc=[N, D] f32) -> layer output,
# called with keywords.
Finish = Callable[..., jax.Array]


class ExpertRunner:
    def __init__(self, store: HostExpertStore, mode: str, num_experts: int, act: str,
                 capacity: int | None = None, policy: CachePolicy | None = None):
        assert mode in MODES, mode
        self.store, self.mode, self.num_experts, self.act = store, mode, num_experts, act
        self.device = store.device
        if mode == "cached":
            self.cache = ExpertCache(store, capacity, policy)
        elif mode == "resident":
            self.cache = ExpertCache(store, len(store), LRU())
            self.cache.prefill(sorted(store.keys()))
        else:
            self.cache = ExpertCache(store, num_experts, LRU())
        self._device_ints: dict[tuple[int, ...], jax.Array] = {}
        self._zeros: dict[tuple[int, int], jax.Array] = {}

    def _ids_on_device(self, ids: list[int]) -> jax.Array:
        """Device int32 array of `ids`, kept for reuse (no host->device copy per layer once seen)."""
        key = tuple(ids)
        if key not in self._device_ints:
            self._device_ints[key] = jax.device_put(np.asarray(ids, np.int32), self.device)
        return self._device_ints[key]

    def _zero_acc(self, shape) -> jax.Array:
        if shape not in self._zeros:
            self._zeros[shape] = jnp.zeros(shape, jnp.float32, device=self.device)
        return self._zeros[shape]

    def needed(self, ids_host: np.ndarray, valid_rows: np.ndarray | None) -> list[int]:
        """Distinct experts chosen by the valid rows (ids >= num_experts mark dropped pairs)."""
        chosen = ids_host if valid_rows is None else ids_host[valid_rows]
        return [int(e) for e in np.unique(chosen) if e < self.num_experts]

    def run(self, moe_layer: int, moe_in, ids, weights, valid_rows: np.ndarray | None, finish: Finish):
        """Routed experts of MoE layer `moe_layer`, then `finish`.

        moe_in [N, D]; ids [N, k] int32 and weights [N, k] f32 on the device; valid_rows: NumPy bool
        [N], the rows whose experts are needed (None: all rows; padding never needs experts).
        """
        ids.copy_to_host_async()
        needed = self.needed(np.asarray(ids), valid_rows)
        cache = self.cache
        acc = self._zero_acc(moe_in.shape)
        waves = [needed[j : j + cache.capacity] for j in range(0, len(needed), cache.capacity)] or [[]]
        if self.mode == "dense-offload":
            chosen = set(needed)
            cache.stream([(moe_layer, e) for e in range(self.num_experts) if e not in chosen], moe_layer)
        for n, wave in enumerate(waves):
            keys = cache.begin_layer(moe_layer, wave)
            experts = cache.ready(keys, moe_layer)
            expert_ids = self._ids_on_device(wave)
            if n < len(waves) - 1:
                acc = layer_fns.accumulate(moe_in, ids, weights, expert_ids, experts, acc, self.act)
            else:
                out = finish(expert_ids=expert_ids, experts=experts, acc=acc)
            cache.end_layer()
        if self.mode in ("on-demand", "dense-offload"):
            cache.clear()
        return out

    def reset_stats(self) -> None:
        self.cache.reset_counters()

    def stats(self) -> dict:
        return cache_stats(self.mode, self.cache, self.store)
