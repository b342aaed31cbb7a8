"""Wide steps as a chain of layer programs, with the whole layers they copy staged by the host meanwhile.

A cached decode step of many rows, or a prompt chunk of many tokens, needs most of every layer's experts; where a
layer is not resident it copies the layer whole (`device_cache.copies_whole`). Inside one step program that copy
runs on the device's stream, in order with the compute: no overlap (BENCHMARKS.md). Copies the host issues
(`jax.device_put`) do overlap compute. So a wide step here runs as programs of one MoE layer each (plus one for the
embedding, one per dense segment and one for the sampling), and before dispatching layer m's program the host issues
the copy of the next layer it stages, which crosses the link while layer m computes. Each layer program decides on
the device, as the fused step does, whether its layer is copied whole (`device_cache.copies_whole`); where it is, it
reads the staged copy instead of making one (`ExpertInputs.staged_layer`); a layer not staged copies in the program,
as in the fused step. So the tokens, the routing and every cache counter are the fused step's (and the policy
lab's); a staged layer that the step does not copy whole after all only cost its copy's link time.

Which layers are staged: those the cache held at most E - `whole_layer_from` experts of after the last step read
(a step needing as many experts as a wide one does misses at least `whole_layer_from` of them). The host waits for
layer m - 1's program before issuing a copy, so at most two staged layers are on the device at once (the one
computing and the one crossing), besides the slab: two layers' bytes where the fused step keeps one layer buffer.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import SingleDeviceSharding

from moejax.engine import decoder_programs as programs
from moejax.engine.decoder_programs import ExpertInputs, ProgramSpec
from moejax.engine.slots import SlotState
from moejax.models.decoder import EmbedHead
from moejax.offload import device_cache as dc
from moejax.offload.budget import device_memory
from moejax.offload.expert_stacks import stack_bytes, stack_to_device

LAYER_STREAM = ("auto", "off")  # `moejax.load`'s layer_stream
STAGED_AT_ONCE = 2  # whole layers on the device besides the slab: the one a layer computes on, the one crossing
log = logging.getLogger(__name__)


def _at(tree, i):
    """Entry i (traced) of every array of a pytree stacked over layers."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


@jax.jit
def _decode_rows(state: SlotState, slot_ids):
    """A decode step's tokens and positions, int32 [R, 1] each: each row's last token, at its slot's length."""
    return state.last_token[slot_ids][:, None], state.length[slot_ids][:, None]


@functools.partial(jax.jit, static_argnames=("size",))
def _chunk_rows(slot, start, count, *, size: int):
    """A prompt chunk's positions int32 [1, size] (from start), slots [1] and real tokens bool [size] (the first
    count)."""
    return (start + jnp.arange(size, dtype=jnp.int32))[None], slot[None], jnp.arange(size) < count


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache", "slab"))
def begin(params, cache, slab, host, staged_keys, priorities, tokens, *, spec: ProgramSpec):
    """The step's start: the host's prefetch picks installed, tokens int32 [R, T] embedded. -> (x [R, T, D], cache,
    slab, routing int32 [MoE layers, R * T, k] zeros, guesses of that shape (-1) or None)."""
    experts = programs.install_staged(spec, ExpertInputs(cache, slab, host, staged_keys, priorities))
    x = EmbedHead(spec.cfg).apply({"params": params["globals"]}, tokens, method=EmbedHead.embed_tokens)
    shape = (len(spec.moe_layers), tokens.size, spec.cfg.top_k)
    guesses = jnp.full(shape, -1, jnp.int32) if spec.computes_guesses else None  # its own buffer: both are donated
    return x, experts.cache, experts.slab, jnp.zeros(shape, jnp.int32), guesses


@functools.partial(jax.jit, static_argnames=("spec", "s", "attend_len"), donate_argnames=("kv",))
def dense(params, kv, x, positions, slot_ids, *, spec: ProgramSpec, s: int, attend_len: int):
    """Dense segment s's layers on x [R, T, D] at positions int32 [R, T] of slots [R]. -> (x, kv)."""
    return programs.dense_segment(spec, spec.segments[s], params["segments"][s], x, kv,
                                  programs.attention(positions, slot_ids, attend_len))


@functools.partial(jax.jit, static_argnames=("spec", "s", "attend_len"),
                   donate_argnames=("cache", "slab", "kv", "routing", "guesses"))
