"""SiDA's learned per-token expert predictor (Flax + optax), and eMoE's per-request one on the same encoder.

The network (`RoutingNet`): token embeddings [T, embed] (the predictor's vocabulary; strings it never saw
share id 0) plus the mean embedding of each string's hashed character n-grams (its spelling), an LSTM over
them, then one dense layer to logits [T, MoE layers, experts]. Causal (the default): token t's prediction
reads tokens <= t only, as the model's own routing does, so a prefix predicts exactly what the whole
sequence predicts for it; `causal=False` reads the whole window. A causal predictor also has a second
dense layer (`next_token`, the default) for the experts of the token after each one: what the run-ahead
needs for a decode step, whose own token is sampled by the step before and reaches the host only after
the step is dispatched (`predict_next`). It reads the same encoding and is trained without changing it
(its loss does not reach the encoder), so the per-token predictions are those of a predictor without it.
Sequences are read in windows of `context` tokens overlapping by half (`_windows`: every token after the
first window has at least context / 2 earlier tokens before it), in training and prediction alike. In
training, `unknown_rate` of the token ids are hidden (set to the unknown id), so the model learns to
predict from the spelling alone, as it must for strings it never saw.

Training (`fit`): per (token, MoE layer), a softmax over the experts is fitted by cross-entropy to the
teacher's distribution truncated to the experts it chose: the router's probabilities of its top-k
renormalised (knowledge distillation), where the trace recorded them, else uniform over the chosen
experts (hard labels); a window's context-only tokens carry no loss. Adam with weight decay; the sequences split into training and validation (the
last `validation` share of them); the epoch with the best validation top-k recall is kept.

`EMoEPredictor` pools the encoder over the prompt (mean over its tokens) and predicts, per MoE layer, the
share of the request's routing each expert gets (cross-entropy to the request's shares).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.errors import MoejaxError
from moejax.predictors.base import Predictor, request_probabilities, used_mask
from moejax.predictors.data import TraceData
from moejax.progress import Progress

UNKNOWN = 0  # the id of strings outside the vocabulary


@dataclasses.dataclass
class TrainingConfig:
    """embed, hidden: widths; layers: stacked LSTMs; causal: read only earlier tokens; context: window
    length in tokens; min_count: occurrences a string needs to join the vocabulary; epochs; batch_tokens:
    tokens per optimiser step (windows padded); learning_rate; weight_decay; dropout of the encoder's
    output in training; validation: share of the sequences held out; seed; ngram_buckets: hashed
    character n-gram embeddings added to each token's (0: none), which give strings outside the
    vocabulary their spelling; unknown_rate: share of training tokens whose id is replaced by the unknown
    one, so that the model learns to predict from the spelling alone (as it must for unseen strings);
    next_token: a causal per-token predictor's head for the next token's experts (`predict_next`)."""

    embed: int = 192
    hidden: int = 384
    layers: int = 1
    causal: bool = True
    context: int = 128
    min_count: int = 1
    epochs: int = 8
    batch_tokens: int = 512
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    validation: float = 0.1
    seed: int = 0
    ngram_buckets: int = 1 << 14
    unknown_rate: float = 0.2
    next_token: bool = True


class RoutingNet(nn.Module):
    """ids int32 [B, W], grams int32 [B, W, G] (0: none), lengths int32 [B] -> encoded [B, W, features]
    (`encode`) -> logits [B, W, L, E]; with next_token, also `next_logits` [B, W, L, E]: row t for token t + 1."""

    vocab_size: int
    ngram_buckets: int
    num_layers: int
    num_experts: int
    embed: int
    hidden: int
    layers: int
    causal: bool
    next_token: bool = False

    def setup(self):
        self.embedding = nn.Embed(self.vocab_size, self.embed)
        self.grams = nn.Embed(self.ngram_buckets + 1, self.embed) if self.ngram_buckets else None
        cells = [nn.RNN(nn.OptimizedLSTMCell(self.hidden)) for _ in range(self.layers)]
        if self.causal:
            self.encoders = cells
        else:
            backward = [nn.RNN(nn.OptimizedLSTMCell(self.hidden), reverse=True, keep_order=True)
                        for _ in range(self.layers)]
            self.encoders = [nn.Bidirectional(f, b) for f, b in zip(cells, backward, strict=True)]
        self.head = nn.Dense(self.num_layers * self.num_experts)
        self.next_head = nn.Dense(self.num_layers * self.num_experts) if self.next_token else None

    def encode(self, ids, grams, lengths):
        x = self.embedding(ids)
        if self.grams is not None:
            present = (grams > 0)[..., None]
            x = x + (self.grams(grams) * present).sum(-2) / jnp.maximum(present.sum(-2), 1)
        features = [x]
        for encoder in self.encoders:
            x = encoder(x, seq_lengths=lengths)
        features.append(x)
        return jnp.concatenate(features, axis=-1)

    def logits(self, features):
        return self.head(features).reshape(*features.shape[:-1], self.num_layers, self.num_experts)

    def next_logits(self, features):
        return self.next_head(features).reshape(*features.shape[:-1], self.num_layers, self.num_experts)

    def __call__(self, ids, grams, lengths):
        return self.logits(self.encode(ids, grams, lengths))

    def every_head(self, ids, grams, lengths):
        """(logits, next logits or None): what `init` runs, so that every head gets its parameters."""
        features = self.encode(ids, grams, lengths)
        return self.logits(features), self.next_logits(features) if self.next_token else None

    def next_token_logits(self, ids, grams, lengths):
        return self.next_logits(self.encode(ids, grams, lengths))

    def pooled(self, ids, grams, lengths):
        """logits [B, L, E] of the mean of each window's encoded tokens."""
        return self.logits(_mean_over_tokens(self.encode(ids, grams, lengths), lengths))


