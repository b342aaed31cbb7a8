"""The step programs of decoder-only models: one jitted program per prefill chunk and per decode step.

Everything a step needs happens inside its program: each MoE layer routes, looks its experts up in the
device cache (`offload.device_cache`), fetches the misses from the pinned-host stacks into the slab,
computes exactly the chosen experts (`models.moe.routed_experts`) and goes on; the last layer's
logits are sampled on the device and the slot state advances. The host dispatches steps back to back
and reads a step's tokens and routing afterwards.

Modes (`ProgramSpec.mode`, static):
  resident       the slab holds every expert (slot = layer * E + expert): no lookup, nothing moves;
  cached         a slab of `num_slots` with the cache's policy; misses fetched in a loop that runs
                 once per miss;
  on-demand      no cache: each step fetches the experts it uses into a scratch slab;
  dense-offload  every expert of every MoE layer fetched at each step (what layer-wise offloading moves).
All modes compute with the same function on the same gathered weights, so outputs are bit-identical.

Expert compute (`ProgramSpec.expert_compute`, static): how a MoE layer runs its chosen experts on the step's
N token rows, from the same slab in every mode (`models.moe`):
  union      the step's distinct experts gathered once, every row through each of them ([U, N] expert rows),
             each row adding its own in increasing expert order;
  grouped    dropless dynamic gating (Huang et al.): (row, choice) pairs sorted by expert into fixed-size
             blocks, each expert computing exactly its pairs (about N x k expert rows), added as union adds;
  ragged     the same sorted pairs through XLA's grouped matmul (`lax.ragged_dot`), no padding;
  capacity   static capacity-factor gating, the padded baseline: every distinct expert gets
             C = ceil(capacity_factor x N x k / E) token slots, pairs past them dropped from the routing
             (`models.capacity.drop_over_capacity`) before the cache sees it. Approximate: a row's output
             depends on the other rows;
  inplace    union's sums from Pallas kernels that read the chosen experts where they lie in the slab
             (`kernels.slab_experts`; GPU, float experts);
  auto       grouped from `moe.GROUPED_FROM_ROWS` rows up; below, inplace for calls of up to
             `moe.INPLACE_MAX_ROWS` rows (decode) where `ProgramSpec.inplace` says the kernels run, else union.

Prefetching (cached mode): `lookahead` applies the next MoE layer's router to this layer's output of
attention and fetches up to that many of its guessed experts right away (in the program, after this
layer's own misses, evicting only experts this layer does not use); the keys the host staged (the trace
prefetcher's picks from earlier steps) are fetched when the step begins. Both run on the device's one
stream, like the misses: they move a miss earlier, they do not hide it behind compute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from moejax.config import ModelConfig
from moejax.engine.slots import SlotState, sample_rows
from moejax.models.decoder import DecoderLayer, EmbedHead, expert_activation
from moejax.models.capacity import capacity_slots, drop_over_capacity
from moejax.models.moe import CAPACITY_FACTOR, forced_weights, resolve_expert_compute, routed_experts
from moejax.offload import device_cache as dc
from moejax.offload.cpu_experts import HostExperts, host_finish, host_start, split_misses
from moejax.offload.expert_stacks import AddressedHost, fetch_all, fetch_expert, write_slot, zero_experts
from moejax.offload.host_cache import TieredHost

if TYPE_CHECKING:
    from moejax.engine.expert_parallel import ExpertParallel

MODES = ("resident", "cached", "on-demand", "dense-offload")


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """What a step program is compiled for (static, hashable)."""

    cfg: ModelConfig
    mode: str
    policy: str = "lru"  # a device cache policy (`device_cache.DEVICE_POLICIES`)
    lookahead: int = 0  # experts fetched per MoE layer from the next router's guess (cached mode)
    guesses: bool = False  # return the next router's guesses even without the lookahead (for traces)
    # Unroll each segment's layer scan: no loop over layers in the program, one copy of the layer per layer:
    # a little faster to run for few layers, minutes to compile for many (BENCHMARKS.md has the figures).
    unroll_layers: bool = False
    expert_compute: str = "auto"  # `models.moe.EXPERT_COMPUTES`; see the module docstring
    inplace: bool = False  # 'auto' may compute few rows 'inplace' (the kernels run here: one GPU, float experts)
    capacity_factor: float = CAPACITY_FACTOR  # expert_compute 'capacity' only
    # cached mode: a layer step missing at least this many experts moves its whole layer from the pinned stack in one
    # copy and takes its misses from there (`admit_misses`); None: never (each miss fetched by itself; `build_engine`
    # leaves it None over the disk tier, whose experts are read one at a time)
    whole_layer_from: int | None = None
    # cached mode: the host computes missed experts routed few tokens (`offload.cpu_experts`); None: never
    cpu_experts: HostExperts | None = None
    # cached mode over the disk tier: after each MoE layer stages its misses, the next router's guess on its input
    # goes to the host cache as the next layer's likely misses (`admit_misses`, `HostCache.hint`)
    tier_hints: bool = False
    # several devices: the mesh and where each expert lives (`engine.expert_parallel`); None: one device
    expert_parallel: ExpertParallel | None = None

    def capacity(self, rows: int) -> int:
        """Token slots per expert of static capacity gating on a call of `rows` token rows."""
        return capacity_slots(self.capacity_factor, rows, self.cfg.top_k, self.cfg.num_experts)

    @property
    def computes_guesses(self) -> bool:
        return self.guesses or ((self.lookahead > 0 or self.tier_hints) and self.mode == "cached")

    @property
    def segments(self) -> tuple[Segment, ...]:
        return layer_segments(self.cfg)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.cfg.moe_layer_ids


NO_WINDOW = 1 << 30  # a layer's window in a segment of mixed windows when it has none: longer than any sequence


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive layers of one kind (MoE or dense): one `lax.scan` in a step, over parameters and KV caches
    stacked on a leading axis of `count`. Their attention windows (`windows`, one per layer) may differ, as
    gpt-oss alternates sliding and full layers: then each layer's window enters the scan as a value
    (`layer_windows`) instead of being compiled in, so the layers still share one loop body."""

    start: int  # its first layer
    count: int
    moe: bool
    windows: tuple[int | None, ...]
    first_moe: int  # the MoE index of its first layer (MoE segments)

    @property
    def window(self) -> int | None:
        """The window compiled into the layer body: the layers' common one (None: none, or mixed)."""
        return self.windows[0] if len(set(self.windows)) == 1 else None

    def layer_windows(self) -> jax.Array | None:
        """int32 [count]: each layer's window (NO_WINDOW: none) where they differ; None where they are alike."""
        if len(set(self.windows)) == 1:
            return None
        return jnp.array([NO_WINDOW if w is None else w for w in self.windows], jnp.int32)


