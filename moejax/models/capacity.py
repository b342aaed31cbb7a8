"""Expert-capacity routing as transformers does it for Switch Transformers and NLLB-MoE.

Tokens take an expert's capacity slots in order (token order, or descending top probability with
`batch_prioritized_routing`); a (token, expert) pair beyond the expert's capacity is dropped: it
gets weight 0 and the id E, which no expert has, so a runtime never fetches an expert for it.
Second choices queue behind all first choices of the same expert. Groups are whole sequences
(`capacity_group='sequence'`, Switch) or all tokens of the call (`'batch'`, NLLB).

Static capacity-factor gating (`capacity_slots`, `drop_over_capacity`) applies the same queue to any
family's routing: capacity C = ceil(capacity_factor x N x k / E) for a call of N tokens, pairs past it
dropped. It is the padded baseline of Huang et al.'s dynamic gating (`models.moe.capacity_experts` pads
every expert to C tokens) and it is approximate: a dropped pair's expert output is missing from its token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.encdec_config import EncDecConfig


def capacity_for(cfg: EncDecConfig, n_tokens: int) -> int:
    """Capacity in tokens per expert for a call whose groups hold `n_tokens` tokens in all (transformers' rule)."""
    if cfg.capacity_token_fraction > 0:
        return math.ceil(cfg.capacity_token_fraction * n_tokens)
    if cfg.expert_capacity is not None:
        return cfg.expert_capacity
    return 2 * math.ceil(n_tokens / cfg.num_experts)


def _normalized(probs: list, masks: list) -> list:
    total = sum(p * m for p, m in zip(probs, masks, strict=True))
    denom = jnp.maximum(total, jnp.finfo(jnp.float32).eps)
    return [p * m / denom for p, m in zip(probs, masks, strict=True)]


def _slot_positions(mask, order):
    """0-based position of each token in its expert's queue. mask [G, L, E] (0/1); order [G, L] or None."""
    if order is None:
        return jnp.cumsum(mask, axis=1) - 1
    sorted_mask = jnp.take_along_axis(mask, order[..., None], axis=1)
    sorted_slots = (jnp.cumsum(sorted_mask, axis=1) - 1) * sorted_mask
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(sorted_slots, inverse[..., None], axis=1)


def queue_positions(choices: list, counted, num_experts: int, order=None) -> list:
    """Each (token, choice) pair's 0-based place in its expert's queue: choices, one int [G, L] per choice
    rank (ids outside [0, num_experts): no expert); counted [G, L] bool: the tokens that queue. Within a group
    the tokens queue in token order (or in `order` [G, L]), every first choice ahead of every second choice
    of the same expert, and so on. -> one float32 [G, L] per choice rank (exact integers; a pair that does
    not queue gets a meaningless place)."""
    counted_f = counted[..., None].astype(jnp.float32)
    queued_before, places = 0.0, []
    for choice in choices:
        mask = jax.nn.one_hot(choice, num_experts) * counted_f
        slots = _slot_positions(mask, order) + queued_before
        expert = jnp.clip(choice, 0, num_experts - 1)
        places.append(jnp.take_along_axis(slots, expert[..., None], axis=-1)[..., 0])
        queued_before = queued_before + jnp.sum(mask, axis=1, keepdims=True)
    return places


def capacity_route(cfg: EncDecConfig, router_logits, counted, capacity):
    """router_logits [B, T, E] f32; counted [B, T] bool (tokens that take capacity); capacity int32 [].

    Returns (weights [B*T, k] f32, ids [B*T, k] int32) with dropped pairs at weight 0 and id E.
    """
    batch, length, num_experts = router_logits.shape
    if cfg.capacity_group == "batch":
        router_logits = router_logits.reshape(1, batch * length, num_experts)
        counted = counted.reshape(1, batch * length)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)

    first = jnp.argmax(probs, axis=-1)
    choices = [first]
    if cfg.top_k == 2:
        others = jnp.where(jax.nn.one_hot(first, num_experts) > 0, -jnp.inf, router_logits)
        choices.append(jnp.argmax(others, axis=-1))
    top_probs = [jnp.take_along_axis(probs, c[..., None], axis=-1)[..., 0] for c in choices]
    if cfg.norm_topk_prob and cfg.normalize_before_dropping:
        top_probs = _normalized(top_probs, [1.0] * len(choices))

    order = jnp.argsort(-jnp.max(probs, axis=-1), axis=1, stable=True) if cfg.batch_prioritized_routing else None
    keeps = [counted & (place < capacity) for place in queue_positions(choices, counted, num_experts, order)]

    keep_f = [k.astype(jnp.float32) for k in keeps]
    if cfg.norm_topk_prob and not cfg.normalize_before_dropping:
        top_probs = _normalized(top_probs, keep_f)
    weights = jnp.stack([p * k for p, k in zip(top_probs, keep_f, strict=True)], axis=-1)
    ids = jnp.stack([jnp.where(k, c, num_experts) for c, k in zip(choices, keeps, strict=True)], axis=-1)
    k = len(choices)
    return weights.reshape(batch * length, k), ids.reshape(batch * length, k).astype(jnp.int32)


def capacity_slots(capacity_factor: float, rows: int, top_k: int, num_experts: int) -> int:
    """Static gating's token slots per expert for a call of `rows` tokens: ceil(capacity_factor x rows x
    top_k / num_experts), at least 1."""
    return max(1, math.ceil(capacity_factor * rows * top_k / num_experts))


def drop_over_capacity(ids, weights, counted, capacity: int, num_experts: int):
    """Static capacity gating of one group (all N tokens of a call): ids int32 [N, k], weights f32 [N, k],
    counted bool [N] (the tokens that take capacity; None: all). Pairs of counted tokens past their expert's
    `capacity` (queued as `queue_positions` says) get id num_experts and weight 0; the others are unchanged
    (weights are not renormalised: a dropped pair's share of the output is lost, as in Switch Transformers).
    -> (ids, weights)."""
    if counted is None:
        counted = jnp.ones(ids.shape[:1], bool)
    places = queue_positions([ids[None, :, j] for j in range(ids.shape[1])], counted[None], num_experts)
    real = (ids >= 0) & (ids < num_experts)
    dropped = counted[:, None] & real & (jnp.stack([p[0] for p in places], axis=-1) >= capacity)
    return jnp.where(dropped, num_experts, ids).astype(jnp.int32), jnp.where(dropped, 0.0, weights)
