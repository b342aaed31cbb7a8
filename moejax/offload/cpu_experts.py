"""CPU compute of missed experts (`cpu_experts='auto'`): a missed expert routed few tokens is computed on the host
from host memory instead of being copied to the device, when a cost model says that is faster.

Per MoE layer step of a cached engine (`split_misses`, inside the step program): an expert that is not in the
device cache and was routed `t` >= 1 tokens (valid rows' pairs of nonzero weight) is computed on the host when
t <= `CostModel.host_token_limit()`: the host's time for it, host_fixed_s + t x host_per_token_s (reading its
weights from host memory and the FLOPs of its t rows, measured), is below the link's, expert_bytes /
link_bytes_per_s. Those experts take no cache slot and move nothing over the link; their pairs get weight 0 in
the device's expert compute, and one host callback (`HostExperts.compute`, via `jax.experimental.io_callback`,
only in layer steps that send anything) receives the layer's rows x [N, D], routing and the host experts' mask,
and returns their weighted sum [N, D] f32, which the program adds to the device's.

Exact up to float rounding: the host runs the device's own expert function (`models.moe.expert_ffn` on the
weights as the cache holds them, compact ones dequantized by `models.quantized.dequantized`) compiled by XLA for
the CPU (`jax.devices("cpu")`; its thread pool uses the host's cores), on the expert's rows padded to a power of
two. Its matmuls have other shapes than the device's batched ones, so they may round differently, and the
host experts' sum is added after the device's instead of in expert order. tests/test_compact_experts.py states
and checks the tolerance (float32: 1e-6 of the output's largest value; bf16: 1e-2).

The cost model's numbers are measured once at load (`measure`: one expert's in-program fetch from the pinned
host stack; the host function on 1 and 8 rows) unless given. The host keeps its own copy of the experts as CPU
arrays, one buffer per expert (host RAM: the experts' bytes twice, in their format).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from moejax.errors import ParameterError
from moejax.models.moe import expert_ffn
from moejax.models.quantized import SCALE_SUFFIX, dequantized
from moejax.offload.expert_stacks import fetch_expert

CPU_EXPERTS = ("off", "auto")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """expert_bytes: one expert as the link carries it; link_bytes_per_s: host -> device copy rate;
    host_fixed_s + tokens x host_per_token_s: the host's time for one expert on that many token rows."""

    expert_bytes: int
    link_bytes_per_s: float
    host_fixed_s: float
    host_per_token_s: float

    def copy_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def host_s(self, tokens: int) -> float:
        return self.host_fixed_s + tokens * self.host_per_token_s

    def host_token_limit(self, most: int = 1 << 20) -> int:
        """The most tokens for which the host is faster than the copy (0: never); at most `most`."""
        spare = self.copy_s() - self.host_fixed_s
        if spare <= 0:
            return 0
        if self.host_per_token_s <= 0:
            return most
        return int(min(most, max(0, np.ceil(spare / self.host_per_token_s) - 1)))

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "copy_s": self.copy_s(), "host_token_limit": self.host_token_limit()}


@functools.partial(jax.jit, static_argnames=("act",))
def _host_ffn(x, expert: dict, act: str):
    return expert_ffn(x, dequantized(expert), act).astype(jnp.float32)


def host_rows(n: int) -> int:
    """Rows the host function computes for n token rows: the next power of two (few compiled shapes)."""
    return 1 << max(0, n - 1).bit_length()


class HostExperts:
    """The host side: every MoE layer's experts as CPU arrays (`experts[m][e]` = {name: array}), the callback that
    computes some of them on a layer's rows, and its counters (experts computed, tokens, seconds). Hashable by
    identity: it is part of the step programs' static spec."""

    def __init__(self, stacks: list[dict], act: str, token_limit: int):
        """stacks: each MoE layer's experts {name: [E, ...]} (NumPy or JAX arrays)."""
        cpu = jax.devices("cpu")[0]
        self.experts = []
        for stack in stacks:
            layer = {name: np.asarray(w) for name, w in stack.items()}  # one host copy of the layer, sliced below
            count = next(iter(layer.values())).shape[0]
            self.experts.append([jax.device_put({name: w[e] for name, w in layer.items()}, cpu) for e in range(count)])
        self.act, self.token_limit, self.cpu = act, token_limit, cpu
        self.cost: CostModel | None = None
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.computed, self.tokens, self.seconds = 0, 0, 0.0

    def stats(self) -> dict:
        with self._lock:
            counts = {"experts": self.computed, "tokens": self.tokens, "seconds": self.seconds}
        return {**counts, "token_limit": self.token_limit, **({"cost_model": self.cost.describe()} if self.cost else {})}

    def expert_output(self, layer: int, expert: int, rows: np.ndarray) -> np.ndarray:
        """Expert `expert` of MoE layer `layer` on rows [n, D] -> [n, D] f32, computed on the CPU."""
        padded = np.zeros((host_rows(len(rows)), rows.shape[1]), rows.dtype)
        padded[: len(rows)] = rows
        out = _host_ffn(jax.device_put(padded, self.cpu), self.experts[layer][expert], self.act)
        return np.asarray(out)[: len(rows)]

    def compute(self, layer, x, ids, weights, on_host) -> np.ndarray:
        """The host experts' weighted sum: layer (scalar), x [N, D], ids int32 [N, k], weights f32 [N, k] (0 for
        pairs not computed), on_host bool [E] -> [N, D] f32. Experts added in increasing order."""
        start = time.perf_counter()
        x, ids, weights = np.asarray(x), np.asarray(ids), np.asarray(weights, np.float32)
        out = np.zeros(x.shape, np.float32)
        tokens = 0
        experts = np.flatnonzero(np.asarray(on_host))
        for e in experts:
            row_weight = np.where(ids == e, weights, 0.0).sum(axis=-1)
            rows = np.flatnonzero(row_weight != 0)
            out[rows] += row_weight[rows, None] * self.expert_output(int(layer), int(e), x[rows])
            tokens += rows.size
        with self._lock:
            self.computed += experts.size
            self.tokens += tokens
            self.seconds += time.perf_counter() - start
        return out


