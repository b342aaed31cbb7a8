"""`moejax.load`: a checkpoint directory -> an Engine with the chosen executor and offloading mode."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError, ParameterError
from moejax.models.decoder import kv_cache_bytes
from moejax.models.encdec import kv_cache_shape as encdec_kv_cache_shape
from moejax.runtime.budget import cache_capacity, device_memory, parse_budget
from moejax.engine.compilation import use_compilation_cache
from moejax.runtime.engine import Engine
from moejax.runtime.executors import DeviceRoutedExecutor, WholeModelExecutor
from moejax.runtime.expert_runner import MODES, ExpertRunner
from moejax.runtime.host_routed import HostRoutedExecutor
from moejax.runtime.policies import ONLINE_POLICIES, CachePolicy, make_policy
from moejax.routing.prefetchers import PREFETCHERS, Prefetcher, make_prefetcher
from moejax.runtime.store import HostExpertStore, size_pinned_pool
from moejax.routing.eams import EAMCollection
from moejax.tokenizer import load_tokenizer

EXECUTORS = ("host-routed", "device-routed", "whole-model")
DECODER_EXECUTORS = {"device-routed": DeviceRoutedExecutor, "whole-model": WholeModelExecutor}
DEFAULT_BUDGET = "0.25"


def load(
    path: str | Path,
    *,
    offload: str = "resident",
    expert_budget: str | float | None = None,
    cache_policy: str | None = None,
    executor: str = "host-routed",
    max_batch: int = 8,
    max_seq_len: int = 4096,
    device=None,
    show_progress: bool = False,
    routing: str | None = None,
    prefetch: str = "none",
    prefetch_per_layer: int | None = None,
    prefetch_floor: float | None = None,
    traces: str | Path | None = None,
) -> Engine:
    """Loads a decoder-only moejax checkpoint (encoder-decoder ones load with `moejax.load`, the step engine).

    offload: 'resident' (all experts on the device), 'cached' (experts in pinned host memory and a
        GPU cache of `expert_budget`), 'on-demand' (each layer's experts fetched every time) or
        'dense-offload' (every expert of every layer streamed every step). Outputs are
        bit-identical across modes, budgets and policies.
    expert_budget: GPU memory for the expert cache, a fraction of all expert bytes (0.25) or a
        size ('12GiB'); 'cached' only (default 0.25).
    cache_policy: replacement policy of the cache: lru (default), lfu, fifo, lifo or activation; 'cached' only.
    executor: 'host-routed' (per-layer, routing read back to the host: every offloading mode),
        'device-routed' (per-layer, routing on the device, no round trip; resident only) or
        'whole-model' (one program, the reference; resident only). The last two equal the first
        up to float rounding.
    max_batch, max_seq_len: the largest KV cache to reserve device memory for when sizing the budget.
    routing: encoder-decoder models only: 'dropless' (default) or 'capacity' (transformers' token
        dropping); decoder families always route dropless.
    prefetch: 'none', 'lookahead' (the next MoE layer's router on the current hidden state), 'trace'
        (match the sequence's activations against a trace collection) or 'trace+lookahead' (the trace
        prediction, sharpened by the next router's guess); 'cached' only.
    prefetch_per_layer: most experts prefetched per MoE layer step (default: the model's top-k); with a prefetcher only.
    prefetch_floor: the trace prefetchers propose only experts whose probability of use is at least
        this (default 0.02 for 'trace', 0.2 for 'trace+lookahead').
    traces: an activation-matrix collection (`eams.npz`, or the directory `moejax trace` wrote) for the
        trace prefetcher and the activation policy (only they read it); without one they start empty and
        learn from the sequences this engine runs (they always do).

    Bad values raise ParameterError naming the parameter.

    Compiled programs are kept in JAX's persistent compilation cache, by default in ~/.cache/moejax/jax
    (the environment variable MOEJAX_COMPILATION_CACHE names another directory, or 'off').
    """
    use_compilation_cache()
    path = Path(path)
    cfg = checkpoint.load_config(path)
    check_offload_options(offload, executor, expert_budget, cache_policy, prefetch, prefetch_per_layer)
    cache_policy = cache_policy or "lru"
    if isinstance(cfg, EncDecConfig):
        raise MoejaxError(f"{path}: an encoder-decoder checkpoint: load it with moejax.load")
    if routing not in (None, "dropless"):
        raise ParameterError("{routing} {routing_value!r}: {family} routing is always dropless (capacity is for "
                             "encoder-decoder models)", routing_value=routing, family=cfg.family)
    collection = trace_collection(cfg, traces, prefetch, cache_policy)
    num_moe = len(cfg.moe_layer_ids)
    policy = make_policy(cache_policy, num_layers=num_moe, num_experts=cfg.num_experts, collection=collection)
    prefetcher = None
    if prefetch != "none" or prefetch_floor is not None:
        prefetcher = make_prefetcher(prefetch, num_layers=num_moe, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                     collection=collection, floor=prefetch_floor)
    if executor == "host-routed" and offload != "resident":
        size_pinned_pool(len(cfg.moe_layer_ids) * cfg.num_experts * cfg.expert_bytes)
    device = device or jax.devices()[0]
    globals_ = checkpoint.load_globals(path)
    layers = [checkpoint.load_layer(path, i) for i in range(cfg.num_layers)]
    if executor != "host-routed":
        experts = [
            tuple(checkpoint.load_expert(path, i, e) for e in range(cfg.num_experts)) if cfg.moe_layers[i] else None
            for i in range(cfg.num_layers)
        ]
        return Engine(cfg, DECODER_EXECUTORS[executor](cfg, globals_, layers, experts, device), load_tokenizer(path), path)
    store = HostExpertStore.from_checkpoint(path, cfg, device, on_device=offload == "resident", show_progress=show_progress)
    kv_bytes = reserved_kv_bytes(cfg, max_batch, min(max_seq_len, cfg.max_position_embeddings))
    runner = expert_runner(cfg, store, offload, expert_budget, policy, dense_bytes(globals_, layers), kv_bytes,
                           prefetcher=prefetcher, prefetch_per_layer=prefetch_per_layer, collection=collection)
    return Engine(cfg, HostRoutedExecutor(cfg, globals_, layers, runner), load_tokenizer(path), path)


def check_offload_options(offload: str, executor: str, expert_budget, cache_policy: str | None, prefetch: str,
                          prefetch_per_layer: int | None) -> None:
    """Refuses an unknown mode, executor or policy, and an option the chosen mode would ignore."""
    if offload not in MODES:
        raise ParameterError.not_one_of("offload", offload, MODES)
    if executor not in EXECUTORS:
        raise ParameterError.not_one_of("executor", executor, EXECUTORS)
    if executor != "host-routed" and offload != "resident":
        raise ParameterError("{executor} {name!r} keeps every expert on the device: it needs {offload} resident",
                             name=executor)
    if prefetch not in PREFETCHERS:
        raise ParameterError.not_one_of("prefetch", prefetch, PREFETCHERS)
    if cache_policy is not None and cache_policy not in ONLINE_POLICIES:
        hint = " (belady needs the future: it runs in the policy lab only)" if cache_policy == "belady" else ""
        raise ParameterError.not_one_of("cache_policy", cache_policy, ONLINE_POLICIES, hint)
    for parameter, value in (("expert_budget", expert_budget), ("cache_policy", cache_policy)):
        if value is not None and offload != "cached":
            raise ParameterError("{" + parameter + "} applies to {offload} cached, not {mode!r}", mode=offload)
    if prefetch != "none" and offload != "cached":
        raise ParameterError("{prefetch} {name!r} fills the expert cache: it needs {offload} cached (not {mode!r})",
                             name=prefetch, mode=offload)
    if prefetch_per_layer is not None:
        if prefetch == "none":
            raise ParameterError("{prefetch_per_layer} applies to a prefetcher: give {prefetch} too")
        if prefetch_per_layer < 0:
            raise ParameterError("{prefetch_per_layer} must be >= 0 (got {value})", value=prefetch_per_layer)


def trace_collection(cfg, traces: str | Path | None, prefetch: str, cache_policy: str) -> EAMCollection | None:
    """The collection the trace prefetcher and the activation policy read: loaded from `traces`, or
    empty (filled as sequences finish) when one of them is chosen; None when neither is."""
    num_moe = len(cfg.moe_layer_ids)
    reader = prefetch.startswith("trace") or cache_policy == "activation"
    if traces is not None:
        if not reader:
            raise ParameterError("{traces} feeds {prefetch} trace / trace+lookahead and {cache_policy} activation: "
                                 "give one of them, or leave {traces} out")
        collection = EAMCollection.load(traces)
        found = (collection.num_layers, collection.num_experts)
        if found != (num_moe, cfg.num_experts):
            raise MoejaxError(f"{traces}: activation matrices of {found[0]} MoE layers x {found[1]} experts, "
                              f"but the model has {num_moe} x {cfg.num_experts}")
        return collection
    return EAMCollection(num_moe, cfg.num_experts) if reader else None


def dense_bytes(globals_, layers) -> int:
    """Bytes of the non-expert weights not yet on the device."""
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves((globals_, layers)) if not isinstance(leaf, jax.Array))


def reserved_kv_bytes(cfg: ModelConfig | EncDecConfig, batch: int, length: int) -> int:
    """Device bytes of the largest KV cache to leave room for (encoder-decoder: self and cross attention)."""
    if isinstance(cfg, EncDecConfig):
        per_layer = int(np.prod(encdec_kv_cache_shape(cfg, batch, length))) * cfg.dtype_bytes
        return 4 * len(cfg.decoder_layer_ids) * per_layer
    return kv_cache_bytes(cfg, batch, length)


def expert_runner(
    cfg: ModelConfig | EncDecConfig,
    store: HostExpertStore,
    offload: str,
    expert_budget: str | float | None,
    policy: CachePolicy,
    dense_bytes_to_place: int = 0,
    kv_bytes: int = 0,
    *,
    prefetcher: Prefetcher | None = None,
    prefetch_per_layer: int | None = None,
    collection: EAMCollection | None = None,
) -> ExpertRunner:
    """An ExpertRunner; in 'cached' mode its capacity comes from the budget and the device's free memory."""
    capacity = None
    if offload == "cached":
        budget = parse_budget(DEFAULT_BUDGET if expert_budget is None else expert_budget, store.total_bytes)
        memory = device_memory(store.device, kv_bytes, dense_bytes_to_place)
        capacity = cache_capacity(budget, store.expert_bytes, cfg.top_k, len(store), memory)
    return ExpertRunner(
        store, offload, cfg.num_experts, cfg.hidden_act, capacity, policy, prefetcher=prefetcher,
        prefetch_per_layer=cfg.top_k if prefetch_per_layer is None else prefetch_per_layer, collection=collection,
        num_moe_layers=len(cfg.moe_layer_ids), top_k=cfg.top_k,
    )
