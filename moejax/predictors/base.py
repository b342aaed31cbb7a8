"""The expert predictor interface and the baselines behind it.

A predictor is fitted on routing traces with their tokens (`data.TraceData`) and answers, for a sequence of
token strings, a probability for every (MoE layer, expert):
  - per token (`predict`): float32 [T, MoE layers, experts], the probability that token t uses expert e at
    MoE layer l (a row of a layer sums to about k, the experts a token uses there);
  - per request (`predict_request`): float32 [MoE layers, experts], the probability that some token of the
    request uses the expert;
  - for the next token (`predict_next`, where the predictor has its own): float32 [MoE layers, experts], the
    probability that the token after the last one uses the expert (what a decode step's run-ahead needs).
The engine (run-ahead, predicted routing), the policy lab and the scheduler read only this interface.

Baselines: `frequency` (each layer's expert shares, the same for every token), `token-table` (each token
string's own expert counts, the frequency for strings never seen), `trace` (the running sequence's
activation matrix matched against the collection of the training sequences, `routing.eams.EAMMatcher`:
needs the routing of the sequence's earlier tokens) and `lookahead` (the next MoE layer's router applied
one layer early, where the trace recorded it). `trace` and `lookahead` read the sequence's recorded routing,
so they serve the lab only and are never saved.
"""

from __future__ import annotations

import numpy as np

from moejax.errors import MoejaxError, ParameterError
from moejax.predictors.data import TraceData
from moejax.routing.prefetchers import TracePrefetcher
from moejax.routing.traces import NO_PREDICTION


def used_mask(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [T, L, E]: whether token t used expert e at MoE layer l. experts: int [L, T, k] (ids >= num_experts
    and negative ids: none)."""
    num_layers, num_tokens, _ = experts.shape
    mask = np.zeros((num_tokens, num_layers, num_experts + 1), bool)
    ids = np.where((experts >= 0) & (experts < num_experts), experts, num_experts).astype(np.int64)
    mask[np.arange(num_tokens)[None, :, None], np.arange(num_layers)[:, None, None], ids] = True
    return mask[..., :num_experts]


def request_probabilities(per_token: np.ndarray) -> np.ndarray:
    """[L, E]: the probability that some token uses each expert, tokens taken as independent. per_token: [T, L, E]."""
    return 1.0 - np.exp(np.log1p(-np.minimum(per_token, 1 - 1e-6)).sum(axis=0))


def step_profile(predictor: "Predictor", token_ids) -> np.ndarray:
    """float32 [L, E]: the probability that one step of a request with this prompt uses each expert (the
    mean over its tokens of the per-token prediction; what the `slo` scheduler's profiles hold)."""
    return np.clip(predictor.predict(id_strings(token_ids)).mean(axis=0), 0.0, 1.0).astype(np.float32)


def id_strings(token_ids) -> list[str]:
    """Token ids as the predictor's token strings (decimal ids, as `moejax trace` records them)."""
    return [str(int(t)) for t in token_ids]


class Predictor:
    """See the module docstring. `per` is "token" (SiDA: each token's experts) or "request" (eMoE: the
    experts of a whole request, the same for each of its tokens); `saveable`: `store.save` can write it."""

    name = "base"
    per = "token"
    saveable = True
    reads_routing = False  # predict reads the sequence's recorded routing (experts, lookahead)
    reads_later_tokens = False  # token t's prediction may read tokens after t (not causal)

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k

    def fit(self, data: TraceData, show_progress: bool = False) -> dict:
        """Learns from `data`; returns a JSON-ready summary of the fit."""
        raise NotImplementedError

    def predict(self, tokens: list[str], experts: np.ndarray | None = None,
                lookahead: np.ndarray | None = None) -> np.ndarray:
        """float32 [T, L, E] for the T tokens. experts, lookahead: the sequence's recorded routing [L, T, k],
        read only by the predictors that `reads_routing` (token t's prediction reads only tokens < t of
        `experts`, and token t's lookahead guess)."""
        raise NotImplementedError

    def predict_next(self, tokens: list[str]) -> np.ndarray | None:
        """float32 [L, E] for the token after the last of `tokens` (not known yet), or None where this
        predictor has no prediction of its own for it (then the last token's stands in)."""
        return None

    def predict_each_next(self, tokens: list[str]) -> np.ndarray | None:
        """float32 [T, L, E]: row t, `predict_next(tokens[: t + 1])`, computed at once; None as predict_next."""
        return None

    def warm_up(self) -> None:
        """Does the one-time work of `predict` (compilation) ahead of the first real call."""

    def predict_request(self, tokens: list[str]) -> np.ndarray:
        """float32 [L, E]: the probability that some token of the request uses each expert."""
        return request_probabilities(self.predict(tokens)).astype(np.float32)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-ready settings, named arrays) that `from_state` rebuilds the fitted predictor from."""
        raise NotImplementedError

    def load_state(self, settings: dict, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """ParameterError unless this predictor is for a model of num_layers MoE layers of num_experts experts."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise ParameterError("{predicted} is for {layers} MoE layers of {experts} experts, the model has {shape}",
                                 layers=self.num_layers, experts=self.num_experts, shape=f"{num_layers} of {num_experts}")

    def check_fits(self, data: TraceData) -> None:
        """MoejaxError unless `data` is routing of a model of this predictor's MoE layers and experts."""
        trace = data.trace
        if (trace.num_layers, trace.num_experts) != (self.num_layers, self.num_experts):
            raise MoejaxError(f"{data.source}: {trace.num_layers} MoE layers of {trace.num_experts} experts, but the "
                              f"{self.name} predictor is for {self.num_layers} of {self.num_experts}")


