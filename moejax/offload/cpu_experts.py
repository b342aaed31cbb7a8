"""CPU compute of missed experts (`cpu_experts='auto'`): a missed expert routed few tokens is computed on the host
from host memory instead of being copied to the device, when a cost model says that is faster.

Per MoE layer step of a cached engine (`split_misses`, inside the step program): of the layer's misses (experts not
in the device cache routed `t` >= 1 tokens: valid rows' pairs of nonzero weight), the host computes the h it is
fastest at, h chosen to minimise the later of the two, the host and the link working at once: the host's time for
its h, the sum of host_fixed_s + t x host_per_token_s (reading an expert's weights from host memory and the FLOPs of
its t rows, measured; summed as if one at a time, though HOST_THREADS run at once), against the link's for the
others, expert_bytes / link_bytes_per_s each. A lone miss goes to the host when the host alone beats the link (t <=
`CostModel.host_token_limit()`); several may share the work even when the host is slower per expert than the link.
Those experts take no cache slot and move nothing over the link; their pairs get weight 0 in the device's expert
compute. A wide step that would copy its whole layer (`device_cache.copies_whole`) counts the host taking none as
that copy (`CostModel.layer_copy_s`), and where the host takes a share the device fetches only its own misses
(`decoder_programs.admit_misses`). Two host callbacks (`jax.experimental.io_callback`, only in layer steps that send
anything) compute their weighted sum [N, D] f32, which the program adds to the device's: `host_start`, right after
the split, hands the layer's rows x [N, D], routing and the host experts' mask to `HostExperts.start`, which starts
`compute` on a runner thread and returns at once; the device then fetches and computes its own experts, and
`host_finish` waits for the host's sum. So the host computes while the link copies the other misses (on a GPU; on
the CPU backend, where the host is the device, `finish` computes it).

Exact up to float rounding: float experts (bf16, float32; 'auto-float32' widens the host's copy), where torch is
importable, go through torch's CPU matmul (`offload.torch_ffn`: one expert at a time on torch's threads;
`HostExperts.library` 'torch'). Otherwise
('xla') the host runs the device's expert function on the weights as the cache holds them
(compact ones dequantized), in float32 and reading each weight matrix block by block (`offload.host_ffn`: XLA:CPU's
own bf16 matmul is several times slower), compiled by XLA for the CPU (`jax.devices("cpu")`; its thread pool uses the
host's cores), on the expert's rows padded to a power of two. A layer's host experts share HOST_THREADS threads
(XLA:CPU runs the blocked function on one core): as many run at once as there are threads, each cut into ranges
on the threads left over (a lone expert: all of them), summed in order: ranges of hidden units, one call each, for
the bf16 experts of the host's own copy (kept gate and up transposed: `host_ffn.split_units_ffn`), else ranges of
each projection's input rows (`host_ffn.split_expert_ffn`: two calls each, the first ones summed between); float32
experts, whose matmuls XLA:CPU spreads over the cores itself, run one at a time, uncut. Its arithmetic differs
from the device's bf16 batched program, and the host experts' sum is added after the device's instead of in
expert order. tests/test_compact_experts.py states and checks the tolerance
(float32: 1e-6 of the output's largest value; bf16: 1e-2).

The steps check the model as they go: `finish` counts the seconds the device waited for the host's sum, and where
those waits (with the round trips) outweigh the link time the host's experts saved, the host's work was not hidden
(`HostExperts.losing`): the engine then copies every miss (`Engine._check_host_experts`).

The cost model's numbers are measured once at load (`measure`: one expert's fetch to the device as a miss makes it
in the step programs; the host function on 1 and 8 rows) unless given. Where the host computes from:
- pinned host stacks (the experts in host memory): its own copy of the experts as CPU arrays, one buffer per expert
  (host RAM: the experts' bytes twice, in their format);
- the disk tier (`host_budget`, `offload.host_cache`): the host cache's copy, lent by `HostCache.get` for the time
  of one expert's computation (a host-cache hit: arrays over its slot, no copy; a miss: read from disk into a slot
  first, as a device fetch through the tier reads it), so no second copy. Both choices then pay that disk read:
  the cost model weighs the link copy against the host compute, as above. A read that fails inside a step is
  recorded by the host cache (the expert contributes nothing) and raised when the engine reads the step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from moejax.errors import ParameterError
from moejax.models.quantized import SCALE_SUFFIX
from moejax.offload.expert_stacks import fetch_expert, median_seconds
from moejax.offload.host_cache import HostCache, TieredHost
from moejax.offload.host_ffn import (UNITS_BITS, host_operands, split_expert_ffn, split_units_ffn, unit_operands,
                                     widened_in_blocks)
from moejax.offload.torch_ffn import is_torch_operands, torch_expert_ffn, torch_operands, usable as torch_usable

CPU_EXPERTS = ("off", "auto", "auto-float32")  # auto-float32: the host's own copy widened to float32
HOST_LIBRARIES = ("auto", "torch", "xla")
HOST_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))  # host experts, and ranges of each, at once
# `measure`: a lone expert of at least this many bytes read at under this rate means a busy host (one core reads
# several GB/s from memory); it is timed again, and a warning says so if it stays that slow
SLOW_HOST_JUDGED_BYTES = 1 << 20
SLOW_HOST_BYTES_PER_S = 2e9
# The steps' host time against the cost model's estimate of it: past this ratio, over at least that many experts, a
# note says the model underestimates the host (on an H100's host, 12-07: 1.59x, and `auto` ran slower than copying).
OVER_MODEL_RATIO, OVER_MODEL_EXPERTS = 1.5, 16
# The device's waits for the host's sums (`finish`) plus the callbacks' round trips against the link time the host's
# experts saved (their copies): past this ratio, over at least OVER_MODEL_EXPERTS experts, the host's work was not
# hidden behind the device's and costs the steps more than copying (`HostExperts.losing`; the engine then copies).
UNHIDDEN_RATIO = 1.0
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """expert_bytes: one expert as the link carries it; link_bytes_per_s: host -> device copy rate;
    host_fixed_s + tokens x host_per_token_s: the host's time for one expert on that many token rows;
    round_trip_s: what a layer step pays once when the host computes anything (the two callbacks: the rows to
    the host, the sum back, the device waiting in between); layer_copy_s: the copy of a whole layer's experts that
    a wide step makes when the host takes none of its misses (`device_cache.copies_whole`; None: that many
    copies of one expert)."""

    expert_bytes: int
    link_bytes_per_s: float
    host_fixed_s: float
    host_per_token_s: float
    round_trip_s: float = 0.0
    layer_copy_s: float | None = None

    def copy_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def host_s(self, tokens: int) -> float:
        return self.host_fixed_s + tokens * self.host_per_token_s

    def host_token_limit(self, most: int = 1 << 20) -> int:
        """The most tokens for which the host, round trip included, is faster than the copy (0: never); at most
        `most`."""
        spare = self.copy_s() - self.host_fixed_s - self.round_trip_s
        if spare <= 0:
            return 0
        if self.host_per_token_s <= 0:
            return most
        return int(min(most, max(0, np.ceil(spare / self.host_per_token_s) - 1)))

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "copy_s": self.copy_s(), "host_token_limit": self.host_token_limit()}


def host_rows(n: int) -> int:
    """Rows the host function computes for n token rows: the next power of two (few compiled shapes)."""
    return 1 << max(0, n - 1).bit_length()


class HostExperts:
    """The host side: where it reads the experts it computes (`weights(layer, expert)` -> {name: array} as the
    device cache holds them, or None when the read failed), the callback that computes some of them on a layer's
    rows, and its counters (experts computed, tokens, seconds). most_tokens: no expert routed more tokens goes to
    the host (`split_misses`); dtypes: {name: dtype} of an expert's weights; library: what computes them, 'torch'
    (float experts, bf16 or float32, where torch is importable: `offload.torch_ffn`) or 'xla' (`offload.host_ffn`);
    'auto': torch where it can. Hashable by identity: it is part of the step programs' static spec."""

    def __init__(self, weights: Callable[[int, int], dict | None], act: str, most_tokens: int, dtypes: dict,
                 library: str = "auto"):
        self.weights, self.act, self.most_tokens = weights, act, most_tokens
        self.library = host_library(library, dtypes)
        self.threads = HOST_THREADS  # host threads a layer's experts share (see `compute`)
        # each expert's products use every core themselves: torch's, and XLA:CPU's float matmuls
        self.whole = self.library == "torch" or not widened_in_blocks(dtypes)
        self.overlap = True  # `start` computes on the runner thread while the device goes on (host_start)
        self._jobs: dict[int, tuple[futures.Future | tuple, float]] = {}  # ticket -> (job, its start's time)
        self._tickets = itertools.cycle(range(1 << 30))
        self.cpu = jax.devices("cpu")[0]
        self.cost: CostModel | None = None
        self._noted_over_model = False  # the note of `stats` is logged once
        self._lock = threading.Lock()
        self.reset()

    @classmethod
    def from_stacks(cls, stacks: list[dict], act: str, most_tokens: int, library: str = "auto",
                    widen: bool = False) -> HostExperts:
        """Over its own copy of each MoE layer's experts {name: [E, ...]} (NumPy or JAX arrays): torch tensors in
        linear's layout (`torch_ffn.torch_operands`) for torch; for XLA, CPU arrays (bf16 experts laid out by hidden
        unit, `host_ffn.unit_operands`; others as `host_operands` gives them). widen: the copy in float32 (twice
        a bf16 expert's bytes; float32 matmuls read more bytes but, on some hosts, faster: `cpu_experts`
        'auto-float32'); float experts only."""
        check_widened_copy(widen, compact=any(name.endswith(SCALE_SUFFIX) for name in stacks[0]))
        as_kept = (lambda w: np.asarray(w, np.float32)) if widen else np.asarray
        dtypes = {name: np.float32 if widen else w.dtype for name, w in stacks[0].items()}
        library = host_library(library, dtypes)
        cpu = jax.devices("cpu")[0]
        own = torch_operands if library == "torch" else lambda e: jax.device_put(_own_operands(e), cpu)
        experts = []
        for stack in stacks:
            layer = {name: as_kept(w) for name, w in stack.items()}  # one host copy of the layer, sliced below
            count = next(iter(layer.values())).shape[0]
            experts.append([own({name: w[e] for name, w in layer.items()}) for e in range(count)])
        return cls(lambda layer, expert: experts[layer][expert], act, most_tokens, dtypes, library)

    @classmethod
    def from_host_cache(cls, cache: HostCache, act: str, most_tokens: int, library: str = "auto") -> HostExperts:
        """Over the disk tier's host cache: each expert lent by `HostCache.get` while it is computed (see the
        module's docstring); a failed read is recorded in `cache.failure` (`HostCache.get_or_record`)."""
        dtypes = {name: dtype for name, (_, dtype) in cache.files.shapes.items()}
        return cls(cache.get_or_record, act, most_tokens, dtypes, library)

    def reset(self) -> None:
        with self._lock:
            self.computed, self.tokens, self.seconds = 0, 0, 0.0
            self.layer_steps, self.window_s, self.wait_s = 0, 0.0, 0.0

    @property
    def token_limit(self) -> int:
        """The most tokens (at most most_tokens) for which the host alone beats the link (0 before a cost model)."""
        return self.cost.host_token_limit(self.most_tokens) if self.cost is not None else 0

    def stats(self) -> dict:
        """Experts computed, their tokens and seconds (the host's wall time in the steps); layer_steps (layer steps
        that sent the host anything), window_s (the seconds between their `start` and `finish` callbacks: the
        device's own fetches and compute meanwhile, as the host sees them) and wait_s (the seconds the device
        waited in `finish` for the host's sums: host work not hidden behind the device's); the library, the
        token limit and the cost model; x_cost_model: the host's seconds over the model's estimate of them (> 1:
        the host ran slower in the steps than measured at load; logged once past OVER_MODEL_RATIO, after
        OVER_MODEL_EXPERTS experts) and x_saved: the waits and the model's round trips over the link time the
        host's experts saved (> 1: computing them on the host cost the steps more than copying would have:
        `losing`)."""
        counts = self._counts()
        out = {**counts, "library": self.library, "token_limit": self.token_limit}
        if self.cost is None:
            return out
        x_saved = self._x_saved(counts)
        modeled = counts["experts"] * self.cost.host_fixed_s + counts["tokens"] * self.cost.host_per_token_s
        ratio = counts["seconds"] / modeled if modeled > 0 else None
        if ratio is not None and ratio > OVER_MODEL_RATIO and counts["experts"] >= OVER_MODEL_EXPERTS \
                and not self._noted_over_model:
            self._noted_over_model = True
            fixed_ms, per_token_us = self.cost.host_fixed_s * 1e3, self.cost.host_per_token_s * 1e6
            log.warning(f"cpu_experts: the host took {counts['seconds'] / counts['experts'] * 1e3:.2f} ms an expert in "
                        f"the steps, {ratio:.2f}x the cost model's estimate from its measure at load "
                        f"({fixed_ms:.3g} ms + tokens x {per_token_us:.3g} us): the model sends it more than it "
                        "should; compare with --cpu-experts off")
        return {**out, "cost_model": self.cost.describe(), "x_cost_model": ratio, "x_saved": x_saved}

    def _counts(self) -> dict:
        with self._lock:
            return {"experts": self.computed, "tokens": self.tokens, "seconds": self.seconds,
                    "layer_steps": self.layer_steps, "window_s": self.window_s, "wait_s": self.wait_s}

    def _x_saved(self, counts: dict) -> float | None:
        saved = counts["experts"] * self.cost.copy_s()
        return (counts["wait_s"] + counts["layer_steps"] * self.cost.round_trip_s) / saved if saved > 0 else None

    def losing(self) -> str | None:
        """Why computing experts on the host costs the steps more than copying them would (`stats`' x_saved past
        UNHIDDEN_RATIO over OVER_MODEL_EXPERTS experts or more: the device idled waiting for the host longer than
        the copies it was spared would have taken, with the round trips), or None."""
        counts = self._counts()
        x_saved = None if self.cost is None else self._x_saved(counts)
        if x_saved is None or x_saved <= UNHIDDEN_RATIO or counts["experts"] < OVER_MODEL_EXPERTS:
            return None
        return (f"the device waited {counts['wait_s'] / counts['layer_steps'] * 1e3:.2f} ms a layer step for the "
                f"host's experts ({counts['wait_s']:.3g} s in {counts['layer_steps']} layer steps, round trips "
                f"besides), {x_saved:.2f}x the link time their copies would have taken: the host's work was not hidden")

    def expert_output(self, layer: int, expert: int, rows: np.ndarray, parts: int = 1) -> np.ndarray | None:
        """Expert `expert` of MoE layer `layer` on rows [n, D] -> [n, D] f32, computed on the CPU: by torch, or by
        XLA cut into `parts` ranges (of hidden units, or of its projections' input rows: the module's docstring) on
        the 'part' threads where the products are widened block by block on one core (None: its weights could not
        be read). Weights in host memory are used where they lie (aliased, not copied)."""
        weights = self.weights(layer, expert)
        if weights is None:
            return None
        if self.library == "torch":
            operands = weights if is_torch_operands(weights) else torch_operands(weights, copy=False)
            return torch_expert_ffn(rows, operands, self.act)
        operands = host_operands(weights)
        parts = 1 if self.whole else parts
        padded = np.zeros((host_rows(len(rows)), rows.shape[1]), rows.dtype)
        padded[: len(rows)] = rows
        run = _pool(self.threads, "part").map if parts > 1 else map
        split = split_units_ffn if "up" + UNITS_BITS in operands else split_expert_ffn
        return split(padded, operands, self.act, parts, run)[: len(rows)]

    def start(self, layer, x, ids, weights, on_host) -> np.ndarray:
        """`compute` of these arguments (copied: a callback's arrays may be the runtime's buffers) started on the
        host's runner thread -> its ticket, int32 [], for `finish`. With `overlap` off, `finish` computes it."""
        started = time.perf_counter()
        arguments = (int(layer), np.array(x), np.array(ids), np.array(weights, np.float32), np.array(on_host))
        job = _runner().submit(self.compute, *arguments) if self.overlap else arguments
        with self._lock:
            ticket = next(self._tickets)
            self._jobs[ticket] = (job, started)
        return np.int32(ticket)

    def finish(self, ticket) -> np.ndarray:
        """The host experts' output [N, D] f32 of a `start`'s ticket, once computed (the time since `start` and
        the time waited here are counted: `stats`)."""
        called = time.perf_counter()
        with self._lock:
            job, started = self._jobs.pop(int(ticket))
        out = job.result() if isinstance(job, futures.Future) else self.compute(*job)
        with self._lock:
            self.layer_steps += 1
            self.window_s += called - started
            self.wait_s += time.perf_counter() - called
        return out

    def compute(self, layer, x, ids, weights, on_host) -> np.ndarray:
        """The host experts' weighted sum: layer (scalar), x [N, D], ids int32 [N, k], weights f32 [N, k] (0 for
        pairs not computed), on_host bool [E] -> [N, D] f32. Experts added in increasing order (one whose weights
        could not be read adds nothing: the failure is the step's, raised where it was recorded)."""
        start = time.perf_counter()
        x, ids, weights = np.asarray(x), np.asarray(ids), np.asarray(weights, np.float32)
        out = np.zeros(x.shape, np.float32)
        experts = np.flatnonzero(np.asarray(on_host))
        row_weights = [np.where(ids == e, weights, 0.0).sum(axis=-1) for e in experts]
        rows = [np.flatnonzero(w != 0) for w in row_weights]
        # The threads go to the experts first, what is left to each one's ranges: never more than `threads`
        # products at once (8 experts each split 8 ways ran slower than the 8 whole, on the GPU machines' hosts).
        # Torch's and float experts go one at a time: each matmul already uses every core.
        concurrent = 1 if self.whole else max(1, min(self.threads, experts.size))
        parts = max(1, self.threads // concurrent)
        run = lambda e, r: self.expert_output(int(layer), int(e), x[r], parts)  # noqa: E731
        outputs = map(run, experts, rows) if concurrent == 1 else _pool(self.threads, "expert").map(run, experts, rows)
        for row_weight, expert_rows, expert_out in zip(row_weights, rows, outputs):
            if expert_out is not None:
                out[expert_rows] += row_weight[expert_rows, None] * expert_out
        tokens = sum(r.size for r in rows)
        with self._lock:
            self.computed += experts.size
            self.tokens += tokens
            self.seconds += time.perf_counter() - start
        return out


def host_library(library: str, dtypes: dict) -> str:
    """What computes experts of these weights ({name: dtype}) for `library` ('auto': torch where it can)."""
    if library not in HOST_LIBRARIES:
        raise ParameterError.not_one_of("host_library", library, HOST_LIBRARIES)
    if library == "xla" or (library == "auto" and not torch_usable(dtypes)):
        return "xla"
    if not torch_usable(dtypes):
        raise ParameterError("{host_library} 'torch' computes float experts (bf16 or float32, not compact) and "
                             "needs torch installed")
    return "torch"


def _own_operands(expert: dict) -> dict:
    """One expert of the host's own copy: by hidden unit where it can be (bf16: `unit_operands`, each range of units
    one call, so a lone expert splits over the threads), else as `host_operands` gives it."""
    units = unit_operands(expert)
    return host_operands(expert) if units is None else units


@functools.cache
def _pool(threads: int, role: str) -> futures.ThreadPoolExecutor:
    """The threads that compute a layer's host experts ('expert': each waits for its parts) or the ranges each is
    cut into ('part')."""
    return futures.ThreadPoolExecutor(threads, thread_name_prefix=f"moejax-host-{role}")


@functools.cache
def _runner() -> futures.ThreadPoolExecutor:
    """The thread that runs started layer jobs (`HostExperts.start`), one at a time; their experts use `_pool`."""
    return futures.ThreadPoolExecutor(1, thread_name_prefix="moejax-host-layer")


def split_misses(table, layer, distinct, ids, weights, valid_rows, num_experts: int, cost: CostModel,
                 most_tokens: int, whole=None):
    """Inside a step program: which of MoE layer `layer`'s experts the host computes (the module's docstring).

    table: the cache's slot table [L * E] (-1: not resident); distinct int32 [U] (increasing, padded with E);
    ids int32 [N, k]; weights f32 [N, k]; valid_rows bool [N] or None; cost: the CostModel (its numbers are
    compiled in); most_tokens: no expert routed more tokens goes to the host; whole: None, or bool []: the step
    copies the whole layer unless the host takes a share (`device_cache.copies_whole`), so the host taking none
    costs that copy (`CostModel.layer_copy_s`) rather than a copy per miss. -> (device_distinct int32 [U]: the
    others, increasing, padded with E; device_weights [N, k]: 0 for the host experts' pairs; on_host bool [E])."""
    E = num_experts
    chosen = (ids >= 0) & (ids < E) & (weights != 0)
    if valid_rows is not None:
        chosen = chosen & valid_rows[:, None]
    tokens = jnp.zeros(E + 1, jnp.int32).at[jnp.where(chosen, ids, E).reshape(-1)].add(1)[:E]
    misses = (table[layer * E + jnp.arange(E)] < 0) & (tokens > 0)
    # The host takes the h misses it computes fastest, h minimising max(their host time, summed, plus the round
    # trip if h > 0, against the link's time for the other misses): the two work at once (host_start), the layer
    # waits for the later.
    host_s = jnp.where(misses & (tokens <= most_tokens), cost.host_fixed_s + tokens * cost.host_per_token_s, jnp.inf)
    order = jnp.argsort(host_s, stable=True)
    fastest = host_s[order]
    count = jnp.arange(E + 1)
    host_total = jnp.concatenate([jnp.zeros(1), jnp.cumsum(jnp.where(jnp.isfinite(fastest), fastest, 0.0))])
    host_total = host_total + jnp.where(count > 0, cost.round_trip_s, 0.0)
    makespan = jnp.maximum(host_total, (misses.sum() - count) * cost.copy_s())
    if whole is not None:
        layer_copy_s = E * cost.copy_s() if cost.layer_copy_s is None else cost.layer_copy_s
        makespan = makespan.at[0].set(jnp.where(whole, layer_copy_s, makespan[0]))
    makespan = jnp.where(count <= jnp.isfinite(host_s).sum(), makespan, jnp.inf)
    on_host = jnp.zeros(E, bool).at[order].set(jnp.arange(E) < jnp.argmin(makespan))
    host_id = on_host[jnp.clip(distinct, 0, E - 1)] & (distinct < E)
    device_distinct = jnp.sort(jnp.where(host_id, E, distinct))
    device_weights = jnp.where(on_host[jnp.clip(ids, 0, E - 1)] & (ids >= 0) & (ids < E), 0.0, weights)
    return device_distinct, device_weights, on_host


def host_start(host: HostExperts, layer, x, ids, weights, on_host, valid_rows=None):
    """Inside a step program, right after `split_misses`: starts the host experts' output (`HostExperts.start`)
    -> its ticket, int32 [] (-1, and no callback, when no expert goes to the host). Rows not in valid_rows (bool
    [N], None: all valid; padding) are not computed. The host computes while the device fetches and computes its
    own experts; `host_finish` waits for the result."""
    if valid_rows is not None:
        weights = jnp.where(valid_rows[:, None], weights, 0.0)

    def call(operands):
        return io_callback(host.start, jax.ShapeDtypeStruct((), jnp.int32), *operands, ordered=False)

    return jax.lax.cond(on_host.any(), call, lambda operands: jnp.int32(-1), (layer, x, ids, weights, on_host))


def host_finish(host: HostExperts, ticket, shape: tuple):
    """Inside a step program, after the device's expert output: the host experts' output [N, D] f32 of `ticket`
    (zeros when it is -1)."""
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.lax.cond(ticket >= 0, lambda t: io_callback(host.finish, result, t, ordered=False),
                        lambda t: jnp.zeros(shape, jnp.float32), ticket)


@jax.jit
def _fetch(host, expert):
    """Expert `expert` (a traced int, as a miss's id is) of MoE layer 0 on the device, fetched as a miss fetches it in
    the step programs: from MoE layer 0's pinned host stack, or through the disk tier (a `TieredHost`). A traced
    offset matters: XLA copies a slice of pinned memory at a constant offset with a DMA, at a routing-chosen one with
    a kernel reading over the link, slower on some machines (BENCHMARKS.md)."""
    return host.fetch(0, expert) if isinstance(host, TieredHost) else fetch_expert(host, expert)


def measure(host: HostExperts, source, expert_bytes: int, repeats: int = 3,
            experts: list[tuple[int, int]] = ((0, 0),)) -> CostModel:
    """The cost model: the fetch of MoE layer 0's expert 0 to the device from `source` (MoE layer 0's pinned host
    stack, or the `TieredHost`; after the first, warming, fetch, a host-cache hit); the host function on 1 and 8
    token rows (medians of `repeats`), each call on the next (MoE layer, expert) of `experts` (cycled), so that
    with enough of them the weights come from memory as a step's do, not from the CPU's caches (a small expert
    computed again and again is read from cache, several times faster); and the callbacks' round trip. A host
    slower than a busy one would be (`_slow_host`) is timed a second time, the faster kept, and if it stays that
    slow a warning names its rate (a mismeasured model silently sends the host few experts)."""
    median_time = functools.partial(median_seconds, repeats=repeats)
    first = jnp.int32(0)
    copy_s = median_time(lambda: jax.block_until_ready(_fetch(source, first)))
    shapes = source.shapes if isinstance(source, TieredHost) else {n: (w.shape[1:], w.dtype) for n, w in source.items()}
    width = shapes["down"][0][-1]
    dtype = shapes.get("down" + SCALE_SUFFIX, shapes["down"])[1]  # the model's (compact: its scales')
    rng = np.random.default_rng(0)
    # a lone expert, as `compute` runs it: in `threads` ranges
    rows = {n: rng.standard_normal((n, width)).astype(dtype) for n in (1, 8)}
    pairs = itertools.cycle(experts)

    def host_times() -> list[float]:
        return [median_seconds(lambda n=n: host.expert_output(*next(pairs), rows[n], host.threads),
                               repeats=repeats + 2) for n in (1, 8)]

    times = host_times()
    if _slow_host(expert_bytes, times[0]):  # busy for a moment? the faster of two tries
        times = [min(before, again) for before, again in zip(times, host_times())]
        if _slow_host(expert_bytes, times[0]):
            log.warning(f"cpu_experts: the host computed one {expert_bytes / 2**20:.1f} MiB expert in "
                        f"{times[0] * 1e3:.2f} ms ({expert_bytes / times[0] / 1e9:.2f} GB/s), twice; a host this slow "
                        "is likely busy, and the cost model then sends it few experts (see cpu_experts.cost_model "
                        "in the stats; `load(cpu_cost=...)` sets its fields)")
    per_token = max(0.0, (times[1] - times[0]) / 7)
    return CostModel(expert_bytes, expert_bytes / max(copy_s, 1e-9), max(0.0, times[0] - per_token), per_token,
                     round_trip_s(width, repeats))


def _slow_host(expert_bytes: int, seconds: float) -> bool:
    """Whether the host read one expert of at least SLOW_HOST_JUDGED_BYTES (smaller ones are bound by the call's own
    cost) at under SLOW_HOST_BYTES_PER_S."""
    return expert_bytes >= SLOW_HOST_JUDGED_BYTES and expert_bytes < SLOW_HOST_BYTES_PER_S * seconds


def round_trip_s(width: int, repeats: int = 3) -> float:
    """Seconds the host callbacks add to a layer step that sends a row [1, width] to the host and gets a sum back
    (as `host_start` and `host_finish` do, the second waiting for the first's work), over the same program
    without them: medians of `repeats`."""
    jobs = {}

    def start(x):
        jobs[0] = np.zeros(x.shape, np.float32)
        return np.int32(0)

    def finish(ticket):
        return jobs.pop(int(ticket))

    shape = jax.ShapeDtypeStruct((1, width), jnp.float32)
    plain = jax.jit(lambda x: x * 2.0)

    @jax.jit
    def calling(x):
        ticket = io_callback(start, jax.ShapeDtypeStruct((), jnp.int32), x, ordered=False)
        x, ticket = jax.lax.optimization_barrier((x * 2.0, ticket))
        return x + io_callback(finish, shape, ticket, ordered=False)

    x = jnp.ones((1, width), jnp.float32)
    with_callbacks = median_seconds(lambda: jax.block_until_ready(calling(x)), repeats=repeats)
    return max(0.0, with_callbacks - median_seconds(lambda: jax.block_until_ready(plain(x)), repeats=repeats))


def check_option(cpu_experts: str, mode: str) -> None:
    """Raises ParameterError for a bad `cpu_experts` value or one the offload mode cannot use."""
    if cpu_experts not in CPU_EXPERTS:
        raise ParameterError.not_one_of("cpu_experts", cpu_experts, CPU_EXPERTS)
    if cpu_experts != "off" and mode != "cached":
        raise ParameterError("{cpu_experts} {value!r} computes the expert cache's misses on the host: it needs "
                             "{offload} cached, not {mode!r}", value=cpu_experts, mode=mode)


def check_widened_copy(widen: bool, compact: bool = False, tiered: bool = False) -> None:
    """Raises ParameterError where the host's copy cannot be widened (`cpu_experts` 'auto-float32', widen True):
    compact experts, or the disk tier (the host then computes from its host cache, not a copy of its own)."""
    if not widen:
        return
    if compact:
        raise ParameterError("{cpu_experts} 'auto-float32' widens float experts, not compact ones "
                             "({expert_format} int8 / int4): use 'auto'")
    if tiered:
        raise ParameterError("{cpu_experts} 'auto-float32' keeps a float32 copy of the experts in host RAM; with "
                             "{host_budget} the host computes from its host cache: use 'auto'")


def keeping(stacks, kept: list):
    """The expert stacks as they come, each also appended to `kept` (for the host's copy)."""
    for stack in stacks:
        kept.append(stack)
        yield stack


def host_experts(host, kept: list[dict] | None, act, expert_bytes: int, cost: CostModel | dict | None,
                 most_tokens: int, widen: bool = False) -> HostExperts:
    """The HostExperts of an engine whose experts are `host`: its pinned host stacks (one per MoE layer; the host
    computes from its own copy, `kept`, the stacks as they were placed) or the disk tier (a `TieredHost`: the host
    computes from its host cache; `kept` unused); the cost model `cost` (a CostModel; None: measured; a dict:
    measured, then those fields replaced, e.g. {'link_bytes_per_s': 25e9} for another link); no expert routed more
    than `most_tokens` tokens goes to the host; widen: the host's own copy in float32 (`HostExperts.from_stacks`)."""
    tier = host if isinstance(host, TieredHost) else None
    check_widened_copy(widen, tiered=tier is not None)
    experts = (HostExperts.from_host_cache(tier.cache, act, most_tokens) if tier is not None
               else HostExperts.from_stacks(kept, act, most_tokens, widen=widen))
    if isinstance(cost, CostModel):
        experts.cost = cost
    else:
        fields = {f.name for f in dataclasses.fields(CostModel)}
        if cost is not None and not set(cost) <= fields:
            raise ParameterError("{cpu_cost}: unknown fields {names} (fields: {fields})",
                                 names=", ".join(sorted(set(cost) - fields)), fields=", ".join(sorted(fields)))
        cold = [(0, 0)] if tier is not None else [(m, e) for m in range(len(kept)) for e in range(len(kept[m]["down"]))]
        measured = measure(experts, tier or host[0], expert_bytes, experts=cold)
        if tier is not None:
            tier.raise_failure()  # the measured expert's file failed its check: a one-line error at load
            tier.cache.reset_stats()  # the measurement's reads are no step's
        experts.cost = dataclasses.replace(measured, **(cost or {}))
    return experts
