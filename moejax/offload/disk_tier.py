"""Opening the disk tier of a checkpoint for `moejax.load(..., host_budget=...)`: its expert directory in the
engine's expert format (written from the checkpoint the first time), and a host cache of the budget's size above it."""

from __future__ import annotations

from pathlib import Path

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.errors import ParameterError
from moejax.offload.budget import parse_budget
from moejax.offload.expert_format import DTYPE_FORMATS, ExpertFormat
from moejax.offload.expert_files import ExpertFiles, write_expert_files
from moejax.offload.host_cache import HostCache, TieredHost

DEFAULT_DIR = "expert_files"


def host_slots(host_budget: str | float, files: ExpertFiles, checkpoint_expert_bytes: int | None = None) -> int:
    """Experts the host cache holds for `host_budget` (a fraction of all the checkpoint's expert bytes, or a size),
    at most all. checkpoint_expert_bytes: one expert as the checkpoint's dtype (default: as the files hold it), so
    that, as with `expert_budget`, a fraction is of the float model and compact experts fit more of them."""
    total = files.num_layers * files.num_experts
    whole = total * (checkpoint_expert_bytes or files.expert_bytes)
    slots = min(parse_budget(host_budget, whole, "host_budget") // files.file_bytes, total)
    if slots < 1:
        raise ParameterError("{host_budget} {value!r} holds no expert (one takes {size:,} bytes)", value=str(host_budget),
                             size=files.file_bytes)
    return int(slots)


def open_tier(files: ExpertFiles, host_budget: str | float, prefetch_per_step: int,
              checkpoint_expert_bytes: int | None = None) -> TieredHost:
    """The host tier the step programs read: a host cache of `host_budget` above `files` (see `host_slots`)."""
    return TieredHost(HostCache(files, host_slots(host_budget, files, checkpoint_expert_bytes), prefetch_per_step))


def default_dir(path: Path, fmt: ExpertFormat) -> Path:
    """`expert_files/` in the checkpoint for float experts of its dtype, `expert_files-int4/` (etc.) for another
    format: switching `expert_format` needs no new `expert_dir`, and float directories keep their old name."""
    return Path(path) / (DEFAULT_DIR if fmt.name == DTYPE_FORMATS[fmt.model_dtype] else f"{DEFAULT_DIR}-{fmt.name}")


def checkpoint_tier(path: Path, cfg: ModelConfig, shapes: dict, fmt: ExpertFormat, host_budget: str | float,
                    expert_dir: str | Path | None, show_progress: bool = False) -> TieredHost:
    """The disk tier of the checkpoint at `path`: `expert_dir` (default `default_dir`), written from the
    checkpoint's experts in format `fmt` if it does not exist (each expert quantized once, as it is written, when
    the checkpoint stores float ones); shapes: one expert's {name: (shape, dtype)} as the checkpoint's dtype. The
    host prefetcher reads up to one token's experts (top-k per MoE layer) ahead per step."""
    root = Path(expert_dir) if expert_dir is not None else default_dir(path, fmt)
    moe_layers = cfg.moe_layer_ids
    stored = fmt.shapes(shapes)

    def load(m: int, e: int) -> dict:
        return fmt.convert(checkpoint.load_expert(path, moe_layers[m], e), f"{path}: MoE layer {moe_layers[m]}, expert {e}")

    if not root.exists():
        try:
            write_expert_files(root, stored, len(moe_layers), cfg.num_experts, load, show_progress, fmt.record())
        except OSError as err:
            raise ParameterError("{expert_dir} {root}: cannot write the expert files ({error}); give a writable "
                                 "directory", root=str(root), error=err.strerror or err) from None
    files = ExpertFiles(root, stored, len(moe_layers), cfg.num_experts, fmt.record())
    return open_tier(files, host_budget, cfg.top_k * len(moe_layers), cfg.expert_bytes)