def moe(params, cache, slab, host, priorities, staged, kv, x, routing, guesses, i, positions, slot_ids, valid_rows,
        forced_ids=None, *, spec: ProgramSpec, s: int, attend_len: int):
    """Layer i (traced) of MoE segment s on x [R, T, D] at positions [R, T] of slots [R] (valid_rows bool [R * T]:
    real tokens); staged: its whole stack on the device, or None (misses fetched in the program). forced_ids: as
    `decoder_programs.forward`'s. -> (x, kv, cache, slab, routing, guesses) with the layer's row of routing (and
    guesses) written."""
    forced_ids, forced_guesses = forced_ids if isinstance(forced_ids, tuple) else (forced_ids, None)
    segment = spec.segments[s]
    experts = ExpertInputs(cache, slab, host, None, priorities, staged_layer=staged)
    x, kv, experts, ids, guess = programs.moe_layer(
        spec, segment, i, _at(params["segments"][s], i), _at(params["next_router"][s], i), x, kv, experts,
        programs.attention(positions, slot_ids, attend_len), valid_rows, forced_ids, forced_guesses)
    m = segment.first_moe + i
    routing = lax.dynamic_update_index_in_dim(routing, ids, m, 0)
    if guesses is not None:
        guesses = lax.dynamic_update_index_in_dim(guesses, guess, m, 0)
    return x, kv, experts.cache, experts.slab, routing, guesses


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def end(params, cache, x, state: SlotState, slot_ids, active, *, spec: ProgramSpec):
    """The step's end, as `decoder_programs.decode_step`'s. -> (tokens int32 [R], resident bool [L * E], state)."""
    new, state = programs.decode_tokens(spec, params, x, state, slot_ids, active)
    return new, programs.resident_keys(spec, cache), state


@functools.partial(jax.jit, static_argnames=("spec", "want_logits"), donate_argnames=("state",))
def end_chunk(params, cache, x, state: SlotState, slot, start, count, final, *, spec: ProgramSpec,
              want_logits: bool):
    """A prompt chunk's end, as `decoder_programs.prefill_chunk`'s. -> (token int32, resident bool [L * E], state,
    logits [T, V] f32 or None)."""
    token, state, logits = programs.chunk_token(spec, params, x, state, slot, start, count, final, want_logits)
    return token, programs.resident_keys(spec, cache), state, logits


def room_problem(device, host: tuple) -> str | None:
    """Why the device lacks room for the staged layers besides what is placed (the slab, KV caches, weights) and the
    workspace; None where it has room, or reports no memory (CPU)."""
    memory = device_memory(device, kv_cache_bytes=0)  # the KV caches are placed by now
    need = STAGED_AT_ONCE * max(map(stack_bytes, host))
    if memory is None or memory.available >= need:
        return None
    return (f"{STAGED_AT_ONCE} staged layers take {need / 2**30:.2f} GiB, and {max(memory.available, 0) / 2**30:.2f} "
            "GiB are free past the cache and the workspace")


def supports(spec: ProgramSpec, host) -> bool:
    """Whether steps of this spec can run as layer programs: cached mode on one device, wide steps copying whole
    layers from pinned stacks (not through the disk tier), no host compute of experts (its split is per layer step
    of the fused program)."""
    return (spec.mode == "cached" and spec.whole_layer_from is not None and spec.expert_parallel is None
            and spec.cpu_experts is None and isinstance(host, tuple))


def build(spec: ProgramSpec, host, device) -> LayerStream | None:
    """An engine's layer stream, where its steps can run as layer programs (`supports`) and the device has room for
    the staged layers (else a warning says why the steps stay one program each); None otherwise."""
    if not supports(spec, host):
        return None
    problem = room_problem(device, host)
    if problem is not None:
        log.warning(f"layer_stream: wide steps run as one program each: {problem}")
        return None
    return LayerStream(spec, host, device)


