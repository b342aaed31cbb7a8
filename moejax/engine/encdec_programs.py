"""The step programs of encoder-decoder models (Switch Transformers, NLLB-MoE): the encoder on one source,
a chunk of one target's decoder tokens, and a decode step over slots.

As for decoder models (`engine.decoder_programs`, whose per-MoE-layer expert path `routed_moe` every MoE
layer here runs), everything a step needs happens inside its program: routing (dropless, or transformers'
capacity routing), the device cache lookup, the fetch of missed experts from the pinned-host stacks, the
expert compute and the sampling. The encoder and the decoder share one expert cache, slab and set of host
stacks (key = MoE layer * E + expert, over all MoE layers, encoder first), so decode steps can use the whole
budget; their programs return routing over all MoE layers, the other stack's rows holding E (no expert).

Layers: each stack is cut into `UnitSegment`s, a unit of consecutive layers (Switch's (dense, MoE) pair,
NLLB-MoE's (dense, dense, dense, MoE)) repeated `count` times, one `lax.scan` over its repeats with the
parameters stacked per position in the unit, so a program compiles each distinct layer once.

Per-slot encoder state lives in `kv_caches` next to the decoder's self-attention caches: the encoder program
writes every decoder layer's cross-attention keys and values of the slot's source and the source's length
into the slot's rows, and the decoder reads them at every step.

Expert shapes: a slab slot holds the largest expert. Where the encoder's and the decoder's FFN sizes
differ (no published checkpoint: Switch Transformers and NLLB-MoE use one size), the loader zero-pads the
smaller experts on the host, which leaves every output unchanged (act(0) = 0 and zero biases) at the cost
of the padding's bytes in the host stacks, the link and the slab.

Capacity routing: every sequence is its own capacity group (a decode step: each row), as in transformers
for that sequence alone, so a sequence's tokens do not depend on what the other slots hold; NLLB-MoE's
batch-wide groups (`capacity_group='batch'`) are not reproduced across sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.encdec_config import EncDecConfig
from moejax.engine.decoder_programs import ExpertInputs, ProgramSpec, gate, install_staged, routed_moe, sample_next
from moejax.engine.slots import SlotState
from moejax.models.capacity import capacity_for
from moejax.models.encdec import EncDecLayer, RouteInputs, apply_globals


@dataclasses.dataclass(frozen=True)
class UnitSegment:
    """`count` repeats of a unit of consecutive layers of one stack: one `lax.scan` over the repeats."""

    start: int  # global index of its first layer
    unit: tuple[bool, ...]  # per position: MoE (True) or dense
    count: int
    first_moe: int  # the MoE index of its first MoE layer
    decoder: bool

    def layer(self, repeat: int, position: int) -> int:
        return self.start + repeat * len(self.unit) + position

    @property
    def moe_per_unit(self) -> int:
        return sum(self.unit)


def stack_segments(cfg: EncDecConfig, decoder: bool) -> tuple[UnitSegment, ...]:
    """The encoder's (or decoder's) layers as unit segments, in order: at each point the unit repeated most
    often (ties: the shorter one), so periodic patterns of sparse layers become one segment."""
    layers = list(cfg.decoder_layer_ids if decoder else cfg.encoder_layer_ids)
    kinds = [cfg.moe_layers[g] for g in layers]
    moe_seen = sum(cfg.moe_layers[: layers[0]]) if layers else 0
    segments, i = [], 0
    while i < len(kinds):
        length = max(range(1, len(kinds) - i + 1), key=lambda p: (_repeats(kinds, i, p), -p))
        repeats, unit = _repeats(kinds, i, length), tuple(kinds[i : i + length])
        segments.append(UnitSegment(layers[i], unit, repeats, moe_seen, decoder))
        moe_seen += repeats * sum(unit)
        i += repeats * len(unit)
    return tuple(segments)


def _repeats(kinds: list[bool], start: int, length: int) -> int:
    unit, n = kinds[start : start + length], 1
    while kinds[start + n * length : start + (n + 1) * length] == unit:
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class Seq2SeqSpec(ProgramSpec):
    """What an encoder-decoder step program is compiled for. cfg: the model's, with one capacity group per
    sequence (see the module docstring)."""

    cfg: EncDecConfig

    @property
    def encoder_segments(self) -> tuple[UnitSegment, ...]:
        return stack_segments(self.cfg, decoder=False)

    @property
    def decoder_segments(self) -> tuple[UnitSegment, ...]:
        return stack_segments(self.cfg, decoder=True)

    @property
    def segments(self) -> tuple[UnitSegment, ...]:
        return self.encoder_segments + self.decoder_segments

    def stack_moe(self, decoder: bool) -> tuple[int, ...]:
        """The MoE indices of one stack's MoE layers."""
        cfg = self.cfg
        return tuple(m for m, g in enumerate(cfg.moe_layer_ids) if cfg.is_decoder_layer(g) == decoder)


