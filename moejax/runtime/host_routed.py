"""The per-layer executor with routing resolved on the host: resident and every offloading mode.

Per MoE layer: the dense part runs on the device (`attend_and_route`); its top-k ids come back
to the host; the distinct experts the valid tokens chose are looked up in the GPU cache, the
misses are copied asynchronously, prefetches for later layers are issued before the layer's
expert compute is dispatched (so they overlap it), and the expert function receives the
device arrays of exactly those experts. A layer that needs more experts than the cache has
slots streams them through in waves, in increasing expert order, which keeps the sums
bit-identical to one pass. Every mode calls the same compiled functions with the same
shapes, so outputs are bit-identical across modes, budgets and policies.

Modes:
  resident       every expert on the device (the cache holds them all; nothing moves);
  cached         experts in host memory, a GPU cache of `capacity` experts with a replacement policy;
  on-demand      only the current layer's experts, fetched every time (the no-cache baseline);
  dense-offload  every expert of the layer copied every step, as layer-wise offloading does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.runtime import layer_fns
from moejax.runtime.cache import ExpertCache
from moejax.runtime.executors import Executor
from moejax.runtime.policies import LRU, CachePolicy
from moejax.runtime.stats import cache_stats
from moejax.runtime.store import HostExpertStore

MODES = ("resident", "cached", "on-demand", "dense-offload")


class HostRoutedExecutor(Executor):
    def __init__(
        self,
        cfg: ModelConfig,
        globals_,
        layers,
        store: HostExpertStore,
        mode: str,
        capacity: int | None = None,
        policy: CachePolicy | None = None,
        device=None,
    ):
        super().__init__(cfg, globals_, device)
        assert mode in MODES, mode
        self.mode, self.store, self.name = mode, store, mode
        self.layers = jax.device_put(layers, self.device)
        self.moe_index = {layer: m for m, layer in enumerate(cfg.moe_layer_ids)}
        if mode == "cached":
            self.cache = ExpertCache(store, capacity, policy)
        elif mode == "resident":
            self.cache = ExpertCache(store, len(store), LRU())
            self.cache.prefill(sorted(store.keys()))
        else:
            self.cache = ExpertCache(store, cfg.num_experts, LRU())
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

    def step(self, tokens, kv_caches, positions, valid, select):
        cfg = self.cfg
        rows_valid = np.asarray(valid).reshape(-1)
        tokens, positions, select = self._inputs(tokens, positions, select)
        x = layer_fns.embed(cfg, self.globals, tokens)
        kv_caches = list(kv_caches)
        for i in range(cfg.num_layers):
            window = cfg.sliding_windows[i]
            if not cfg.moe_layers[i]:
                x, kv_caches[i], _ = layer_fns.layer_device_routed(cfg, False, window, self.layers[i], None, x, kv_caches[i], positions)
                continue
            h, kv_caches[i], moe_in, weights, ids = layer_fns.attend_and_route(
                cfg, True, window, self.layers[i], x, kv_caches[i], positions
            )
            ids.copy_to_host_async()
            needed = np.unique(np.asarray(ids)[rows_valid]).tolist()
            x = self._run_experts(self.moe_index[i], i, h, moe_in, weights, ids, needed)
        return layer_fns.head(cfg, self.globals, x, select), kv_caches

    def _run_experts(self, moe_layer: int, layer: int, h, moe_in, weights, ids, needed: list[int]):
        """Routed experts of one layer (waves when the cache is smaller than `needed`), then finish."""
        cfg, cache = self.cfg, self.cache
        static = (cfg, True, cfg.sliding_windows[layer])
        acc = self._zero_acc(moe_in.shape)
        waves = [needed[j : j + cache.capacity] for j in range(0, len(needed), cache.capacity)] or [[]]
        if self.mode == "dense-offload":
            unneeded = [(moe_layer, e) for e in range(cfg.num_experts) if e not in set(needed)]
            cache.stream(unneeded, moe_layer)
        for n, wave in enumerate(waves):
            keys = cache.begin_layer(moe_layer, wave)
            experts = cache.ready(keys, moe_layer)
            expert_ids = self._ids_on_device(wave)
            if n < len(waves) - 1:
                acc = layer_fns.accumulate(moe_in, ids, weights, expert_ids, experts, acc, cfg.hidden_act)
            else:
                out = layer_fns.accumulate_and_finish(*static, self.layers[layer], h, moe_in, ids, weights, expert_ids, experts, acc)
            cache.end_layer()
        if self.mode in ("on-demand", "dense-offload"):
            cache.clear()
        return out

    def reset_stats(self) -> None:
        self.cache.reset_counters()

    def stats(self) -> dict:
        return cache_stats(self.mode, self.cache, self.store)