def split_misses(table, layer, distinct, ids, weights, valid_rows, num_experts: int, token_limit: int):
    """Inside a step program: which of MoE layer `layer`'s experts the host computes.

    table: the cache's slot table [L * E] (-1: not resident); distinct int32 [U] (increasing, padded with E);
    ids int32 [N, k]; weights f32 [N, k]; valid_rows bool [N] or None. -> (device_distinct int32 [U]: the
    others, increasing, padded with E; device_weights [N, k]: 0 for the host experts' pairs; on_host bool [E])."""
    E = num_experts
    chosen = (ids >= 0) & (ids < E) & (weights != 0)
    if valid_rows is not None:
        chosen = chosen & valid_rows[:, None]
    tokens = jnp.zeros(E + 1, jnp.int32).at[jnp.where(chosen, ids, E).reshape(-1)].add(1)[:E]
    missing = table[layer * E + jnp.arange(E)] < 0
    on_host = missing & (tokens > 0) & (tokens <= token_limit)
    host_id = on_host[jnp.clip(distinct, 0, E - 1)] & (distinct < E)
    device_distinct = jnp.sort(jnp.where(host_id, E, distinct))
    device_weights = jnp.where(on_host[jnp.clip(ids, 0, E - 1)] & (ids >= 0) & (ids < E), 0.0, weights)
    return device_distinct, device_weights, on_host


def host_output(host: HostExperts, layer, x, ids, weights, on_host):
    """Inside a step program: the host experts' output [N, D] f32 (zeros, and no callback, when none)."""
    shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)

    def call(operands):
        return io_callback(host.compute, shape, *operands, ordered=False)

    return jax.lax.cond(on_host.any(), call, lambda operands: jnp.zeros(x.shape, jnp.float32),
                        (layer, x, ids, weights, on_host))


def measure(host: HostExperts, host_stack: dict, expert_bytes: int, repeats: int = 3) -> CostModel:
    """The cost model from one expert of MoE layer 0: its copy from the host stack (`host_stack`, as the engine
    keeps it in pinned host memory) to the device, as a miss fetches it, and the host function on 1 and 8 token
    rows (medians of `repeats`)."""
    def median_time(run) -> float:
        run()  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    fetch = jax.jit(lambda stack: fetch_expert(stack, 0))  # what a miss runs in the step programs
    copy_s = median_time(lambda: jax.block_until_ready(fetch(host_stack)))
    width = host_stack["down"].shape[-1]
    dtype = host_stack.get("down" + SCALE_SUFFIX, host_stack["down"]).dtype  # the model's (compact: its scales')
    rng = np.random.default_rng(0)
    times = [median_time(lambda n=n: host.expert_output(0, 0, rng.standard_normal((n, width)).astype(dtype)))
             for n in (1, 8)]
    per_token = max(0.0, (times[1] - times[0]) / 7)
    return CostModel(expert_bytes, expert_bytes / max(copy_s, 1e-9), max(0.0, times[0] - per_token), per_token)


def check_option(cpu_experts: str, mode: str) -> None:
    """Raises ParameterError for a bad `cpu_experts` value or one the offload mode cannot use."""
    if cpu_experts not in CPU_EXPERTS:
        raise ParameterError.not_one_of("cpu_experts", cpu_experts, CPU_EXPERTS)
    if cpu_experts == "auto" and mode != "cached":
        raise ParameterError("{cpu_experts} 'auto' computes the expert cache's misses on the host: it needs {offload} "
                             "cached, not {mode!r}", mode=mode)


def keeping(stacks, kept: list):
    """The expert stacks as they come, each also appended to `kept` (for the host's copy)."""
    for stack in stacks:
        kept.append(stack)
        yield stack


def host_experts(kept: list[dict], act, host_stack: dict, expert_bytes: int, cost: CostModel | dict | None,
                 most_tokens: int) -> HostExperts:
    """The HostExperts of an engine: its expert stacks `kept`, the cost model `cost` (a CostModel; None: measured
    from `host_stack`, the engine's first pinned host stack; a dict: measured, then those fields replaced, e.g.
    {'link_bytes_per_s': 25e9} for another link) and the token limit it gives (at most `most_tokens`)."""
    host = HostExperts(kept, act, 0)
    if isinstance(cost, CostModel):
        host.cost = cost
    else:
        fields = {f.name for f in dataclasses.fields(CostModel)}
        if cost is not None and not set(cost) <= fields:
            raise ParameterError("{cpu_cost}: unknown fields {names} (fields: {fields})",
                                 names=", ".join(sorted(set(cost) - fields)), fields=", ".join(sorted(fields)))
        host.cost = dataclasses.replace(measure(host, host_stack, expert_bytes), **(cost or {}))
    host.token_limit = host.cost.host_token_limit(most_tokens)
    return host