def layer_segments(cfg: ModelConfig) -> tuple[Segment, ...]:
    """The model's layers as runs of MoE or dense layers, in order."""
    segments, moe_seen = [], 0
    for i in range(cfg.num_layers):
        moe, window = cfg.moe_layers[i], cfg.sliding_windows[i]
        if segments and segments[-1].moe == moe:
            last = segments[-1]
            segments[-1] = dataclasses.replace(last, count=last.count + 1, windows=(*last.windows, window))
        else:
            segments.append(Segment(i, 1, moe, (window,), moe_seen))
        moe_seen += moe
    return tuple(segments)


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
    # cached mode, steps wide enough to copy a layer whole: a layer-sized buffer {name: [E, ...]} that the layer
    # steps hand on to each other (`layer_buffer`), written only by a step that copies its layer (or shares it with
    # the host); None: each layer step makes its own, which costs a write of zeros where it copies nothing
    layer_buffer: dict | None = None
    # cached mode, a step whose layers run as programs of their own (`engine.layer_stream`): the MoE layer's whole
    # stack {name: [E, ...]}, copied to the device by the host ahead of the layer; a layer step that copies its layer
    # whole reads it instead of copying (`admit_misses`)
    staged_layer: dict | None = None


def distinct_size(cfg: ModelConfig, tokens: int) -> int:
    """Entries of a step's distinct-expert list: the most experts `tokens` tokens can choose."""
    return min(tokens * cfg.top_k, cfg.num_experts)


def _host_layer(host: tuple, m, make):
    """make(host[m]) for a traced MoE layer index m (a switch over the layers' host stacks)."""
    return lax.switch(m, [lambda stack=stack: make(stack) for stack in host])


