"""The decoder-only executor of the engine's modes: per layer, routing read back to the host.

Per MoE layer the dense part runs on the device (`attend_and_route`), then the `ExpertRunner`
fetches and runs exactly the chosen experts (see `runtime.expert_runner` for the modes and why
outputs are bit-identical across them); dense layers run whole on the device.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from moejax.config import ModelConfig
from moejax.runtime import layer_fns
from moejax.runtime.executors import Executor
from moejax.runtime.expert_runner import ExpertRunner


class HostRoutedExecutor(Executor):
    def __init__(self, cfg: ModelConfig, globals_, layers, runner: ExpertRunner, device=None):
        super().__init__(cfg, globals_, device or runner.device)
        self.runner, self.name = runner, runner.mode
        self.layers = jax.device_put(layers, self.device)
        self.moe_index = {layer: m for m, layer in enumerate(cfg.moe_layer_ids)}
        # The MoE layer after each MoE layer (its router gives the lookahead prefetcher's guess).
        ids = cfg.moe_layer_ids
        self.next_moe = dict(zip(ids, ids[1:]))

    def step(self, tokens, kv_caches, positions, valid, select):
        cfg = self.cfg
        rows_valid = np.asarray(valid).reshape(-1)
        tokens, positions, select = self._inputs(tokens, positions, select)
        x = layer_fns.embed(cfg, self.globals, tokens)
        kv_caches = list(kv_caches)
        for i in range(cfg.num_layers):
            shape = (cfg, cfg.moe_layers[i], cfg.sliding_windows[i])
            if not cfg.moe_layers[i]:
                x, kv_caches[i], _ = layer_fns.layer_device_routed(*shape, self.layers[i], None, x, kv_caches[i], positions)
                continue
            next_params = self.layers[self.next_moe[i]] if self.runner.wants_lookahead and i in self.next_moe else None
            h, kv_caches[i], moe_in, weights, ids, routing = layer_fns.attend_and_route(
                *shape, self.layers[i], x, kv_caches[i], positions, next_params)
            finish = functools.partial(layer_fns.accumulate_and_finish, *shape, self.layers[i], h, moe_in, weights=weights)
            x = self.runner.run(self.moe_index[i], moe_in, ids, weights, rows_valid, finish, routing)
        return layer_fns.head(cfg, self.globals, x, select), kv_caches

    def reset_stats(self) -> None:
        self.runner.reset_stats()

    def stats(self) -> dict:
        return self.runner.stats()
