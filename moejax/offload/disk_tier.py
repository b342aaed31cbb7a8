"""Opening the disk tier of a checkpoint for `moejax.load(..., host_budget=...)`: its expert directory
(written from the checkpoint the first time), and a host cache of the budget's size above it."""

from __future__ import annotations

from pathlib import Path

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.errors import ParameterError
from moejax.offload.budget import parse_budget
from moejax.offload.expert_files import ExpertFiles, write_expert_files
from moejax.offload.host_cache import HostCache, TieredHost

DEFAULT_DIR = "expert_files"


def host_slots(host_budget: str | float, files: ExpertFiles) -> int:
    """Experts the host cache holds for `host_budget` (a fraction of all expert bytes or a size), at most all."""
    total = files.num_layers * files.num_experts
    slots = min(parse_budget(host_budget, total * files.expert_bytes, "host_budget") // files.file_bytes, total)
    if slots < 1:
        raise ParameterError("{host_budget} {value!r} holds no expert (one takes {size:,} bytes)", value=str(host_budget),
                             size=files.file_bytes)
    return int(slots)


def open_tier(files: ExpertFiles, host_budget: str | float, prefetch_per_step: int) -> TieredHost:
    """The host tier the step programs read: a host cache of `host_budget` above `files`."""
    return TieredHost(HostCache(files, host_slots(host_budget, files), prefetch_per_step))


def checkpoint_tier(path: Path, cfg: ModelConfig, shapes: dict, host_budget: str | float, expert_dir: str | Path | None,
                    show_progress: bool = False) -> TieredHost:
    """The disk tier of the checkpoint at `path`: `expert_dir` (default `expert_files/` inside the checkpoint),
    written from the checkpoint's experts if it does not exist; shapes: one expert's {name: (shape, dtype)}. The
    host prefetcher reads up to one token's experts (top-k per MoE layer) ahead per step."""
    root = Path(expert_dir) if expert_dir is not None else Path(path) / DEFAULT_DIR
    moe_layers = cfg.moe_layer_ids
    if not root.exists():
        try:
            write_expert_files(root, shapes, len(moe_layers), cfg.num_experts,
                               lambda m, e: checkpoint.load_expert(path, moe_layers[m], e), show_progress)
        except OSError as err:
            raise ParameterError("{expert_dir} {root}: cannot write the expert files ({error}); give a writable "
                                 "directory", root=str(root), error=err.strerror or err) from None
    files = ExpertFiles(root, shapes, len(moe_layers), cfg.num_experts)
    return open_tier(files, host_budget, cfg.top_k * len(moe_layers))