def host_expert(host, m, e) -> dict:
    """Expert e of MoE layer m (traced ints) from the host tier, on the device: from the layers' pinned stacks, or
    through the disk-backed host cache (`offload.host_cache.TieredHost`)."""
    if isinstance(host, TieredHost):
        return host.fetch(m, e)
    return _host_layer(host, m, lambda h: fetch_expert(h, e))


def write_from_host(host, slab: dict, m, e, slot) -> dict:
    """The slab with expert e of MoE layer m (traced ints) from the host tier in slot `slot`: copied straight
    into the slot by the copy kernel where the host carries its row tables (`expert_stacks.AddressedHost`), else
    fetched (`host_expert`) and then written."""
    if isinstance(host, AddressedHost):
        return host.write(slab, m, e, slot)
    return write_slot(slab, slot, host_expert(host, m, e))


def routed_moe(spec: ProgramSpec, m, experts: ExpertInputs, moe_in, ids, weights, valid_rows, guess, *,
               counted: bool = False):
    """MoE layer m's (traced) routed output [N, D] f32, through the mode's expert source: -> (output, experts).
    Over several devices each runs `local_moe` on its own experts and the outputs are summed (`engine.expert_parallel`).
    counted: the caller counts this layer's resident accesses itself (`counts_after_scan`; one device only)."""
    if spec.expert_parallel is not None:
        return spec.expert_parallel.routed(functools.partial(local_moe, spec), m, experts, moe_in, ids, weights,
                                           valid_rows, guess)
    return local_moe(spec, spec.cfg.num_experts, m, experts, moe_in, ids, weights, valid_rows, guess, counted=counted)


def counts_after_scan(spec: ProgramSpec) -> bool:
    """Whether `forward` counts a resident step's accesses after its last layer (`device_cache.count_layers`: a few
    operations for all the MoE layers) instead of in each layer."""
    return spec.mode == "resident" and spec.expert_parallel is None


def local_moe(spec: ProgramSpec, E: int, m, experts: ExpertInputs, moe_in, ids, weights, valid_rows, guess, *,
              counted: bool = False):
    """`routed_moe` on one device that holds E experts of each MoE layer: every expert of the model, or under
    expert parallelism its own, renumbered 0..E-1 (ids, guess, cache keys, host stacks and slab all in that
    numbering; ids E: not this device's pairs, weight 0)."""
    L = len(spec.moe_layers)
    distinct = dc.distinct_experts(ids, valid_rows, E, min(ids.size, E))
    cache, slab, streamed, buffer = experts.cache, experts.slab, None, experts.layer_buffer
    if spec.mode == "resident":
        real = distinct < E
        slots = jnp.where(real, m * E + distinct, -1)
        if not counted:
            cache = cache.replace(counters=dc._count(cache.counters, m, (dc.ACTIVATIONS, dc.HITS), real.sum()))
    elif spec.mode == "cached":
        host, split = experts.host, None
        whole = dc.copies_whole(cache, m, distinct, E, spec.whole_layer_from)
        if spec.cpu_experts is not None:
            all_weights = weights
            distinct, weights, on_host = split_misses(cache.table, m, distinct, ids, weights, valid_rows, E,
                                                      spec.cpu_experts.cost, spec.cpu_experts.most_tokens, whole)
            if whole is not None:  # the whole layer's copy gives way to the device's share of a split
                split = whole & on_host.any()
            ticket = host_start(spec.cpu_experts, m, moe_in, ids, all_weights, on_host, valid_rows)
            distinct, ticket = lax.optimization_barrier((distinct, ticket))  # the host starts before the fetches
        hint = None
        if spec.tier_hints and guess is not None and isinstance(host, TieredHost):
            hint = next_layer_hint(cache, m, L, E, guess, valid_rows)
        cache, slab, slots, pinned, streamed = admit_misses(spec, E, m, host, cache, slab, distinct,
                                                            experts.priorities, hint, whole, split, buffer,
                                                            experts.staged_layer)
        if guess is not None and spec.lookahead:
            following = jnp.minimum(m + 1, L - 1)
            keys = jnp.where(m + 1 < L, dc.guessed_keys(guess, valid_rows, following, E, spec.lookahead), -1)
            move_guess = lambda slab, i, slot: write_from_host(host, slab, following, keys[i] % E, slot)  # noqa: E731
            cache, slab, _ = dc.install(cache, keys, policy=spec.policy, num_experts=E, layer=m,
                                        priorities=experts.priorities, pinned=pinned, move=move_guess, slab=slab)
    else:
        real = distinct < E
        if spec.mode == "dense-offload":  # the whole layer crosses the link; compute reads what it chose
            scratch = _host_layer(experts.host, m, fetch_all)
            slots = jnp.where(real, distinct, -1)
            cache = cache.replace(counters=dc._count(cache.counters, m, dc.STREAMED, E - real.sum()))
        else:  # on-demand: the chosen experts only, one fetch each
            scratch = zero_experts(experts.host[0], distinct.shape[0])
            fetch = lambda j, s: write_from_host(experts.host, s, m, distinct[j], j)  # noqa: E731
            scratch = lax.fori_loop(0, real.sum(), fetch, scratch)
            slots = jnp.where(real, jnp.arange(distinct.shape[0]), -1)
        cache = cache.replace(counters=dc._count(cache.counters, m, (dc.ACTIVATIONS, dc.MISSES), real.sum()))
        out = _compute(spec, moe_in, ids, weights, distinct, slots, scratch, valid_rows)
        return out, dataclasses.replace(experts, cache=cache)
    if streamed is not None:  # a layer copied whole is computed out of the copy
        whole, layer = streamed
        buffer = layer if buffer is not None else None
        out = lax.cond(whole, lambda: _compute(spec, moe_in, ids, weights, distinct,
                                               jnp.where(distinct < E, distinct, -1), layer, valid_rows),
                       lambda: _compute(spec, moe_in, ids, weights, distinct, slots, slab, valid_rows))
    else:
        out = _compute(spec, moe_in, ids, weights, distinct, slots, slab, valid_rows)
    if spec.mode == "cached" and spec.cpu_experts is not None:
        out, ticket = lax.optimization_barrier((out, ticket))  # the host's result is waited for after the device's
        out = out + host_finish(spec.cpu_experts, ticket, out.shape)
    return out, dataclasses.replace(experts, cache=cache, slab=slab, layer_buffer=buffer)


