"""Expert parallelism over the local devices (`moejax.load(..., devices=N)`, resident experts).

A `jax.sharding.Mesh` of the first N local devices along one axis, 'experts'. The dense weights, the KV caches
and the slot state are replicated on every device (each device runs the attention of every token); each MoE
layer's experts are split over the devices by a placement (`offload.placement`): the slab of every expert,
L x E slots, is sharded along its slot axis in N equal blocks, device d's block holding its experts of every
layer (`Placement.slots`). In a step program, each MoE layer runs inside `shard_map`: every device takes the
layer's routing (it has every token already), keeps the (token, expert) pairs whose expert it holds, computes
them from its block of the slab with the engine's own expert compute, and the devices' partial outputs are
summed (`psum`, an all-reduce): tokens' hidden states do not move, the experts' outputs do.

Outputs: greedy tokens equal the single-device engine's; the logits agree to float rounding, not bit for bit,
since each token's experts are added per device and then across devices instead of in one sequence of adds.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.engine.engine import Engine
from moejax.errors import ParameterError
from moejax.offload import device_cache as dc
from moejax.offload.expert_stacks import _write_layer, empty_slab
from moejax.routing.eams import EAMCollection, eam_counts
from moejax.routing.files import ROUTING_FILE, trace_file
from moejax.routing.traces import load_routing
from moejax.offload.placement import PLACEMENTS, Placement, check_devices, load_spread, make_placement

AXIS = "experts"


def check(devices: int, num_experts: int, placement: str) -> None:
    """The `devices` and `placement` parameters checked against the model and the local devices."""
    check_devices(devices, num_experts)
    if placement not in PLACEMENTS:
        raise ParameterError.not_one_of("placement", placement, PLACEMENTS)
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


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """What a step program needs to compute a MoE layer's experts where they live (static, hashable):
    the mesh and each expert's slot in the sharded slab, slots[m][e] (`Placement.slots`)."""

    mesh: Mesh
    slots: tuple[tuple[int, ...], ...]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    def routed(self, compute, m, moe_in, ids, weights, valid_rows, slab, distinct_size: int):
        """MoE layer m's routed output [N, D] f32: `compute(moe_in, ids, weights, distinct, slots, slab, valid_rows)`
        (the engine's expert compute) run by each device on the pairs of its experts, the outputs summed."""
        table = np.asarray(self.slots, np.int32)
        E, block = table.shape[1], table.size // self.mesh.size

        def local(m, moe_in, ids, weights, valid_rows, slab):
            layer = jnp.asarray(table)[m]
            first = lax.axis_index(AXIS) * block
            mine = (ids < E) & (layer[jnp.clip(ids, 0, E - 1)] // block == first // block)
            ids, weights = jnp.where(mine, ids, E), jnp.where(mine, weights, 0.0)
            distinct = dc.distinct_experts(ids, valid_rows, E, distinct_size)
            slots = jnp.where(distinct < E, layer[jnp.clip(distinct, 0, E - 1)] - first, -1)
            return lax.psum(compute(moe_in, ids, weights, distinct, slots, slab, valid_rows), AXIS)

        same = PartitionSpec()
        return jax.shard_map(local, mesh=self.mesh, in_specs=(same,) * 5 + (PartitionSpec(AXIS),), out_specs=same,
                             check_vma=False)(m, moe_in, ids, weights, valid_rows, slab)


def measured_load(path: str | Path) -> np.ndarray:
    """Tokens per (MoE layer, expert) int [L, E] summed over a routing trace (routing.npz) or an EAM collection
    (eams.npz), or the directory `moejax trace` wrote (its routing.npz)."""
    routing = trace_file(path, ROUTING_FILE)
    if routing.is_file() and "experts" in np.load(routing).files:
        trace = load_routing(routing)
        return eam_counts(trace.experts, trace.num_experts)
    return EAMCollection.load(path).eams.sum(axis=0)


def plan(cfg, devices: int, placement: str, placement_traces: str | Path | None) -> tuple[ExpertParallel, Placement]:
    """The mesh and placement of `devices` devices for a model config (`placement`: see `offload.placement`;
    placement_traces: where the load 'balanced' reads comes from, see `measured_load`)."""
    check(devices, cfg.num_experts, placement)
    mesh = device_mesh(devices)
    load = None if placement_traces is None else measured_load(placement_traces)
    table = make_placement(placement, devices, len(cfg.moe_layer_ids), cfg.num_experts, load)
    return ExpertParallel(mesh, tuple(map(tuple, table.slots().tolist()))), table


def sharded_slab(parallel: ExpertParallel, placement: Placement, expert_stacks, shapes: dict) -> dict:
    """The slab of every expert, sharded: each device's block built on that device from each MoE layer's stacks
    ({name: [E, ...]}, one layer at a time), its experts of the layer in increasing order (each process builds
    its own devices' blocks)."""
    devices = list(parallel.mesh.devices.flat)
    L, E, G = placement.num_layers, placement.num_experts, placement.num_devices
    per_device = E // G
    local = {d: device for d, device in enumerate(devices) if device.process_index == jax.process_index()}
    blocks = {d: empty_slab(shapes, L * per_device, device) for d, device in local.items()}
    for m, stack in enumerate(expert_stacks):
        for d, device in local.items():
            mine = np.flatnonzero(placement.devices[m] == d)
            part = jax.device_put({name: w[mine] for name, w in stack.items()}, device)
            blocks[d] = _write_layer(blocks[d], part, m * per_device)
    return {name: jax.make_array_from_single_device_arrays((L * E,) + shapes[name][0], parallel.sharded,
                                                           [block[name] for block in blocks.values()])
            for name in shapes}


class ExpertParallelEngine(Engine):
    """An Engine whose experts are sharded over several devices: its statistics add each device's load (tokens
    routed to its experts) and their max/mean."""

    def __init__(self, *args, placement: Placement, **kwargs):
        super().__init__(*args, **kwargs)
        self.placement = placement
        self._device_load = np.zeros((placement.num_layers, placement.num_devices), np.int64)

    def _observe(self, routing: np.ndarray, resident: np.ndarray) -> None:
        super()._observe(routing, resident)
        E = self.cfg.num_experts
        for m, row in enumerate(routing.reshape(routing.shape[0], -1)):
            self._device_load[m] += np.bincount(self.placement.devices[m][row[(row >= 0) & (row < E)]],
                                                minlength=self.placement.num_devices)

    def reset_stats(self) -> None:
        super().reset_stats()
        self._device_load[:] = 0

    def stats(self) -> dict:
        stats = super().stats()
        stats["expert_parallel"] = {"devices": self.placement.num_devices,
                                    "device_load": self._device_load.sum(axis=0).tolist(),
                                    "max_over_mean": load_spread(self._device_load) if self._device_load.any() else None}
        return stats


def engine_class(parallel: ExpertParallel | None, placement: Placement | None):
    """The Engine class to build: Engine, or with several devices ExpertParallelEngine of this placement."""
    return Engine if parallel is None else functools.partial(ExpertParallelEngine, placement=placement)
