"""Where commands write: never onto, into or above their own input, never half-written.

Every writer (convert, export, trace, the lab's plot, `save_checkpoint`) calls `check_output` before
it reads or computes anything: the output may not be an input, lie inside one or contain one (after
resolving symbolic links and relative paths), whatever the flags; an existing output is replaced
only when the caller allows it and it holds what the writer itself writes (so `--overwrite` cannot
remove a home directory). Directories are built under a hidden temporary name next to the output
and renamed into place at the end (`atomic_directory`); files are written the same way
(`atomic_file`). Interrupted writes (Ctrl-C, SIGTERM, SIGHUP, an error) leave nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from moejax.errors import MoejaxError
from moejax.interrupts import uninterrupted


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _same(a: Path, b: Path) -> bool:
    """True if a and b name one file or directory (also through hard links or bind mounts)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raises MoejaxError if `output` is one of `inputs` (None entries are skipped), lies inside one,
    or contains one: writing it would destroy or change that input."""
    out = _resolved(Path(output))
    for given in inputs:
        if given is None:
            continue
        source = _resolved(Path(given))
        if _same(out, source):
            problem = "is the input"
        elif out.is_relative_to(source):
            problem = "is inside the input"
        elif source.is_relative_to(out):
            problem = "contains the input"
        else:
            continue
        raise MoejaxError(f"output {output} {problem} {given}: writing it would change the input; choose another output")


def check_output(
    output: str | Path,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    replaceable: tuple[str, Callable[[Path], bool]] | None = None,
) -> None:
    """Refuses an output that overlaps an input, or that exists and may not be replaced.

    overwrite: an existing output may be replaced; replaceable: (what the writer writes, e.g.
    "moejax checkpoint"; a test that a path holds one): an existing non-empty directory that fails
    the test is never replaced. Call it before any work; `atomic_directory` calls it again."""
    refuse_overlap(output, inputs)
    output = Path(output)
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise MoejaxError(f"{output}: already exists (pass --overwrite to replace it)")
    if replaceable is None or (output.is_dir() and not any(output.iterdir())):
        return
    what, holds_one = replaceable
    if not holds_one(output):
        raise MoejaxError(
            f"{output}: exists and is not a {what}; --overwrite replaces only a {what} (remove it yourself if you mean it)"
        )


def _partial_name(path: Path, suffix: str = "") -> Path:
    """The hidden temporary name of `path` while it is written: .NAME.partial-PID (+ suffix)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | Path,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    replaceable: tuple[str, Callable[[Path], bool]] | None = None,
) -> Iterator[Path]:
    """Yields a temporary directory that becomes `out_dir` only if the block succeeds.

    Checks `out_dir` with `check_output` first. The temporary directory is removed whatever ends the
    block; the final swap (old output aside, new one in, old one removed) is never cut by a signal."""
    out_dir = Path(out_dir)
    check_output(out_dir, inputs, overwrite, replaceable)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(out_dir)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        with uninterrupted():
            if out_dir.exists() or out_dir.is_symlink():
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                os.rename(out_dir, old)
                os.rename(tmp, out_dir)
                _remove(old)
            else:
                os.rename(tmp, out_dir)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path` (same suffix, so writers that infer a format from it
    work) that replaces `path` only if the block succeeds. The file gets the usual permissions
    (0666 less the umask), like any file the user creates."""
    path = Path(path)
    tmp = _partial_name(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