def next_layer_hint(cache, m, L: int, E: int, guess, valid_rows):
    """The keys of MoE layer m + 1 that its router guessed from layer m's input (guess int32 [N, k]) and the device
    cache does not hold, most rows first -> int32 [E] (-1: none; all of it at the last MoE layer)."""
    following = jnp.minimum(m + 1, L - 1)
    keys = dc.guessed_keys(guess, valid_rows, following, E, E)
    held = dc.resident_slots(cache, following, jnp.maximum(keys, 0) % E, E) >= 0
    return jnp.where((m + 1 < L) & (keys >= 0) & ~held, keys, -1)


def admit_misses(spec: ProgramSpec, E: int, m, host, cache, slab, distinct, priorities, hint=None, whole=None,
                 split=None, buffer=None, staged=None):
    """MoE layer m's `device_cache.access` for the distinct experts it needs (int32 [U]), each miss moved from the
    host tier: fetched by itself, or, when the layer misses at least `spec.whole_layer_from` of them, out of one
    copy of the layer's whole pinned stack (counted `streamed` for the experts it carries past). An expert at an
    offset the routing chose is read by a kernel over the link, a whole stack by one copy at the link's DMA rate,
    which may be much faster (BENCHMARKS.md): past some share of a layer's experts, which the engine measures on
    its device at load (`whole_layer_from`), the whole is faster. A step needing that many experts evicts nothing
    (`device_cache.copies_whole`): its misses take empty slots, else it copies the layer whole, computes out of
    the copy and lets the layer's resident experts go. A step of few rows, which never copies its layer whole, moves
    each miss with `write_from_host` (the copy kernel's straight write where the engine has it); a wider one
    fetches it by XLA (the layer's copy or the expert's). Through the disk tier, the misses are first staged
    (`TieredHost.stage`), so that the disk reads them back to back, then `hint` (`next_layer_hint`; None: none)
    is handed over (`TieredHost.hint`), so that it reads on into the next layer's likely misses.
    whole: `copies_whole` of the step (before the host took its share, where it computes some); split: None, or
    bool [] where the host computes some of the step's experts (`split_misses`, which took them off `distinct`):
    then the layer buffer holds only the device's share (`_own_experts`: its misses fetched one by one, nothing
    carried past them) instead of the whole layer's copy. buffer: the layer buffer the layer steps hand on
    (`ExpertInputs.layer_buffer`), written in place of a new one; None: a new one (zeros where nothing is copied).
    staged: None, or the layer's whole stack that the host copied ahead (`ExpertInputs.staged_layer`): where the
    step copies its layer whole, it reads that copy instead of making its own; elsewhere it is left unread.
    -> (cache, slab, slots, pinned) as `access`, and None or (whole: bool [], the layer's buffer {name: [E, ...]};
    where not whole: zeros, or the buffer as it came, unread)."""
    if isinstance(host, TieredHost):  # the disk reads the layer's misses back to back, ahead of their fetches
        missing = (distinct < E) & (dc.resident_slots(cache, m, distinct, E) < 0)
        distinct = host.stage(jnp.where(missing, m * E + distinct, -1), distinct)
        if hint is not None:
            distinct = host.hint(hint, distinct)
    # (a step of few rows never misses that many: no layer-sized buffer)
    move, streamed = (lambda slab, e, slot: write_from_host(host, slab, m, e, slot)), None
    if whole is not None:
        # Only the layer-sized buffer is chosen by the condition, never the slab (which XLA would then copy). A
        # buffer of its own would cost the other branch a write of the layer's bytes in zeros at every layer step;
        # the handed-on one passes through unwritten.
        unused = (lambda: buffer) if buffer is not None else (lambda: zero_experts(host[0], E))
        sources = [unused, lambda: _host_layer(host, m, fetch_all)]
        choice = whole.astype(jnp.int32)
        if split is not None:
            sources.append(lambda: _own_experts(host, m, cache, slab, distinct, E, unused()))
            choice = choice + split
        layer = lax.switch(choice, sources) if staged is None else staged  # (no split: `layer_stream.supports`)
        fetched = lambda e: lax.cond(  # noqa: E731
            whole, lambda: {name: lax.dynamic_index_in_dim(w, e, keepdims=False) for name, w in layer.items()},
            lambda: host_expert(host, m, e))
        move = lambda slab, e, slot: write_slot(slab, slot, fetched(e))  # noqa: E731
        streamed = (whole, layer)
    return (*dc.access(cache, m, distinct, policy=spec.policy, num_experts=E, priorities=priorities, move=move,
                       slab=slab, whole=whole, carried=None if split is None else ~split), streamed)


