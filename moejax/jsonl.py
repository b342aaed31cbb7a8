"""Reading JSON Lines files of objects, with one-line errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from moejax.errors import MoejaxError


def json_objects(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number from 1, object) for each non-blank line of `path`, a file of `what` (for errors, e.g.
    'the prompt file'). Unreadable files, lines that are not JSON and JSON that is not an object are refused."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MoejaxError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    objects = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoejaxError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise MoejaxError(f"{path}:{number}: a line must be a JSON object")
        objects.append((number, item))
    return objects