def _mean_over_tokens(features, lengths):
    """features [B, W, F] -> [B, F], the mean over each row's first `lengths` tokens."""
    mask = (jnp.arange(features.shape[1])[None] < lengths[:, None])[..., None]
    return (features * mask).sum(1) / jnp.maximum(mask.sum(1), 1)


MAX_GRAMS = 24  # character n-grams kept per token (the first ones: a long token's beginning says the most)


class Vocabulary:
    """Token strings -> ids 1..n (UNKNOWN = 0 for the rest), and each string's hashed character 2-, 3- and
    4-grams (ids 1..buckets, 0: none) [MAX_GRAMS]."""

    def __init__(self, strings: list[str], ngram_buckets: int = 0):
        self.strings = list(strings)
        self.index = {s: i + 1 for i, s in enumerate(self.strings)}
        self.ngram_buckets = ngram_buckets
        self._grams: dict[str, np.ndarray] = {}

    def grams(self, tokens: list[str]) -> np.ndarray:
        """int32 [T, MAX_GRAMS]."""
        out = np.zeros((len(tokens), MAX_GRAMS), np.int32)
        if not self.ngram_buckets:
            return out
        for t, token in enumerate(tokens):
            row = self._grams.get(token)
            if row is None:
                text = f"\x02{token}\x03".encode()
                hashes = [zlib.crc32(text[i : i + n]) % self.ngram_buckets + 1
                          for n in (2, 3, 4) for i in range(len(text) - n + 1)][:MAX_GRAMS]
                row = self._grams[token] = np.array(hashes, np.int32)
            out[t, : len(row)] = row
        return out

    @classmethod
    def build(cls, sequences: list[list[str]], min_count: int, ngram_buckets: int) -> Vocabulary:
        counts = Counter(t for seq in sequences for t in seq)
        return cls(sorted(s for s, c in counts.items() if c >= min_count), ngram_buckets)

    def __len__(self) -> int:
        return len(self.strings) + 1

    def ids(self, tokens: list[str]) -> np.ndarray:
        return np.array([self.index.get(t, UNKNOWN) for t in tokens], np.int32)


def _windows(length: int, context: int) -> list[tuple[int, int, int]]:
    """(start, stop, scored) of the windows a sequence of `length` tokens is read in: `context` tokens each,
    overlapping by context // 2, so that every token after the first window has at least context // 2
    earlier tokens in its window; tokens start..scored only give context (the window before predicts them)."""
    overlap = context // 2
    windows, stop = [], 0
    while stop < length:
        start = max(stop - overlap, 0)
        windows.append((start, min(start + context, length), stop))
        stop = windows[-1][1]
    return windows


