"""moejax checkpoint -> HF checkpoint (config.json, safetensors shards, tokenizer files).

The inverse of `converter.convert`, driven by the same per-family tensor map, so a checkpoint
exported and converted back has identical weights. Tensors stream through: the checkpoint is read
one group at a time (the globals, a layer's dense weights, one expert) and each tensor goes straight
into its shard file, so peak memory is about one group, never the model. Shards hold at most
`max_shard_size` bytes (a tensor larger than that gets a shard of its own), in transformers' layout:
one model.safetensors, or model-00001-of-0000N.safetensors ... with model.safetensors.index.json.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.convert.families import family
from moejax.convert.families.common import Target, common_hf_config
from moejax.convert.safetensors_file import INDEX_FILE, SINGLE_FILE, tensor_bytes, write_tensors
from moejax.errors import MoejaxError
from moejax.models.registry import kind_of
from moejax.offload.expert_format import stored_format
from moejax.outputs import atomic_directory, check_output
from moejax.progress import Progress
from moejax.sizes import parse_size

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


def is_hf_checkpoint(path: Path) -> bool:
    """Whether `path` looks like a HF safetensors checkpoint (what `--overwrite` may replace)."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


HF_CHECKPOINT_OUTPUT = ("HF checkpoint", is_hf_checkpoint)


def hf_config(cfg: ModelConfig) -> dict:
    """The config.json transformers loads the exported model with."""
    return {**common_hf_config(cfg), **family(cfg.family).hf_config(cfg)}


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names (in the order of `sizes`: name -> bytes) cut into consecutive shards of at most
    `max_shard_bytes` each; a tensor larger than that is a shard by itself."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes.items():
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def export(
    ckpt: Path,
    hf_dir: Path,
    overwrite: bool = False,
    show_progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ModelConfig:
    """Writes the checkpoint at `ckpt` as a HF checkpoint directory `hf_dir`; returns its ModelConfig.

    max_shard_size: most bytes of one safetensors file, as bytes or a size ('5GB', '500MB', '2GiB')."""
    ckpt, hf_dir = Path(ckpt), Path(hf_dir)
    max_shard_bytes = parse_size(max_shard_size, "max_shard_size")
    check_output(hf_dir, [ckpt], overwrite, HF_CHECKPOINT_OUTPUT)
    cfg = checkpoint.load_config(ckpt)
    if kind_of(cfg).encoder_decoder:
        raise MoejaxError(f"{ckpt}: exporting encoder-decoder checkpoints ({cfg.family}) is not supported")
    if hasattr(family(cfg.family), "fused_experts"):
        raise MoejaxError(f"{ckpt}: exporting {cfg.family} checkpoints (fused expert tensors) is not supported")
    stored = stored_format(ckpt, cfg.dtype)
    if stored.compact:
        raise MoejaxError(f"{ckpt}: its experts are stored {stored.name} (compact, approximate); export writes the "
                          "float checkpoint: export the one it was converted from")
    targets = family(cfg.family).tensor_map(cfg)
    names_by_group: dict[tuple, list[str]] = defaultdict(list)
    for name, target in targets.items():
        names_by_group[target.group].append(name)
    # Group by group, so that every group is read once however the shards cut the list.
    sizes = {name: tensor_bytes(targets[name].dtype(cfg), targets[name].shape)
             for names in names_by_group.values() for name in names}
    shards = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names(len(shards))

    progress = Progress("export", sum(sizes.values()), unit="B", enabled=show_progress, stream=sys.stderr)
    tensors = _stream_tensors(ckpt, cfg, targets, list(sizes), progress)
    with atomic_directory(hf_dir, overwrite, [ckpt], HF_CHECKPOINT_OUTPUT) as tmp:
        for file, names in zip(files, shards, strict=True):
            specs = [(name, targets[name].dtype(cfg), targets[name].hf_shape) for name in names]
            write_tensors(tmp / file, specs, (next(tensors) for _ in names), {"format": "pt"})
        if len(shards) > 1:
            weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=1) + "\n")
        checkpoint.copy_tokenizer_files(ckpt, tmp)
    progress.close()
    return cfg


def _stream_tensors(
    ckpt: Path, cfg: ModelConfig, targets: dict[str, Target], names: list[str], progress: Progress
) -> Iterator[np.ndarray]:
    """The HF tensors `names` in order, reading each checkpoint group once, when its first tensor is
    due (so `names` must keep a group's tensors together); holds one group at a time."""
    group, tree = None, None
    for name in names:
        target = targets[name]
        if target.group != group:
            tree = None  # let the previous group go before the next is read
            group = target.group
            tree = checkpoint.load_group(ckpt, group)
        array = _get_path(tree, target.path, ckpt, group)
        where = f"{checkpoint.group_dir(ckpt, group)}: '{'/'.join(target.path)}'"
        if array.shape != target.shape:
            raise MoejaxError(f"{where} has shape {list(array.shape)}, config.json implies {list(target.shape)}")
        if array.dtype != target.dtype(cfg):
            raise MoejaxError(f"{where} has dtype {array.dtype}, config.json implies {target.dtype(cfg)}")
        progress.advance(array.nbytes)
        yield np.ascontiguousarray(array.T if target.transpose else array)


def _get_path(tree: dict, path: tuple[str, ...], ckpt: Path, group: tuple) -> np.ndarray:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise MoejaxError(f"{checkpoint.group_dir(ckpt, group)}: checkpoint group lacks '{'/'.join(path)}'")
        node = node[key]
    return np.asarray(node)
