"""The moejax checkpoint: orbax, one item per group so that any single expert loads alone.

Layout of a checkpoint directory:

    config.json              ModelConfig or EncDecConfig (moejax's own, with format_version)
    globals/                 embedding, final norm, lm_head
    layers/007/              layer 7's non-expert weights (norms, attention, router, shared expert)
    experts/007/003/         routed expert 3 of layer 7: {'gate': [D, F], 'up': [D, F], 'down': [F, D]}
                             (encoder-decoder models: global layer numbers, encoder first; see
                             moejax.models.moe for their plain expert kind)
    tokenizer.json ...       tokenizer files, when the source had them

Writers build the whole directory under a temporary name and rename it at the end
(moejax.outputs.atomic_directory), so an interrupted or failed write never leaves a partial
checkpoint behind. Orbax's save and restore run to their end before Ctrl-C or SIGTERM takes effect:
interrupted midway, its asynchronous machinery leaves threads and event loops behind.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from moejax.config import ModelConfig, read_config_json
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError
from moejax.models.registry import kind_of_json
from moejax.interrupts import uninterrupted
from moejax.outputs import atomic_directory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def _checkpointer():
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp.PyTreeCheckpointer()


def group_dir(root: Path, group: tuple) -> Path:
    """Directory of a group: ("globals",), ("layer", i) or ("expert", i, e)."""
    kind = group[0]
    if kind == "globals":
        return Path(root) / "globals"
    if kind == "layer":
        return Path(root) / "layers" / f"{group[1]:03d}"
    if kind == "expert":
        return Path(root) / "experts" / f"{group[1]:03d}" / f"{group[2]:03d}"
    raise ValueError(f"unknown checkpoint group {group!r}")


def save_group(root: Path, group: tuple, tree: dict) -> None:
    """Writes one group (a nested dict of NumPy arrays)."""
    path = group_dir(root, group)
    path.parent.mkdir(parents=True, exist_ok=True)
    with uninterrupted():
        _checkpointer().save(path.absolute(), tree)


def load_group(root: Path, group: tuple) -> dict:
    """Reads one group as a nested dict of NumPy arrays."""
    path = group_dir(root, group)
    if not path.is_dir():
        raise MoejaxError(f"{root}: checkpoint lacks {path.relative_to(root)}")
    try:
        with uninterrupted():
            return _checkpointer().restore(path.absolute())
    except Exception as err:  # orbax raises many types; the user needs the path
        raise MoejaxError(f"{path}: cannot read checkpoint group ({type(err).__name__}: {err})") from None


def is_checkpoint(path: Path) -> bool:
    """Whether `path` looks like a moejax checkpoint directory (what `--overwrite` may replace)."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "globals").is_dir()


CHECKPOINT_OUTPUT = ("moejax checkpoint", is_checkpoint)


def load_config(ckpt: Path) -> ModelConfig | EncDecConfig:
    """The checkpoint's config: an EncDecConfig for encoder-decoder families, else a ModelConfig."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise MoejaxError(f"{ckpt}: no such checkpoint directory")
    data = read_config_json(ckpt / "config.json")
    if "format_version" not in data and "model_type" in data:
        raise MoejaxError(f"{ckpt}: a HuggingFace checkpoint (model_type {data['model_type']!r}), not a moejax one: "
                          f"convert it first with `moejax convert {ckpt} OUT_DIR`")
    try:
        return kind_of_json(data).from_json(data)
    except MoejaxError as err:
        raise MoejaxError(f"{ckpt / 'config.json'}: {str(err).removeprefix('config: ')}") from None
    except (KeyError, TypeError, ValueError) as err:  # a field missing or of the wrong type
        raise MoejaxError(f"{ckpt / 'config.json'}: not a valid moejax config ({type(err).__name__}: {err})") from None


def load_globals(ckpt: Path) -> dict:
    return load_group(ckpt, ("globals",))


def load_layer(ckpt: Path, layer: int) -> dict:
    return load_group(ckpt, ("layer", layer))


def load_expert(ckpt: Path, layer: int, expert: int) -> dict:
    """One routed expert: {'gate': [D, F], 'up': [D, F], 'down': [F, D]} NumPy arrays."""
    return load_group(ckpt, ("expert", layer, expert))


def load_stacked_experts(ckpt: Path, cfg: ModelConfig | EncDecConfig, layer: int) -> dict:
    """All routed experts of a layer stacked on a leading [E] axis, as float weights (a compact checkpoint's,
    `moejax convert --expert-format`, dequantized to the model's dtype)."""
    from moejax.models.quantized import dequantized

    experts = [load_expert(ckpt, layer, e) for e in range(cfg.num_experts)]
    stack = {name: np.stack([ex[name] for ex in experts]) for name in experts[0]}
    return {name: np.asarray(w, cfg.np_dtype) for name, w in dequantized(stack, np).items()}


def save_checkpoint(
    out_dir: Path,
    cfg: ModelConfig,
    globals_: dict,
    layers: list[dict],
    experts: list[dict | None],
    tokenizer_dir: Path | None = None,
    overwrite: bool = False,
) -> None:
    """Writes a whole model held in memory (stacked experts per layer) as a checkpoint."""
    to_numpy = lambda tree: _map_arrays(tree, lambda a: np.asarray(a, dtype=cfg.np_dtype))  # noqa: E731
    with atomic_directory(out_dir, overwrite, inputs=(tokenizer_dir,), replaceable=CHECKPOINT_OUTPUT) as tmp:
        save_group(tmp, ("globals",), to_numpy(globals_))
        for i, layer in enumerate(layers):
            save_group(tmp, ("layer", i), to_numpy(layer))
            if experts[i] is not None:
                for e in range(cfg.num_experts):
                    save_group(tmp, ("expert", i, e), {k: np.asarray(v[e], dtype=cfg.np_dtype) for k, v in experts[i].items()})
        cfg.save(tmp / "config.json")
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _map_arrays(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_arrays(v, fn) for k, v in tree.items()}
    return fn(tree)