def _bucket(length: int, context: int) -> int:
    """Padded window length: the next power of two >= 16, at most `context` (few compiled shapes)."""
    size = 16
    while size < length:
        size *= 2
    return min(size, context) if length <= context else length


class _Network:
    """A RoutingNet with its parameters: jitted prediction, a window at a time."""

    def __init__(self, net: RoutingNet, params, context: int):
        self.net, self.params, self.context = net, params, context
        self._tokens = jax.jit(lambda params, *inputs: jax.nn.softmax(net.apply({"params": params}, *inputs)))
        self._next = jax.jit(lambda params, *inputs: jax.nn.softmax(
            net.apply({"params": params}, *inputs, method=RoutingNet.next_token_logits)))
        self._pooled = jax.jit(lambda params, *inputs: jax.nn.softmax(
            net.apply({"params": params}, *inputs, method=RoutingNet.pooled)))

    @staticmethod
    def _window(ids: np.ndarray, grams: np.ndarray, start: int, stop: int, context: int):
        size = _bucket(stop - start, context)
        window, window_grams = np.zeros((1, size), np.int32), np.zeros((1, size, MAX_GRAMS), np.int32)
        window[0, : stop - start], window_grams[0, : stop - start] = ids[start:stop], grams[start:stop]
        return window, window_grams, np.array([stop - start], np.int32)

    def token_shares(self, ids: np.ndarray, grams: np.ndarray, next_token: bool = False) -> np.ndarray:
        """float32 [T, L, E]: the softmax over experts of each (token, layer); next_token: of the token after
        each one (the next-token head's)."""
        head = self._next if next_token else self._tokens
        out = []
        for start, stop, scored in _windows(len(ids), self.context):
            window = self._window(ids, grams, start, stop, self.context)
            out.append(np.asarray(head(self.params, *window)[0, scored - start : stop - start]))
        if not out:
            return np.zeros((0, self.net.num_layers, self.net.num_experts), np.float32)
        return np.concatenate(out)

    def next_shares(self, ids: np.ndarray, grams: np.ndarray) -> np.ndarray:
        """float32 [L, E]: the next-token head's softmax for the token after the last one (its window only)."""
        start, stop, _ = _windows(len(ids), self.context)[-1]
        window = self._window(ids, grams, start, stop, self.context)
        return np.asarray(self._next(self.params, *window)[0, stop - start - 1])

    def request_shares(self, ids: np.ndarray, grams: np.ndarray) -> np.ndarray:
        """float32 [L, E]: the predicted share of each layer's routing per expert, from the first window."""
        stop = min(len(ids), self.context)
        return np.asarray(self._pooled(self.params, *self._window(ids, grams, 0, stop, self.context))[0])