def program_params(cfg: EncDecConfig, globals_: dict, layers: list[dict]) -> dict:
    """The step programs' parameters: {'globals', 'segments': per segment (the encoder's, then the decoder's),
    per position in its unit, the layers' parameters stacked over the repeats, 'next_router': likewise, per
    MoE position the ffn_norm and router of the next MoE layer of the same stack (the last one's: its own),
    None for dense positions}."""
    stack = lambda trees: jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)  # noqa: E731
    segments, following = [], []
    for segment in stack_segments(cfg, False) + stack_segments(cfg, True):
        moe_ids = [g for g in cfg.moe_layer_ids if cfg.is_decoder_layer(g) == segment.decoder]
        positions, nexts = [], []
        for j, moe in enumerate(segment.unit):
            ids = [segment.layer(r, j) for r in range(segment.count)]
            positions.append(stack([layers[g] for g in ids]))
            after = [moe_ids[min(moe_ids.index(g) + 1, len(moe_ids) - 1)] for g in ids] if moe else []
            nexts.append(stack([{n: layers[a][n] for n in ("ffn_norm", "router")} for a in after]) if moe else None)
        segments.append(positions)
        following.append(nexts)
    return {"globals": globals_, "segments": segments, "next_router": following}


def new_kv_caches(spec: Seq2SeqSpec, rows: int, length: int, device) -> dict:
    """The decoder's caches for `rows` slots: {'self': per decoder segment, per unit position, the
    self-attention (k, v) [count, rows, length, H, head_dim]; 'cross': the same for the cross-attention keys
    and values of each slot's source (its first `length` tokens); 'source_length': int32 [rows]}. Every
    array is its own buffer (they are donated)."""
    cfg = spec.cfg

    def zeros(count):
        return jnp.zeros((count, rows, length, cfg.num_heads, cfg.head_dim), cfg.dtype, device=device)

    def caches():
        return [[(zeros(s.count), zeros(s.count)) for _ in s.unit] for s in spec.decoder_segments]

    return {"self": caches(), "cross": caches(), "source_length": jnp.zeros(rows, jnp.int32, device=device)}


def _run_stack(spec: Seq2SeqSpec, decoder: bool, params, experts: ExpertInputs, x, attend, route_in: RouteInputs,
               kv=None):
    """One stack's layers on x [B, T, D]. attend(layer, p, x, kv, segment, position, repeat) -> (h, kv) is the
    layer's attention half; kv: per segment of the stack what `attend` updates (None: nothing). -> (x, experts, kv,
    routing int32 [MoE layers, B * T, k] with E in the other stack's rows, guesses likewise with -1, or None)."""
    cfg, E, k = spec.cfg, spec.cfg.num_experts, spec.cfg.top_k
    ffn_size = cfg.decoder_ffn_size if decoder else cfg.encoder_ffn_size
    first = len(spec.encoder_segments) if decoder else 0
    own = spec.stack_moe(decoder)
    valid_rows = route_in.valid.reshape(-1)
    kv = list(kv) if kv is not None else None
    routing, guesses = [], []
    for s, segment in enumerate(spec.decoder_segments if decoder else spec.encoder_segments):

        def repeat(carry, xs, segment=segment, s=s):
            x, seg_kv, cache, slab = carry
            p, following, i = xs
            used = dataclasses.replace(experts, cache=cache, slab=slab)
            ids_out, guesses_out = [], []
            for j, moe in enumerate(segment.unit):
                layer = EncDecLayer(cfg, decoder, moe, ffn_size)
                h, seg_kv = attend(layer, p[j], x, seg_kv, s, j, i)
                if not moe:
                    x = layer.apply({"params": p[j]}, h, method=EncDecLayer.dense_ffn)
                    continue
                m = segment.first_moe + i * segment.moe_per_unit + sum(segment.unit[:j])
                moe_in, weights, ids = layer.apply({"params": p[j]}, h, route_in, method=EncDecLayer.route)
                ids, weights = gate(spec, ids, weights, valid_rows)
                guess = None
                if spec.computes_guesses:  # the next MoE layer of this stack's router, one layer early
                    _, _, guess = layer.apply({"params": following[j]}, h, route_in, method=EncDecLayer.route)
                    guess = jnp.where(m < own[-1], guess, -1)
                routed, used = routed_moe(spec, m, used, moe_in, ids, weights, valid_rows, guess)
                x = layer.apply({"params": p[j]}, h, routed, method=EncDecLayer.finish)
                ids_out.append(ids)
                guesses_out.append(jnp.full_like(ids, -1) if guess is None else guess)
            ys = (jnp.stack(ids_out), jnp.stack(guesses_out)) if ids_out else None
            return (x, seg_kv, used.cache, used.slab), ys

        xs = (params["segments"][first + s], params["next_router"][first + s], jnp.arange(segment.count))
        seg_kv = None if kv is None else kv[s]
        (x, seg_kv, cache, slab), ys = lax.scan(repeat, (x, seg_kv, experts.cache, experts.slab), xs,
                                                unroll=spec.unroll_layers)
        experts = dataclasses.replace(experts, cache=cache, slab=slab)
        if kv is not None:
            kv[s] = seg_kv
        if ys is not None:
            routing.append(ys[0].reshape((-1,) + ys[0].shape[2:]))
            guesses.append(ys[1].reshape((-1,) + ys[1].shape[2:]))
    rows = valid_rows.shape[0]
    before, after = (len(spec.stack_moe(False)), 0) if decoder else (0, len(spec.stack_moe(True)))

    def full(parts, fill):
        return jnp.concatenate([jnp.full((before, rows, k), fill, jnp.int32), *parts,
                                jnp.full((after, rows, k), fill, jnp.int32)])

    return x, experts, kv, full(routing, E), full(guesses, -1) if spec.computes_guesses else None


