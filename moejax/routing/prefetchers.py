"""Expert prefetchers: which experts of the layers ahead to copy to the GPU while a layer computes.

One interface for the engine and the policy lab. Per MoE layer step the caller
  1. `observe(layer, counts, lookahead)`: token counts [E] of the layer's routing in this step and,
     when the executor computed it, the token counts [E] of the experts the NEXT MoE layer's
     router picks when applied to this layer's input;
  2. `predict(layer)`: keys (moe_layer, expert) of layers after `layer`, best first (after the last
     layer they wrap to layers 0.. of the next token), never of `layer` itself;
  3. admits a prefix of them with `prefetch_into` (or `ExpertCache.prefetch`): the same rule,
     never evicting an expert the layer in progress has pinned.
Prefetching moves experts, never changes what is computed, so outputs do not depend on it.
"""

from __future__ import annotations

import numpy as np

from moejax.errors import MoejaxError, ParameterError
from moejax.routing.eams import EAMCollection, EAMMatcher
from moejax.routing.usage import ExpertUsage

ExpertKey = tuple[int, int]  # (MoE layer, expert)


class Prefetcher:
    name = "base"
    uses_lookahead = False  # whether `observe` reads the next MoE layer's router guess

    def on_sequence_start(self, task: str | None = None) -> None:
        """A new sequence (request) begins, with an optional task label."""

    def observe(self, layer: int, counts: np.ndarray, lookahead: np.ndarray | None = None) -> None:
        """Routing of MoE layer `layer` in this step: counts [E] tokens per expert; lookahead [E] or None."""

    def predict(self, layer: int) -> list[ExpertKey]:
        """Experts to prefetch after `layer`'s routing, best first."""
        return []


class NoPrefetcher(Prefetcher):
    name = "none"


class LookaheadPrefetcher(Prefetcher):
    """Prefetches the experts the next MoE layer's router picks on the current layer's input.

    The mixtral-offloading / Pre-gated heuristic: hidden states change little from one layer to
    the next, so the next router applied one layer early guesses its experts. Experts with more
    tokens come first. Nothing is predicted after the last MoE layer (no next router input yet).
    """

    name = "lookahead"
    uses_lookahead = True

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.guess: np.ndarray | None = None

    def observe(self, layer, counts, lookahead=None):
        self.guess = None if lookahead is None else np.asarray(lookahead)

    def predict(self, layer):
        if self.guess is None or layer + 1 >= self.num_layers:
            return []
        experts = np.flatnonzero(self.guess)
        order = np.argsort(-self.guess[experts], kind="stable")
        return [(layer + 1, int(e)) for e in experts[order]]


PREFETCHERS = ("none", "lookahead", "trace", "trace+lookahead")
# The trace prefetchers' default probability floors. trace+lookahead's was chosen on DeepSeek-V2-Lite
# traces disjoint from the benchmark's (BENCHMARKS.md): the router evidence makes p sharp, and lower
# floors buy few hits for many more copies.
DEFAULT_FLOORS = {"trace": 0.02, "trace+lookahead": 0.2}