def _own_experts(host, m, cache, slab, distinct, E: int, layer: dict) -> dict:
    """The layer-sized buffer `layer` {name: [E, ...]} with MoE layer m's experts `distinct` (int32 [U], padded with
    E) written at their own indices (the rest as it was, unread): the misses fetched from the host tier one by one,
    the hits copied out of the slab (a wide step the host shares: `admit_misses`)."""
    slots = dc.resident_slots(cache, m, distinct, E)
    real = distinct < E
    miss = real & (slots < 0)
    order = jnp.argsort(~miss, stable=True)  # the misses first, then the hits, then the padding
    expert = lambda i: distinct[order[i]]  # noqa: E731
    from_host = lambda i, layer: write_slot(layer, expert(i), host_expert(host, m, expert(i)))  # noqa: E731
    from_slab = lambda i, layer: write_slot(layer, expert(i), {  # noqa: E731
        name: lax.dynamic_index_in_dim(w, slots[order[i]], keepdims=False) for name, w in slab.items()})
    layer = lax.fori_loop(0, miss.sum(), from_host, layer)
    return lax.fori_loop(miss.sum(), real.sum(), from_slab, layer)


def _compute(spec: ProgramSpec, moe_in, ids, weights, distinct, slots, slab, valid_rows):
    """The routed-expert output [N, D] f32 as the spec's expert compute makes it for the call's N rows."""
    rows = ids.shape[0]
    how = resolve_expert_compute(spec.expert_compute, rows, spec.inplace)
    return routed_experts(how, moe_in, ids, weights, distinct, slots, slab, expert_activation(spec.cfg),
                          valid_rows=valid_rows, capacity=spec.capacity(rows))


def gate(spec: ProgramSpec, ids, weights, valid_rows):
    """A MoE layer's routing as the step uses it: under static capacity gating the pairs of valid rows past their
    expert's capacity are dropped (id E, weight 0), so neither the cache nor the routing record sees them;
    otherwise unchanged. ids int32 [N, k], weights f32 [N, k], valid_rows bool [N] -> (ids, weights)."""
    if spec.expert_compute != "capacity":
        return ids, weights
    return drop_over_capacity(ids, weights, valid_rows, spec.capacity(ids.shape[0]), spec.cfg.num_experts)


