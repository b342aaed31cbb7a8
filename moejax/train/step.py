"""Optimizer, learning-rate schedule and the jitted train and eval steps (optax, AdamW).

Master weights stay float32; each step casts them to the model's compute dtype (`cfg.dtype`),
so gradients flow back to float32 through the cast (mixed precision).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from moejax.config import ModelConfig
from moejax.train.objective import lm_losses


def make_optimizer(weight_decay: float = 0.1, max_grad_norm: float = 1.0, b2: float = 0.95) -> optax.GradientTransformation:
    """Clipped AdamW without the learning rate (the step multiplies by it), decaying matrices only."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda a: a.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.scale_by_adam(b1=0.9, b2=b2),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
    )


def learning_rate(step: int, progress: float, peak: float, warmup_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `final_fraction * peak` as progress goes 0 -> 1.

    `progress` is the fraction of the run's budget used (time or tokens), so the decay ends when the
    budget does whatever the step rate turns out to be.
    """
    warmup = min(1.0, (step + 1) / warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return peak * warmup * (final_fraction + (1 - final_fraction) * cosine)


def sample_windows(stream, key, batch: int, length: int):
    """`batch` random windows [batch, length + 1] of a device token stream [n] int32."""
    starts = jax.random.randint(key, (batch,), 0, stream.shape[0] - length)
    return stream[starts[:, None] + jnp.arange(length + 1)[None, :]]


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, batch: int, length: int, aux_coef: float):
    """A jitted step(params, opt_state, stream, data_key, step_index, lr) -> (params, opt_state, metrics).

    Draws `batch` windows (with the key data_key folded with step_index) of `length + 1` tokens from the device stream, minimises
    cross-entropy + aux_coef * load-balancing loss; metrics: loss, cross_entropy, balance,
    grad_norm (scalars) and load [moe_layers, E] (fraction of routing choices per expert).
    params and opt_state are donated.
    """

    def objective(params, tokens):
        cross_entropy, balance, load = lm_losses(cfg, params, tokens)
        return cross_entropy + aux_coef * balance, (cross_entropy, balance, load)

    def step(params, opt_state, stream, data_key, step_index, lr):
        tokens = sample_windows(stream, jax.random.fold_in(data_key, step_index), batch, length)
        (loss, (cross_entropy, balance, load)), grads = jax.value_and_grad(objective, has_aux=True)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -lr * u, updates))
        metrics = dict(loss=loss, cross_entropy=cross_entropy, balance=balance, load=load, grad_norm=optax.tree.norm(grads))
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(cfg: ModelConfig):
    """A jitted eval(params, windows [B, T + 1]) -> (cross-entropy, balance, load [moe_layers, E])."""
    return jax.jit(lambda params, windows: lm_losses(cfg, params, windows))
