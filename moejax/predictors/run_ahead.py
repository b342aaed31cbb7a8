"""SiDA's run-ahead: a host thread that predicts the experts of the engine's next steps while the current
ones run, so the engine never waits for a prediction.

The engine hands the thread a sequence's tokens as soon as it knows them (`submit`): a prompt when its
prefill is requested (prediction for every prompt token: the prompt is known whole), then the sequence so
far after each new token (prediction for the token after it, which the decode step after the next one
feeds: the host reads a step's token after it has dispatched the next step; that token is not known, so
the predictor's next-token prediction is used, `Predictor.predict_next`, or where it has none the last
known token's prediction stands for it). When the engine dispatches a step it
takes whatever prediction is finished (`take`, which never blocks): a prediction still being computed is
simply not used. Predictions only choose experts to copy early, so outputs never depend on them.

A per-request predictor (eMoE) predicts a prompt as a whole, every prompt token alike; with
`predict_every` N it runs for one prompt in N and the others reuse its last prediction (eMoE's saving: the
prediction changes little between consecutive requests of one workload).

The predictor runs on the CPU backend, beside the engine's device.
"""

from __future__ import annotations

import atexit
import threading

import jax
import numpy as np

from moejax.errors import ParameterError
from moejax.predictors.base import Predictor, id_strings

PROMPT, NEXT = "prompt", "next"  # what a job predicts: every prompt token, or the token after the last one


class RunAhead:
    """The prediction thread of one engine. Jobs are keyed (owner, kind), owner naming a sequence (the engine
    uses (slot, epoch)); a newer job for a key replaces an older one not yet started, and its result the
    older result when it is done (until then the older one, computed from fewer tokens, is what `take`
    gives). `close` stops the thread and waits for it."""

    def __init__(self, predictor: Predictor, predict_every: int = 1):
        if predict_every < 1:
            raise ParameterError("{predict_every} must be >= 1 (got {value})", value=predict_every)
        if predict_every > 1 and predictor.per != "request":
            raise ParameterError("{predict_every} reuses per-request predictions (an emoe predictor), not {kind}'s",
                                 kind=predictor.name)
        self.predictor, self.predict_every = predictor, predict_every
        self._request: np.ndarray | None = None  # the last per-request prediction [L, E] (predict_every > 1)
        self._reused = 0  # prompts that reused it since it was made
        self._lock = threading.Condition()
        self._jobs: dict[tuple, list[str]] = {}  # waiting, in submission order
        self._live: set[tuple] = set()  # keys submitted and not forgotten
        self._ready: dict[tuple, np.ndarray] = {}
        self._closed = False
        self.predicted = self.used = 0  # predictions finished and taken
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="moejax-run-ahead", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a thread inside JAX when the interpreter exits aborts the process

    def submit(self, owner, kind: str, token_ids) -> None:
        key = (owner, kind)
        with self._lock:
            if self._closed:
                return
            if kind == PROMPT and self._request is not None and self._reused < self.predict_every - 1:
                self._reused += 1
                self._live.add(key)
                self._ready[key] = np.broadcast_to(self._request, (len(token_ids), *self._request.shape))
                return
            self._jobs.pop(key, None)
            self._jobs[key] = id_strings(token_ids)
            self._live.add(key)
            self._lock.notify()

    def take(self, owner, kind: str) -> np.ndarray | None:
        """The finished prediction for (owner, kind), once, or None: PROMPT [T, L, E], NEXT [1, L, E]."""
        with self._lock:
            result = self._ready.pop((owner, kind), None)
            self.used += result is not None
            return result

    def forget(self, owner) -> None:
        """Drops a finished sequence's waiting jobs and results (a running one's result is dropped when done)."""
        with self._lock:
            for table in (self._jobs, self._ready):
                for key in [k for k in table if k[0] == owner]:
                    del table[key]
            self._live = {k for k in self._live if k[0] != owner}

    def close(self, timeout: float | None = 10.0) -> None:
        atexit.unregister(self.close)
        with self._lock:
            self._closed = True
            self._jobs.clear()
            self._lock.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _predict(self, kind: str, tokens: list[str]) -> np.ndarray:
        """PROMPT: every token's prediction [T, L, E]; NEXT: the next token's [1, L, E]."""
        if kind == NEXT:
            ahead = self.predictor.predict_next(tokens)
            return ahead[None] if ahead is not None else self.predictor.predict(tokens)[-1:]
        return self.predictor.predict(tokens)

    def _work(self) -> None:
        cpu = jax.devices("cpu")[0]
        try:
            with jax.default_device(cpu):
                self.predictor.warm_up()  # compiles now, while the engine compiles its own programs
        except Exception as err:  # noqa: BLE001 - as below
            with self._lock:
                self.error, self._closed = err, True
            return
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                key = next(iter(self._jobs))
                tokens = self._jobs.pop(key)
            try:
                with jax.default_device(cpu):
                    probabilities = self._predict(key[1], tokens)
            except Exception as err:  # noqa: BLE001 - kept for the engine to report; prediction stops, outputs do not change
                with self._lock:
                    self.error, self._closed = err, True
                return
            with self._lock:
                if key[1] == PROMPT and self.predict_every > 1 and len(probabilities):
                    self._request, self._reused = probabilities[0], 0
                if key in self._live:  # not forgotten while it ran; a newer job for it only refreshes it
                    self._ready[key] = probabilities
                    self.predicted += 1
