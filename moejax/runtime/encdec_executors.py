"""Executors of encoder-decoder models; each decides where the weights live.

Interface (what the sequence-to-sequence engine uses):
  encode(tokens, src_valid, route) -> EncoderState
      tokens: NumPy int32 [B, S] (right-padded sources); src_valid: NumPy bool [B, S], the real
      source tokens (attention mask); route: RouteInputs of NumPy arrays.
  new_kv_caches(batch, length) -> per-decoder-layer (k, v) device arrays [B, L, H, head_dim]
  decode(tokens, kv_caches, state, positions, route, select) -> (logits, kv_caches)
      tokens, positions: NumPy int32 [B, T]; route.valid [B, T]: the tokens that get experts
      (dropless: those of unfinished sequences; padding never needs experts); select: NumPy int32 [B] (logits [B, V] at that position) or
      None (logits [B, T, V]).
  last_routing: {global layer: topk ids [N, k] device array} of the latest call of each MoE layer.
  reset_stats(); stats() -> dict of counters ({'mode': 'resident', 'executor': name, ...})

`WholeModelExecutor` compiles the encoder and a decoder
step as one program each (reference); `DeviceRoutedExecutor` runs one jitted call per layer
with routing resolved on the device; `HostRoutedExecutor` reads each MoE layer's routing back
and runs the chosen experts through the `ExpertRunner` and its cache, in every offloading mode,
exactly as decoder models do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.encdec_config import EncDecConfig
from moejax.models.encdec import RouteInputs, kv_cache_shape
from moejax.runtime import encdec_layer_fns as fns
from moejax.runtime.executors import SequenceHooks
from moejax.runtime.expert_runner import ExpertRunner


@dataclasses.dataclass
class EncoderState:
    """What the decoder needs of an encoded source batch (device arrays)."""

    enc_out: jax.Array  # [B, S, D] after the encoder's final norm
    src_valid: jax.Array  # [B, S] bool
    cross_kv: list  # per decoder layer (k, v) [B, S, H, head_dim]


class EncDecExecutor(SequenceHooks):
    name = "base"

    def __init__(self, cfg: EncDecConfig, globals_, layers, experts, device=None):
        self.cfg = cfg
        self.device = device or jax.devices()[0]
        self.globals = jax.device_put(globals_, self.device)
        self.layers = jax.device_put(layers, self.device)
        self.experts = jax.device_put(experts, self.device)
        self.last_routing: dict[int, jax.Array] = {}

    def new_kv_caches(self, batch: int, length: int):
        shape = kv_cache_shape(self.cfg, batch, length)
        zeros = lambda: jnp.zeros(shape, self.cfg.dtype, device=self.device)  # noqa: E731
        return [(zeros(), zeros()) for _ in self.cfg.decoder_layer_ids]

    def _put(self, array, dtype=np.int32):
        return None if array is None else jax.device_put(np.asarray(array, dtype), self.device)

    def _put_route(self, route: RouteInputs) -> RouteInputs:
        return RouteInputs(self._put(route.valid, bool), self._put(route.counted, bool), self._put(route.capacity))

    def encode(self, tokens, src_valid, route: RouteInputs) -> EncoderState:
        raise NotImplementedError

    def decode(self, tokens, kv_caches, state: EncoderState, positions, route: RouteInputs, select):
        raise NotImplementedError

    def reset_stats(self) -> None:
        """Zeroes runtime counters (called at the start of each generate)."""

    def stats(self) -> dict:
        return {"mode": "resident", "executor": self.name}


class WholeModelExecutor(EncDecExecutor):
    """All weights on the device; the encoder, and each decoder step, one XLA program."""

    name = "whole-model"

    def encode(self, tokens, src_valid, route: RouteInputs) -> EncoderState:
        src_valid = self._put(src_valid, bool)
        enc_out, cross_kv = fns.whole_encoder(self.cfg, self.globals, self.layers, self.experts, self._put(tokens),
                                              src_valid, self._put_route(route))
        return EncoderState(enc_out, src_valid, cross_kv)

    def decode(self, tokens, kv_caches, state: EncoderState, positions, route: RouteInputs, select):
        return fns.whole_decoder(
            self.cfg, self.globals, self.layers, self.experts, self._put(tokens), self._put(positions), kv_caches,
            state.cross_kv, state.src_valid, self._put_route(route), self._put(select),
        )


class DeviceRoutedExecutor(EncDecExecutor):
    """All weights on the device, one jitted call per layer, routing resolved on the device."""

    name = "device-routed"

    def encode(self, tokens, src_valid, route: RouteInputs) -> EncoderState:
        cfg = self.cfg
        src_valid, route = self._put(src_valid, bool), self._put_route(route)
        x, bias = fns.embed_source(cfg, self.globals, self._put(tokens))
        for g in cfg.encoder_layer_ids:
            x, ids = self._encoder_layer(g, x, (src_valid, bias, route))
            if ids is not None:
                self.last_routing[g] = ids
        enc_out = fns.encoder_final(cfg, self.globals, x)
        return EncoderState(enc_out, src_valid, fns.cross_keys_values(cfg, self.layers, enc_out))

    def decode(self, tokens, kv_caches, state: EncoderState, positions, route: RouteInputs, select):
        cfg = self.cfg
        positions, route = self._put(positions), self._put_route(route)
        y, bias = fns.embed_target(cfg, self.globals, self._put(tokens), positions, kv_caches[0][0].shape[1])
        kv_caches = list(kv_caches)
        for j, g in enumerate(cfg.decoder_layer_ids):
            context = (positions, bias, state.cross_kv[j], state.src_valid, route)
            y, kv_caches[j], ids = self._decoder_layer(g, y, kv_caches[j], context)
            if ids is not None:
                self.last_routing[g] = ids
        return fns.head(cfg, self.globals, y, self._put(select)), kv_caches

    def _encoder_layer(self, g: int, x, context):
        """context: (src_valid, bias, route) -> (x, ids or None)."""
        shape = fns.layer_shape(self.cfg, g)
        return fns.encoder_device_routed(self.cfg, **shape, params=self.layers[g], experts=self.experts[g], x=x,
                                         src_valid=context[0], bias=context[1], route_in=context[2])

    def _decoder_layer(self, g: int, y, kv_cache, context):
        """context: (positions, bias, cross_kv, src_valid, route) -> (y, kv_cache, ids or None)."""
        shape = fns.layer_shape(self.cfg, g)
        return fns.decoder_device_routed(self.cfg, **shape, params=self.layers[g], experts=self.experts[g], y=y,
                                         kv_cache=kv_cache, positions=context[0], bias=context[1],
                                         cross_kv=context[2], src_valid=context[3], route_in=context[4])


class HostRoutedExecutor(DeviceRoutedExecutor):
    """Each MoE layer reads its routing back to the host; the `ExpertRunner` hands the expert function
    exactly the chosen experts from its cache, in every offloading mode (the decoder models' runtime,
    `runtime.expert_runner`); dense layers run device-routed."""

    name = "host-routed"

    def __init__(self, cfg: EncDecConfig, globals_, layers, runner: ExpertRunner, device=None):
        super().__init__(cfg, globals_, layers, [None] * cfg.num_layers, device or runner.device)
        self.runner = runner
        self.moe_index = {g: m for m, g in enumerate(cfg.moe_layer_ids)}
        # The next MoE layer of the same stack (its router gives the lookahead prefetcher's guess).
        self.next_moe = {}
        for stack in (cfg.encoder_layer_ids, cfg.decoder_layer_ids):
            moe = [g for g in stack if cfg.moe_layers[g]]
            self.next_moe.update(zip(moe, moe[1:]))

    def _encoder_layer(self, g: int, x, context):
        if not self.cfg.moe_layers[g]:
            return super()._encoder_layer(g, x, context)
        shape = fns.layer_shape(self.cfg, g)
        h, moe_in, weights, ids, routing = fns.encoder_attend_and_route(
            self.cfg, **shape, params=self.layers[g], x=x, src_valid=context[0], bias=context[1], route_in=context[2]
        )
        return self._experts_and_finish(g, h, moe_in, weights, ids, routing, context[2]), ids

    def _decoder_layer(self, g: int, y, kv_cache, context):
        if not self.cfg.moe_layers[g]:
            return super()._decoder_layer(g, y, kv_cache, context)
        shape = fns.layer_shape(self.cfg, g)
        h, kv_cache, moe_in, weights, ids, routing = fns.decoder_attend_and_route(
            self.cfg, **shape, params=self.layers[g], y=y, kv_cache=kv_cache, positions=context[0],
            bias=context[1], cross_kv=context[2], src_valid=context[3], route_in=context[4],
        )
        return self._experts_and_finish(g, h, moe_in, weights, ids, routing, context[4]), kv_cache, ids

    def _experts_and_finish(self, g: int, h, moe_in, weights, ids, routing, route_in):
        """routing: the ids in host memory, what the runner reads (replaced by ids and the lookahead guess
        when the runner wants it). Padding and dropped (token, expert) pairs carry id E, so every row
        may be passed as valid."""
        finish = functools.partial(fns.accumulate_and_finish, self.cfg, **fns.layer_shape(self.cfg, g),
                                   params=self.layers[g], h=h, moe_in=moe_in, weights=weights)
        if self.runner.wants_lookahead and g in self.next_moe:
            nxt = self.next_moe[g]
            routing = fns.lookahead_route(self.cfg, **fns.layer_shape(self.cfg, nxt), params=self.layers[nxt],
                                          h=h, route_in=route_in, ids=ids)
        return self.runner.run(self.moe_index[g], moe_in, ids, weights, None, finish, routing)

    def reset_stats(self) -> None:
        self.runner.reset_stats()

    def stats(self) -> dict:
        return {**self.runner.stats(), "executor": self.name}


EXECUTORS = {cls.name: cls for cls in (HostRoutedExecutor, DeviceRoutedExecutor, WholeModelExecutor)}
