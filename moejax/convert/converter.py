"""HF safetensors checkpoint -> moejax checkpoint, one tensor at a time.

Every tensor name, shape and file is validated from the safetensors headers before anything
is written; then groups (globals, each layer's dense weights, each expert) are read, cast and
saved one by one, so peak memory is about one group, never a second copy of the model. FP8 checkpoints
with block scales are dequantized tensor by tensor as they are read (`convert.fp8`). A tiktoken tokenizer (no
tokenizer.json) is written as a tokenizer.json (`convert.tiktoken_bpe`).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from moejax import checkpoint
from moejax.config import DTYPES, ModelConfig
from moejax.convert.families import family
from moejax.convert.families.common import Target
from moejax.convert.fp8 import block_fp8_format, read_weight, scale_tensors
from moejax.convert.safetensors_file import TensorInfo, checkpoint_files, read_header
from moejax.convert.tiktoken_bpe import point_config_at_tokenizer_json, tiktoken_tokenizer
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError, ParameterError
from moejax.outputs import atomic_directory, check_output
from moejax.progress import Progress

# Buffers some checkpoints carry that are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise MoejaxError(f"{hf_dir}: no such directory")
    if not path.is_file():
        raise MoejaxError(f"{hf_dir}: missing config.json")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoejaxError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise MoejaxError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    if "format_version" in hf and "model_type" not in hf:
        raise MoejaxError(f"{hf_dir}: a moejax checkpoint already; convert reads HuggingFace checkpoints")
    return hf


def source_dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def hf_model_config(hf_dir: Path, dtype: str | None = None) -> tuple[ModelConfig | EncDecConfig, dict[str, Target]]:
    """The moejax config and tensor map of a HF checkpoint directory."""
    hf = read_hf_config(hf_dir)
    fam = family(hf.get("model_type"))
    if dtype is not None and dtype not in DTYPES:
        raise ParameterError.not_one_of("dtype", dtype, DTYPES)
    try:
        cfg = fam.config_from_hf(hf).replace(dtype=dtype or source_dtype(hf))
    except (TypeError, ValueError) as err:  # a field of the wrong type, e.g. "hidden_size": "big"
        raise MoejaxError(f"{Path(hf_dir) / 'config.json'}: invalid {fam.MODEL_TYPE} config ({err})") from None
    return cfg, fam.tensor_map(cfg)


def index_tensors(hf_dir: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(hf_dir):
        for name, info in read_header(path).items():
            if name in tensors:
                raise MoejaxError(f"tensor '{name}' appears in both {tensors[name].file} and {path}")
            tensors[name] = info
    return tensors


def validate(targets: dict[str, Target], tensors: dict[str, TensorInfo], cfg, ignored: set[str]) -> None:
    """Every target present with its shape, nothing else but `ignored` names and recomputed buffers."""
    missing = sorted(set(targets) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MoejaxError(f"checkpoint is missing tensor '{missing[0]}'{more}")
    extra = sorted(
        name for name in set(tensors) - set(targets) - ignored if not name.endswith(IGNORED_SUFFIXES)
    )
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise MoejaxError(f"checkpoint has unexpected tensor '{extra[0]}'{more} (not used by {cfg.family})")
    for name, target in targets.items():
        found = tensors[name].shape
        if found != target.hf_shape:
            raise MoejaxError(
                f"tensor '{name}' in {tensors[name].file.name}: expected shape {list(target.hf_shape)}, found {list(found)}"
            )


def convert(hf_dir: Path, out_dir: Path, dtype: str | None = None, overwrite: bool = False, show_progress: bool = True,
            expert_format: str | None = None):
    """Converts `hf_dir` into a moejax checkpoint at `out_dir`; returns its ModelConfig or EncDecConfig.
    expert_format: 'int8' / 'int4' stores the routed experts compact (`offload.expert_format`; decoder models)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output(out_dir, [hf_dir], overwrite, checkpoint.CHECKPOINT_OUTPUT)
    cfg, targets = hf_model_config(hf_dir, dtype)
    fmt = compact_format(cfg, expert_format)
    tensors = index_tensors(hf_dir)
    fam = family(cfg.family)
    if hasattr(fam, "resolve_tensors"):
        cfg, targets, ignored = fam.resolve_tensors(cfg, tensors)
    else:
        ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    fused = fam.fused_experts(cfg, tensors) if hasattr(fam, "fused_experts") else None
    fp8 = block_fp8_format(read_hf_config(hf_dir))
    validate(targets, tensors, cfg, ignored | (fused.tensor_names if fused else set()) | scale_tensors(fp8, targets, tensors))
    tiktoken = tiktoken_tokenizer(hf_dir, cfg.vocab_size)  # its files checked before any weight is converted

    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, target in targets.items():
        groups[target.group].append(name)
    total_bytes = sum(tensors[n].nbytes for n in targets) + (fused.nbytes if fused else 0)
    progress = Progress("convert", total_bytes, unit="B", enabled=show_progress, stream=sys.stderr)
    with atomic_directory(out_dir, overwrite, [hf_dir], checkpoint.CHECKPOINT_OUTPUT) as tmp:

        def save(group: tuple, tree: dict) -> None:
            if fmt is not None and group[0] == "expert":
                tree = fmt.convert(tree, f"{hf_dir}: layer {group[1]} expert {group[2]}")
            checkpoint.save_group(tmp, group, tree)

        for group, names in groups.items():
            tree: dict = {}
            for name in names:
                target = targets[name]
                array = read_weight(tensors, name, fp8)
                if target.transpose:
                    array = array.T
                _set_path(tree, target.path, np.ascontiguousarray(array.astype(target.dtype(cfg))))
                progress.advance(tensors[name].nbytes)
            save(group, tree)
        for group, tree, nbytes in fused.groups(cfg.np_dtype) if fused else ():
            save(group, tree)
            progress.advance(nbytes)
        if fmt is not None:
            fmt.save(tmp)
        cfg.save(tmp / "config.json")
        checkpoint.copy_tokenizer_files(hf_dir, tmp)
        if tiktoken is not None:
            tiktoken.save(str(tmp / "tokenizer.json"))
            point_config_at_tokenizer_json(tmp / "tokenizer_config.json")
    progress.close()
    return cfg


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def compact_format(cfg, expert_format: str | None):
    """The compact ExpertFormat `expert_format` names for the converted model (None: experts as they are)."""
    if expert_format is None:
        return None
    from moejax.models.decoder import expert_shapes
    from moejax.models.registry import kind_of
    from moejax.offload.expert_format import QUANTIZED_FORMATS, ExpertFormat

    if expert_format not in QUANTIZED_FORMATS:
        raise ParameterError.not_one_of("expert_format", expert_format, QUANTIZED_FORMATS)
    if kind_of(cfg).encoder_decoder:
        raise ParameterError("{expert_format} {fmt!r}: encoder-decoder models keep their experts as converted",
                             fmt=expert_format)
    fmt = ExpertFormat(expert_format, cfg.dtype)
    fmt.check({name: (shape, cfg.np_dtype) for name, shape in expert_shapes(cfg).items()})
    return fmt
