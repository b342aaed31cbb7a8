"""Predictor directories: what `moejax train-predictor` writes and `--predictor DIR` reads.

A directory holds predictor.json (format, kind, the model's MoE layers, experts and top-k, the
predictor's settings and vocabulary, and the training summary) and arrays.npz (its weights or tables). It
is written all at once (`outputs.atomic_directory`); reading checks every file and array and refuses
anything else with one line naming the directory and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from moejax.errors import MoejaxError
from moejax.outputs import atomic_directory
from moejax.predictors.base import FrequencyPredictor, Predictor, TokenTablePredictor
from moejax.predictors.sida import EMoEPredictor, SiDAPredictor
from moejax.routing.files import read_npz, write_npz_atomic

FORMAT = 2  # 2: causal SiDA encoder by default, overlapping windows, unknown-id training
SETTINGS_FILE = "predictor.json"
ARRAYS_FILE = "arrays.npz"
KINDS = {cls.name: cls for cls in (SiDAPredictor, EMoEPredictor, FrequencyPredictor, TokenTablePredictor)}


def is_predictor_directory(path: Path) -> bool:
    """Whether `path` holds only what `save` writes (what `--overwrite` may replace)."""
    return Path(path).is_dir() and all(e.name in (SETTINGS_FILE, ARRAYS_FILE) for e in Path(path).iterdir())


PREDICTOR_OUTPUT = ("predictor directory", is_predictor_directory)


def save(predictor: Predictor, out_dir: str | Path, summary: dict | None = None, overwrite: bool = False,
         inputs=()) -> None:
    """Writes `predictor` as the directory `out_dir`, all at once. inputs: files it may not touch."""
    if not predictor.saveable:
        raise MoejaxError(f"the {predictor.name} predictor reads recorded routing and cannot be saved")
    settings, arrays = predictor.state()
    document = {"format": FORMAT, "kind": predictor.name, "num_layers": predictor.num_layers,
                "num_experts": predictor.num_experts, "top_k": predictor.top_k, "settings": settings,
                "summary": summary or {}}
    with atomic_directory(out_dir, overwrite, inputs, PREDICTOR_OUTPUT) as tmp:
        (tmp / SETTINGS_FILE).write_text(json.dumps(document))
        write_npz_atomic(tmp / ARRAYS_FILE, arrays)


def load(path: str | Path) -> Predictor:
    """The predictor saved in directory `path`; MoejaxError naming it if it is missing or damaged."""
    path = Path(path)
    what = f"{path}: not a predictor directory (`moejax train-predictor` writes one)"
    if not path.is_dir():
        raise MoejaxError(f"{path}: no such predictor directory" if not path.exists() else what)
    settings_path = path / SETTINGS_FILE
    try:
        document = json.loads(settings_path.read_text())
    except FileNotFoundError:
        raise MoejaxError(f"{what}: no {SETTINGS_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoejaxError(f"{settings_path}: damaged predictor settings ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("format"), int):
        raise MoejaxError(f"{settings_path}: not a predictor of format {FORMAT}")
    if document["format"] != FORMAT:
        raise MoejaxError(f"{settings_path}: a predictor of format {document['format']}, but this moejax reads format "
                          f"{FORMAT} (format 2: causal encoder, overlapping windows): train it again with "
                          "`moejax train-predictor`")
    kind = document.get("kind")
    if kind not in KINDS:
        raise MoejaxError(f"{settings_path}: unknown predictor kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        shape = [int(document[k]) for k in ("num_layers", "num_experts", "top_k")]
        settings = dict(document["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise MoejaxError(f"{settings_path}: damaged predictor settings (missing or bad {err})") from None
    arrays = read_npz(path / ARRAYS_FILE, "predictor weights", f"{ARRAYS_FILE} holds the weights `moejax train-predictor` wrote")
    predictor = KINDS[kind](*shape)
    try:
        predictor.load_state(settings, arrays)
    except MoejaxError as err:
        raise MoejaxError(f"{path}: damaged predictor ({err})") from None
    except (KeyError, TypeError, ValueError) as err:
        raise MoejaxError(f"{path}: damaged predictor settings ({type(err).__name__}: {err})") from None
    predictor.summary = document.get("summary", {})
    return predictor
