"""Expert placement over several devices: which device holds each expert of each MoE layer.

Two placements, both pure functions of their inputs (same inputs, same table):
  round-robin  expert e on device e % G (MoE-Infinity's);
  balanced     from measured activation load per (MoE layer, expert), e.g. a trace collection's EAMs: per layer,
               a greedy longest-processing-time assignment (hottest expert first, onto the least loaded device
               that still has room), so per-device load is even; every device holds the same number of copies
               (so device memory is even too). Optionally the `replicas` hottest experts of each layer get a
               second copy on another device, each copy taking half the expert's load.

A placement's load figure is max/mean per-device load (1.0: perfectly even; G: everything on one device).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moejax.errors import ParameterError, is_integer

PLACEMENTS = ("round-robin", "balanced")


@dataclasses.dataclass(frozen=True)
class Placement:
    """devices: int32 [L, E], the device of each expert's (first) copy; replicas: per MoE layer, the second copies
    as ((expert, device), ...); num_devices: G."""

    devices: np.ndarray
    replicas: tuple[tuple[tuple[int, int], ...], ...]
    num_devices: int

    @property
    def num_layers(self) -> int:
        return self.devices.shape[0]

    @property
    def num_experts(self) -> int:
        return self.devices.shape[1]

    def copies(self, layer: int) -> list[list[int]]:
        """Per expert of MoE layer `layer`, the devices holding a copy (first copy first)."""
        copies = [[int(d)] for d in self.devices[layer]]
        for expert, device in self.replicas[layer]:
            copies[expert].append(device)
        return copies

    def device_load(self, load: np.ndarray) -> np.ndarray:
        """float64 [L, G]: the load [L, E] (tokens per expert) each device serves, an expert's load split evenly
        over its copies."""
        out = np.zeros((self.num_layers, self.num_devices))
        for m in range(self.num_layers):
            for e, devices in enumerate(self.copies(m)):
                for d in devices:
                    out[m, d] += load[m, e] / len(devices)
        return out

    def held(self) -> np.ndarray:
        """int32 [G, L, H]: the experts each device holds of each MoE layer (first copies and replicas), increasing,
        padded with -1 to H, the most any device holds of a layer. A device numbers its experts of a layer by their
        place here (its local expert j of layer m is held[d, m, j]): its slab, host stacks and cache keys use them."""
        lists = [[[] for _ in range(self.num_layers)] for _ in range(self.num_devices)]
        for m in range(self.num_layers):
            for e, devices in enumerate(self.copies(m)):
                for d in devices:
                    lists[d][m].append(e)
        H = max(len(experts) for per_device in lists for experts in per_device)
        held = np.full((self.num_devices, self.num_layers, H), -1, np.int32)
        for d, per_device in enumerate(lists):
            for m, experts in enumerate(per_device):
                held[d, m, : len(experts)] = experts
        return held

    def copy_table(self) -> np.ndarray:
        """int32 [L, E, C]: the devices holding each expert (C: the most copies of an expert), its copies repeated in
        order to fill C; pair (row n, choice j) of expert e is computed by copy_table[m, e, (n + j) % C] (each pair by
        exactly one copy, deterministically, the copies taking turns)."""
        copies = [self.copies(m) for m in range(self.num_layers)]
        C = max(len(devices) for layer in copies for devices in layer)
        return np.array([[[devices[c % len(devices)] for c in range(C)] for devices in layer] for layer in copies],
                        np.int32)


def load_spread(device_load: np.ndarray) -> dict:
    """Max/mean per-device load of [L, G] device loads: per layer averaged ('mean'), the worst layer ('worst'), and
    over all layers together ('total')."""
    per_layer = device_load.max(axis=1) / np.maximum(device_load.mean(axis=1), 1e-12)
    total = device_load.sum(axis=0)
    return {"mean": float(per_layer.mean()), "worst": float(per_layer.max()),
            "total": float(total.max() / max(total.mean(), 1e-12))}


def check_devices(num_devices: int, num_experts: int) -> None:
    if not is_integer(num_devices) or num_devices < 1:
        raise ParameterError("{devices} must be an integer >= 1 (got {value!r})", value=num_devices)
    if num_experts % num_devices:
        raise ParameterError("{devices} {value} does not divide the {experts} experts of a MoE layer",
                             value=num_devices, experts=num_experts)


def round_robin(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """Expert e of every layer on device e % G."""
    devices = np.tile(np.arange(num_experts, dtype=np.int32) % num_devices, (num_layers, 1))
    return Placement(devices, ((),) * num_layers, num_devices)


def balanced(load: np.ndarray, num_devices: int, replicas: int = 0) -> Placement:
    """Per MoE layer of `load` ([L, E] tokens routed to each expert, >= 0), the experts spread over G devices by
    longest processing time first: copies in decreasing load (ties: lower expert first) each onto the least loaded
    device (ties: the first from device m % G on, so that layers' hottest experts do not pile up on one device) among those holding fewer than ceil((E + replicas) / G) copies and not yet this
    expert. replicas: the hottest experts of each layer that get a second copy (each copy half the load)."""
    load = np.asarray(load, np.float64)
    if load.ndim != 2 or (load < 0).any() or not np.isfinite(load).all():
        raise ParameterError("{load} must be finite, non-negative [MoE layers, experts] counts (got shape {shape})",
                             shape=load.shape)
    L, E = load.shape
    if not 0 <= replicas <= E or (replicas and num_devices < 2):
        raise ParameterError("{replicas} must be in [0, {experts}] and needs 2 or more devices (got {value})",
                             experts=E, value=replicas)
    room = math.ceil((E + replicas) / num_devices)
    devices = np.zeros((L, E), np.int32)
    extra = []
    for m in range(L):
        hottest = np.argsort(-load[m], kind="stable")[:replicas]
        share = load[m].copy()
        share[hottest] /= 2
        copies = [(share[e], e) for e in range(E)] + [(share[e], int(e)) for e in hottest]
        copies.sort(key=lambda c: (-c[0], c[1]))
        total, held, placed = np.zeros(num_devices), np.zeros(num_devices, int), {}
        layer_extra = []
        for amount, e in copies:
            free = [d for d in range(num_devices) if held[d] < room and d not in placed.get(e, ())]
            d = min(free, key=lambda d: (total[d], (d - m) % num_devices))
            total[d] += amount
            held[d] += 1
            if e in placed:
                layer_extra.append((e, d))
            else:
                devices[m, e] = d
            placed.setdefault(e, []).append(d)
        extra.append(tuple(sorted(layer_extra)))
    return Placement(devices, tuple(extra), num_devices)


def make_placement(name: str, num_devices: int, num_layers: int, num_experts: int, load: np.ndarray | None = None,
                   replicas: int = 0) -> Placement:
    """The `placement` parameter's table: 'round-robin', or 'balanced' from `load` [L, E] (measured tokens per
    expert, e.g. a trace collection's summed EAMs)."""
    if name not in PLACEMENTS:
        raise ParameterError.not_one_of("placement", name, PLACEMENTS)
    if name == "round-robin":
        return round_robin(num_layers, num_experts, num_devices)
    if load is None:
        raise ParameterError("{placement} 'balanced' places experts by measured load: give {placement_traces} "
                             "(what `moejax trace` wrote)")
    if np.shape(load) != (num_layers, num_experts):
        raise ParameterError("{placement} 'balanced': a load of shape {shape}, but the model has {want} "
                             "(MoE layers, experts)", shape=np.shape(load), want=(num_layers, num_experts))
    return balanced(load, num_devices, replicas)
