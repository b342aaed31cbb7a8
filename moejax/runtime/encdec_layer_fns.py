"""The jitted per-layer functions of encoder-decoder models, the encoder and decoder alike.

Static arguments are the config and the layer's shape (`is_decoder`, `moe`, `ffn_size`), never its
index, so all layers alike share one compiled function per input shape; decoder KV caches are
donated and updated in place. Every MoE layer, encoder or decoder, runs through the same three
steps a runtime can drive: `*_attend_and_route` (-> moe_in [N, D], weights [N, k] f32, ids [N, k]
int32, and the ids again in pinned host memory, which the host reads), `layer_fns.accumulate` (waves
of experts given as a tuple of per-expert dicts or PackedExperts, ids increasing) and
`accumulate_and_finish` (last wave + residual). `*_device_routed` run a whole layer with its stacked
experts on the device (no host round trip).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.encdec_config import EncDecConfig
from moejax.models import encdec
from moejax.models.encdec import EncDecGlobals, EncDecLayer, RouteInputs
from moejax.models.moe import accumulate_experts
from moejax.runtime.layer_fns import to_host_memory

_LAYER_STATIC = ("cfg", "is_decoder", "moe", "ffn_size")


def layer_shape(cfg: EncDecConfig, layer: int) -> dict:
    """The static shape arguments of global layer `layer`."""
    return {"is_decoder": cfg.is_decoder_layer(layer), "moe": cfg.moe_layers[layer], "ffn_size": cfg.ffn_size(layer)}


def _globals(cfg, globals_, method, *args):
    return EncDecGlobals(cfg).apply({"params": globals_}, *args, method=getattr(EncDecGlobals, method))


def _layer(cfg, is_decoder, moe, ffn_size, params, method, *args):
    module = EncDecLayer(cfg, is_decoder, moe, ffn_size)
    return module.apply({"params": params}, *args, method=getattr(EncDecLayer, method))


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_source(cfg: EncDecConfig, globals_, tokens):
    """tokens [B, S] int32 -> (x [B, S, D], encoder position bias [1, H, S, S] or None)."""
    return _globals(cfg, globals_, "embed_source", tokens), _globals(cfg, globals_, "encoder_bias", tokens.shape[1])


@functools.partial(jax.jit, static_argnames=("cfg", "kv_length"))
def embed_target(cfg: EncDecConfig, globals_, tokens, positions, kv_length: int):
    """tokens, positions [B, T] -> (y [B, T, D], decoder position bias [B, H, T, L] or None)."""
    y = _globals(cfg, globals_, "embed_target", tokens, positions)
    return y, _globals(cfg, globals_, "decoder_bias", positions, kv_length)


@functools.partial(jax.jit, static_argnames=("cfg",))
def encoder_final(cfg: EncDecConfig, globals_, x):
    return _globals(cfg, globals_, "encoder_final", x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head(cfg: EncDecConfig, globals_, y, select):
    """Logits f32: [B, V] at position select[b] of each row, or [B, T, V] when select is None."""
    if select is not None:
        y = y[jnp.arange(y.shape[0]), select]
    return _globals(cfg, globals_, "logits", y)


@functools.partial(jax.jit, static_argnames=("cfg",))
def cross_keys_values(cfg: EncDecConfig, layers, enc_out):
    """Every decoder layer's cross-attention (k, v) [B, S, H, hd] (layers: all layers' params),
    computed once per source batch."""
    return encdec.cross_keys_values(cfg, layers, enc_out)


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC)
def encoder_device_routed(cfg: EncDecConfig, is_decoder, moe, ffn_size, params, experts, x, src_valid, bias, route_in):
    """A whole encoder layer, stacked experts on the device: -> (x, ids [N, k] or None)."""
    h = _layer(cfg, is_decoder, moe, ffn_size, params, "encoder_attend", x, src_valid, bias)
    return _layer(cfg, is_decoder, moe, ffn_size, params, "feed_forward", h, route_in, experts)


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC, donate_argnames=("kv_cache",))
def decoder_device_routed(
    cfg: EncDecConfig, is_decoder, moe, ffn_size, params, experts, y, kv_cache, positions, bias, cross_kv, src_valid, route_in
):
    """A whole decoder layer, stacked experts on the device: -> (y, kv_cache, ids [N, k] or None)."""
    args = (y, kv_cache, positions, bias, cross_kv, src_valid)
    h, kv_cache = _layer(cfg, is_decoder, moe, ffn_size, params, "decoder_attend", *args)
    y, ids = _layer(cfg, is_decoder, moe, ffn_size, params, "feed_forward", h, route_in, experts)
    return y, kv_cache, ids


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC)
def encoder_attend_and_route(cfg: EncDecConfig, is_decoder, moe, ffn_size, params, x, src_valid, bias, route_in):
    """First half of an encoder MoE layer: -> (h [B, S, D], moe_in [N, D], weights [N, k], ids [N, k], routing):
    routing, the ids in pinned host memory, is what the host reads (as `layer_fns.attend_and_route`'s)."""
    h = _layer(cfg, is_decoder, moe, ffn_size, params, "encoder_attend", x, src_valid, bias)
    moe_in, weights, ids = _layer(cfg, is_decoder, moe, ffn_size, params, "route", h, route_in)
    return h, moe_in, weights, ids, to_host_memory(ids)


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC, donate_argnames=("kv_cache",))
def decoder_attend_and_route(
    cfg: EncDecConfig, is_decoder, moe, ffn_size, params, y, kv_cache, positions, bias, cross_kv, src_valid, route_in
):
    """First half of a decoder MoE layer: -> (h [B, T, D], kv_cache, moe_in [N, D], weights [N, k], ids [N, k],
    routing): routing, the ids in pinned host memory, is what the host reads."""
    args = (y, kv_cache, positions, bias, cross_kv, src_valid)
    h, kv_cache = _layer(cfg, is_decoder, moe, ffn_size, params, "decoder_attend", *args)
    moe_in, weights, ids = _layer(cfg, is_decoder, moe, ffn_size, params, "route", h, route_in)
    return h, kv_cache, moe_in, weights, ids, to_host_memory(ids)


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC)
def lookahead_route(cfg: EncDecConfig, is_decoder, moe, ffn_size, params, h, route_in, ids):
    """The next MoE layer's router (its params and shape) on this layer's residual h [B, T, D], after
    this layer's ids [N, k]: -> routing [N, 2k] in pinned host memory: ids, then the guess (read back
    as one array)."""
    guess = _layer(cfg, is_decoder, moe, ffn_size, params, "route", h, route_in)[2]
    return to_host_memory(jnp.concatenate([ids, guess], axis=-1))


