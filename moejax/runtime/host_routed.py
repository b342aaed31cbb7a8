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
    """fuse_next_attention: a MoE layer followed by a MoE layer runs its experts' finish and the next
    layer's attention and routing as one call (`layer_fns.finish_then_attend`); False: two calls."""

    def __init__(self, cfg: ModelConfig, globals_, layers, runner: ExpertRunner, device=None, fuse_next_attention: bool = True):
        super().__init__(cfg, globals_, device or runner.device)
        assert runner.top_k == cfg.top_k, "the runner's waves are chunks of the model's top_k"
        self.runner, self.name = runner, runner.mode
        self.fuse_next_attention = fuse_next_attention
        self.layers = jax.device_put(layers, self.device)
        self.moe_index = {layer: m for m, layer in enumerate(cfg.moe_layer_ids)}
        # The MoE layer after each MoE layer (its router gives the lookahead prefetcher's guess).
        ids = cfg.moe_layer_ids
        self.next_moe = dict(zip(ids, ids[1:]))

    def _lookahead_params(self, i: int):
        """The parameters of the MoE layer after layer i, when the runner wants the lookahead guess."""
        return self.layers[self.next_moe[i]] if self.runner.wants_lookahead and i in self.next_moe else None

    def step(self, tokens, kv_caches, positions, valid, select):
        cfg = self.cfg
        rows_valid = np.asarray(valid).reshape(-1)
        tokens, positions, select = self._inputs(tokens, positions, select)
        x = layer_fns.embed(cfg, self.globals, tokens)
        kv_caches = list(kv_caches)
        attended = None  # layer i's attend_and_route outputs, when the previous layer's call computed them
        for i in range(cfg.num_layers):
            shape = (cfg, cfg.moe_layers[i], cfg.sliding_windows[i])
            if not cfg.moe_layers[i]:
                x, kv_caches[i], _ = layer_fns.layer_device_routed(*shape, self.layers[i], None, x, kv_caches[i], positions)
                continue
            if attended is None:
                attended = layer_fns.attend_and_route(*shape, self.layers[i], x, kv_caches[i], positions, self._lookahead_params(i))
            h, kv_caches[i], moe_in, weights, ids, routing = attended
            attended = None
            j = i + 1
            if self.fuse_next_attention and j < cfg.num_layers and cfg.moe_layers[j]:
                finish = functools.partial(
                    layer_fns.finish_then_attend, *shape, self.layers[i], h, moe_in, weights=weights,
                    next_window=cfg.sliding_windows[j], next_params=self.layers[j], next_kv_cache=kv_caches[j],
                    positions=positions, lookahead_params=self._lookahead_params(j))
                kv_caches[j] = None  # donated to the call; the call returns its update
                attended = self.runner.run(self.moe_index[i], moe_in, ids, weights, rows_valid, finish, routing)
            else:
                finish = functools.partial(layer_fns.accumulate_and_finish, *shape, self.layers[i], h, moe_in, weights=weights)
                x = self.runner.run(self.moe_index[i], moe_in, ids, weights, rows_valid, finish, routing)
        return layer_fns.head(cfg, self.globals, x, select), kv_caches

    def reset_stats(self) -> None:
        self.runner.reset_stats()

    def stats(self) -> dict:
        return self.runner.stats()
