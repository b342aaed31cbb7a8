"""Executors run the model's layers on token ids; each decides where the weights live.

Interface (what the generation loop uses):
  new_kv_caches(batch, length) -> per-layer (k, v) device arrays [B, S, KV, head_dim]
  step(tokens, kv_caches, positions, valid, select) -> (logits, kv_caches)
      tokens, positions: NumPy int32 [B, T]; valid: NumPy bool [B, T], True for real tokens of
      unfinished sequences (padding never needs experts); select: NumPy int32 [B] (logits [B, V]
      at that position) or None (logits [B, T, V]).
  stats() -> dict of counters (empty where nothing is offloaded)

`WholeModelExecutor` compiles the whole model into one program (reference and upper bound);
`DeviceRoutedExecutor` runs one jitted call per layer with all weights on the device and
routing resolved there (no host round trip per layer; equal to the host-routed executor up
to float rounding). The host-routed executor of the engine's modes is in
`moejax.runtime.host_routed`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.errors import MoejaxError
from moejax.models.decoder import kv_cache_shape
from moejax.runtime import layer_fns


class SequenceHooks:
    """Generation hooks of every executor (decoder and encoder-decoder); host-routed executors set
    `runner` (an ExpertRunner), which records routing and drives prefetchers through them."""

    name = "base"
    runner = None

    def start_sequences(self, batch: int, sequences: int, tasks=None) -> None:
        """A generation of `sequences` prompts in `batch` rows begins; tasks: their labels or None."""
        if self.runner is not None:
            self.runner.start_sequences(batch, sequences, tasks)

    def end_sequences(self) -> None:
        """The generation started last is over."""
        if self.runner is not None:
            self.runner.end_sequences()

    def routing(self, b: int):
        """Sequence b's recorded routing: (experts int16 [L, T, k], lookahead [L, T, k] or None)."""
        if self.runner is None:
            raise MoejaxError(f"the {self.name} executor does not record routing: use the host-routed executor")
        return self.runner.recorder.routing(b)


class Executor(SequenceHooks):
    name = "base"

    def __init__(self, cfg: ModelConfig, globals_, device=None):
        self.cfg = cfg
        self.device = device or jax.devices()[0]
        self.globals = jax.device_put(globals_, self.device)

    def new_kv_caches(self, batch: int, length: int):
        shape = kv_cache_shape(self.cfg, batch, length)
        zeros = lambda: jnp.zeros(shape, self.cfg.dtype, device=self.device)  # noqa: E731
        return [(zeros(), zeros()) for _ in range(self.cfg.num_layers)]

    def _inputs(self, tokens, positions, select):
        put = lambda a: None if a is None else jax.device_put(np.asarray(a, np.int32), self.device)  # noqa: E731
        return put(tokens), put(positions), put(select)

    def step(self, tokens, kv_caches, positions, valid, select):
        raise NotImplementedError

    def reset_stats(self) -> None:
        """Zeroes runtime counters (called at the start of each generate)."""

    def stats(self) -> dict:
        return {"mode": self.name}


class WholeModelExecutor(Executor):
    """All weights on the device, the whole forward pass one XLA program."""

    name = "whole-model"

    def __init__(self, cfg: ModelConfig, globals_, layers, experts, device=None):
        super().__init__(cfg, globals_, device)
        self.layers = jax.device_put(layers, self.device)
        self.experts = jax.device_put(experts, self.device)

    def step(self, tokens, kv_caches, positions, valid, select):
        tokens, positions, select = self._inputs(tokens, positions, select)
        return layer_fns.whole_model(self.cfg, self.globals, self.layers, self.experts, tokens, kv_caches, positions, select)


class DeviceRoutedExecutor(Executor):
    """All weights on the device, one jitted call per layer, routing resolved on the device."""

    name = "device-routed"

    def __init__(self, cfg: ModelConfig, globals_, layers, experts, device=None):
        super().__init__(cfg, globals_, device)
        self.layers = jax.device_put(layers, self.device)
        self.experts = jax.device_put(experts, self.device)

    def step(self, tokens, kv_caches, positions, valid, select):
        cfg = self.cfg
        tokens, positions, select = self._inputs(tokens, positions, select)
        x = layer_fns.embed(cfg, self.globals, tokens)
        kv_caches = list(kv_caches)
        for i in range(cfg.num_layers):
            x, kv_caches[i], _ = layer_fns.layer_device_routed(
                cfg, cfg.moe_layers[i], cfg.sliding_windows[i], self.layers[i], self.experts[i], x, kv_caches[i], positions
            )
        return layer_fns.head(cfg, self.globals, x, select), kv_caches
