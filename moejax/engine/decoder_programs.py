"""The step programs of decoder-only models: one jitted program per prefill chunk and per decode step.

Everything a step needs happens inside its program: each MoE layer routes, looks its experts up in the
device cache (`offload.device_cache`), fetches the misses from the pinned-host stacks into the slab,
computes exactly the chosen experts (`models.moe.experts_from_slab`) and goes on; the last layer's
logits are sampled on the device and the slot state advances. The host dispatches steps back to back
and reads a step's tokens and routing afterwards.

Modes (`ProgramSpec.mode`, static):
  resident       the slab holds every expert (slot = layer * E + expert): no lookup, nothing moves;
  cached         a slab of `num_slots` with the cache's policy; misses fetched in a loop that runs
                 once per miss;
  on-demand      no cache: each step fetches the experts it uses into a scratch slab;
  dense-offload  every expert of every MoE layer fetched at each step (what layer-wise offloading moves).
All modes compute with the same function on the same gathered weights, so outputs are bit-identical.

Prefetching (cached mode): `lookahead` applies the next MoE layer's router to this layer's output of
attention and fetches up to that many of its guessed experts right away (in the program, after this
layer's own misses, evicting only experts this layer does not use); the keys the host staged (the trace
prefetcher's picks from earlier steps) are fetched when the step begins. Both run on the device's one
stream, like the misses: they move a miss earlier, they do not hide it behind compute.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from moejax.config import ModelConfig
from moejax.engine.slots import SlotState, sample_rows
from moejax.models.decoder import DecoderLayer, EmbedHead
from moejax.models.moe import experts_from_slab
from moejax.offload import device_cache as dc
from moejax.offload.expert_stacks import fetch_expert, write_slot

MODES = ("resident", "cached", "on-demand", "dense-offload")


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """What a step program is compiled for (static, hashable)."""

    cfg: ModelConfig
    mode: str
    policy: str = "lru"  # a device cache policy (`device_cache.DEVICE_POLICIES`)
    lookahead: int = 0  # experts fetched per MoE layer from the next router's guess (cached mode)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.cfg.moe_layer_ids


@dataclasses.dataclass(frozen=True)
class ExpertInputs:
    """What a step reads and updates of the experts, inside the program: the cache's bookkeeping, the
    device slab, the host stacks (one per MoE layer, in pinned host memory; empty in resident mode),
    the keys the host picked to prefetch when the step begins (int32 [P], -1: none) and the priority
    policy's scores."""

    cache: dc.CacheState
    slab: dict
    host: tuple
    staged_keys: jax.Array | None = None
    priorities: dc.Priorities | None = None


def distinct_size(cfg: ModelConfig, tokens: int) -> int:
    """Entries of a step's distinct-expert list: the most experts `tokens` tokens can choose."""
    return min(tokens * cfg.top_k, cfg.num_experts)


