"""Expert parallelism over several devices (`moejax.load(..., devices=N)`), in every offload mode.

A `jax.sharding.Mesh` of the first N devices along one axis, 'experts'. The dense weights, the KV caches and the
slot state are replicated on every device (each device runs the attention of every token); each MoE layer's
experts are split over the devices by a placement (`offload.placement`), hot experts possibly held by two. A
device numbers the experts it holds of a layer 0..H-1 in increasing order (`Placement.held`; H: the most any
device holds of a layer), and everything it owns is in that numbering, sharded along the leading axis:
  resident   its block of the slab, L x H slots (local expert j of layer m in slot m * H + j);
  cached     its own slab of S slots (S from the budget: --expert-budget is per device) and its own cache state
             (slot table, policy numbers, counters: `CacheState` fields with a leading [N] axis);
  host       per MoE layer, its H experts' rows of the one pinned host store (each expert once on the host,
             a replicated one once per copy), from which its misses are fetched into its own slab.
In a step program, each MoE layer runs inside `shard_map`: every device takes the layer's routing (it has every
token already), keeps the (token, expert) pairs it computes (an expert's pair goes to exactly one copy,
`Placement.copy_table`), renumbers them and runs the single-device layer on them (`decoder_programs.local_moe`:
cache lookup, miss fetches, prefetch, expert compute), and the devices' partial outputs are summed (`psum`, an
all-reduce): tokens' hidden states do not move, the experts' outputs do. The host's staged prefetches go to the
devices that hold them.

Outputs: greedy tokens equal the single-device engine's; the logits agree bit for bit where a token's experts are
at most two (one on each device, or both on one: adding zeros is exact) and to float rounding otherwise, since
each token's experts are added per device and then across devices instead of in one sequence of adds.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from moejax.engine.decoder_programs import ExpertInputs
from moejax.engine.engine import Engine
from moejax.errors import ParameterError, is_integer
from moejax.offload import device_cache as dc
from moejax.offload.expert_stacks import _write_layer, empty_slab, has_pinned_host
from moejax.offload.stats import cache_stats, per_device_entry
from moejax.routing.eams import EAMCollection, eam_counts
from moejax.routing.files import ROUTING_FILE, trace_file
from moejax.routing.traces import load_routing
from moejax.offload.placement import PLACEMENTS, Placement, check_devices, load_spread, make_placement

AXIS = "experts"


def check(devices: int, num_experts: int, placement: str, hot_replicas: int = 0) -> None:
    """The `devices`, `placement` and `hot_replicas` parameters checked against the model and the local devices."""
    check_devices(devices, num_experts)
    if placement not in PLACEMENTS:
        raise ParameterError.not_one_of("placement", placement, PLACEMENTS)
    if not is_integer(hot_replicas) or not (
            0 <= hot_replicas <= num_experts):
        raise ParameterError("{hot_replicas} must be an integer in [0, {experts}] (got {value!r})",
                             experts=num_experts, value=hot_replicas)
    if hot_replicas and placement != "balanced":
        raise ParameterError("{hot_replicas} copies the experts that measured load calls hot: it needs {placement} "
                             "'balanced' (got {name!r})", name=placement)
    seen = jax.devices()
    if devices > len(seen):
        hint = " (the CPU splits into N with XLA_FLAGS=--xla_force_host_platform_device_count=N)" * (
            seen[0].platform == "cpu")
        raise ParameterError("{devices} {value}: JAX sees {count} {platform} device(s){hint}", value=devices,
                             count=len(seen), platform=seen[0].platform, hint=hint)


def device_mesh(devices: int) -> Mesh:
    """A one-axis mesh over the first `devices` devices JAX sees (every process's, after `jax.distributed.initialize`;
    the local ones otherwise)."""
    return Mesh(np.array(jax.devices()[:devices]), (AXIS,))


def _own(tree):
    """Inside shard_map: a device's block of a tree sharded along a leading [N] axis, without that axis."""
    return jax.tree.map(lambda x: x[0], tree)


