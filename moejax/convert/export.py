"""moejax checkpoint -> HF checkpoint (config.json, model.safetensors, tokenizer files).

The inverse of `converter.convert`, driven by the same per-family tensor map, so a
checkpoint exported and converted back has identical weights. All tensors go into one
model.safetensors, so the whole model passes through memory once: meant for small models.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.convert.families import family
from moejax.convert.families.common import common_hf_config
from moejax.convert.safetensors_file import write_file
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError
from moejax.outputs import atomic_directory, check_output
from moejax.progress import Progress


def is_hf_checkpoint(path: Path) -> bool:
    """Whether `path` looks like a HF safetensors checkpoint (what `--overwrite` may replace)."""
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


HF_CHECKPOINT_OUTPUT = ("HF checkpoint", is_hf_checkpoint)


def hf_config(cfg: ModelConfig) -> dict:
    """The config.json transformers loads the exported model with."""
    return {**common_hf_config(cfg), **family(cfg.family).hf_config(cfg)}


def export(ckpt: Path, hf_dir: Path, overwrite: bool = False, show_progress: bool = True) -> ModelConfig:
    """Writes the checkpoint at `ckpt` as a HF checkpoint directory `hf_dir`; returns its ModelConfig."""
    ckpt, hf_dir = Path(ckpt), Path(hf_dir)
    check_output(hf_dir, [ckpt], overwrite, HF_CHECKPOINT_OUTPUT)
    cfg = checkpoint.load_config(ckpt)
    if isinstance(cfg, EncDecConfig):
        raise MoejaxError(f"{ckpt}: exporting encoder-decoder checkpoints ({cfg.family}) is not supported")
    targets = family(cfg.family).tensor_map(cfg)
    names_by_group: dict[tuple, list[str]] = defaultdict(list)
    for name, target in targets.items():
        names_by_group[target.group].append(name)

    progress = Progress("export", len(names_by_group), enabled=show_progress, stream=sys.stderr)
    tensors: dict[str, np.ndarray] = {}
    for group, names in names_by_group.items():
        tree = checkpoint.load_group(ckpt, group)
        for name in names:
            target = targets[name]
            array = _get_path(tree, target.path, ckpt, group)
            if array.shape != target.shape:
                raise MoejaxError(
                    f"{checkpoint.group_dir(ckpt, group)}: '{'/'.join(target.path)}' has shape {list(array.shape)}, "
                    f"config.json implies {list(target.shape)}"
                )
            tensors[name] = np.ascontiguousarray(array.T if target.transpose else array)
        progress.advance(1)
    progress.close()

    with atomic_directory(hf_dir, overwrite, [ckpt], HF_CHECKPOINT_OUTPUT) as tmp:
        write_file(tmp / "model.safetensors", {name: tensors[name] for name in sorted(tensors)}, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=1) + "\n")
        checkpoint.copy_tokenizer_files(ckpt, tmp)
    return cfg


def _get_path(tree: dict, path: tuple[str, ...], ckpt: Path, group: tuple) -> np.ndarray:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise MoejaxError(f"{checkpoint.group_dir(ckpt, group)}: checkpoint group lacks '{'/'.join(path)}'")
        node = node[key]
    return np.asarray(node)
