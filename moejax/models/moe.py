"""The MoE block as separate pure functions: router, one expert's FFN, and the expert accumulation.

Expert weights are always arguments, never module parameters, so a runtime can hand the
expert computation whichever experts it has on the device. One expert's weights are a dict
of arrays whose names give its kind (see `expert_ffn`): gated {'gate': [D, F], 'up': [D, F],
'down': [F, D]} (decoder families) or plain {'up': [D, F], 'down': [F, D]}, optionally with
'up_bias' [F] and 'down_bias' [D] (Switch Transformers, NLLB-MoE); a layer's stacked experts
have a leading [E] axis on each.

Determinism across execution strategies: every expert processes all N tokens of the call
(rows it was not chosen for get weight 0), and contributions are added into a float32
accumulator in increasing expert-id order. Splitting a layer's experts into waves, choosing
them on the host or gathering them on the device therefore yields the same sums.

`accumulate_experts(..., chunk=c)` runs the experts c at a time as batched matmuls (one kernel per
weight for c experts instead of one per expert: the host launches fewer kernels). Every chunk has
exactly c experts (the last is padded with a repeat that gets weight 0), so an expert's output
never depends on how many others were passed with it: waves that are multiples of c give the
same sums as one pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.layers import ACTIVATIONS

EXPERT_WEIGHTS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How one expert's weights sit in one flat buffer (the runtime moves and passes each expert as a
    single array: one copy and one argument per expert, not one per weight).

    entries: (name, shape, dtype) in buffer order; dtype: the buffer's, the weights' common dtype, or
    uint8 holding their bytes when their dtypes differ. Hashable: a static argument of jitted functions.
    """

    entries: tuple[tuple[str, tuple[int, ...], str], ...]
    dtype: str

    @classmethod
    def of(cls, weights: dict) -> ExpertLayout:
        entries = tuple((name, tuple(w.shape), str(np.dtype(w.dtype))) for name, w in sorted(weights.items()))
        dtypes = {dtype for _, _, dtype in entries}
        return cls(entries, dtypes.pop() if len(dtypes) == 1 else "uint8")

    def matches(self, weights: dict) -> bool:
        return ExpertLayout.of(weights) == self

    def pack(self, weights: dict) -> np.ndarray:
        """weights (NumPy or device arrays, this layout) -> one flat buffer (on the device where they all are)."""
        parts = [weights[name] for name, _, _ in self.entries]
        if self.dtype != "uint8" and all(isinstance(part, jax.Array) for part in parts):
            return jnp.concatenate([part.reshape(-1) for part in parts])
        parts = [np.asarray(part).reshape(-1) for part in parts]
        if self.dtype == "uint8":
            parts = [part.view(np.uint8) for part in parts]
        return np.concatenate(parts)

    def unpack(self, buffers) -> dict:
        """buffers [..., S] (one or stacked experts) -> {name: [..., *shape]}, inside or outside jit."""
        lead, out, offset = buffers.shape[:-1], {}, 0
        for name, shape, dtype in self.entries:
            itemsize = np.dtype(dtype).itemsize if self.dtype == "uint8" else 1
            size = int(np.prod(shape, dtype=np.int64)) * itemsize
            part = buffers[..., offset : offset + size]
            if self.dtype == "uint8":
                part = jax.lax.bitcast_convert_type(part.reshape(*lead, size // itemsize, itemsize), jnp.dtype(dtype))
            out[name] = part.reshape(*lead, *shape)
            offset += size
        return out


def route(router_logits, top_k: int, normalize: bool):
    """Softmax over experts, then top-k. router_logits [N, E] -> (weights [N, k] f32, ids [N, k] int32)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def expert_ffn(x, expert: dict, act: str = "silu"):
    """One expert on all rows: x [N, D] -> [N, D] in x's dtype.

    Gated (has 'gate'): act(x @ gate) * (x @ up) @ down. Plain: act(x @ up + up_bias) @ down +
    down_bias, each bias only where the expert has it.
    """
    if "gate" in expert:
        hidden = ACTIVATIONS[act](x @ expert["gate"]) * (x @ expert["up"])
        return hidden @ expert["down"]
    hidden = x @ expert["up"]
    if "up_bias" in expert:
        hidden = hidden + expert["up_bias"]
    out = ACTIVATIONS[act](hidden) @ expert["down"]
    if "down_bias" in expert:
        out = out + expert["down_bias"]
    return out


def stacked_expert_ffn(x, stacked: dict, act: str = "silu"):
    """`expert_ffn` of c experts at once: x [N, D], stacked weights [c, ...] each -> [c, N, D] in x's dtype."""
    if "gate" in stacked:
        gate = jnp.einsum("nd,cdf->cnf", x, stacked["gate"])
        hidden = ACTIVATIONS[act](gate) * jnp.einsum("nd,cdf->cnf", x, stacked["up"])
        return jnp.einsum("cnf,cfd->cnd", hidden, stacked["down"])
    hidden = jnp.einsum("nd,cdf->cnf", x, stacked["up"])
    if "up_bias" in stacked:
        hidden = hidden + stacked["up_bias"][:, None, :]
    out = jnp.einsum("cnf,cfd->cnd", ACTIVATIONS[act](hidden), stacked["down"])
    if "down_bias" in stacked:
        out = out + stacked["down_bias"][:, None, :]
    return out


def accumulate_experts(x, topk_ids, topk_weights, expert_ids, experts: Sequence, acc, act: str = "silu",
                       chunk: int | None = None, layout: ExpertLayout | None = None):
    """Adds the weighted outputs of the given experts into `acc`.

    x [N, D]; topk_ids [N, k] int32; topk_weights [N, k] f32; expert_ids [n] int32, the global id
    of each entry of `experts` in increasing order (ids that no token chose contribute zeros);
    acc [N, D] f32. experts: per-expert dicts, or with `layout` per-expert flat buffers [S]. chunk:
    None runs one expert at a time; c runs c at a time as batched matmuls (see the module
    docstring). Returns the new acc.
    """
    if chunk is None:
        for i, expert in enumerate(experts):
            if layout is not None:
                expert = layout.unpack(expert)
            chosen = topk_ids == expert_ids[i]
            weight = jnp.sum(jnp.where(chosen, topk_weights, 0.0), axis=-1)
            acc = acc + weight[:, None] * expert_ffn(x, expert, act).astype(jnp.float32)
        return acc
    for start in range(0, len(experts), chunk):
        group = list(experts[start : start + chunk])
        group_ids = expert_ids[start : start + chunk]
        pad = chunk - len(group)
        if pad:  # repeats of the last expert under id -1, which no token chose: weight 0
            group += [group[-1]] * pad
            group_ids = jnp.concatenate([group_ids, jnp.full((pad,), -1, group_ids.dtype)])
        if layout is not None:
            stacked = layout.unpack(jnp.stack(group))
        else:
            stacked = {name: jnp.stack([expert[name] for expert in group]) for name in group[0]}
        out = stacked_expert_ffn(x, stacked, act)
        chosen = topk_ids[None] == group_ids[:, None, None]  # [c, N, k]
        weight = jnp.sum(jnp.where(chosen, topk_weights[None], 0.0), axis=-1)  # [c, N]
        for i in range(chunk):
            acc = acc + weight[i][:, None] * out[i].astype(jnp.float32)
    return acc


def stacked_expert(stacked: dict, index):
    """Expert `index` (static int or traced scalar) of a layer's stacked weights."""
    return {name: weights[index] for name, weights in stacked.items()}


def expert_list(experts) -> list[dict]:
    """A layer's experts as per-expert dicts, from a stacked dict ([E, ...] per weight) or a sequence."""
    if isinstance(experts, dict):
        return [stacked_expert(experts, e) for e in range(experts["down"].shape[0])]
    return list(experts)


def device_routed_experts(x, topk_ids, topk_weights, experts, act: str = "silu"):
    """The routed-expert output [N, D] f32 with routing resolved on the device (no host round trip).

    `experts`: the layer's experts, a sequence of per-expert dicts (separate buffers: each is read in
    place) or a stacked dict. When fewer (token, expert) pairs exist than experts (decode), a loop
    over the distinct chosen ids runs each through `lax.switch`, so only the chosen experts' weights
    are read and none is copied; otherwise every expert runs on every row. Both add in increasing
    expert order, like `accumulate_experts` over the chosen experts. Ids >= E (pairs the router
    dropped) carry weight 0 and contribute zeros.
    """
    experts = expert_list(experts)
    num_experts, n_pairs = len(experts), topk_ids.size
    acc = jnp.zeros(x.shape, jnp.float32)
    if n_pairs >= num_experts:
        return accumulate_experts(x, topk_ids, topk_weights, jnp.arange(num_experts), experts, acc, act)
    # Unused slots get id E, whose branch adds zeros without reading any weights.
    ids = jnp.unique(topk_ids, size=n_pairs, fill_value=num_experts)
    branches = [functools.partial(_expert_f32, expert=expert, act=act) for expert in experts]
    branches.append(lambda rows: jnp.zeros(rows.shape, jnp.float32))
    for slot in range(n_pairs):
        weight = jnp.sum(jnp.where(topk_ids == ids[slot], topk_weights, 0.0), axis=-1)
        acc = acc + weight[:, None] * jax.lax.switch(ids[slot], branches, x)
    return acc


def _expert_f32(x, expert: dict, act: str):
    return expert_ffn(x, expert, act).astype(jnp.float32)
