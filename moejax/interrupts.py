"""Ctrl-C, SIGTERM and SIGHUP end a command the same way: its cleanup runs, nothing half-written stays.

`stop_like_ctrl_c()` (around every CLI command) makes SIGINT raise KeyboardInterrupt and SIGTERM and
SIGHUP raise `Terminated`, a KeyboardInterrupt, wherever they arrive, so the `finally` blocks that
remove temporary outputs run for all three. `uninterrupted()` holds them back during a call that must
not be cut (orbax's asynchronous save and restore leave event loops, coroutines and writer threads
behind when interrupted) and delivers the first one when the call returns.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator

TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
STOPPING = (signal.SIGINT, *TERMINATING)
REDELIVERY_DELAY_S = 0.01


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where it arrived; `signum` is the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _in_gc_callback(frame) -> bool:
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


def _stop(signum: int, frame) -> None:
    if _in_gc_callback(frame):
        # Python prints and ignores an exception raised in a gc callback (JAX registers one, and
        # signals often land in it): deliver the signal again a moment later, in whatever runs then.
        threading.Timer(REDELIVERY_DELAY_S, os.kill, (os.getpid(), signum)).start()
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_like_ctrl_c() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt (Terminated for the latter two) inside the
    block. A signal the process was started with ignored (`nohup` ignores SIGHUP, a shell's
    background jobs SIGINT) stays ignored; the previous handlers come back after the block."""
    if not _on_main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {}
    for signum in STOPPING:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, _stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_held: list[int] = []  # signals received inside the outermost uninterrupted() block, in order
_holding = False


def _hold(signum: int, frame) -> None:
    _held.append(signum)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Runs the block to its end even if Ctrl-C, SIGTERM or SIGHUP arrives, then delivers the first
    such signal to the handler that was in place (so it raises KeyboardInterrupt or Terminated there).
    Signals the process ignores stay ignored. Nests; a no-op off the main thread."""
    global _holding
    if not _on_main_thread() or _holding:  # off the main thread no handler can be set; nested: the outer block holds
        yield
        return
    previous = {}
    for signum in STOPPING:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:  # None: a handler not set from Python
            previous[signum] = signal.signal(signum, _hold)
    _holding = True
    try:
        yield
    finally:
        _holding = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        held = _held[:1]
        _held.clear()
        if held:
            signal.raise_signal(held[0])
