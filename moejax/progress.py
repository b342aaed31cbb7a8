"""A dependency-free progress line for long work (conversion, tracing, training) on stderr."""

from __future__ import annotations

import sys
import time


def _human(value: float, unit: str) -> str:
    if unit != "B":
        return f"{value:.0f}{unit}"
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if value < 1024 or prefix == "Ti":
            return f"{value:.1f}{prefix}B"
        value /= 1024
    return f"{value:.1f}B"


class Progress:
    """Counts work done out of `total` and redraws at most every `interval` seconds.

    On a terminal it redraws one line; otherwise it prints a line per interval, so logs stay readable.
    """

    def __init__(self, label: str, total: float, unit: str = "", enabled: bool = True, stream=None, interval: float = 0.5):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.enabled, self.stream, self.interval = enabled, stream or sys.stderr, interval
        self.done, self.start, self.last_draw = 0.0, time.perf_counter(), 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.note = ""

    def advance(self, amount: float = 1, note: str = "") -> None:
        self.done += amount
        self.note = note or self.note
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw >= self.interval or self.done >= self.total):
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        frac = min(self.done / self.total, 1.0)
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * 24)
        text = (
            f"{self.label} [{bar:<24}] {frac * 100:5.1f}% {_human(self.done, self.unit)}/{_human(self.total, self.unit)}"
            f" {elapsed:.0f}s eta {eta:.0f}s {self.note}"
        )
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
