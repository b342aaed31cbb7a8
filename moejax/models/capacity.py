"""Expert-capacity routing as transformers does it for Switch Transformers and NLLB-MoE.

Tokens take an expert's capacity slots in order (token order, or descending top probability with
`batch_prioritized_routing`); a (token, expert) pair beyond the expert's capacity is dropped: it
gets weight 0 and the id E, which no expert has, so a runtime never fetches an expert for it.
Second choices queue behind all first choices of the same expert. Groups are whole sequences
(`capacity_group='sequence'`, Switch) or all tokens of the call (`'batch'`, NLLB).
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


def capacity_route(cfg: EncDecConfig, router_logits, counted, capacity):
    """router_logits [B, T, E] f32; counted [B, T] bool (tokens that take capacity); capacity int32 [].

    Returns (weights [B*T, k] f32, ids [B*T, k] int32) with dropped pairs at weight 0 and id E.
    """
    batch, length, num_experts = router_logits.shape
    if cfg.capacity_group == "batch":
        router_logits = router_logits.reshape(1, batch * length, num_experts)
        counted = counted.reshape(1, batch * length)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    counted_f = counted[..., None].astype(jnp.float32)

    first = jnp.argmax(probs, axis=-1)
    choices = [first]
    if cfg.top_k == 2:
        others = jnp.where(jax.nn.one_hot(first, num_experts) > 0, -jnp.inf, router_logits)
        choices.append(jnp.argmax(others, axis=-1))
    top_probs = [jnp.take_along_axis(probs, c[..., None], axis=-1)[..., 0] for c in choices]
    if cfg.norm_topk_prob and cfg.normalize_before_dropping:
        top_probs = _normalized(top_probs, [1.0] * len(choices))

    order = jnp.argsort(-jnp.max(probs, axis=-1), axis=1, stable=True) if cfg.batch_prioritized_routing else None
    queued_before = 0.0
    keeps = []
    for choice in choices:
        mask = jax.nn.one_hot(choice, num_experts) * counted_f
        slots = _slot_positions(mask, order) + queued_before
        slot = jnp.take_along_axis(slots, choice[..., None], axis=-1)[..., 0]
        keeps.append(counted & (slot < capacity))
        queued_before = queued_before + jnp.sum(mask, axis=1, keepdims=True)

    keep_f = [k.astype(jnp.float32) for k in keeps]
    if cfg.norm_topk_prob and not cfg.normalize_before_dropping:
        top_probs = _normalized(top_probs, keep_f)
    weights = jnp.stack([p * k for p, k in zip(top_probs, keep_f, strict=True)], axis=-1)
    ids = jnp.stack([jnp.where(k, c, num_experts) for c, k in zip(choices, keeps, strict=True)], axis=-1)
    k = len(choices)
    return weights.reshape(batch * length, k), ids.reshape(batch * length, k).astype(jnp.int32)
