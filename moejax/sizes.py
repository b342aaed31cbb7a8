"""Sizes in bytes as people write them: 5GB, 500MB, 2GiB (decimal and binary units)."""

from __future__ import annotations

import re

from moejax.errors import MoejaxError
from moejax.offload.budget import UNITS

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*$")
EXAMPLES = "e.g. 5GB, 500MB, 2GiB"


def parse_size(size: str | int, name: str) -> int:
    """Bytes of `size`: a number with a unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), or an int of bytes.

    name: the parameter or flag that gave it, for the error message."""
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    else:
        match = _SIZE.match(str(size))
        if not match or match.group(2).lower() not in UNITS:
            raise MoejaxError(f"{name} '{size}' is not a size with a unit ({EXAMPLES})")
        nbytes = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if nbytes < 1:
        raise MoejaxError(f"{name} '{size}' must be at least 1 byte ({EXAMPLES})")
    return nbytes
