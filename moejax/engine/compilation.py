"""XLA compilation: JAX's persistent compilation cache, and the seconds spent compiling.

The cache keeps compiled programs on disk, so the second run of a model starts fast. Where it lives
is set by the environment variable MOEJAX_COMPILATION_CACHE: unset, `$XDG_CACHE_HOME/moejax/jax`
(`~/.cache/moejax/jax`); a directory; or `off` (moejax leaves JAX's cache alone, and JAX keeps none
unless told to). A cache directory set for JAX itself (JAX_COMPILATION_CACHE_DIR, `jax.config`) is
used as it is. The setting takes effect if made before the process compiles its first program.

Compile time is read from JAX's monitoring events, in the thread that compiles, so that speed
figures can leave it out: `run_clock()` differences are wall seconds spent on anything but compiling.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from moejax.errors import MoejaxError

CACHE_ENV = "MOEJAX_COMPILATION_CACHE"
# What making one program takes: tracing to a jaxpr, lowering to MLIR, and XLA's compilation (or
# loading the result from the persistent cache). Each event reports its start and its end.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moejax" / "jax"


def use_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache where MOEJAX_COMPILATION_CACHE says (module docstring)."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() == "off" or (not setting and jax.config.jax_compilation_cache_dir):
        return
    directory = Path(setting).expanduser() if setting else default_cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # a cache others can write to runs their code
    except OSError as err:
        if setting:
            raise MoejaxError(f"{CACHE_ENV}={setting}: cannot create the compilation cache directory "
                              f"({err.strerror}); name a writable directory or 'off'") from None
        return  # no writable home: compile in every run
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX stores only programs that took 1 s or more; moejax's per-layer programs take less each.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class _ThreadState(threading.local):
    seconds = 0.0  # finished compilation, outermost events only
    depth = 0  # compile events in progress (an eager op run while tracing nests its own)
    notice: Callable[[], None] | None = None


_thread = _ThreadState()
_listening = threading.Lock()
_listeners_registered = False


def _on_start(event: str, start_time: float, **_) -> None:
    if event in COMPILE_EVENTS:
        if _thread.depth == 0 and _thread.notice is not None:
            notice, _thread.notice = _thread.notice, None
            notice()
        _thread.depth += 1


def _on_end(event: str, start_time: float, end_time: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _thread.depth = max(_thread.depth - 1, 0)  # 0 for an event that began before moejax listened
        if _thread.depth == 0:
            _thread.seconds += end_time - start_time


def _listen() -> None:
    global _listeners_registered
    with _listening:
        if not _listeners_registered:
            jax.monitoring.register_scalar_listener(_on_start)  # compile events report their start time as a scalar
            jax.monitoring.register_event_time_span_listener(_on_end)
            _listeners_registered = True


def compile_seconds() -> float:
    """Seconds this thread has spent making XLA programs since moejax began listening (its first call)."""
    _listen()
    return _thread.seconds


def run_clock() -> float:
    """time.perf_counter() less compile_seconds(): the difference of two readings is the wall time
    between them spent on anything but compiling (seconds)."""
    return time.perf_counter() - compile_seconds()


@contextlib.contextmanager
def on_first_compile(notice: Callable[[], None]) -> Iterator[None]:
    """Calls notice() once, when this thread starts compiling inside the block (if it does)."""
    _listen()
    _thread.notice = notice
    try:
        yield
    finally:
        _thread.notice = None