def _routed(spec: ProgramSpec, m: int, experts: ExpertInputs, moe_in, ids, weights, valid_rows, guess):
    """MoE layer m's routed output [N, D] f32, through the mode's expert source: -> (output, experts)."""
    cfg, E = spec.cfg, spec.cfg.num_experts
    distinct = dc.distinct_experts(ids, valid_rows, E, distinct_size(cfg, ids.shape[0]))
    cache, slab = experts.cache, experts.slab
    if spec.mode == "resident":
        real = distinct < E
        slots = jnp.where(real, m * E + distinct, -1)
        counters = dc._count(cache.counters, m, dc.ACTIVATIONS, real.sum())
        cache = cache.replace(counters=dc._count(counters, m, dc.HITS, real.sum()))
    elif spec.mode == "cached":
        host = experts.host[m]
        move = lambda slab, expert, slot: write_slot(slab, slot, fetch_expert(host, expert))  # noqa: E731
        cache, slab, slots, pinned = dc.access(cache, m, distinct, policy=spec.policy, num_experts=E,
                                               priorities=experts.priorities, move=move, slab=slab)
        if guess is not None:
            ahead = experts.host[m + 1]
            keys = dc.guessed_keys(guess, valid_rows, m + 1, E, spec.lookahead)
            move_guess = lambda slab, i, slot: write_slot(slab, slot, fetch_expert(ahead, keys[i] % E))  # noqa: E731
            cache, slab, _ = dc.install(cache, keys, policy=spec.policy, num_experts=E, layer=m,
                                        priorities=experts.priorities, pinned=pinned, move=move_guess, slab=slab)
    else:
        host = experts.host[m]
        real = distinct < E
        if spec.mode == "dense-offload":  # the whole layer crosses the link; compute reads what it chose
            scratch = fetch_all(host)
            slots = jnp.where(real, distinct, -1)
            cache = cache.replace(counters=dc._count(cache.counters, m, dc.STREAMED, E - real.sum()))
        else:  # on-demand: the chosen experts only, one fetch each
            scratch = {name: jnp.zeros((distinct.shape[0],) + w.shape[1:], w.dtype) for name, w in host.items()}
            scratch = lax.fori_loop(0, real.sum(), lambda j, s: write_slot(s, j, fetch_expert(host, distinct[j])), scratch)
            slots = jnp.where(real, jnp.arange(distinct.shape[0]), -1)
        counters = dc._count(cache.counters, m, dc.ACTIVATIONS, real.sum())
        cache = cache.replace(counters=dc._count(counters, m, dc.MISSES, real.sum()))
        out = experts_from_slab(moe_in, ids, weights, distinct, slots, scratch, cfg.hidden_act)
        return out, dataclasses.replace(experts, cache=cache)
    out = experts_from_slab(moe_in, ids, weights, distinct, slots, slab, cfg.hidden_act)
    return out, dataclasses.replace(experts, cache=cache, slab=slab)


def fetch_all(host: dict) -> dict:
    """A whole host stack moved to the device, inside a program."""
    return {name: jax.device_put(w, jax.memory.Space.Device) for name, w in host.items()}


