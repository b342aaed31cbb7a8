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
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from moejax.models.layers import ACTIVATIONS

EXPERT_WEIGHTS = ("gate", "up", "down")


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


def accumulate_experts(x, topk_ids, topk_weights, expert_ids, experts: Sequence[dict], acc, act: str = "silu"):
    """Adds the weighted outputs of the given experts into `acc`.

    x [N, D]; topk_ids [N, k] int32; topk_weights [N, k] f32; expert_ids [n] int32, the global id
    of each entry of `experts` in increasing order (ids that no token chose contribute zeros);
    acc [N, D] f32. Returns the new acc.
    """
    for i, expert in enumerate(experts):
        chosen = topk_ids == expert_ids[i]
        weight = jnp.sum(jnp.where(chosen, topk_weights, 0.0), axis=-1)
        acc = acc + weight[:, None] * expert_ffn(x, expert, act).astype(jnp.float32)
    return acc


def stacked_expert(stacked: dict, index):
    """Expert `index` (static int or traced scalar) of a layer's stacked weights."""
    return {name: weights[index] for name, weights in stacked.items()}


def device_routed_experts(x, topk_ids, topk_weights, stacked: dict, act: str = "silu"):
    """The routed-expert output [N, D] f32 with routing resolved on the device (no host round trip).

    When few (token, expert) pairs exist (decode), only the distinct chosen experts are gathered
    from `stacked` ([E, ...] per weight); otherwise every expert runs. Both orders are increasing
    expert ids, so the result equals `accumulate_experts` over the chosen experts. Ids >= E
    (pairs the router dropped) carry weight 0 and contribute zeros.
    """
    num_experts = stacked["down"].shape[0]
    n_pairs = topk_ids.size
    acc = jnp.zeros(x.shape, jnp.float32)
    if n_pairs < num_experts:
        # Unused slots get id E: no token matches it, so its (clipped, real) expert adds zeros.
        ids = jnp.unique(topk_ids, size=n_pairs, fill_value=num_experts)
        experts = [stacked_expert(stacked, jnp.minimum(ids[i], num_experts - 1)) for i in range(n_pairs)]
        return accumulate_experts(x, topk_ids, topk_weights, ids, experts, acc, act)
    experts = [stacked_expert(stacked, e) for e in range(num_experts)]
    return accumulate_experts(x, topk_ids, topk_weights, jnp.arange(num_experts), experts, acc, act)