def _block(tree):
    return jax.tree.map(lambda x: x[None], tree)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """What a step program needs to run a MoE layer's experts where they live (static, hashable): the mesh, the
    experts each device holds (`Placement.held`, [N][L][H]) and each expert's copies (`Placement.copy_table`,
    [L][E][C])."""

    mesh: Mesh
    held: tuple
    copies: tuple

    @classmethod
    def of(cls, mesh: Mesh, placement: Placement) -> ExpertParallel:
        return cls(mesh, _nested(placement.held()), _nested(placement.copy_table()))

    @property
    def num_held(self) -> int:
        """H: the experts of a layer a device holds (its local numbering's size)."""
        return len(self.held[0][0])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    def local_index(self) -> np.ndarray:
        """int32 [N, L, E]: each expert's local number on each device, -1 where the device does not hold it."""
        held = np.asarray(self.held, np.int32)
        G, L, H = held.shape
        index = np.full((G, L, len(self.copies[0])), -1, np.int32)
        d, m, j = np.nonzero(held >= 0)
        index[d, m, held[d, m, j]] = j
        return index

    def _run(self, local, replicated: dict, sharded: dict, out_specs):
        """shard_map of local(replicated, sharded) over the mesh: `replicated` the same on every device, `sharded`
        split along its leading axis."""
        return jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
                             out_specs=out_specs, check_vma=False)(replicated, sharded)

    def _local_inputs(self, d, sharded: dict, priorities, staged_keys=None) -> ExpertInputs:
        """A device's `ExpertInputs` in its numbering (the priority policy's scores [L, H] of the experts it holds)."""
        if priorities is not None:
            held = jnp.maximum(jnp.asarray(np.asarray(self.held, np.int32))[d], 0)
            priorities = jax.tree.map(lambda table: jnp.take_along_axis(table, held, axis=1), priorities)
        return ExpertInputs(_own(sharded["cache"]), sharded["slab"], sharded["host"], staged_keys, priorities)

    def routed(self, local_moe, m, experts: ExpertInputs, moe_in, ids, weights, valid_rows, guess):
        """MoE layer m's routed output [N, D] f32 and the devices' updated experts: `local_moe(H, m, experts, moe_in,
        ids, weights, valid_rows, guess)` (`decoder_programs.local_moe`) run by each device on the pairs it computes,
        in its numbering, the outputs summed."""
        copies, index, H = np.asarray(self.copies, np.int32), self.local_index(), self.num_held
        E, C, L = copies.shape[1], copies.shape[2], copies.shape[0]

        def local(replicated, sharded):
            d = lax.axis_index(AXIS)
            m, ids, guess = replicated["m"], replicated["ids"], replicated["guess"]
            mine = jnp.asarray(index)[d]  # [L, E]
            safe = jnp.clip(ids, 0, E - 1)
            turn = (jnp.arange(ids.shape[0])[:, None] + jnp.arange(ids.shape[1])[None, :]) % C
            computes = (ids >= 0) & (ids < E) & (jnp.asarray(copies)[m][safe, turn] == d)
            local_ids = jnp.where(computes, mine[m][safe], H)
            local_weights = jnp.where(computes, replicated["weights"], 0.0)
            if guess is not None:  # the next layer's guessed experts this device holds
                held = mine[jnp.minimum(m + 1, L - 1)][jnp.clip(guess, 0, E - 1)]
                guess = jnp.where((guess >= 0) & (guess < E) & (held >= 0), held, H)
            inputs = self._local_inputs(d, sharded, replicated["priorities"])
            out, inputs = local_moe(H, m, inputs, replicated["moe_in"], local_ids, local_weights,
                                    replicated["valid_rows"], guess)
            return lax.psum(out, AXIS), _block(inputs.cache), inputs.slab

        replicated = {"m": m, "moe_in": moe_in, "ids": ids, "weights": weights, "valid_rows": valid_rows,
                      "guess": guess, "priorities": experts.priorities}
        sharded = {"cache": experts.cache, "slab": experts.slab, "host": experts.host}
        out, cache, slab = self._run(local, replicated, sharded, (PartitionSpec(), PartitionSpec(AXIS),
                                                                  PartitionSpec(AXIS)))
        return out, dataclasses.replace(experts, cache=cache, slab=slab)

    def install_staged(self, install_keys, experts: ExpertInputs) -> ExpertInputs:
        """The host's staged keys (layer * E + expert, -1: none) installed by each device that holds them:
        `install_keys(H, experts)` (`decoder_programs.install_keys`) on each, in its numbering."""
        index, H = self.local_index(), self.num_held
        E = index.shape[2]

        def local(replicated, sharded):
            d = lax.axis_index(AXIS)
            keys = replicated["keys"]
            layer, expert = jnp.clip(keys // E, 0), jnp.clip(keys % E, 0)
            j = jnp.asarray(index)[d][layer, expert]
            keys = jnp.where((keys >= 0) & (j >= 0), layer * H + j, -1)
            inputs = install_keys(H, self._local_inputs(d, sharded, replicated["priorities"], keys))
            return _block(inputs.cache), inputs.slab

        replicated = {"keys": experts.staged_keys, "priorities": experts.priorities}
        sharded = {"cache": experts.cache, "slab": experts.slab, "host": experts.host}
        cache, slab = self._run(local, replicated, sharded, (PartitionSpec(AXIS), PartitionSpec(AXIS)))
        return dataclasses.replace(experts, cache=cache, slab=slab, staged_keys=None)

    def resident(self, cache: dc.CacheState) -> jax.Array:
        """bool [L * E], replicated: the keys (layer * E + expert) resident on some device, from the devices' slot
        tables [N, L * H] (what the host-side manager reads after a step)."""
        held = np.asarray(self.held, np.int32)
        G, L, H = held.shape
        E = len(self.copies[0])
        keys = np.where(held >= 0, np.arange(L)[None, :, None] * E + held, L * E).reshape(G, L * H)
        resident = jnp.zeros(L * E, bool).at[jnp.asarray(keys)].max(cache.table >= 0, mode="drop")
        return jax.lax.with_sharding_constraint(resident, self.replicated)

    def gathered(self, x: jax.Array) -> jax.Array:
        """A sharded array copied whole to every device (so that every process can read it)."""
        return _replicate(x, self.replicated)


@functools.partial(jax.jit, static_argnums=(1,))
def _replicate(x, sharding):
    return jax.lax.with_sharding_constraint(x, sharding)


def _nested(table: np.ndarray) -> tuple:
    return tuple(map(_nested, table)) if table.ndim > 1 else tuple(int(v) for v in table)


def measured_load(path: str | Path) -> np.ndarray:
    """Tokens per (MoE layer, expert) int [L, E] summed over a routing trace (routing.npz) or an EAM collection
    (eams.npz), or the directory `moejax trace` wrote (its routing.npz)."""
    routing = trace_file(path, ROUTING_FILE)
    if routing.is_file() and "experts" in np.load(routing).files:
        trace = load_routing(routing)
        return eam_counts(trace.experts, trace.num_experts)
    return EAMCollection.load(path).eams.sum(axis=0)


def plan(cfg, devices: int, placement: str, placement_traces: str | Path | None,
         hot_replicas: int = 0) -> tuple[ExpertParallel, Placement]:
    """The mesh and placement of `devices` devices for a model config (`placement`: see `offload.placement`;
    placement_traces: where the load 'balanced' reads comes from, see `measured_load`; hot_replicas: 'balanced'
    gives each MoE layer's that many hottest experts a second copy); the caller checks the parameters first (`check`)."""
    mesh = device_mesh(devices)
    load = None if placement_traces is None else measured_load(placement_traces)
    table = make_placement(placement, devices, len(cfg.moe_layer_ids), cfg.num_experts, load, hot_replicas)
    return ExpertParallel.of(mesh, table), table


def _local_devices(parallel: ExpertParallel) -> dict:
    """{mesh position: device} of this process's devices."""
    return {d: device for d, device in enumerate(parallel.mesh.devices.flat) if device.process_index == jax.process_index()}


def _held_rows(stack: dict, rows: np.ndarray) -> dict:
    """A layer's stacked experts {name: [E, ...]} at `rows` ([H], -1: a zero row)."""
    keep = rows >= 0
    taken = {name: w[np.maximum(rows, 0)] for name, w in stack.items()}
    if keep.all():
        return taken
    return {name: jnp.where(keep.reshape((-1,) + (1,) * (w.ndim - 1)), w, 0) for name, w in taken.items()}


def place_sharded(parallel: ExpertParallel, expert_stacks, shapes: dict, on_host: bool):
    """Each device's experts from each MoE layer's stacks ({name: [E, ...]}, one layer at a time), in its numbering
    (each process builds its own devices' parts): on_host=False, the resident slab {name: [N * L * H, ...]} (device d's
    block: local expert j of layer m in slot m * H + j); True, per MoE layer the host stacks {name: [N * H, ...]} in
    pinned host memory, device d's H rows its experts of the layer."""
    held, H = np.asarray(parallel.held, np.int32), parallel.num_held
    L = held.shape[1]
    local = _local_devices(parallel)
    blocks = {d: empty_slab(shapes, L * H, device) for d, device in local.items()} if not on_host else None
    host = []
    for m, stack in enumerate(expert_stacks):
        parts = {}
        for d, device in local.items():
            where = SingleDeviceSharding(device, memory_kind="pinned_host" if on_host and has_pinned_host(device) else None)
            parts[d] = jax.device_put(_held_rows(stack, held[d, m]), where)
            if not on_host:
                blocks[d] = _write_layer(blocks[d], parts[d], m * H)
        if on_host:
            host.append(_assemble(parallel, parts, H, shapes, "pinned_host"))
    return tuple(host) if on_host else _assemble(parallel, blocks, L * H, shapes, None)


def _assemble(parallel: ExpertParallel, parts: dict, rows: int, shapes: dict, memory_kind: str | None) -> dict:
    """One global array {name: [N * rows, ...]} sharded over the mesh from this process's devices' parts."""
    local = next(iter(parts.values()))
    kind = memory_kind if memory_kind and next(iter(local.values())).sharding.memory_kind == memory_kind else None
    sharding = NamedSharding(parallel.mesh, PartitionSpec(AXIS), memory_kind=kind)
    size = parallel.mesh.size * rows
    return {name: jax.make_array_from_single_device_arrays((size,) + tuple(shapes[name][0]), sharding,
                                                           [part[name] for part in parts.values()])
            for name in shapes}


def device_caches(parallel: ExpertParallel, num_layers: int, num_slots: int) -> dc.CacheState:
    """Every device's own empty cache of `num_slots` slots over its H experts of each layer: the `CacheState` fields
    with a leading [N] axis, sharded."""
    state = dc.empty_state(num_layers, parallel.num_held, num_slots)
    G = parallel.mesh.size

    def stacked(x):
        whole = np.broadcast_to(np.asarray(x), (G,) + x.shape)
        return jax.make_array_from_callback(whole.shape, parallel.sharded, lambda index: whole[index])

    return jax.tree.map(stacked, state)


class ExpertParallelEngine(Engine):
    """An Engine whose experts are split over several devices: its statistics are the devices' counters summed, and
    per device (`expert_parallel` in the stats) the pairs it computed, its hit rate and bytes moved."""

    def __init__(self, *args, placement: Placement, placement_name: str = "round-robin", **kwargs):
        super().__init__(*args, **kwargs)
        self.placement, self.placement_name = placement, placement_name
        self._copy_table = placement.copy_table()
        self._device_pairs = np.zeros((placement.num_layers, placement.num_devices), np.int64)

    def _observe(self, routing: np.ndarray, resident: np.ndarray) -> None:
        super()._observe(routing, resident)
        self._device_pairs += device_pairs(self._copy_table, routing, self.placement.num_devices)

    def reset_stats(self) -> None:
        super().reset_stats()
        self._device_pairs[:] = 0

    def stats(self) -> dict:
        parallel = self.spec.expert_parallel
        counters = np.asarray(parallel.gathered(self.cache.counters))  # [N, L, len(COUNTERS)]
        slots = self.cache.slot_key.shape[-1]
        stats = cache_stats(self.spec, counters.sum(axis=0), self.expert_bytes, slots, self.manager, self.host_wait_s,
                            self.stats_info)
        pairs = self._device_pairs.sum(axis=0)
        stats["expert_parallel"] = {
            "devices": self.placement.num_devices, "placement": self.placement_name,
            "hot_replicas": max(len(r) for r in self.placement.replicas), "experts_per_device": parallel.num_held,
            "device_load": pairs.tolist(),
            "max_over_mean": load_spread(self._device_pairs) if self._device_pairs.any() else None,
            "per_device": [{"device": d, "pairs": int(pairs[d]), **per_device_entry(counters[d], self.expert_bytes)}
                           for d in range(len(pairs))]}
        return stats


def device_pairs(copy_table: np.ndarray, routing: np.ndarray, num_devices: int) -> np.ndarray:
    """int [L, N]: the (token, expert) pairs each device computes of a step's routing [L, n, k] (its rows in step
    order, as the program numbers them), by the program's rule: expert e's pair (n, j) on copy_table[m, e,
    (n + j) % C]."""
    L, n, k = routing.shape
    E, C = copy_table.shape[1:]
    turn = (np.arange(n)[:, None] + np.arange(k)[None, :]) % C
    out = np.zeros((L, num_devices), np.int64)
    for m in range(L):
        real = (routing[m] >= 0) & (routing[m] < E)
        devices = copy_table[m][np.clip(routing[m], 0, E - 1), turn]
        out[m] = np.bincount(devices[real], minlength=num_devices)
    return out


def engine_class(parallel: ExpertParallel | None, placement: Placement | None, placement_name: str = "round-robin"):
    """The Engine class to build: Engine, or with several devices ExpertParallelEngine of this placement."""
    if parallel is None:
        return Engine
    return functools.partial(ExpertParallelEngine, placement=placement, placement_name=placement_name)
