"""The decoder-only executor of the engine's modes: per layer, routing read back to the host.

Per MoE layer the dense part runs on the device (`attend_and_route`), then the `ExpertRunner`
fetches and runs exactly the chosen experts (see `runtime.expert_runner` for the modes and why
outputs are bit-identical across them); dense layers run whole on the device. When the next layer
is a MoE layer too, the layer's finish and the next layer's `attend_and_route` are one call
(`finish_and_attend`): one dispatch per MoE layer instead of two (on the H200, ~4 ms/token less for
trace+lookahead prefetching at a 25% budget; BENCHMARKS.md).
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
        # For each MoE layer, what the lookahead guess needs of the MoE layer after it: its norm and
        # router (the guess is that router applied to the layer's input).
        ids = cfg.moe_layer_ids
        self.next_router = {i: {name: self.layers[j][name] for name in ("post_norm", "router")} for i, j in zip(ids, ids[1:])}

    def step(self, tokens, kv_caches, positions, valid, select):
        cfg, layers = self.cfg, self.layers
        rows_valid = np.asarray(valid).reshape(-1)
        tokens, positions, select = self._inputs(tokens, positions, select)
        x = layer_fns.embed(cfg, self.globals, tokens)
        kv_caches = list(kv_caches)
        attended = None  # layer i's attend_and_route outputs when layer i-1's finish computed them
        for i in range(cfg.num_layers):
            shape = (cfg, cfg.moe_layers[i], cfg.sliding_windows[i])
            if not cfg.moe_layers[i]:
                x, kv_caches[i], _ = layer_fns.layer_device_routed(*shape, layers[i], None, x, kv_caches[i], positions)
                continue
            if attended is None:
                attended = layer_fns.attend_and_route(*shape, layers[i], x, kv_caches[i], positions, self._lookahead_params(i))
            h, kv_caches[i], moe_in, weights, ids, routing = attended
            if i + 1 < cfg.num_layers and cfg.moe_layers[i + 1]:
                finish = functools.partial(
                    layer_fns.finish_and_attend, cfg, cfg.sliding_windows[i], cfg.sliding_windows[i + 1], layers[i], h,
                    moe_in, weights=weights, next_params=layers[i + 1], next_kv_cache=kv_caches[i + 1],
                    positions=positions, lookahead_params=self._lookahead_params(i + 1))
                kv_caches[i + 1] = None  # donated to the call
                attended = self.runner.run(self.moe_index[i], moe_in, ids, weights, rows_valid, finish, routing)
            else:
                finish = functools.partial(layer_fns.accumulate_and_finish, *shape, layers[i], h, moe_in, weights=weights)
                x, attended = self.runner.run(self.moe_index[i], moe_in, ids, weights, rows_valid, finish, routing), None
        return layer_fns.head(cfg, self.globals, x, select), kv_caches

    def _lookahead_params(self, i: int):
        """The router of the MoE layer after layer i, when the runner wants the lookahead guess."""
        return self.next_router.get(i) if self.runner.wants_lookahead else None

    def reset_stats(self) -> None:
        self.runner.reset_stats()

    def stats(self) -> dict:
        return self.runner.stats()