def _decoder(spec: Seq2SeqSpec, attend_len: int, source_len: int, params, experts: ExpertInputs, kv_caches, tokens,
             positions, slot_ids, valid, capacity):
    """The decoder on tokens [R, T] of slots slot_ids [R] at positions [R, T] (valid [R, T]: real tokens),
    attending over the first `attend_len` positions of the self-attention caches and the first `source_len`
    of the cross-attention ones. -> (hidden [R, T, D] before the final norm, experts, kv_caches, routing, guesses)."""
    cfg, glob = spec.cfg, params["globals"]
    experts = install_staged(spec, experts)
    y = apply_globals(cfg, glob, "embed_target", tokens, positions)
    bias = apply_globals(cfg, glob, "decoder_bias", positions, attend_len)
    src_valid = jnp.arange(source_len)[None] < kv_caches["source_length"][slot_ids][:, None]

    def attend(layer, p, y, caches, s, j, i):
        cross_k, cross_v = kv_caches["cross"][s][j]
        seen = (i, slot_ids, slice(None, source_len))
        h, kv_j = layer.apply({"params": p}, y, caches[j], positions, bias, (cross_k[seen], cross_v[seen]), src_valid,
                              slot_ids, attend_len, i, method=EncDecLayer.decoder_attend)
        return h, caches[:j] + [kv_j] + caches[j + 1:]

    route_in = RouteInputs(valid, valid, capacity)
    y, experts, caches, routing, guesses = _run_stack(spec, True, params, experts, y, attend, route_in,
                                                      [list(c) for c in kv_caches["self"]])
    return y, experts, {**kv_caches, "self": caches}, routing, guesses


DONATED = ("cache", "slab", "kv_caches", "state")


@functools.partial(jax.jit, static_argnames=("spec", "want_output"), donate_argnames=("cache", "slab", "kv_caches"))
def encode_source(params, cache, slab, host, staged_keys, priorities, kv_caches, slot, tokens, count, capacity, *,
                  spec: Seq2SeqSpec, want_output: bool = False):
    """Source tokens [S] (the first `count` real; capacity int32: the experts' capacity in capacity routing)
    through the encoder; writes every decoder layer's cross-attention keys and values of the output, and the
    source's length, into slot `slot`'s rows of kv_caches.

    cache, slab, host, staged_keys, priorities: the fields of `ExpertInputs`.
    -> (routing int32 [MoE layers, S, k] (the decoder's rows: E), guesses or None, resident bool [L * E],
    cache, slab, kv_caches, the encoder's output [S, D] after its final norm or None).
    """
    cfg, glob = spec.cfg, params["globals"]
    experts = install_staged(spec, ExpertInputs(cache, slab, host, staged_keys, priorities))
    S = tokens.shape[0]
    valid = (jnp.arange(S) < count)[None]
    x = apply_globals(cfg, glob, "embed_source", tokens[None])
    bias = apply_globals(cfg, glob, "encoder_bias", S)

    def attend(layer, p, x, kv, s, j, i):
        return layer.apply({"params": p}, x, valid, bias, method=EncDecLayer.encoder_attend), kv

    x, experts, _, routing, guesses = _run_stack(spec, False, params, experts, x, attend, RouteInputs(valid, valid, capacity))
    enc_out = apply_globals(cfg, glob, "encoder_final", x)
    cross = []
    for s, segment in enumerate(spec.decoder_segments):
        positions = []
        for j, (cross_k, cross_v) in enumerate(kv_caches["cross"][s]):
            layer = EncDecLayer(cfg, True, segment.unit[j], cfg.decoder_ffn_size)
            p = params["segments"][len(spec.encoder_segments) + s][j]
            k, v = jax.vmap(lambda q, layer=layer: layer.apply({"params": q}, enc_out, method=EncDecLayer.cross_keys_values))(p)
            at = (0, slot, 0, 0, 0)
            positions.append((lax.dynamic_update_slice(cross_k, k.astype(cross_k.dtype), at),
                              lax.dynamic_update_slice(cross_v, v.astype(cross_v.dtype), at)))
        cross.append(positions)
    kv_caches = {**kv_caches, "cross": cross, "source_length": kv_caches["source_length"].at[slot].set(count)}
    return (routing, guesses, experts.cache.table >= 0, experts.cache, experts.slab, kv_caches,
            enc_out[0] if want_output else None)


