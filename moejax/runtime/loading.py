"""`moejax.load`: a checkpoint directory -> an Engine with the chosen executor and offloading mode."""

from __future__ import annotations

from pathlib import Path

import jax

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError
from moejax.models.decoder import kv_cache_bytes
from moejax.runtime.budget import cache_capacity, device_memory, parse_budget
from moejax.runtime.engine import Engine
from moejax.runtime.executors import DeviceRoutedExecutor, WholeModelExecutor
from moejax.runtime.host_routed import MODES, HostRoutedExecutor
from moejax.runtime.policies import CachePolicy, make_policy
from moejax.runtime.seq2seq import load_seq2seq
from moejax.runtime.store import HostExpertStore, size_pinned_pool
from moejax.tokenizer import load_tokenizer

EXECUTORS = ("host-routed", "device-routed", "whole-model")
DEFAULT_BUDGET = "0.25"


def load(
    path: str | Path,
    *,
    offload: str = "resident",
    expert_budget: str | float | None = None,
    cache_policy: str = "lru",
    executor: str = "host-routed",
    max_batch: int = 8,
    max_seq_len: int = 4096,
    device=None,
    show_progress: bool = False,
    routing: str | None = None,
) -> Engine:
    """Loads a moejax checkpoint (an encoder-decoder one as a Seq2SeqEngine).

    offload: 'resident' (all experts on the device), 'cached' (experts in pinned host memory and a
        GPU cache of `expert_budget`), 'on-demand' (each layer's experts fetched every time) or
        'dense-offload' (every expert of every layer streamed every step). Outputs are
        bit-identical across modes, budgets and policies.
    expert_budget: GPU memory for the expert cache, a fraction of all expert bytes (0.25) or a
        size ('12GiB'); 'cached' only (default 0.25).
    cache_policy: replacement policy of the cache (lru, lfu, fifo, lifo, ...).
    executor: 'host-routed' (per-layer, routing read back to the host: every offloading mode),
        'device-routed' (per-layer, routing on the device, no round trip; resident only) or
        'whole-model' (one program, the reference; resident only). The last two equal the first
        up to float rounding.
    max_batch, max_seq_len: the largest KV cache to reserve device memory for when sizing the budget.
    routing: encoder-decoder models only: 'dropless' (default) or 'capacity' (transformers' token
        dropping); decoder families always route dropless.
    """
    path = Path(path)
    cfg = checkpoint.load_config(path)
    if offload not in MODES:
        raise MoejaxError(f"--offload '{offload}' is not one of {', '.join(MODES)}")
    if executor not in EXECUTORS:
        raise MoejaxError(f"--executor '{executor}' is not one of {', '.join(EXECUTORS)}")
    if executor != "host-routed" and offload != "resident":
        raise MoejaxError(f"--executor {executor} keeps every expert on the device: it needs --offload resident")
    if expert_budget is not None and offload != "cached":
        raise MoejaxError(f"--expert-budget applies to --offload cached, not '{offload}'")
    if isinstance(cfg, EncDecConfig):
        return load_seq2seq(path, cfg, offload=offload, executor=executor, routing=routing, device=device)
    if routing not in (None, "dropless"):
        raise MoejaxError(f"--routing {routing}: {cfg.family} routing is always dropless (capacity is for encoder-decoder models)")
    policy = make_policy(cache_policy)
    if executor == "host-routed" and offload != "resident":
        size_pinned_pool(sum(cfg.moe_layers) * cfg.num_experts * cfg.expert_bytes)
    device = device or jax.devices()[0]
    globals_ = checkpoint.load_globals(path)
    layers = [checkpoint.load_layer(path, i) for i in range(cfg.num_layers)]
    tokenizer = load_tokenizer(path)
    if executor != "host-routed":
        experts = [
            tuple(checkpoint.load_expert(path, i, e) for e in range(cfg.num_experts)) if cfg.moe_layers[i] else None
            for i in range(cfg.num_layers)
        ]
        executor_cls = WholeModelExecutor if executor == "whole-model" else DeviceRoutedExecutor
        return Engine(cfg, executor_cls(cfg, globals_, layers, experts, device), tokenizer, path)
    store = HostExpertStore.from_checkpoint(path, cfg, device, on_device=offload == "resident", show_progress=show_progress)
    return Engine(cfg, host_routed_executor(cfg, globals_, layers, store, offload, expert_budget, policy, device, max_batch, max_seq_len), tokenizer, path)


def host_routed_executor(
    cfg: ModelConfig,
    globals_,
    layers,
    store: HostExpertStore,
    offload: str,
    expert_budget: str | float | None,
    policy: CachePolicy,
    device,
    max_batch: int = 8,
    max_seq_len: int = 4096,
) -> HostRoutedExecutor:
    """A HostRoutedExecutor; in 'cached' mode its capacity comes from the budget and the device's free memory."""
    capacity = None
    if offload == "cached":
        budget = parse_budget(DEFAULT_BUDGET if expert_budget is None else expert_budget, store.total_bytes)
        kv_bytes = kv_cache_bytes(cfg, max_batch, min(max_seq_len, cfg.max_position_embeddings))
        leaves = jax.tree_util.tree_leaves((globals_, layers))
        dense_bytes = sum(leaf.nbytes for leaf in leaves if not isinstance(leaf, jax.Array))  # not yet on the device
        capacity = cache_capacity(budget, store.expert_bytes, cfg.top_k, device_memory(device, kv_bytes, dense_bytes))
    return HostRoutedExecutor(cfg, globals_, layers, store, offload, capacity, policy, device)