class FrequencyPredictor(Predictor):
    """p(l, e) = k(l) * share of layer l's routing that went to expert e, for every token."""

    name = "frequency"

    def fit(self, data, show_progress=False):
        self.check_fits(data)
        used = used_mask(data.trace.experts, self.num_experts).sum(axis=0, dtype=np.float64)  # [L, E]
        self.probabilities = (used / max(data.trace.experts.shape[1], 1)).astype(np.float32)
        return {"tokens": int(data.trace.experts.shape[1])}

    def predict(self, tokens, experts=None, lookahead=None):
        return np.broadcast_to(self.probabilities, (len(tokens), *self.probabilities.shape)).copy()

    def state(self):
        return {}, {"probabilities": self.probabilities}

    def load_state(self, settings, arrays):
        self.probabilities = _array(arrays, "probabilities", (self.num_layers, self.num_experts))


class TokenTablePredictor(Predictor):
    """Each token string's share of occurrences that used each expert, smoothed towards the frequency by
    `prior_tokens` occurrences; strings never seen get the frequency."""

    name = "token-table"

    def __init__(self, num_layers, num_experts, top_k, prior_tokens: float = 1.0):
        super().__init__(num_layers, num_experts, top_k)
        self.prior_tokens = prior_tokens

    def fit(self, data, show_progress=False):
        self.check_fits(data)
        self.vocab = sorted({t for seq in data.tokens for t in seq})
        index = {t: i for i, t in enumerate(self.vocab)}
        ids = np.array([index[t] for seq in data.tokens for t in seq], np.int64)
        used = used_mask(data.trace.experts, self.num_experts).astype(np.float32)  # [T, L, E]
        counts = np.zeros((len(self.vocab), self.num_layers, self.num_experts), np.float32)
        np.add.at(counts, ids, used)
        self.occurrences = np.bincount(ids, minlength=len(self.vocab)).astype(np.float32)
        self.counts = counts
        self.frequency = used.mean(axis=0) if len(used) else np.zeros((self.num_layers, self.num_experts), np.float32)
        self._index = index
        return {"tokens": int(len(ids)), "vocabulary": len(self.vocab)}

    def predict(self, tokens, experts=None, lookahead=None):
        rows = np.array([self._index.get(t, -1) for t in tokens], np.int64)
        out = np.broadcast_to(self.frequency, (len(tokens), self.num_layers, self.num_experts)).copy()
        seen = rows >= 0
        n = self.occurrences[rows[seen]][:, None, None]
        out[seen] = (self.counts[rows[seen]] + self.prior_tokens * self.frequency) / (n + self.prior_tokens)
        return out

    def state(self):
        return ({"prior_tokens": self.prior_tokens, "vocabulary": self.vocab},
                {"counts": self.counts, "occurrences": self.occurrences, "frequency": self.frequency})

    def load_state(self, settings, arrays):
        self.prior_tokens, self.vocab = float(settings["prior_tokens"]), list(settings["vocabulary"])
        shape = (self.num_layers, self.num_experts)
        self.counts = _array(arrays, "counts", (len(self.vocab), *shape))
        self.occurrences = _array(arrays, "occurrences", (len(self.vocab),))
        self.frequency = _array(arrays, "frequency", shape)
        self._index = {t: i for i, t in enumerate(self.vocab)}