@functools.partial(jax.jit, static_argnames=("spec", "attend_len", "source_len", "want_logits"), donate_argnames=DONATED)
def decoder_chunk(params, cache, slab, host, staged_keys, priorities, kv_caches, state: SlotState, slot, tokens, start,
                  count, forced_token, capacity, *, spec: Seq2SeqSpec, attend_len: int, source_len: int,
                  want_logits: bool = False):
    """Target tokens [T] (the first `count` real) of slot `slot` at positions start.. : generation's first step
    (the decoder start token alone) or teacher forcing. capacity int32: as for `encode_source`.

    -> (token int32: forced_token when >= 0, else sampled from the last real token's logits with random index 0,
    routing [MoE layers, T, k] (the encoder's rows: E), guesses, resident, cache, slab, kv_caches, state,
    logits [T, V] f32 or None). The slot's length becomes start + count and its last token the new one.
    """
    experts = ExpertInputs(cache, slab, host, staged_keys, priorities)
    T = tokens.shape[0]
    positions = (start + jnp.arange(T, dtype=jnp.int32))[None]
    valid = (jnp.arange(T) < count)[None]
    slot_ids = slot[None]
    y, experts, kv_caches, routing, guesses = _decoder(spec, attend_len, source_len, params, experts, kv_caches,
                                                       tokens[None], positions, slot_ids, valid, capacity)
    last = lax.dynamic_index_in_dim(y[0], count - 1, keepdims=True)
    sampled = sample_next(state, slot_ids, apply_globals(spec.cfg, params["globals"], "logits", last))[0]
    token = jnp.where(forced_token >= 0, forced_token, sampled)
    state = state.replace(last_token=state.last_token.at[slot].set(token), length=state.length.at[slot].set(start + count),
                          sampled=state.sampled.at[slot].set(1))
    logits = apply_globals(spec.cfg, params["globals"], "logits", y[0]) if want_logits else None
    return token, routing, guesses, experts.cache.table >= 0, experts.cache, experts.slab, kv_caches, state, logits


@functools.partial(jax.jit, static_argnames=("spec", "attend_len", "source_len"), donate_argnames=DONATED)
def decode_step(params, cache, slab, host, staged_keys, priorities, kv_caches, state: SlotState, slot_ids, active,
                forced_ids=None, *, spec: Seq2SeqSpec, attend_len: int, source_len: int):
    """One target token for each row: slot_ids int32 [R] (the scratch slot for padding rows), active bool [R];
    each row is its own capacity group. forced_ids: always None (the decoder engines' routing override).

    -> (tokens int32 [R], routing [MoE layers, R, k], guesses, resident, cache, slab, kv_caches, state), as
    `decoder_programs.decode_step`.
    """
    experts = ExpertInputs(cache, slab, host, staged_keys, priorities)
    tokens = state.last_token[slot_ids][:, None]
    positions = state.length[slot_ids][:, None]
    capacity = jnp.int32(capacity_for(spec.cfg, 1))
    y, experts, kv_caches, routing, guesses = _decoder(spec, attend_len, source_len, params, experts, kv_caches, tokens,
                                                       positions, slot_ids, active[:, None], capacity)
    new = sample_next(state, slot_ids, apply_globals(spec.cfg, params["globals"], "logits", y[:, 0]))
    state = state.replace(
        last_token=state.last_token.at[slot_ids].set(jnp.where(active, new, state.last_token[slot_ids])),
        length=state.length.at[slot_ids].add(active.astype(jnp.int32)),
        sampled=state.sampled.at[slot_ids].add(active.astype(jnp.int32)))
    return new, routing, guesses, experts.cache.table >= 0, experts.cache, experts.slab, kv_caches, state