def install_staged(spec: ProgramSpec, experts: ExpertInputs) -> ExpertInputs:
    """Fetches the host's picks (any MoE layer: a switch over the layers' host stacks) before the first layer (over
    several devices, each device the picks it holds: `engine.expert_parallel`)."""
    if experts.staged_keys is None:
        return experts
    if spec.expert_parallel is not None:
        return spec.expert_parallel.install_staged(functools.partial(install_keys, spec), experts)
    return install_keys(spec, spec.cfg.num_experts, experts)


def install_keys(spec: ProgramSpec, E: int, experts: ExpertInputs) -> ExpertInputs:
    """`install_staged` on one device holding E experts of each MoE layer (keys layer * E + expert, -1: none)."""
    keys = experts.staged_keys
    move = lambda slab, i, slot: write_from_host(experts.host, slab, keys[i] // E, keys[i] % E, slot)  # noqa: E731
    cache, slab, _ = dc.install(experts.cache, keys, policy=spec.policy, num_experts=E, layer=-1,
                                priorities=experts.priorities, move=move, slab=experts.slab, staged=True)
    return dataclasses.replace(experts, cache=cache, slab=slab, staged_keys=None)


def forward(spec: ProgramSpec, attend_len: int, params, experts: ExpertInputs, kv_caches, tokens, positions, slot_ids, valid,
            forced_ids=None):
    """All layers on tokens [R, T] of slots slot_ids [R] at positions [R, T] (valid [R, T]: real tokens).

    forced_ids: None, or int32 [MoE layers, R * T, k]: the experts every MoE layer uses instead of its router's
    choice (weighted by their router scores, renormalised, `moe.forced_weights`): replays known routing through the
    real engine (benchmarks); or a pair (that, guesses int32 [MoE layers, R * T, k]) whose row m also replaces the
    next router's guess made at MoE layer m (-1: no guess), so a benchmark's lookahead can guess the replayed
    routing (the next router is then not run: a matmul of [R * T, D] by [D, E] a layer, not counted).

    params: {'globals', 'segments': stacked layer parameters per segment, 'next_router': per MoE segment,
    the next MoE layer's post_norm and router for each of its layers (the last MoE layer: its own, unused)};
    kv_caches: per segment (k, v) [count, slots + 1, S, KV, head_dim].
    -> (hidden [R, T, D] before the final norm, experts, kv_caches, routing int32 [MoE layers, R * T, k],
    guesses int32 [MoE layers, R * T, k] (row m: what MoE layer m + 1's router picked from layer m's input;
    the last row: -1) or None).
    """
    cfg = spec.cfg
    forced_ids, forced_guesses = forced_ids if isinstance(forced_ids, tuple) else (forced_ids, None)
    experts = install_staged(spec, experts)
    x = EmbedHead(cfg).apply({"params": params["globals"]}, tokens, method=EmbedHead.embed_tokens)
    valid_rows = valid.reshape(-1)
    experts = dataclasses.replace(experts, layer_buffer=layer_buffer(spec, experts.host, valid_rows.shape[0]))
    kv_caches, routing, guesses = list(kv_caches), [], []
    attend = attention(positions, slot_ids, attend_len)
    for s, segment in enumerate(spec.segments):
        if not segment.moe:
            x, kv_caches[s] = dense_segment(spec, segment, params["segments"][s], x, kv_caches[s], attend)
            continue

        def moe(carry, xs, segment=segment):
            x, kv, cache, slab, buffer = carry
            p, following, i = xs
            inputs = dataclasses.replace(experts, cache=cache, slab=slab, layer_buffer=buffer)
            x, kv, out, ids, guess = moe_layer(spec, segment, i, p, following, x, kv, inputs, attend, valid_rows,
                                               forced_ids, forced_guesses)
            return (x, kv, out.cache, out.slab, out.layer_buffer), (ids, guess)

        xs = (params["segments"][s], params["next_router"][s], jnp.arange(segment.count))
        carry = (x, kv_caches[s], experts.cache, experts.slab, experts.layer_buffer)
        (x, kv_caches[s], cache, slab, buffer), (ids, guess) = lax.scan(moe, carry, xs, unroll=spec.unroll_layers)
        experts = dataclasses.replace(experts, cache=cache, slab=slab, layer_buffer=buffer)
        routing.append(ids)
        guesses.append(guess)
    routing = jnp.concatenate(routing)
    if counts_after_scan(spec):  # every access a hit
        counters = dc.count_layers(experts.cache.counters, routing, valid_rows, cfg.num_experts,
                                   (dc.ACTIVATIONS, dc.HITS))
        experts = dataclasses.replace(experts, cache=experts.cache.replace(counters=counters))
    return x, experts, kv_caches, routing, jnp.concatenate(guesses) if spec.computes_guesses else None


def attention(positions, slot_ids, attend_len: int):
    """`DecoderLayer.attend` with a step's positions [R, T], slots [R] and attention length bound."""
    return functools.partial(DecoderLayer.attend, positions=positions, slot_ids=slot_ids, attend_len=attend_len)


def _layer(cfg: ModelConfig, segment: Segment, i) -> DecoderLayer:
    """Layer i (traced) of the segment (its own window where the segment's windows differ)."""
    windows = segment.layer_windows()
    return DecoderLayer(cfg, segment.moe, segment.window if windows is None else windows[i])


def dense_segment(spec: ProgramSpec, segment: Segment, params, x, kv, attend):
    """A dense segment's layers on hidden states x [R, T, D]: params and kv stacked over its layers; attend:
    `DecoderLayer.attend` with the step's positions bound. -> (x, kv)."""
    def dense(carry, xs):
        x, kv = carry
        p, i = xs
        layer = _layer(spec.cfg, segment, i)
        h, kv = layer.apply({"params": p}, x, kv, layer_index=i, method=attend)
        return (layer.apply({"params": p}, h, method=DecoderLayer.dense_mlp), kv), None

    (x, kv), _ = lax.scan(dense, (x, kv), (params, jnp.arange(segment.count)), unroll=spec.unroll_layers)
    return x, kv


def moe_layer(spec: ProgramSpec, segment: Segment, i, p, following, x, kv, experts: ExpertInputs, attend, valid_rows,
              forced_ids=None, forced_guesses=None):
    """Layer i (traced) of a MoE segment on hidden states x [R, T, D]: p its parameters, following the next MoE
    layer's router (`forward`'s params['next_router']), kv the segment's stacked KV caches; forced_ids,
    forced_guesses: as `forward`'s, for every MoE layer. -> (x, kv, experts, ids int32 [R * T, k], guess int32
    [R * T, k] or None)."""
    cfg = spec.cfg
    layer = _layer(cfg, segment, i)
    h, kv = layer.apply({"params": p}, x, kv, layer_index=i, method=attend)
    moe_in, weights, ids = layer.apply({"params": p}, h, method=DecoderLayer.route)
    m = segment.first_moe + i
    if forced_ids is not None:
        ids = forced_ids[m]
        _, logits = layer.apply({"params": p}, h, method=DecoderLayer.router_logits)
        weights = forced_weights(logits, ids, cfg.scoring_func, cfg.routed_scaling_factor)
    ids, weights = gate(spec, ids, weights, valid_rows)
    guess = None
    if spec.computes_guesses:
        if forced_guesses is not None:
            guess = forced_guesses[m]
        else:
            _, _, guess = DecoderLayer(cfg, True, None).apply({"params": following}, h, method=DecoderLayer.route)
    routed, experts = routed_moe(spec, m, experts, moe_in, ids, weights, valid_rows, guess,
                                 counted=counts_after_scan(spec))
    x = layer.apply({"params": p}, h, moe_in, routed, method=DecoderLayer.finish)
    if guess is not None:  # the last MoE layer has no next router to guess for
        guess = jnp.where(m + 1 < len(spec.moe_layers), guess, -1)
    return x, kv, experts, ids, guess


def layer_buffer(spec: ProgramSpec, host, rows: int) -> dict | None:
    """The layer buffer the cached MoE layer steps of a step of `rows` token rows hand on (`ExpertInputs.layer_buffer`):
    zeros {name: [E, ...]} where the step is wide enough to copy a layer whole (`device_cache.copies_whole`) on one
    device; else None."""
    wide = dc.can_copy_whole(distinct_size(spec.cfg, rows), spec.whole_layer_from)
    if spec.mode != "cached" or spec.expert_parallel is not None or not wide:
        return None
    return zero_experts(host[0], spec.cfg.num_experts)


def resident_keys(spec: ProgramSpec, cache: dc.CacheState):
    """bool [L * E] after a step: the keys resident (on some device, under expert parallelism)."""
    return cache.table >= 0 if spec.expert_parallel is None else spec.expert_parallel.resident(cache)


def _logits(cfg: ModelConfig, params, x):
    return EmbedHead(cfg).apply({"params": params["globals"]}, x, method=EmbedHead.logits)


def sample_next(state: SlotState, rows, logits):
    return sample_rows(logits, state.temperature[rows], state.top_k[rows], state.top_p[rows], state.seed[rows],
                       state.sampled[rows])


def decode_tokens(spec: ProgramSpec, params, x, state: SlotState, slot_ids, active):
    """A decode step's end: each row's token sampled from the last layer's x [R, 1, D]; each active slot's last
    token and length advance. -> (tokens int32 [R], state)."""
    new = sample_next(state, slot_ids, _logits(spec.cfg, params, x[:, 0]))
    state = state.replace(
        last_token=state.last_token.at[slot_ids].set(jnp.where(active, new, state.last_token[slot_ids])),
        length=state.length.at[slot_ids].add(active.astype(jnp.int32)),
        sampled=state.sampled.at[slot_ids].add(active.astype(jnp.int32)))
    return new, state


DONATED = ("cache", "slab", "kv_caches", "state")


@functools.partial(jax.jit, static_argnames=("spec", "attend_len"), donate_argnames=DONATED)
def decode_step(params, cache, slab, host, staged_keys, priorities, kv_caches, state: SlotState, slot_ids, active,
                forced_ids=None, *, spec: ProgramSpec, attend_len: int):
    """One token for each row: slot_ids int32 [R] (the scratch slot for padding rows), active bool [R].

    cache, slab, host, staged_keys, priorities: the fields of `ExpertInputs`; forced_ids: see `forward`.
    -> (tokens int32 [R], routing,
    guesses, resident bool [L * E] after the step, cache, slab, kv_caches, state). Each active slot's last
    token is fed at its length; its new token and length are written back.
    """
    experts = ExpertInputs(cache, slab, host, staged_keys, priorities)
    tokens = state.last_token[slot_ids][:, None]
    positions = state.length[slot_ids][:, None]
    x, experts, kv_caches, routing, guesses = forward(spec, attend_len, params, experts, kv_caches, tokens, positions,
                                                      slot_ids, active[:, None], forced_ids)
    new, state = decode_tokens(spec, params, x, state, slot_ids, active)
    return new, routing, guesses, resident_keys(spec, experts.cache), experts.cache, experts.slab, kv_caches, state


@functools.partial(jax.jit, static_argnames=("spec", "attend_len", "want_logits"), donate_argnames=DONATED)
def prefill_chunk(params, cache, slab, host, staged_keys, priorities, kv_caches, state: SlotState, slot, tokens, start,
                  count, final, forced_ids=None, *, spec: ProgramSpec, attend_len: int, want_logits: bool = False):
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
                                                      positions, slot_ids, valid, forced_ids)
    token, state, logits = chunk_token(spec, params, x, state, slot, start, count, final, want_logits)
    return (token, routing, guesses, resident_keys(spec, experts.cache), experts.cache, experts.slab, kv_caches, state,
            logits)


def chunk_token(spec: ProgramSpec, params, x, state: SlotState, slot, start, count, final, want_logits: bool):
    """A prompt chunk's end (`prefill_chunk`'s arguments; x [1, T, D] the last layer's): the token sampled from the
    last real token's logits; the slot's length, last token and random index set. -> (token int32, state, logits
    [T, V] f32 or None)."""
    last = lax.dynamic_index_in_dim(x[0], count - 1, keepdims=True)
    token = sample_next(state, slot[None], _logits(spec.cfg, params, last))[0]
    state = state.replace(last_token=state.last_token.at[slot].set(token), length=state.length.at[slot].set(start + count),
                          sampled=state.sampled.at[slot].set(final.astype(jnp.int32)))
    return token, state, _logits(spec.cfg, params, x[0]) if want_logits else None