class TracePrefetcher(Prefetcher):
    """Trace-based prefetching: the running sequence's EAM matched against the collection (MoE-Infinity),
    sharpened by the experts the token in flight already chose.

    After the step of layer l, for the `horizon` layers ahead (distance t = 1..horizon layer steps,
    wrapping to layers 0.. of the next token after the last layer), the probability p(j, e) that the
    next visit of layer j uses expert e is built in two parts:

    1. sequence level: s(j, e) = `trace.ExpertUsage`: the running sequence's token counts smoothed
       towards the expert shares of layer j in the best-matching collection EAMs (`trace.EAMMatcher`:
       cosine over the whole running EAM; the `top_matches` most similar, weighted by similarity);
    2. token level, when the collection has `transitions` and layer j is still ahead in the current
       token: for each earlier layer i = j - d (d = 1..depth) the token has passed, P_d(e) = sum_a
       c_i(a) T_d[j, a, e] / sum_a c_i(a) T_d[j, a, .] (c_i: this step's counts of layer i; T_d:
       the collection's transitions, + `smoothing` per cell), combined as a naive-Bayes product

           log r(j, e) = log P_{d0}(e) + sum_{d != d0} (log P_d(e) - log u(j, e)) + w (log s'(j, e) - log u(j, e)),

       with d0 the nearest layer, u the collection's shares of layer j, s' = s normalised to shares,
       w = `sequence_weight`; then p(j, e) = min(1, m(j) r(j, e) / sum_e r(j, e)) (m(j): experts per
       step). Without transitions, or for the next token's layers, p = s.
    3. router evidence (`use_lookahead`, the prefetcher `trace+lookahead`): given the lookahead guess
       (the next MoE layer's router applied one layer early), for the next layer only, p's odds are multiplied
       by the likelihood ratio of the guess, P(g | used) / P(g | unused) for a guessed expert and
       P(not g | used) / P(not g | unused) for the others, counted online from how earlier guesses
       turned out (each of the four (guessed, used) cells starts at `guess_prior` pseudo-counts).

    Keys are ranked by priority(j, e) = p(j, e) * (1 - (t - 1) / horizon): nearer layers and likelier
    experts first; only experts with p >= `min_probability` are proposed (a prefetch evicts a cached
    expert, so a guess that is rarely right costs more than it wins).
    """

    name = "trace"

    def __init__(self, num_layers: int, num_experts: int, collection: EAMCollection | None = None,
                 horizon: int = 1, prior_tokens: float = 4.0, decay: float = 1.0, top_matches: int = 1,
                 min_probability: float = DEFAULT_FLOORS["trace"], sequence_weight: float = 0.5, smoothing: float = 0.1,
                 use_transitions: bool = True, use_lookahead: bool = False, guess_prior: float = 1.0):
        if collection is not None and (collection.num_layers, collection.num_experts) != (num_layers, num_experts):
            raise MoejaxError(
                f"EAM collection is [{collection.num_layers}, {collection.num_experts}] but the model has "
                f"{num_layers} MoE layers of {num_experts} experts"
            )
        self.num_layers, self.num_experts = num_layers, num_experts
        self.horizon = max(1, min(horizon, num_layers - 1)) if num_layers > 1 else 1
        self.min_probability, self.sequence_weight = min_probability, sequence_weight
        self.usage = ExpertUsage(num_layers, num_experts, prior_tokens, decay)
        self.collection, self.top_matches = collection, top_matches
        self.smoothing, self.use_transitions = smoothing, use_transitions
        self.uniform = np.full(num_experts, 1.0 / num_experts)
        self.refit()
        self.token_counts = np.zeros((num_layers, num_experts))
        self.token_used = np.zeros(num_layers, bool)  # whether the token in flight routed anything at each layer
        self.token_layer = -1  # the token in flight has passed layers 0..token_layer
        self.uses_lookahead = use_lookahead
        self.name = "trace+lookahead" if use_lookahead else "trace"
        self.guess: np.ndarray | None = None  # bool [E]: the guess for layer token_layer + 1
        self.guess_layer = -1
        # Outcomes of earlier guesses, as pseudo-counts of (guessed, used) pairs: [[not g & unused, not g & used],
        # [g & unused, g & used]]; the prior is a guess independent of use.
        self.guess_outcomes = np.full((2, 2), guess_prior)
        self._guess_ratios: np.ndarray | None = None  # [2]: the likelihood ratios the outcomes give

    def refit(self) -> None:
        """Rebuilds the matcher and the transition statistics from the collection (the engine calls
        this after finished sequences joined it)."""
        collection = self.collection
        self.matcher = EAMMatcher(collection, self.top_matches) if collection is not None and len(collection) else None
        self.conditional = None
        if self.use_transitions and collection is not None and collection.transitions.any():
            smoothed = collection.transitions.astype(np.float64) + self.smoothing
            self.conditional = smoothed / smoothed.sum(axis=3, keepdims=True)  # [depth, L, a, b]: P_d(b | a)
            first = collection.transitions[0].sum(axis=1) + self.smoothing  # [L, E]; layer 0 has no d = 1 pairs
            shares = first / first.sum(axis=1, keepdims=True)
            # Part 2 as a product, its constant factors dropped (r is normalised): with n earlier layers,
            # r = prod_d (c_i @ T_d[j]) * s^w * u^-(n - 1 + w); unshared[n - 1] = u^-(n - 1 + w), [depth, L, E].
            sources = np.arange(1, len(self.conditional) + 1)[:, None, None]
            self.unshared = shares[None] ** -(sources - 1 + self.sequence_weight)

    def on_sequence_start(self, task=None):
        self.usage.reset()
        self.token_layer = -1
        self.guess, self.guess_layer = None, -1
        if self.matcher is not None:
            self.matcher.reset()

    def observe(self, layer, counts, lookahead=None):
        counts = np.asarray(counts)
        if self.guess is not None and self.guess_layer == layer:
            cells = np.bincount(2 * self.guess + (counts > 0), minlength=4)  # (guessed, used) pairs, row-major
            self.guess_outcomes += cells.reshape(2, 2)
            self._guess_ratios = None
        self.guess, self.guess_layer = None, -1
        if self.uses_lookahead and lookahead is not None and layer + 1 < self.num_layers:
            self.guess, self.guess_layer = (np.asarray(lookahead) > 0).astype(np.int64), layer + 1
        self.usage.observe(layer, counts)
        self.token_counts[layer] = counts
        self.token_used[layer] = counts.any()
        self.token_layer = layer
        if self.matcher is not None:
            self.matcher.observe(layer, counts)

    def _with_guess(self, p: np.ndarray) -> np.ndarray:
        """p [E] updated by the router's guess for the next layer (part 3 of the class docstring)."""
        if self._guess_ratios is None:
            (unguessed_unused, unguessed_used), (guessed_unused, guessed_used) = self.guess_outcomes.tolist()
            used, unused = unguessed_used + guessed_used, unguessed_unused + guessed_unused
            # P(g | used) / P(g | unused), for g = 0 (not guessed) and g = 1 (guessed)
            self._guess_ratios = np.array([unguessed_used / used * unused / unguessed_unused,
                                           guessed_used / used * unused / guessed_unused])
        p = np.minimum(np.maximum(p, 1e-4), 1 - 1e-4)
        odds = p / (1 - p) * self._guess_ratios[self.guess]
        return odds / (1 + odds)

    def sequence_probabilities(self, layer: int) -> np.ndarray:
        """float [E]: s(layer, e), the sequence-level probability for the next visit of MoE layer `layer`."""
        prior = self.matcher.predicted_shares(layer) if self.matcher is not None else self.uniform
        return self.usage.probabilities(layer, prior)

    def probabilities(self, layer: int) -> np.ndarray:
        """float [E]: p(layer, e) for the next visit of MoE layer `layer`."""
        p = self._trace_probabilities(layer)
        return self._with_guess(p) if self.guess is not None and layer == self.guess_layer else p

    def _trace_probabilities(self, layer: int) -> np.ndarray:
        """Parts 1 and 2 of the class docstring."""
        s = self.sequence_probabilities(layer)
        if self.conditional is None or layer <= self.token_layer:
            return s
        r, sources = None, 0
        for d in range(1, min(len(self.conditional), layer) + 1):
            source = layer - d
            if source > self.token_layer or not self.token_used[source]:
                continue
            evidence = self.token_counts[source] @ self.conditional[d - 1, layer]  # P_d up to a constant
            r = evidence if r is None else r * evidence
            sources += 1
        if r is None:
            return s
        r *= s ** self.sequence_weight * self.unshared[sources - 1, layer]
        return np.minimum(r * (self.usage.experts_per_step(layer) / r.sum()), 1.0)

    def predict(self, layer):
        if self.horizon == 1:  # the usual case, without the merge of several layers below
            ahead = (layer + 1) % self.num_layers
            if ahead == layer:
                return []
            p = self.probabilities(ahead)
            likely = (p >= self.min_probability).nonzero()[0]
            return [(ahead, e) for e in likely[np.argsort(-p[likely], kind="stable")].tolist()]
        layers, experts, priorities = [], [], []
        for t in range(1, self.horizon + 1):
            ahead = (layer + t) % self.num_layers
            if ahead == layer:
                break
            p = self.probabilities(ahead)
            likely = (p >= self.min_probability).nonzero()[0]
            layers.append(np.full(len(likely), ahead))
            experts.append(likely)
            priorities.append(p[likely] * (1 - (t - 1) / self.horizon))
        if not layers:
            return []
        order = np.argsort(-np.concatenate(priorities), kind="stable")
        return list(zip(np.concatenate(layers)[order].tolist(), np.concatenate(experts)[order].tolist()))


def make_prefetcher(name: str, *, num_layers: int, num_experts: int, top_k: int,
                    collection: EAMCollection | None = None, floor: float | None = None) -> Prefetcher:
    """A fresh prefetcher by name (`top_k` is the model's experts per token).

    floor: the trace prefetchers propose only experts with p >= floor (`min_probability`; default
    `DEFAULT_FLOORS`): higher favours precision, lower recall.
    """
    if floor is not None:
        if name not in DEFAULT_FLOORS:
            raise ParameterError("{prefetch_floor} applies to {prefetch} trace or trace+lookahead, not {name!r}", name=name)
        if not 0 <= floor <= 1:
            raise ParameterError("{prefetch_floor} must be a probability in [0, 1], got {floor}", floor=floor)
    if name == "none":
        return NoPrefetcher()
    if name == "lookahead":
        return LookaheadPrefetcher(num_layers)
    if name in DEFAULT_FLOORS:
        return TracePrefetcher(num_layers, num_experts, collection, use_lookahead=name == "trace+lookahead",
                               min_probability=DEFAULT_FLOORS[name] if floor is None else floor)
    raise ParameterError.not_one_of("prefetch", name, PREFETCHERS)
