"""Trace files: their names, atomic .npz writing and safe reading (never unpickling).

Files are .npz archives written atomically (a temporary file in the same directory, then os.replace): a
failed save leaves the previous file as it was.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.outputs import atomic_file

EAMS_FILE = "eams.npz"  # what `moejax trace --out DIR` writes: the activation-matrix collection
ROUTING_FILE = "routing.npz"  # and the per-token routing trace


def write_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` to `path` as an uncompressed npz; the old file survives any failure."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


# What each kind of trace file holds, for the errors that refuse a file of another kind.
COLLECTION_CONTENTS = (f"an EAM collection holds eams [sequences, MoE layers, experts] and their tasks, like the "
                       f"{EAMS_FILE} that `moejax trace` writes")
ROUTING_CONTENTS = (f"a routing trace holds experts [MoE layers, tokens, k] and seq_lens [sequences], like the "
                    f"{ROUTING_FILE} that `moejax trace` writes")


def trace_file(path: str | Path, file_name: str) -> Path:
    """`path`, or `path / file_name` when `path` is a directory (the one `moejax trace --out` wrote)."""
    path = Path(path)
    return path / file_name if path.is_dir() else path


def read_npz(path: str | Path, what: str, contents: str) -> dict[str, np.ndarray]:
    """All arrays of an npz file; MoejaxError naming the file and what it should hold (`contents`) if it
    is missing or not a readable npz. Pickled objects are never loaded."""
    path = Path(path)
    if not path.is_file():
        raise MoejaxError(f"{path}: no such {what} file")
    try:
        if not zipfile.is_zipfile(path):
            raise MoejaxError(f"{path}: not an .npz archive; {contents}")
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as err:
        if "allow_pickle" in str(err):  # an object array, which only unpickling could read
            raise MoejaxError(f"{path}: holds Python objects, which moejax never loads; {contents}") from None
        raise MoejaxError(f"{path}: not a readable {what} ({err}); {contents}") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise MoejaxError(f"{path}: not a readable {what} ({type(err).__name__}: {err}); {contents}") from None
