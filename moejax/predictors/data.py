"""Training and evaluation data of the expert predictors: a routing trace with each token's text.

A predictor learns from a routing trace (`routing.traces.RoutingTrace`: experts [MoE layers, tokens, k],
seq_lens [sequences]) and the tokens behind it, as strings:
  - moejax's own traces (`moejax trace`) hold the token ids (`token_ids` [T]); a token's string is its
    decimal id ("1734"), and, where the run recorded them, the router's probabilities of the chosen
    experts (`router_probs` [L, T, k]), the soft labels of distillation;
  - any other trace file NAME.npz with experts + seq_lens comes with NAME_tokens.json beside it: a JSON
    list with one list of token strings per sequence (hard labels only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError
from moejax.routing.files import ROUTING_FILE, trace_file
from moejax.routing.traces import RoutingTrace, load_routing


@dataclasses.dataclass
class TraceData:
    """trace: the routing; tokens: per sequence, its token strings (len == seq_lens[s]); source: the
    file they came from, for messages."""

    trace: RoutingTrace
    tokens: list[list[str]]
    source: str = ""

    def __post_init__(self):
        lens = [len(t) for t in self.tokens]
        if lens != self.trace.seq_lens.tolist():
            bad = next((s for s, (a, b) in enumerate(zip(lens, self.trace.seq_lens.tolist())) if a != b), len(lens))
            raise MoejaxError(f"{self.source or 'trace'}: {len(lens)} token sequences for {self.trace.num_sequences} "
                              f"routed ones" if len(lens) != self.trace.num_sequences else
                              f"{self.source or 'trace'}: sequence {bad} has {lens[bad]} tokens but "
                              f"{int(self.trace.seq_lens[bad])} routed tokens")

    @property
    def soft_labels(self) -> bool:
        return self.trace.router_probs is not None

    def select(self, start: int, stop: int) -> TraceData:
        """Sequences [start, stop)."""
        return TraceData(self.trace.select(start, stop), self.tokens[start:stop], self.source)

    def sequences(self):
        """(tokens, experts [L, T_s, k], router probabilities [L, T_s, k] or None, lookahead or None) per sequence."""
        offsets = self.trace.offsets()
        for s, tokens in enumerate(self.tokens):
            span = slice(int(offsets[s]), int(offsets[s + 1]))
            probs, guess = self.trace.router_probs, self.trace.lookahead
            yield (tokens, self.trace.experts[:, span], None if probs is None else probs[:, span],
                   None if guess is None else guess[:, span])


def tokens_file(path: Path) -> Path:
    """The token file beside a trace file: NAME.npz -> NAME_tokens.json."""
    return path.with_name(f"{path.stem}_tokens.json")


def load_trace_data(path: str | Path) -> TraceData:
    """A routing trace and its tokens (see the module docstring); MoejaxError naming the file if the
    tokens are missing or do not match the routing."""
    path = trace_file(path, ROUTING_FILE)
    trace = load_routing(path)
    if trace.token_ids is not None:
        offsets = trace.offsets()
        ids = [str(t) for t in trace.token_ids.tolist()]
        return TraceData(trace, [ids[offsets[s] : offsets[s + 1]] for s in range(trace.num_sequences)], str(path))
    sibling = tokens_file(path)
    if not sibling.is_file():
        raise MoejaxError(f"{path}: holds no token_ids and there is no {sibling.name} beside it: a predictor learns "
                          f"from the tokens (re-record with `moejax trace`, or give a JSON list of token strings "
                          f"per sequence in {sibling.name})")
    try:
        tokens = json.loads(sibling.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoejaxError(f"{sibling}: not a readable JSON file ({err})") from None
    if not isinstance(tokens, list) or not all(isinstance(s, list) and all(isinstance(t, str) for t in s) for s in tokens):
        raise MoejaxError(f"{sibling}: must be a JSON list with one list of token strings per sequence")
    return TraceData(trace, tokens, str(path))


def concatenate(parts: list[TraceData]) -> TraceData:
    """The sequences of several traces of one model, in order; MoejaxError if their shapes differ."""
    first = parts[0]
    for part in parts[1:]:
        a, b = first.trace, part.trace
        if (a.num_layers, a.num_experts, a.top_k) != (b.num_layers, b.num_experts, b.top_k):
            raise MoejaxError(f"{part.source}: {b.num_layers} MoE layers, {b.num_experts} experts, top-{b.top_k}, but "
                              f"{first.source} has {a.num_layers}, {a.num_experts}, top-{a.top_k}")
    if len(parts) == 1:
        return first
    traces = [p.trace for p in parts]

    def joined(name: str, axis: int):
        arrays = [getattr(t, name) for t in traces]
        return None if any(a is None for a in arrays) else np.concatenate(arrays, axis=axis)

    trace = RoutingTrace(
        experts=np.concatenate([t.experts for t in traces], axis=1), seq_lens=joined("seq_lens", 0),
        num_experts=first.trace.num_experts,
        tasks=None if any(t.tasks is None for t in traces) else [x for t in traces for x in t.tasks],
        lookahead=joined("lookahead", 1), prompt_lens=joined("prompt_lens", 0), token_ids=joined("token_ids", 0),
        router_probs=joined("router_probs", 1))
    return TraceData(trace, [s for p in parts for s in p.tokens], ", ".join(p.source for p in parts))