class TraceMatcherPredictor(Predictor):
    """Token t's experts from the running sequence's activation matrix over tokens < t, matched against the
    training sequences' (the trace prefetcher's sequence level, `TracePrefetcher.sequence_probabilities`)."""

    name = "trace"
    saveable = False
    reads_routing = True

    def fit(self, data, show_progress=False):
        self.check_fits(data)
        self.collection = data.trace.collection(capacity=max(data.trace.num_sequences, 1))
        return {"sequences": len(self.collection)}

    def predict(self, tokens, experts=None, lookahead=None):
        if experts is None:
            raise MoejaxError("the trace predictor reads the sequence's routing so far: give experts")
        prefetcher = TracePrefetcher(self.num_layers, self.num_experts, self.collection, use_transitions=False)
        prefetcher.on_sequence_start()
        used = used_mask(experts, self.num_experts)
        out = np.empty((len(tokens), self.num_layers, self.num_experts), np.float32)
        for t in range(len(tokens)):
            out[t] = [prefetcher.sequence_probabilities(layer) for layer in range(self.num_layers)]
            for layer in range(self.num_layers):
                prefetcher.observe(layer, used[t, layer].astype(np.int64))
        return out


class LookaheadPredictor(Predictor):
    """The lookahead guess recorded in the trace (probability 1 for a guessed expert); the first MoE layer,
    which nothing guesses, gets the frequency."""

    name = "lookahead"
    saveable = False
    reads_routing = True

    def fit(self, data, show_progress=False):
        self.frequency = FrequencyPredictor(self.num_layers, self.num_experts, self.top_k)
        return self.frequency.fit(data)

    def predict(self, tokens, experts=None, lookahead=None):
        if lookahead is None:
            raise MoejaxError("the lookahead predictor needs a trace that recorded the lookahead guess "
                              "(`moejax trace` records it)")
        out = self.frequency.predict(tokens) * 1e-3  # ranks the unguessed experts, far below the guessed ones
        guessed = used_mask(np.where(lookahead == NO_PREDICTION, self.num_experts, lookahead), self.num_experts)
        return np.where(guessed, 1.0, out).astype(np.float32)


def _array(arrays: dict[str, np.ndarray], name: str, shape: tuple) -> np.ndarray:
    if name not in arrays:
        raise MoejaxError(f"missing array {name}")
    if arrays[name].shape != tuple(shape):
        raise MoejaxError(f"array {name} has shape {arrays[name].shape}, expected {tuple(shape)}")
    return arrays[name].astype(np.float32)


def next_token_rows(predictor: Predictor, tokens: list[str], predicted: np.ndarray | None = None) -> np.ndarray | None:
    """float32 [T, L, E]: row t, the prediction for the token after tokens[t] from tokens[: t + 1]: the
    predictor's next-token prediction (`predict_each_next`), or where it has none and is causal, token t's own
    prediction standing in (one pass: `predicted`, its `predict(tokens)` if already computed); None for a
    predictor that reads later tokens and has no next-token prediction."""
    ahead = predictor.predict_each_next(tokens)
    if ahead is None and not predictor.reads_later_tokens:
        ahead = predicted if predicted is not None else predictor.predict(tokens)
    return ahead


def known_token_probabilities(predictor: Predictor, tokens: list[str], prompt_len: int, experts: np.ndarray | None = None,
                              lookahead: np.ndarray | None = None) -> np.ndarray:
    """float32 [T, L, E]: each token's probabilities from the tokens known before the step that runs it:
    the whole prompt for its tokens (a prompt is known entirely before its prefill), and for a generated
    token t only the tokens before it (t itself is sampled by the step before): the predictor's next-token
    prediction from them (`predict_next`), or where it has none, the last one's prediction standing for t's.
    A prompt has at least one token. The predictors that read the recorded routing (experts, lookahead
    [L, T, k]) read it as `predict` says."""
    if predictor.reads_routing:
        return predictor.predict(tokens, experts, lookahead)
    prompt_len = max(prompt_len, 1)
    rows = [predictor.predict(tokens[:prompt_len])]
    if prompt_len >= len(tokens):
        return rows[0].astype(np.float32)
    ahead = next_token_rows(predictor, tokens[:-1])
    if ahead is not None:  # row t - 1: token t's, from the tokens before it
        rows.append(ahead[prompt_len - 1 :])
    else:
        rows += [predictor.predict(tokens[:t])[-1:] for t in range(prompt_len, len(tokens))]
    return np.concatenate(rows).astype(np.float32)