class SiDAPredictor(Predictor):
    """SiDA's per-token predictor (module docstring)."""

    name = "sida"

    def __init__(self, num_layers, num_experts, top_k, config: TrainingConfig | None = None):
        super().__init__(num_layers, num_experts, top_k)
        self.config = config or TrainingConfig()
        self.network: _Network | None = None

    def _net(self) -> RoutingNet:
        c = self.config
        return RoutingNet(len(self.vocab), c.ngram_buckets, self.num_layers, self.num_experts, c.embed, c.hidden,
                          c.layers, c.causal, self._has_next_head())

    @property
    def reads_later_tokens(self) -> bool:
        return not self.config.causal or self.per == "request"

    def _has_next_head(self) -> bool:
        return self.config.next_token and self.config.causal and self.per == "token"

    def fit(self, data: TraceData, show_progress: bool = False) -> dict:
        """Trains on `data` (the last `config.validation` share of its sequences held out); returns the
        summary: sizes, and per epoch the mean loss and the validation top-k recall."""
        from moejax.predictors.quality import top_k_quality

        self.check_fits(data)
        c = self.config
        if not 0 <= c.validation < 1:
            raise MoejaxError(f"the validation share must be in [0, 1), got {c.validation}")
        if min(c.epochs, c.context, c.batch_tokens, c.embed, c.hidden, c.layers, c.min_count) < 1:
            raise MoejaxError("epochs, context, batch tokens, widths, layers and min count must all be >= 1")
        count = data.trace.num_sequences
        held = int(round(c.validation * count))
        train, valid = data.select(0, count - held), data.select(count - held, count)
        if not train.trace.num_sequences or not train.trace.experts.shape[1]:
            raise MoejaxError(f"{data.source}: no training tokens left after holding out {held} sequences for validation")
        self.vocab = Vocabulary.build(train.tokens, c.min_count, c.ngram_buckets)
        batches = self._examples(train)
        net = self._net()
        key = jax.random.PRNGKey(c.seed)
        params = net.init(key, *_example_inputs(), method=RoutingNet.every_head)["params"]
        optimizer = optax.adamw(optax.cosine_decay_schedule(c.learning_rate, c.epochs * len(batches)),
                                weight_decay=c.weight_decay)
        opt_state = optimizer.init(params)
        step = jax.jit(_train_step(functools.partial(self._batch_loss, net, c), optimizer))
        self.network = _Network(net, params, c.context)
        rng = np.random.default_rng(c.seed)
        best, history = None, []
        tokens = sum(int(b["lengths"].sum()) for b in batches)
        progress = Progress(f"train {self.name}", c.epochs * tokens, "tok", enabled=show_progress)
        start = time.perf_counter()
        for epoch in range(c.epochs):
            losses = []
            for b in rng.permutation(len(batches)):
                key, drop = jax.random.split(key)
                params, opt_state, loss = step(params, opt_state, batches[b], drop)
                losses.append(float(loss))
                progress.advance(int(batches[b]["lengths"].sum()),
                                 note=f"epoch {epoch + 1}/{c.epochs} loss {np.mean(losses):.3f}")
            self.network.params = params
            record = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4)}
            if valid.trace.num_sequences:
                record["validation_recall"] = round(top_k_quality(self, valid)["predictor_recall"], 4)
                if best is None or record["validation_recall"] > best[0]:
                    best = (record["validation_recall"], params)
            history.append(record)
        progress.close()
        if best is not None:
            self.network.params = best[1]
        return {"train_sequences": train.trace.num_sequences, "validation_sequences": valid.trace.num_sequences,
                "vocabulary": len(self.vocab), "soft_labels": data.soft_labels, "epochs": history,
                "train_s": round(time.perf_counter() - start, 1)}

    @staticmethod
    def _batch_loss(net: RoutingNet, config: TrainingConfig, params, batch: dict, key):
        """Mean over tokens of the cross-entropy of each layer's softmax over experts against the truncated
        teacher: batch["experts"] int32 [B, W, L, k] with batch["weights"] [B, W, L, k] (rows sum to 1); with
        the next-token head, plus the same of its softmax against the next token's teacher ("next_experts",
        "next_weights"), through an encoding its gradient does not reach."""
        features = _encoded_for_training(net, config, params, batch, key)
        loss = _cross_entropy(net, params, features, RoutingNet.logits, batch["experts"], batch["weights"])
        if net.next_token:
            loss += _cross_entropy(net, params, jax.lax.stop_gradient(features), RoutingNet.next_logits,
                                   batch["next_experts"], batch["next_weights"])
        return loss

    def _examples(self, data: TraceData) -> list[dict]:
        """Batches of windows of one padded length W: ids [B, W], grams [B, W, G], lengths [B], experts and
        weights [B, W, L, k]; with the next-token head, next_experts and next_weights [B, W, L, k] (row t: token
        t + 1's teacher; none for a sequence's last token)."""
        windows = []
        for tokens, experts, probs, _ in data.sequences():
            ids, grams = self.vocab.ids(tokens), self.vocab.grams(tokens)
            targets, weights = self._targets(experts, probs)
            per_token = {"experts": targets, "weights": weights}
            if self._has_next_head():
                per_token["next_experts"] = np.concatenate([targets[1:], np.zeros_like(targets[:1])])
                per_token["next_weights"] = np.concatenate([weights[1:], np.zeros_like(weights[:1])])
            for start, stop, scored in _windows(len(ids), self.config.context):
                window = {name: value[start:stop].copy() for name, value in per_token.items()}
                for name in ("weights", "next_weights"):
                    if name in window:
                        window[name][: scored - start] = 0.0  # context only: the window before learns them
                windows.append({"ids": ids[start:stop], "grams": grams[start:stop], **window})
        return _batched(windows, self.config)

    def _targets(self, experts: np.ndarray, probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(experts int32 [T, L, k], weights [T, L, k]): the truncated teacher of each (token, layer)."""
        experts = np.asarray(experts).transpose(1, 0, 2).astype(np.int64)
        valid = (experts >= 0) & (experts < self.num_experts)
        if probs is None:
            weights = valid.astype(np.float32)
        else:
            weights = np.where(valid, np.asarray(probs).transpose(1, 0, 2), 0.0).astype(np.float32)
        weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-9)
        return np.where(valid, experts, 0).astype(np.int32), weights

    def _trained(self) -> _Network:
        if self.network is None:
            raise MoejaxError(f"the {self.name} predictor is not trained: fit or load it first")
        return self.network

    def warm_up(self):
        """Compiles prediction (and the next-token head's) for every padded window length (16, 32, ... up to
        `context`)."""
        length = 16
        while True:
            self.predict(["warm-up"] * min(length, self.config.context))
            self.predict_next(["warm-up"] * min(length, self.config.context))
            if length >= self.config.context:
                return
            length *= 2

    def predict(self, tokens, experts=None, lookahead=None):
        shares = self._trained().token_shares(self.vocab.ids(tokens), self.vocab.grams(tokens))
        return np.minimum(shares * self.top_k, 1.0)

    def predict_next(self, tokens):
        network = self._trained()
        if not network.net.next_token or not tokens:
            return None
        return np.minimum(network.next_shares(self.vocab.ids(tokens), self.vocab.grams(tokens)) * self.top_k, 1.0)

    def predict_each_next(self, tokens):
        network = self._trained()
        if not network.net.next_token:
            return None
        shares = network.token_shares(self.vocab.ids(tokens), self.vocab.grams(tokens), next_token=True)
        return np.minimum(shares * self.top_k, 1.0)

    def state(self):
        flat = {_name(path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(self._trained().params)[0]}
        return {"config": dataclasses.asdict(self.config), "vocabulary": self.vocab.strings}, flat

    def load_state(self, settings, arrays):
        try:  # predictors saved before the next-token head have none
            self.config = TrainingConfig(**{"next_token": False, **settings["config"]})
        except TypeError as err:
            raise MoejaxError(f"bad training settings ({err})") from None
        self.vocab = Vocabulary(list(settings["vocabulary"]), self.config.ngram_buckets)
        net = self._net()
        template = jax.eval_shape(
            lambda: net.init(jax.random.PRNGKey(0), *_example_inputs(), method=RoutingNet.every_head)["params"])
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        values = []
        for path, leaf in leaves:
            name = _name(path)
            if name not in arrays:
                raise MoejaxError(f"missing weights {name}")
            if arrays[name].shape != leaf.shape:
                raise MoejaxError(f"weights {name} have shape {arrays[name].shape}, expected {leaf.shape}")
            values.append(jnp.asarray(arrays[name], leaf.dtype))
        self.network = _Network(net, jax.tree_util.tree_unflatten(treedef, values), self.config.context)


class EMoEPredictor(SiDAPredictor):
    """eMoE's per-request predictor: from the prompt (its first `context` tokens), each MoE layer's share of
    the request's routing per expert (module docstring). `predict` gives every token k times the shares."""

    name = "emoe"
    per = "request"

    @staticmethod
    def _batch_loss(net: RoutingNet, config: TrainingConfig, params, batch: dict, key):
        """Mean over requests of the cross-entropy of each layer's softmax against batch["shares"] [B, L, E]."""
        features = _encoded_for_training(net, config, params, batch, key)
        pooled = _mean_over_tokens(features, batch["lengths"])
        logp = jax.nn.log_softmax(net.apply({"params": params}, pooled, method=RoutingNet.logits), axis=-1)
        return -(logp * batch["shares"]).sum(axis=(-1, -2)).mean()

    def _examples(self, data: TraceData) -> list[dict]:
        """Batches of prompts of one padded length W: ids [B, W], grams [B, W, G], lengths [B], shares [B, L, E]."""
        prompts = []
        prompt_lens = data.trace.prompt_lens
        for s, (tokens, experts, _, _) in enumerate(data.sequences()):
            prompt = tokens[: min(self.config.context, len(tokens) if prompt_lens is None else int(prompt_lens[s]))]
            used = used_mask(experts, self.num_experts).sum(axis=0, dtype=np.float32)  # [L, E]
            prompts.append({"ids": self.vocab.ids(prompt), "grams": self.vocab.grams(prompt),
                            "shares": used / np.maximum(used.sum(-1, keepdims=True), 1)})
        return _batched([p for p in prompts if len(p["ids"])], self.config, per_example=("shares",))

    def request_shares(self, tokens: list[str]) -> np.ndarray:
        """float32 [L, E]: the predicted share of each layer's routing per expert."""
        return self._trained().request_shares(self.vocab.ids(tokens), self.vocab.grams(tokens))

    def predict(self, tokens, experts=None, lookahead=None):
        if not tokens:
            return np.zeros((0, self.num_layers, self.num_experts), np.float32)
        per_token = np.minimum(self.request_shares(tokens) * self.top_k, 1.0)
        return np.broadcast_to(per_token, (len(tokens), *per_token.shape)).copy()

    def predict_request(self, tokens):
        return request_probabilities(self.predict(tokens)[:1].repeat(len(tokens), 0)).astype(np.float32)


def _batched(examples: list[dict], config: TrainingConfig, per_example: tuple[str, ...] = ()) -> list[dict]:
    """Examples (dicts of arrays whose first axis is tokens, "ids" among them, except those named in
    `per_example`) grouped by padded length (`_bucket`), about `config.batch_tokens` tokens a batch, with
    "lengths" [B]."""
    by_size: dict[int, list[dict]] = {}
    for example in examples:
        by_size.setdefault(_bucket(len(example["ids"]), config.context), []).append(example)
    batches = []
    for size, group in sorted(by_size.items()):
        rows = max(1, config.batch_tokens // size)
        for first in range(0, len(group), rows):
            chunk = group[first : first + rows]
            batch = {"lengths": np.array([len(e["ids"]) for e in chunk], np.int32)}
            for name, value in chunk[0].items():
                per_token = name not in per_example
                shape = (len(chunk), size, *value.shape[1:]) if per_token else (len(chunk), *value.shape)
                batch[name] = np.zeros(shape, value.dtype)
                for r, e in enumerate(chunk):
                    if per_token:
                        batch[name][r, : len(e[name])] = e[name]
                    else:
                        batch[name][r] = e[name]
            batches.append(batch)
    return batches


def _encoded_for_training(net: RoutingNet, config: TrainingConfig, params, batch: dict, key):
    """The encoder's output [B, W, F] on batch (ids, grams, lengths) with `config.unknown_rate` of the ids
    replaced by UNKNOWN and `config.dropout` of the output dropped."""
    unknown_key, drop_key = jax.random.split(key)
    ids = jnp.where(jax.random.bernoulli(unknown_key, config.unknown_rate, batch["ids"].shape), UNKNOWN, batch["ids"])
    features = net.apply({"params": params}, ids, batch["grams"], batch["lengths"], method=RoutingNet.encode)
    keep = jax.random.bernoulli(drop_key, 1 - config.dropout, features.shape)
    return jnp.where(keep, features / (1 - config.dropout), 0.0)


def _cross_entropy(net: RoutingNet, params, features, head, experts, weights):
    """Mean over the scored tokens (any weight) of -(weights x log softmax(head(features)))[experts], summed."""
    logp = jax.nn.log_softmax(net.apply({"params": params}, features, method=head), axis=-1)
    per_token = -(jnp.take_along_axis(logp, experts, axis=-1) * weights).sum(axis=(-1, -2))
    scored = weights.sum(axis=(-1, -2)) > 0  # padding and context-only tokens: none
    return jnp.where(scored, per_token, 0.0).sum() / jnp.maximum(scored.sum(), 1)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _example_inputs():
    return np.zeros((1, 16), np.int32), np.zeros((1, 16, MAX_GRAMS), np.int32), np.array([16], np.int32)


def _train_step(batch_loss, optimizer):
    """One optimiser step: (params, opt_state, batch, key) -> (params, opt_state, loss); batch_loss(params,
    batch, key) -> the mean loss."""

    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(batch_loss)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
