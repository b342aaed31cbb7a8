"""`moejax.load`: a checkpoint directory -> an Engine, with its experts where the `OffloadConfig` says."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.encdec_config import ROUTING_MODES, EncDecConfig
from moejax.engine import decoder_programs as programs
from moejax.engine import encdec_programs, expert_parallel
from moejax.engine.engine import Engine
from moejax.engine.layer_stream import LAYER_STREAM
from moejax.engine.seq2seq import Seq2SeqEngine
from moejax.engine.compilation import use_compilation_cache
from moejax.errors import MoejaxError, ParameterError, is_integer, plural
from moejax.models.decoder import expert_activation, kv_bytes_per_token, kv_cache_bytes
from moejax.models.encdec import expert_shapes as encdec_expert_shapes
from moejax.kernels.slab_experts import inplace_problem
from moejax.models.moe import EXPERT_COMPUTES, INPLACE_COMPUTES
from moejax.models.registry import kind_of
from moejax.offload import device_cache as dc
from moejax.offload.config import OffloadConfig
from moejax.offload.cpu_experts import (check_option as check_cpu_experts, check_widened_copy, host_experts,
                                       keeping)
from moejax.offload.expert_format import DTYPE_FORMATS, ExpertFormat, resolve_format, stored_format
from moejax.kernels import host_rows
from moejax.offload.expert_stacks import (HOST_LAYOUTS, MISS_COPIES, AddressedHost, _write_layer, empty_slab,
                                         host_sharding, per_expert_layout, place_on_host, size_pinned_pool,
                                         time_layer_fetches)
from moejax.offload.manager import OffloadManager
from moejax.progress import Progress
from moejax.offload.budget import cache_capacity, device_memory, parse_budget
from moejax.offload.disk_tier import checkpoint_tier
from moejax.routing.eams import EAMCollection
from moejax.tokenizer import load_tokenizer

COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer"
# Step programs branch on the device (a loop over a step's misses): with conditionals and loops captured in
# CUDA graphs, the GPU evaluates their conditions itself; without, the host waits on each (BENCHMARKS.md).
COMMAND_BUFFER_TYPES = "+CONDITIONAL,+WHILE"
log = logging.getLogger(__name__)


def prepare_backend(expert_bytes: int | None = None) -> None:
    """Settings that take effect only before JAX starts its GPU backend, unless the user set them: the
    pinned host pool sized for `expert_bytes` of experts, and device-side loops and conditionals."""
    if expert_bytes:
        size_pinned_pool(expert_bytes)
    flags = os.environ.get("XLA_FLAGS", "")
    if COMMAND_BUFFER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {COMMAND_BUFFER_FLAG}={COMMAND_BUFFER_TYPES}".strip()


def load(path: str | Path, offload: OffloadConfig | str = "resident", *, slots: int = 4, max_seq_len: int = 2048,
         prefill_chunk: int = 512, device=None, show_progress: bool = False, routing: str | None = None,
         unroll_layers: bool = False, expert_compute: str = "auto", capacity_factor: float | None = None,
         expert_format: str | None = None, cpu_experts: str = "off", cpu_cost=None, devices: int = 1,
         placement: str = "round-robin", placement_traces: str | Path | None = None, hot_replicas: int = 0,
         layer_stream: str = "auto", miss_copy: str = "auto", **offload_options):
    """Loads a moejax checkpoint as an Engine (an encoder-decoder one as a Seq2SeqEngine).

    offload: an `OffloadConfig`, or its mode ('resident', 'cached', 'on-demand', 'dense-offload') with the
        other fields as keywords: `load(path, "cached", expert_budget="12GiB", cache_policy="lfu")`.
    slots: sequences held at once (KV caches of slots x max_seq_len positions, allocated at load; an
        encoder-decoder model's sources and targets hold max_seq_len tokens each).
    prefill_chunk: most prompt tokens one prefill program takes (longer prompts run in chunks; decoder
        models: an encoder-decoder model encodes a source in one program).
    routing: encoder-decoder models: 'dropless' (default) or 'capacity' (transformers' token dropping);
        decoder families always route dropless.
    unroll_layers: compile every layer into the step program instead of a loop over each run of like layers
        (a little faster per token, much slower to compile for deep models; BENCHMARKS.md).
    expert_compute: how a step computes its routed experts (`engine.decoder_programs`): 'union' (each row
        through every expert the step uses), 'grouped' (dropless dynamic gating: each expert computes exactly
        its tokens, in blocks), 'ragged' (the same through `lax.ragged_dot`), 'capacity' (static capacity-factor
        gating, APPROXIMATE: tokens past an expert's capacity are dropped, so outputs depend on the other
        sequences of a step), 'inplace' (union's sums from Pallas kernels that read the chosen experts in the
        slab without a gathered copy, `kernels.slab_experts`; float experts only, not int8/int4), 'grouped-inplace'
        (grouped's blocks computed by those kernels, all at once) or 'auto'
        (the default: grouped for calls of many tokens; for a decode step's few, inplace on one GPU with float
        experts, union elsewhere).
    capacity_factor: expert_compute 'capacity' only: capacity = ceil(capacity_factor x tokens x top_k /
        experts) per expert and step (default `models.moe.CAPACITY_FACTOR`).
    expert_format: the routed experts' format on the host, over the link and in the device cache (decoder
        models): 'bf16', or APPROXIMATE compact 'int8' / 'int4' (weight-only, per-group scales,
        `models.quantized`; dequantized inside the expert compute); default: as the checkpoint stores them
        (its dtype, or the compact format `moejax convert --expert-format` wrote).
    cpu_experts: 'auto' (offload 'cached', decoder models): a missed expert routed few tokens is computed on the
        host from host memory instead of copied, where the cost model says it is faster (`offload.cpu_experts`;
        equal up to float rounding; with `host_budget`, from the disk tier's host cache); 'off' (the default): every
        miss is copied; 'auto-float32': as 'auto', the host computing from a float32 copy of the experts (host
        RAM: the pinned store plus twice a bf16 model's expert bytes; faster where the host's float32 matmul reads
        more than twice the bytes per second of its bf16 one). cpu_cost: that cost model (`cpu_experts.CostModel`),
        default measured at load; a dict gives some of its fields and the rest is measured (e.g.
        {'link_bytes_per_s': 25e9}).
    devices: expert parallelism (decoder models): the experts split over the first `devices` devices, the dense
        weights on each (`engine.expert_parallel`); in cached mode every device has its own cache of `expert_budget`
        (the budget is per device; a fraction is of all the model's expert bytes), fed from the one host store.
        placement: which device holds each expert, 'round-robin' or 'balanced' (by the load measured in
        `placement_traces`: a routing trace, an EAM collection or the directory `moejax trace` wrote;
        `offload.placement`); hot_replicas: 'balanced' only, a second copy of each MoE layer's that many hottest
        experts on another device (each token's pair computed by one copy).
    layer_stream: 'auto' (the default; offload 'cached', one device, decoder models): a decode step or prompt chunk
        wide enough to copy whole layers runs as a program per layer, the host copying the next layer it needs whole
        while the device computes the one before (`engine.layer_stream`; outputs unchanged, one more layer's bytes of
        GPU memory); 'off': every step is one program, its copies in order with its compute.
    miss_copy: how a step moves a missed expert out of pinned host memory (offload 'cached' or 'on-demand', one
        device, decoder models, no `host_budget`): 'xla' (XLA fetches it into a temporary on the device, then
        writes it into its slot), 'kernel' (a CUDA kernel, `kernels.host_rows`, built with nvcc on first use,
        copies it straight into its slot; on the CPU backend its C++ twin, built with g++) or 'auto' (the default:
        the kernel on a GPU where the host stacks are stacked arrays, whose slices XLA copies with a slower
        kernel of its own, and it builds; else xla). Outputs are the same bits either way.

    Compiled programs are kept in JAX's persistent compilation cache, by default in ~/.cache/moejax/jax
    (the environment variable MOEJAX_COMPILATION_CACHE names another directory, or 'off'). Bad values raise
    ParameterError naming the parameter.
    """
    use_compilation_cache()
    check_layer_stream(layer_stream)
    _check_sizes(slots=(slots, 1), max_seq_len=(max_seq_len, 2), prefill_chunk=(prefill_chunk, 1))  # before any reading
    path = Path(path)
    cfg = checkpoint.load_config(path)
    if isinstance(offload, OffloadConfig) and offload_options:
        raise ParameterError("give the offload options in {offload} (an OffloadConfig), not also as {names}",
                             names=", ".join(sorted(offload_options)))
    config = offload if isinstance(offload, OffloadConfig) else OffloadConfig(offload, **offload_options)
    cfg = with_routing(cfg, routing)
    compute = expert_compute_options(expert_compute, capacity_factor)
    fmt = resolve_format(expert_format, stored_format(path, cfg.dtype), kind_of(cfg).encoder_decoder)
    compute.update(_expert_options(cfg, config, fmt, cpu_experts, cpu_cost, devices, placement, placement_traces,
                                   hot_replicas, miss_copy))
    if expert_compute in INPLACE_COMPUTES and not kind_of(cfg).encoder_decoder:
        problem = inplace_problem(fmt.shapes(_shapes(cfg)), (device or jax.devices()[0]).platform == "gpu")
        if problem:
            raise ParameterError("{expert_compute} {name!r} {problem}", name=expert_compute, problem=problem)
    host_tier = None
    if config.host_budget is not None:
        host_tier = checkpoint_tier(path, cfg, _shapes(cfg), fmt, config.host_budget, config.expert_dir, show_progress)
    pinned = config.mode != "resident" and host_tier is None
    expert_bytes = fmt.expert_bytes(_shapes(cfg)) if fmt.approximate else cfg.expert_bytes
    prepare_backend(len(cfg.moe_layer_ids) * cfg.num_experts * expert_bytes if pinned else None)
    globals_ = checkpoint.load_globals(path)
    layers = [checkpoint.load_layer(path, i) for i in range(cfg.num_layers)]
    stacks = () if host_tier is not None else _expert_stacks(path, cfg, show_progress, fmt)
    if kind_of(cfg).encoder_decoder:
        return build_seq2seq_engine(cfg, globals_, layers, stacks, config, slots=slots, max_seq_len=max_seq_len,
                                    device=device, tokenizer=load_tokenizer(path), path=path, unroll_layers=unroll_layers,
                                    **compute)
    return build_engine(cfg, globals_, layers, stacks, config, slots=slots, max_seq_len=max_seq_len,
                        prefill_chunk=prefill_chunk, device=device, tokenizer=load_tokenizer(path), path=path,
                        unroll_layers=unroll_layers, host_tier=host_tier, layer_stream=layer_stream, **compute)


def _expert_options(cfg, config: OffloadConfig, fmt: ExpertFormat, cpu_experts: str, cpu_cost, devices: int,
                    placement: str, placement_traces, hot_replicas: int, miss_copy: str = "auto") -> dict:
    """`load`'s expert format, CPU-expert, expert-parallel and miss-copy parameters checked against the model and
    the offload config, as `build_engine` keywords (none for encoder-decoder models, which take none of them)."""
    check_cpu_experts(cpu_experts, config.mode)
    options = {}
    if kind_of(cfg).encoder_decoder:
        if miss_copy == "kernel":
            raise ParameterError("{miss_copy} {value!r}: encoder-decoder models fetch their misses through XLA",
                                 value=miss_copy)
        check_miss_copy(miss_copy, pinned_stacks=False)
        if cpu_experts != "off":
            raise ParameterError("{cpu_experts} {value!r}: encoder-decoder models copy every missed expert",
                                 value=cpu_experts)
        if config.host_budget is not None:
            raise ParameterError("{host_budget}: the disk tier serves decoder-only models, not {family}",
                                 family=cfg.family)
    else:
        fmt.check(_shapes(cfg))
        check_miss_copy(miss_copy, pinned_stacks=config.mode in ("cached", "on-demand") and devices <= 1
                        and config.host_budget is None)
        # before the disk tier writes a file
        check_widened_copy(cpu_experts == "auto-float32", fmt.approximate, config.host_budget is not None)
        options.update(expert_format=fmt, cpu_experts=cpu_experts, cpu_cost=cpu_cost, miss_copy=miss_copy)
    if devices != 1 or placement != "round-robin" or placement_traces is not None or hot_replicas:
        check_parallel(cfg, config, devices, placement, cpu_experts, hot_replicas=hot_replicas,
                       placement_traces=placement_traces)
        options.update(devices=devices, placement=placement, placement_traces=placement_traces,
                       hot_replicas=hot_replicas)
    return options


def expert_compute_options(expert_compute: str, capacity_factor: float | None) -> dict:
    """The `expert_compute` and `capacity_factor` parameters checked, as ProgramSpec fields."""
    if expert_compute not in EXPERT_COMPUTES:
        raise ParameterError.not_one_of("expert_compute", expert_compute, EXPERT_COMPUTES)
    if capacity_factor is None:
        return {"expert_compute": expert_compute}
    if expert_compute != "capacity":
        raise ParameterError("{capacity_factor} applies to {expert_compute} 'capacity', not {value!r}", value=expert_compute)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ParameterError("{capacity_factor} must be > 0 (got {value})", value=capacity_factor)
    return {"expert_compute": expert_compute, "capacity_factor": float(capacity_factor)}


def with_routing(cfg: ModelConfig | EncDecConfig, routing: str | None) -> ModelConfig | EncDecConfig:
    """cfg with the `routing` parameter applied: encoder-decoder models route dropless or with capacity,
    decoder families always dropless."""
    if routing is None:
        return cfg
    if not kind_of(cfg).encoder_decoder:
        if routing != "dropless":
            raise ParameterError("{routing} {routing_value!r}: {family} routing is always dropless (capacity is for "
                                 "encoder-decoder models)", routing_value=routing, family=cfg.family)
        return cfg
    if routing not in ROUTING_MODES:
        raise ParameterError.not_one_of("routing", routing, ROUTING_MODES)
    return cfg.replace(routing=routing)


def build_engine(cfg: ModelConfig, globals_: dict, layers: list[dict], expert_stacks: Iterable[dict],
                 config: OffloadConfig, *, slots: int = 4, max_seq_len: int = 2048, prefill_chunk: int = 512,
                 device=None, tokenizer=None, path: Path | None = None, unroll_layers: bool | None = None,
                 host_tier=None, expert_format: ExpertFormat | None = None, cpu_experts: str = "off", cpu_cost=None,
                 devices: int = 1, placement: str = "round-robin", placement_traces: str | Path | None = None,
                 hot_replicas: int = 0, layer_stream: str = "auto", host_layout: str = "auto", miss_copy: str = "auto",
                 **compute) -> Engine:
    """An Engine from weights in memory: the checkpoint's groups (`globals_`, `layers[i]`: NumPy or JAX arrays) and each
    MoE layer's experts stacked {name: [E, ...]}, one layer at a time (benchmarks pass random weights made on the
    device). unroll_layers: see `ProgramSpec` (default: no); compute: its `expert_compute` and `capacity_factor` (see
    `load`), `whole_layer_from` and `tier_hints` (`ProgramSpec`; benchmarks; tier_hints is on over a tier unless
    given); host_layout: the pinned host stacks' layout, 'auto' (`expert_stacks.per_expert_layout` decides),
    'stacked' or 'per-expert' (benchmarks and tests); host_tier: a `TieredHost` (`offload.disk_tier`) that holds
    the experts instead of `expert_stacks` (cached mode); expert_format: the format the experts are kept in
    (default: as given), stacks not yet in it converted (quantized) as they come; cpu_experts, cpu_cost, devices,
    placement, placement_traces, hot_replicas, layer_stream, miss_copy: see `load`."""
    check_layer_stream(layer_stream)
    _check_sizes(slots=(slots, 1), max_seq_len=(max_seq_len, 2), prefill_chunk=(prefill_chunk, 1))
    max_seq_len = min(max_seq_len, cfg.max_position_embeddings)
    device = device or jax.devices()[0]
    step_experts = programs.distinct_size(cfg, max(prefill_chunk, slots))
    need = ("a prompt chunk of {chunk} tokens, or one token of {rows} sequences; minimum budget {minimum:,} bytes): "
            "give a larger budget, or a smaller {prefill_chunk} and {slots}")
    fmt = expert_format or ExpertFormat(DTYPE_FORMATS[cfg.dtype], cfg.dtype)
    if fmt.approximate:
        fmt.check(_shapes(cfg))
        expert_stacks = (fmt.convert(stack, f"{path or 'experts'}: MoE layer {m}") for m, stack in enumerate(expert_stacks))
    expert_bytes = fmt.expert_bytes(_shapes(cfg))
    if host_tier is not None and host_tier.shapes != fmt.shapes(_shapes(cfg)):
        raise ParameterError("{host_tier}: its expert files hold other weights than {expert_format} {name!r} keeps "
                             "({found})", name=fmt.name, found=host_tier.cache.files.root)
    check_cpu_experts(cpu_experts, config.mode)
    kept = [] if cpu_experts != "off" and host_tier is None else None  # the tier's host cache serves the host
    if kept is not None:
        expert_stacks = keeping(expert_stacks, kept)
    parallel, table = None, None
    if devices > 1:
        check_parallel(cfg, config, devices, placement, cpu_experts, host_tier, hot_replicas)
        parallel, table = expert_parallel.plan(cfg, devices, placement, placement_traces, hot_replicas)
        device = parallel.replicated
    if host_layout not in HOST_LAYOUTS:
        raise ParameterError.not_one_of("host_layout", host_layout, HOST_LAYOUTS)
    pinned_stacks = config.mode in ("cached", "on-demand") and parallel is None and host_tier is None
    per_expert = pinned_stacks and (
        host_layout == "per-expert" or host_layout == "auto" and per_expert_layout(cfg.num_experts, expert_bytes,
                                                                                  device.platform))
    check_miss_copy(miss_copy, pinned_stacks)
    aligned = all(math.prod(shape) * np.dtype(dtype).itemsize % 16 == 0
                  for shape, dtype in fmt.shapes(_shapes(cfg)).values())
    miss_copy = resolve_miss_copy(miss_copy, pinned_stacks, per_expert or not aligned, device)
    experts = place_experts(cfg, config, expert_stacks, fmt.shapes(_shapes(cfg)), device, step_experts,
                            kv_cache_bytes(cfg, slots + 1, max_seq_len), need, host_tier=host_tier,
                            chunk=prefill_chunk, rows=slots, expert_bytes=expert_bytes, parallel=parallel,
                            per_expert=per_expert)
    if miss_copy == "kernel":
        experts = dataclasses.replace(experts, host=addressed_host(experts.host))
    if pinned_stacks:
        experts.info["miss_copy"] = miss_copy
    if cpu_experts != "off":
        compute["cpu_experts"] = host_experts(experts.host, kept, expert_activation(cfg), expert_bytes, cpu_cost,
                                              cfg.top_k * max(prefill_chunk, slots),
                                              widen=cpu_experts == "auto-float32")
        # On the CPU backend the host is the device: no overlap to gain, and a step blocked on its runner thread
        # would hold a thread of the CPU runtime that the runner's computation needs.
        compute["cpu_experts"].overlap = device.platform != "cpu"
    # The in-place kernels beat union's gather at decode on the GPU (BENCHMARKS.md); elsewhere they only interpret.
    compute["inplace"] = (compute.get("expert_compute", "auto") == "auto" and parallel is None
                          and device.platform == "gpu" and inplace_problem(fmt.shapes(_shapes(cfg)), on_gpu=True) is None)
    measured = {}
    if config.mode == "cached" and parallel is None and host_tier is None and "whole_layer_from" not in compute:
        threshold = dc.whole_layer_from(cfg.num_experts, experts.cache.num_slots)
        if threshold is not None and device.platform == "gpu":  # there the measured rates decide, not the default share
            fetch_times = time_layer_fetches(experts.host[0], addressed=experts.host if miss_copy == "kernel" else None)
            measured["fetch_seconds"] = dict(zip(("one_expert", "whole_layer"), fetch_times, strict=True))
            threshold = dc.whole_layer_from(cfg.num_experts, experts.cache.num_slots, fetch_times)
            host = compute.get("cpu_experts")
            if host is not None and host.cost.layer_copy_s is None:  # what a wide step's split weighs against
                host.cost = dataclasses.replace(host.cost, layer_copy_s=fetch_times[1])
        compute["whole_layer_from"] = threshold
    if config.mode == "cached" and host_tier is not None:  # the disk reads on into the next layer's guessed misses
        compute.setdefault("tier_hints", True)
    spec = programs.ProgramSpec(cfg, config.mode, experts.policy, experts.lookahead,
                                unroll_layers=bool(unroll_layers), expert_parallel=parallel, **compute)
    params_sharding = jax.sharding.SingleDeviceSharding(device) if parallel is None else parallel.replicated
    engine = expert_parallel.engine_class(parallel, table, placement)(
                  cfg, jax.device_put(stacked_params(cfg, globals_, layers), params_sharding),
                  experts.manager, spec, cache=experts.cache, slab=experts.slab, host=experts.host, slots=slots,
                  max_seq_len=max_seq_len, device=device, tokenizer=tokenizer, path=path, prefill_chunk=prefill_chunk,
                  expert_bytes=expert_bytes,
                  stats_info={**experts.info, **fmt.describe(), "kv_cache": _kv_cache_info(cfg, slots, max_seq_len),
                              **measured})
    engine.use_layer_stream(layer_stream)
    return engine


def check_miss_copy(value, pinned_stacks: bool) -> None:
    """`miss_copy` checked; pinned_stacks: whether the engine moves misses out of pinned host stacks (offload
    'cached' or 'on-demand', one device, no disk tier), which 'kernel' needs."""
    if value not in MISS_COPIES:
        raise ParameterError.not_one_of("miss_copy", value, MISS_COPIES)
    if value == "kernel" and not pinned_stacks:
        raise ParameterError("{miss_copy} 'kernel' copies misses out of pinned host stacks: it needs {offload} cached "
                             "or on-demand on one device, without {host_budget}")


def resolve_miss_copy(value: str, pinned_stacks: bool, xla_suits: bool, device) -> str:
    """'xla' or 'kernel' for `value` ('auto' decided: the kernel on a GPU for stacked pinned host stacks, where it
    moves DeepSeek-sized experts faster than XLA's slice (BENCHMARKS.md); 'xla' where it does not build);
    pinned_stacks: as `check_miss_copy`; xla_suits: the per-expert layout, whose whole-buffer copies XLA makes at
    the link's DMA rate, or an expert weight whose bytes are no multiple of 16 (its rows would be unaligned, which
    the kernel copies byte by byte); device: the engine's (read only where the rest allows the kernel: under
    expert parallelism it is a sharding)."""
    if value != "auto":
        return value
    if not pinned_stacks or xla_suits or device.platform != "gpu":
        return "xla"
    try:
        host_rows.register_here()
    except host_rows.KernelUnavailable as err:
        log.info("miss_copy auto: XLA's fetches, the copy kernel is unavailable (%s)", err)
        return "xla"
    return "kernel"


def addressed_host(host: tuple) -> AddressedHost:
    """The pinned host stacks with the copy kernel's row tables, the kernel built and registered (a one-line
    ParameterError where it cannot be: no compiler, or its build failed)."""
    try:
        host_rows.register_here()
    except host_rows.KernelUnavailable as err:
        raise ParameterError("{miss_copy} 'kernel' is unavailable: {reason}", reason=str(err)) from None
    return AddressedHost.of(host)


def check_layer_stream(value) -> None:
    if value not in LAYER_STREAM:
        raise ParameterError.not_one_of("layer_stream", value, LAYER_STREAM)


def check_parallel(cfg, config: OffloadConfig, devices: int, placement: str, cpu_experts: str = "off",
                   host_tier=None, hot_replicas: int = 0, placement_traces: str | Path | None = None) -> None:
    """Expert parallelism's parameters and limits, as one-line errors naming the parameter."""
    expert_parallel.check(devices, cfg.num_experts, placement, hot_replicas)
    if placement_traces is not None and placement != "balanced":
        raise ParameterError("{placement_traces} is the load {placement} 'balanced' reads, not {name!r}", name=placement)
    if devices == 1:  # a placement option on one device would be ignored
        raise ParameterError("{placement}, {placement_traces} and {hot_replicas} share the experts out among several "
                             "devices: give {devices} N > 1 too")
    if kind_of(cfg).encoder_decoder:
        raise ParameterError("{devices}: expert parallelism serves decoder-only models, not {family}", family=cfg.family)
    if devices > 1 and (cpu_experts != "off" or host_tier is not None or config.host_budget is not None):
        raise ParameterError("{devices} {value}: expert parallelism does not combine with {cpu_experts} or the disk "
                             "tier ({host_budget}) yet", value=devices)


def _kv_cache_info(cfg: ModelConfig, slots: int, max_seq_len: int) -> dict:
    """The KV cache the engine holds (slots + 1 rows of max_seq_len positions), for the statistics."""
    per_token = kv_bytes_per_token(cfg)
    return {"bytes": kv_cache_bytes(cfg, slots + 1, max_seq_len), "latent": cfg.is_mla,
            "bytes_per_token": per_token["cached"], "full_heads_bytes_per_token": per_token["full_heads"]}


def build_seq2seq_engine(cfg: EncDecConfig, globals_: dict, layers: list[dict], expert_stacks: Iterable[dict],
                         config: OffloadConfig, *, slots: int = 4, max_seq_len: int = 2048, device=None, tokenizer=None,
                         path: Path | None = None, unroll_layers: bool | None = None, **compute) -> Seq2SeqEngine:
    """`build_engine` for an encoder-decoder model: a Seq2SeqEngine whose sources and targets hold up to
    max_seq_len tokens each (`engine.encdec_programs` describes its programs and where its experts live)."""
    _check_sizes(slots=(slots, 1), max_seq_len=(max_seq_len, 2))
    device = device or jax.devices()[0]
    largest = max(cfg.moe_layer_ids, key=cfg.ffn_size)
    shapes = {name: (shape, np.dtype(cfg.np_dtype)) for name, shape in encdec_expert_shapes(cfg, largest).items()}
    step_experts = programs.distinct_size(cfg, max(max_seq_len, slots))
    decoder_kv = 2 * 2 * cfg.num_decoder_layers * (slots + 1) * max_seq_len * cfg.inner_size * cfg.dtype_bytes
    need = ("a source of {tokens} tokens, or one token of {rows} sequences; minimum budget {minimum:,} bytes): "
            "give a larger budget, or a smaller {max_seq_len} and {slots}")
    experts = place_experts(cfg, config, (_padded(stack, shapes) for stack in expert_stacks), shapes, device,
                            step_experts, decoder_kv, need, tokens=max_seq_len, rows=slots)
    # One capacity group per sequence: a sequence's tokens do not depend on the other slots (encdec_programs).
    spec = encdec_programs.Seq2SeqSpec(cfg.replace(capacity_group="sequence"), config.mode, experts.policy,
                                       experts.lookahead,
                                       unroll_layers=bool(unroll_layers), **compute)
    params = jax.device_put(encdec_programs.program_params(cfg, globals_, layers), jax.sharding.SingleDeviceSharding(device))
    return Seq2SeqEngine(cfg, params, experts.manager, spec, cache=experts.cache, slab=experts.slab, host=experts.host,
                         slots=slots, max_seq_len=max_seq_len, device=device, tokenizer=tokenizer, path=path,
                         expert_bytes=cfg.expert_bytes, stats_info=experts.info)


def _check_sizes(**sizes: tuple[int, int]) -> None:
    """sizes: {parameter: (value, least allowed)}."""
    for name, (value, least) in sizes.items():
        if not is_integer(value):  # 1.5 reached JAX's shape checks
            raise ParameterError("{" + name + "} must be an integer (got {value!r})", value=value)
        if value < least:
            raise ParameterError("{" + name + "} must be >= {least} (got {value})", least=least, value=value)


def _padded(stack: dict, shapes: dict) -> dict:
    """A layer's stacked experts {name: [E, ...]} zero-padded to one expert's `shapes` {name: (shape, dtype)}."""
    if all(w.shape[1:] == shapes[name][0] for name, w in stack.items()):
        return stack
    return {name: np.pad(w, [(0, 0)] + [(0, want - have) for have, want in zip(w.shape[1:], shapes[name][0], strict=True)])
            for name, w in stack.items()}


@dataclasses.dataclass(frozen=True)
class PlacedExperts:
    """Where `place_experts` put the routed experts, and the host-side manager of a cached engine."""

    cache: dc.CacheState
    slab: dict
    host: tuple
    manager: OffloadManager | None
    policy: str  # the device cache policy
    lookahead: int  # experts the lookahead fetches per MoE layer step
    info: dict  # for the statistics


def place_experts(cfg: ModelConfig | EncDecConfig, config: OffloadConfig, expert_stacks: Iterable[dict], shapes: dict,
                  device, step_experts: int, kv_bytes: int, need: str, host_tier=None, expert_bytes: int | None = None,
                  parallel: expert_parallel.ExpertParallel | None = None, per_expert: bool = False,
                  **need_values) -> PlacedExperts:
    """Puts every MoE layer's expert stacks ({name: [E, ...]}, one layer at a time) where `config` says: a device
    slab of them all (resident), or pinned host memory (or `host_tier`, the disk tier, instead), with a cache of
    the budget's slots in cached mode (see `_capacity`: step_experts, kv_bytes, need). shapes: one expert's
    {name: (shape, dtype)}; expert_bytes: one expert's bytes as stored (default `cfg.expert_bytes`; compact
    formats' are fewer); parallel: over several devices, each device's experts, slab and cache its own
    (`engine.expert_parallel`; `device` is then the replicated sharding); per_expert: pinned host stacks one
    buffer per expert (`expert_stacks.per_expert_layout`)."""
    num_moe, E = len(cfg.moe_layer_ids), cfg.num_experts
    collection = trace_collection(cfg, config.traces)
    on_device = device if parallel is not None else jax.sharding.SingleDeviceSharding(device)
    held = E if parallel is None else parallel.num_held

    def empty_cache(slots: int) -> dc.CacheState:
        if parallel is None:
            return jax.device_put(dc.empty_state(num_moe, E, slots), on_device)
        return expert_parallel.device_caches(parallel, num_moe, slots)

    manager, host, info = None, (), {}
    if config.mode == "resident":
        if parallel is not None:
            slab = expert_parallel.place_sharded(parallel, expert_stacks, shapes, on_host=False)
        else:
            slab = empty_slab(shapes, num_moe * E, device)
            for m, stack in enumerate(expert_stacks):
                slab = _write_layer(slab, jax.device_put(stack, on_device), m * E)
        cache = empty_cache(1)
    else:
        if parallel is not None:
            host = expert_parallel.place_sharded(parallel, expert_stacks, shapes, on_host=True)
        else:
            sharding = host_sharding(device)
            host = host_tier or tuple(place_on_host(stack, sharding, m, per_expert)
                                      for m, stack in enumerate(expert_stacks))
            if host_tier is None:
                info["host_layout"] = "per-expert" if per_expert else "stacked"
        info["host_experts"] = num_moe * E
        cache, slab = empty_cache(1), {}
        if config.mode == "cached":
            first = device if parallel is None else parallel.mesh.devices.flat[0]
            capacity = _capacity(cfg, config, first, min(step_experts, held), kv_bytes, need,
                                 expert_bytes or cfg.expert_bytes, held=num_moe * held, **need_values)
            cache = empty_cache(capacity)
            if parallel is None:
                slab = empty_slab(shapes, capacity, device)
            else:
                slab = {name: jnp.zeros((parallel.mesh.size * capacity,) + shape, dtype, device=parallel.sharded)
                        for name, (shape, dtype) in shapes.items()}
            staged = 2 * cfg.top_k if config.prefetch_per_step is None else config.prefetch_per_step
            manager = OffloadManager(num_moe, E, cfg.top_k, policy=config.policy, prefetch=config.prefetch,
                                     staged_per_step=staged, prefetch_floor=config.prefetch_floor, collection=collection,
                                     device=device)
    lookahead = 0
    if manager is not None and manager.lookahead:
        lookahead = cfg.top_k if config.prefetch_per_layer is None else min(config.prefetch_per_layer, E)
    return PlacedExperts(cache, slab, host, manager, manager.device_policy if manager is not None else "lru", lookahead,
                         info)


def stacked_params(cfg: ModelConfig, globals_: dict, layers: list[dict]) -> dict:
    """The step programs' parameters (`decoder_programs.forward`): each segment's layers stacked, and per MoE
    segment the post_norm and router of the MoE layer after each of its layers (the last MoE layer's own)."""
    stack = lambda trees: jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)  # noqa: E731
    moe_ids = cfg.moe_layer_ids
    segments, following = [], []
    for segment in programs.layer_segments(cfg):
        segments.append(stack(layers[segment.start : segment.start + segment.count]))
        if not segment.moe:
            following.append(None)
            continue
        after = [moe_ids[min(m + 1, len(moe_ids) - 1)] for m in range(segment.first_moe, segment.first_moe + segment.count)]
        following.append(stack([{name: layers[j][name] for name in ("post_norm", "router")} for j in after]))
    return {"globals": globals_, "segments": segments, "next_router": following}


def _shapes(cfg: ModelConfig) -> dict:
    from moejax.models.decoder import expert_shapes

    return {name: (shape, np.dtype(cfg.np_dtype)) for name, shape in expert_shapes(cfg).items()}


def _expert_stacks(path: Path, cfg: ModelConfig, show_progress: bool, fmt: ExpertFormat) -> Iterator[dict]:
    """Each MoE layer's experts as NumPy stacks {name: [E, ...]} in format `fmt`, one layer at a time."""
    progress = Progress("load experts", len(cfg.moe_layer_ids) * cfg.num_experts, enabled=show_progress)
    for layer in cfg.moe_layer_ids:
        experts = []
        for e in range(cfg.num_experts):
            experts.append(checkpoint.load_expert(path, layer, e))
            progress.advance()
        yield fmt.convert({name: np.stack([np.asarray(x[name]) for x in experts]) for name in experts[0]},
                          f"{path}: MoE layer {layer}")
    progress.close()


def _capacity(cfg: ModelConfig | EncDecConfig, config: OffloadConfig, device, step_experts: int, kv_bytes: int, need: str,
              expert_bytes: int, held: int | None = None, **need_values) -> int:
    """Expert slots for the budget: at least the experts one step can use at once (`step_experts`: usually one
    layer's worth; `need`, a ParameterError template with `need_values`, says what makes a step need them), at
    most every expert, within device memory (next to the dense weights, `kv_bytes` of KV caches and a step's
    gathered experts). Steps are the same at every budget, so outputs are too. expert_bytes: one expert as the
    cache holds it; a fractional budget is of the checkpoint's expert bytes, so that compact experts (fewer bytes)
    fit more of them into the same memory, and a step's gathered experts are dequantized (`cfg.expert_bytes`).
    held: the experts the device may hold (expert parallelism: its own; default all), the most slots it gets."""
    total = len(cfg.moe_layer_ids) * cfg.num_experts
    held = held or total
    budget = parse_budget(config.budget, total * cfg.expert_bytes)
    if min(budget // expert_bytes, held) < step_experts:
        raise ParameterError(
            "{expert_budget} of {budget:,} bytes holds {holds}, but a step of this engine can need {need} at once (" + need,
            budget=budget, holds=plural(budget // expert_bytes, "expert"), need=step_experts,
            minimum=step_experts * expert_bytes, **need_values)
    memory = device_memory(device, kv_bytes + step_experts * cfg.expert_bytes)
    return cache_capacity(budget, expert_bytes, step_experts, held, memory)


def trace_collection(cfg: ModelConfig | EncDecConfig, traces: str | Path | None) -> EAMCollection | None:
    """The collection the trace prefetcher and the activation policy start from (`traces`: eams.npz or the
    directory `moejax trace` wrote), or None (they start empty)."""
    if traces is None:
        return None
    collection = EAMCollection.load(traces)
    found, want = (collection.num_layers, collection.num_experts), (len(cfg.moe_layer_ids), cfg.num_experts)
    if found != want:
        raise MoejaxError(f"{traces}: activation matrices of {found[0]} MoE layers x {found[1]} experts, "
                          f"but the model has {want[0]} x {want[1]}")
    return collection