@dataclasses.dataclass
class LayerStream:
    """The host side of wide steps run as layer programs (see the module docstring): which layers to stage, their
    copies, and counts (`stats`). spec: the engine's at load, for the model's shape (its MoE layers,
    whole_layer_from); each step runs under the engine's spec of the moment, given to `decode` (the engine may
    change it: `Engine.record_guesses`)."""

    spec: ProgramSpec
    host: tuple  # per MoE layer {name: [E, ...]} in pinned host memory
    device: jax.Device
    resident: np.ndarray = None  # int [MoE layers]: experts of each the cache held after the last step read
    steps: int = 0  # decode steps
    chunks: int = 0  # prompt chunks
    layers_staged: int = 0
    bytes_staged: int = 0
    most_at_once: int = 0  # most staged layers on the device at once (copied, and not yet computed on)

    def __post_init__(self):
        self.resident = np.zeros(len(self.spec.moe_layers), np.int64)
        self._sharding = SingleDeviceSharding(self.device, memory_kind=self.device.default_memory().kind)
        self._prestaged: dict[int, dict] = {}  # MoE layer -> its copy, issued before the step that computes on it

    def applies(self, rows: int) -> bool:
        """Whether a step of `rows` token rows (a decode step's sequences, a prompt chunk's tokens) runs as layer
        programs (it may copy layers whole)."""
        return dc.can_copy_whole(programs.distinct_size(self.spec.cfg, rows), self.spec.whole_layer_from)

    def observe(self, resident: np.ndarray) -> None:
        """A read step's resident keys, bool [L * E]."""
        self.resident = resident.reshape(len(self.spec.moe_layers), -1).sum(axis=1)

    def staged_layers(self) -> list[int]:
        """The MoE layers a step stages, in order."""
        E = self.spec.cfg.num_experts
        return [m for m in range(len(self.spec.moe_layers)) if E - self.resident[m] >= self.spec.whole_layer_from]

    def prestage(self) -> None:
        """Issues the copies of the first STAGED_AT_ONCE layers the next step stages (no step in flight: the engine
        calls it instead of dispatching a step of layer programs while its caller uses the last tokens), so that the
        link works meanwhile; the next `decode` computes on them."""
        for m in self.staged_layers():
            if len(self._prestaged) >= STAGED_AT_ONCE:
                break
            if m not in self._prestaged:
                self._prestaged[m] = self._stage(m)
        self.most_at_once = max(self.most_at_once, len(self._prestaged))

    def _stage(self, m: int) -> dict:
        stack = self.host[m]
        self.layers_staged += 1
        self.bytes_staged += stack_bytes(stack)
        return stack_to_device(stack, self._sharding)

    def decode(self, params, cache, slab, host, staged_keys, priorities, kv_caches, state, slot_ids, active,
               forced_ids, *, spec: ProgramSpec, attend_len: int):
        """One decode step, as `decoder_programs.decode_step` (same arguments and outputs)."""
        tokens, positions = _decode_rows(state, slot_ids)
        x, cache, slab, routing, guesses = begin(params, cache, slab, host, staged_keys, priorities, tokens, spec=spec)
        x, cache, slab, kv_caches, routing, guesses = self._layers(
            params, cache, slab, host, priorities, kv_caches, x, routing, guesses, positions, slot_ids, active,
            forced_ids, spec=spec, attend_len=attend_len)
        tokens, resident, state = end(params, cache, x, state, slot_ids, active, spec=spec)
        self.steps += 1
        return tokens, routing, guesses, resident, cache, slab, kv_caches, state

    def prefill(self, params, cache, slab, host, staged_keys, priorities, kv_caches, state, slot, tokens, start, count,
                final, forced_ids, *, spec: ProgramSpec, attend_len: int, want_logits: bool = False):
        """One prompt chunk, as `decoder_programs.prefill_chunk` (same arguments and outputs)."""
        positions, slot_ids, valid_rows = _chunk_rows(slot, start, count, size=len(tokens))
        x, cache, slab, routing, guesses = begin(params, cache, slab, host, staged_keys, priorities, tokens[None],
                                                 spec=spec)
        x, cache, slab, kv_caches, routing, guesses = self._layers(
            params, cache, slab, host, priorities, kv_caches, x, routing, guesses, positions, slot_ids, valid_rows,
            forced_ids, spec=spec, attend_len=attend_len)
        token, resident, state, logits = end_chunk(params, cache, x, state, slot, start, count, final, spec=spec,
                                                   want_logits=want_logits)
        self.chunks += 1
        return token, routing, guesses, resident, cache, slab, kv_caches, state, logits

    def _layers(self, params, cache, slab, host, priorities, kv_caches, x, routing, guesses, positions, slot_ids,
                valid_rows, forced_ids, *, spec: ProgramSpec, attend_len: int):
        """A step's layers as layer programs, the host staging whole layers ahead (the module's docstring). ->
        (x, cache, slab, kv_caches, routing, guesses)."""
        kv_caches = list(kv_caches)
        staged, self._prestaged = self._prestaged, {}  # copies not yet handed to a layer
        to_stage = collections.deque(m for m in self.staged_layers() if m not in staged)
        running = collections.deque()  # layers computing on a staged copy

        def stage_ahead():
            while to_stage:
                if len(staged) + len(running) >= STAGED_AT_ONCE:
                    if not running:
                        return
                    running.popleft().block_until_ready()  # its copy is freed: another may cross
                    continue
                layer = to_stage.popleft()
                staged[layer] = self._stage(layer)
                self.most_at_once = max(self.most_at_once, len(staged) + len(running))

        stage_ahead()
        for s, segment in enumerate(spec.segments):
            if not segment.moe:
                x, kv_caches[s] = dense(params, kv_caches[s], x, positions, slot_ids, spec=spec, s=s,
                                        attend_len=attend_len)
                continue
            for i in range(segment.count):
                m = segment.first_moe + i
                stage_ahead()
                layer = staged.pop(m, None)
                x, kv_caches[s], cache, slab, routing, guesses = moe(
                    params, cache, slab, host, priorities, layer, kv_caches[s], x, routing, guesses, np.int32(i),
                    positions, slot_ids, valid_rows, forced_ids, spec=spec, s=s, attend_len=attend_len)
                if layer is not None:
                    running.append(x)
                del layer  # freed once its layer has run
        return x, cache, slab, kv_caches, routing, guesses

    def stats(self) -> dict:
        """Since the last reset: wide decode steps and prompt chunks run as layer programs, the whole layers they
        staged and those layers' bytes, and the most staged layers on the device at once."""
        return {"steps": self.steps, "chunks": self.chunks, "layers_staged": self.layers_staged,
                "bytes_staged": self.bytes_staged, "most_at_once": self.most_at_once}

    def reset(self) -> None:
        self.steps = self.chunks = self.layers_staged = self.bytes_staged = self.most_at_once = 0

    @staticmethod
    def programs_compiled() -> int:
        """Layer programs compiled in this process so far (every engine's: jit's own caches)."""
        return sum(program._cache_size() for program in (begin, dense, moe, end, end_chunk))
