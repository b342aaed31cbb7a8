"""The whole-model program (`moejax.models.decoder.forward`: every layer in one program, routing on the device,
all experts in memory) run on a checkpoint: the reference the step engine is held to.

Prompts go in one batch, right-padded to `LENGTH` positions (causal attention hides the padding): one
compiled program per model, whatever the prompts. Greedy decoding reruns the whole sequence per token.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from moejax import checkpoint
from moejax.models.decoder import empty_kv_caches, forward, forward_with_router_logits
from moejax.models.moe import route

LENGTH = 32  # positions of every batch: longest prompt + new tokens must fit


@functools.lru_cache(maxsize=None)
def _model(ckpt: Path):
    cfg = checkpoint.load_config(ckpt)
    globals_ = checkpoint.load_globals(ckpt)
    layers = [checkpoint.load_layer(ckpt, i) for i in range(cfg.num_layers)]
    experts = [checkpoint.load_stacked_experts(ckpt, cfg, i) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)]
    return cfg, jax.device_put((globals_, layers, experts))


def _positions(tokens):
    return np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, weights, tokens):
    logits, _ = forward(cfg, *weights, tokens, empty_kv_caches(cfg, *tokens.shape), _positions(tokens))
    return logits


@functools.partial(jax.jit, static_argnums=0)
def _routing(cfg, weights, tokens):
    _, _, router_logits = forward_with_router_logits(cfg, *weights, tokens, empty_kv_caches(cfg, *tokens.shape),
                                                     _positions(tokens))
    routers = [weights[1][i]["router"] for i in cfg.moe_layer_ids]
    return [route(logits, cfg.top_k, cfg.norm_topk_prob, **cfg.router_options,
                  correction_bias=router.get("e_score_correction_bias"))[1]
            for logits, router in zip(router_logits, routers, strict=True)]


def _padded(sequences: list[list[int]]) -> np.ndarray:
    assert max(map(len, sequences)) <= LENGTH
    tokens = np.zeros((len(sequences), LENGTH), np.int32)
    for b, ids in enumerate(sequences):
        tokens[b, : len(ids)] = ids
    return tokens


def _padded_logits(ckpt: Path, sequences: list[list[int]]) -> np.ndarray:
    cfg, weights = _model(ckpt)
    return np.asarray(_logits(cfg, weights, _padded(sequences)))


def whole_model_logits(ckpt: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """Full-sequence logits [len, V] float32 per prompt."""
    logits = _padded_logits(ckpt, prompts)
    return [logits[b, : len(prompt)] for b, prompt in enumerate(prompts)]


def whole_model_greedy(ckpt: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """`new_tokens` greedy tokens per prompt."""
    sequences = [list(prompt) for prompt in prompts]
    for _ in range(new_tokens):
        logits = _padded_logits(ckpt, sequences)
        for b, ids in enumerate(sequences):
            ids.append(int(np.argmax(logits[b, len(ids) - 1])))
    return [ids[len(prompt):] for ids, prompt in zip(sequences, prompts, strict=True)]


def whole_model_routing(ckpt: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    """The experts each MoE layer's router picks for every token: int32 [MoE layers, len, k] per sequence."""
    cfg, weights = _model(ckpt)
    ids = np.stack([np.asarray(layer).reshape(len(sequences), LENGTH, cfg.top_k)
                    for layer in _routing(cfg, weights, _padded(sequences))])
    return [ids[:, b, : len(seq)] for b, seq in enumerate(sequences)]