def _install_staged(spec: ProgramSpec, experts: ExpertInputs) -> ExpertInputs:
    """Fetches the host's picks (any MoE layer: a switch over the layers' host stacks) before the first layer."""
    if experts.staged_keys is None:
        return experts
    keys, E = experts.staged_keys, spec.cfg.num_experts
    fetchers = [lambda e, stack=stack: fetch_expert(stack, e) for stack in experts.host]
    move = lambda slab, i, slot: write_slot(slab, slot, lax.switch(keys[i] // E, fetchers, keys[i] % E))  # noqa: E731
    cache, slab, _ = dc.install(experts.cache, keys, policy=spec.policy, num_experts=E, layer=-1,
                                priorities=experts.priorities, move=move, slab=experts.slab, staged=True)
    return dataclasses.replace(experts, cache=cache, slab=slab, staged_keys=None)


def forward(spec: ProgramSpec, attend_len: int, params, experts: ExpertInputs, kv_caches, tokens, positions, slot_ids, valid):
    """All layers on tokens [R, T] of slots slot_ids [R] at positions [R, T] (valid [R, T]: real tokens).

    -> (hidden [R, T, D] before the final norm, experts, kv_caches, routing int32 [MoE layers, R * T, k],
    guesses int32 [MoE layers, R * T, k] (what the lookahead router picked for the next MoE layer; -1
    where none) or None).
    """
    cfg = spec.cfg
    experts = _install_staged(spec, experts)
    x = EmbedHead(cfg).apply({"params": params["globals"]}, tokens, method=EmbedHead.embed_tokens)
    valid_rows = valid.reshape(-1)
    kv_caches = list(kv_caches)
    routing, guesses = [], []
    moe_ids = spec.moe_layers
    for i in range(cfg.num_layers):
        layer = DecoderLayer(cfg, cfg.moe_layers[i], cfg.sliding_windows[i])
        variables = {"params": params["layers"][i]}
        h, kv_caches[i] = layer.apply(variables, x, kv_caches[i], positions, slot_ids, attend_len, method=DecoderLayer.attend)
        if not cfg.moe_layers[i]:
            x = layer.apply(variables, h, method=DecoderLayer.dense_mlp)
            continue
        m = moe_ids.index(i)
        moe_in, weights, ids = layer.apply(variables, h, method=DecoderLayer.route)
        guess = None
        if spec.lookahead and spec.mode == "cached" and m + 1 < len(moe_ids):
            following = DecoderLayer(cfg, True, None)
            _, _, guess = following.apply({"params": params["layers"][moe_ids[m + 1]]}, h, method=DecoderLayer.route)
        routed, experts = _routed(spec, m, experts, moe_in, ids, weights, valid_rows, guess)
        x = layer.apply(variables, h, moe_in, routed, method=DecoderLayer.finish)
        # Keeps XLA from fusing across layers, where it could skip rounding x to its dtype.
        x = lax.optimization_barrier(x)
        routing.append(ids)
        guesses.append(guess if guess is not None else jnp.full_like(ids, -1))
    has_guesses = bool(spec.lookahead) and spec.mode == "cached"
    return x, experts, kv_caches, jnp.stack(routing), (jnp.stack(guesses) if has_guesses else None)


def _logits(cfg: ModelConfig, params, x):
    return EmbedHead(cfg).apply({"params": params["globals"]}, x, method=EmbedHead.logits)


def _sample(state: SlotState, rows, logits):
    return sample_rows(logits, state.temperature[rows], state.top_k[rows], state.top_p[rows], state.seed[rows],
                       state.sampled[rows])


DONATED = ("cache", "slab", "kv_caches", "state")


@functools.partial(jax.jit, static_argnames=("spec", "attend_len"), donate_argnames=DONATED)
def decode_step(params, cache, slab, host, staged_keys, priorities, kv_caches, state: SlotState, slot_ids, active, *,
                spec: ProgramSpec, attend_len: int):
    """One token for each row: slot_ids int32 [R] (the scratch slot for padding rows), active bool [R].

    cache, slab, host, staged_keys, priorities: the fields of `ExpertInputs`. -> (tokens int32 [R], routing,
    guesses, resident bool [L * E] after the step, cache, slab, kv_caches, state). Each active slot's last
    token is fed at its length; its new token and length are written back.
    """
    experts = ExpertInputs(cache, slab, host, staged_keys, priorities)
    tokens = state.last_token[slot_ids][:, None]
    positions = state.length[slot_ids][:, None]
    x, experts, kv_caches, routing, guesses = forward(spec, attend_len, params, experts, kv_caches, tokens, positions,
                                                      slot_ids, active[:, None])
    new = _sample(state, slot_ids, _logits(spec.cfg, params, x[:, 0]))
    state = state.replace(
        last_token=state.last_token.at[slot_ids].set(jnp.where(active, new, state.last_token[slot_ids])),
        length=state.length.at[slot_ids].add(active.astype(jnp.int32)),
        sampled=state.sampled.at[slot_ids].add(active.astype(jnp.int32)))
    return new, routing, guesses, experts.cache.table >= 0, experts.cache, experts.slab, kv_caches, state


@functools.partial(jax.jit, static_argnames=("spec", "attend_len", "want_logits"), donate_argnames=DONATED)
def prefill_chunk(params, cache, slab, host, staged_keys, priorities, kv_caches, state: SlotState, slot, tokens, start,
                  count, final, *, spec: ProgramSpec, attend_len: int, want_logits: bool = False):
    """Prompt tokens [T] (the first `count` real) of slot `slot` at positions start.. .

    -> (token int32: sampled from the last real token's logits, routing, guesses, resident, cache, slab,
    kv_caches, state, logits [T, V] f32 or None). The slot's length becomes start + count and its last token the
    sampled one; `final` (bool): this chunk ends the prompt (its token is the sequence's first, drawn
    with the slot's random index 0; earlier chunks' tokens are discarded).
    """
    experts = ExpertInputs(cache, slab, host, staged_keys, priorities)
    T = tokens.shape[0]
    positions = (start + jnp.arange(T, dtype=jnp.int32))[None]
    valid = (jnp.arange(T) < count)[None]
    slot_ids = slot[None]
    x, experts, kv_caches, routing, guesses = forward(spec, attend_len, params, experts, kv_caches, tokens[None],
                                                      positions, slot_ids, valid)
    last = lax.dynamic_index_in_dim(x[0], count - 1, keepdims=True)
    token = _sample(state, slot_ids, _logits(spec.cfg, params, last))[0]
    state = state.replace(last_token=state.last_token.at[slot].set(token), length=state.length.at[slot].set(start + count),
                          sampled=state.sampled.at[slot].set(final.astype(jnp.int32)))
    logits = _logits(spec.cfg, params, x[0]) if want_logits else None
    return token, routing, guesses, experts.cache.table >= 0, experts.cache, experts.slab, kv_caches, state, logits