@functools.partial(jax.jit, static_argnames=_LAYER_STATIC)
def accumulate_and_finish(cfg: EncDecConfig, is_decoder, moe, ffn_size, params, h, moe_in, ids, weights, expert_ids, experts, acc):
    """The last wave of experts (tuple of per-expert dicts or PackedExperts, ids increasing) plus the
    residual: -> x [B, T, D]."""
    acc = accumulate_experts(moe_in, ids, weights, expert_ids, experts, acc, cfg.hidden_act)
    return _layer(cfg, is_decoder, moe, ffn_size, params, "finish", h, acc)


@functools.partial(jax.jit, static_argnames=("cfg",))
def whole_encoder(cfg: EncDecConfig, globals_, layers, experts, tokens, src_valid, route_in: RouteInputs):
    """The whole encoder as one XLA program, plus every decoder layer's cross K/V: -> (enc_out, cross_kv)."""
    enc_out, _ = encdec.encode(cfg, globals_, layers, experts, tokens, src_valid, route_in)
    return enc_out, encdec.cross_keys_values(cfg, layers, enc_out)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("kv_caches",))
def whole_decoder(cfg: EncDecConfig, globals_, layers, experts, tokens, positions, kv_caches, cross_kv, src_valid, route_in, select):
    """The whole decoder step as one XLA program (the reference): -> (logits, kv_caches)."""
    y, kv_caches, _ = encdec.decode(cfg, globals_, layers, experts, tokens, positions, kv_caches, cross_kv, src_valid, route_in)
    return head(cfg, globals_, y, select), kv_caches
