"""Encoder-decoder building blocks against obviously-right twins: naive expert loops, transformers'
own routers, position buckets and sinusoids, sparse-layer patterns and tied-table decisions."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from scipy.special import erf
from hf_zoo_encdec import build
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSinusoidalPositionalEmbedding, NllbMoeTop2Router
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersAttention,
    SwitchTransformersTop1Router,
)

from moejax.convert.converter import index_tensors, read_hf_config
from moejax.convert.families import nllb_moe, switch_transformers
from moejax.convert.safetensors_file import read_tensor, write_file
from moejax.models.capacity import capacity_for, capacity_route
from moejax.models.positions import relative_bucket_table, sinusoidal_positions
from moejax.models.moe import accumulate_experts, device_routed_experts, route

# -- the MoE block with plain (fc1/fc2) experts ------------------------------------------------


def plain_experts(rng, experts=5, dim=8, ffn=12, bias=True):
    stacked = {"up": rng.normal(size=(experts, dim, ffn)) * 0.4, "down": rng.normal(size=(experts, ffn, dim)) * 0.4}
    if bias:
        stacked.update(up_bias=rng.normal(size=(experts, ffn)) * 0.4, down_bias=rng.normal(size=(experts, dim)) * 0.4)
    return {k: v.astype(np.float32) for k, v in stacked.items()}


NUMPY_ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, 0.0),
    "gelu": lambda h: 0.5 * h * (1.0 + erf(h / np.sqrt(2.0))),
    "gelu_new": lambda h: 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3))),
}


def naive_plain_moe(x, ids, weights, stacked, act):
    """Token by token, expert by expert, in float64 NumPy; ids >= E (dropped) are skipped."""
    act_fn = NUMPY_ACTIVATIONS[act]
    w = {k: np.asarray(v, np.float64) for k, v in stacked.items()}
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for e, weight in zip(np.asarray(ids[t]), np.asarray(weights[t])):
            if e >= w["up"].shape[0]:
                continue
            hidden = np.asarray(x[t], np.float64) @ w["up"][e] + (w["up_bias"][e] if "up_bias" in w else 0)
            y = act_fn(hidden) @ w["down"][e]
            out[t] += weight * (y + (w["down_bias"][e] if "down_bias" in w else 0))
    return out


@pytest.mark.parametrize("tokens,top_k,bias,act", [(1, 2, True, "relu"), (3, 1, False, "gelu_new"), (19, 2, True, "gelu")])
def test_plain_experts_equal_naive_loop(tokens, top_k, bias, act):
    rng = np.random.default_rng(tokens)
    stacked = plain_experts(rng, bias=bias)
    x = rng.normal(size=(tokens, 8)).astype(np.float32)
    weights, ids = (np.array(a) for a in jax.jit(route, static_argnums=(1, 2))(rng.normal(size=(tokens, 5)) * 2, top_k, top_k > 1))
    ids[0, 0], weights[0, 0] = 5, 0.0  # a dropped pair: id E, which no expert has
    expected = naive_plain_moe(x, ids, weights, stacked, act)
    device_routed = jax.jit(device_routed_experts, static_argnums=4)
    np.testing.assert_allclose(np.asarray(device_routed(x, ids, weights, stacked, act)), expected, rtol=1e-5, atol=1e-5)
    used = sorted(set(np.asarray(ids).ravel().tolist()) - {5})
    accumulate = jax.jit(accumulate_experts, static_argnums=6)
    acc = np.zeros(x.shape, np.float32)
    for e in used:  # one expert per wave, as an offloading runtime may pass them
        acc = accumulate(x, ids, weights, np.array([e]), ({k: v[e] for k, v in stacked.items()},), acc, act)
    np.testing.assert_allclose(np.asarray(acc), expected, rtol=1e-5, atol=1e-5)


# -- capacity routing against transformers' routers --------------------------------------------


def switch_cfg(**overrides):
    hf = {"model_type": "switch_transformers", "vocab_size": 10, "d_model": 8, "d_kv": 4, "num_heads": 2, "d_ff": 8,
          "num_layers": 1, "num_experts": 4, "decoder_start_token_id": 0, **overrides}
    return switch_transformers.config_from_hf(hf).replace(routing="capacity"), T.SwitchTransformersConfig(**hf)


def nllb_cfg(**overrides):
    hf = {"model_type": "nllb-moe", "vocab_size": 10, "d_model": 8, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
          "encoder_ffn_dim": 8, "decoder_ffn_dim": 8, "encoder_layers": 1, "decoder_layers": 1, "num_experts": 4, **overrides}
    return nllb_moe.config_from_hf(hf).replace(routing="capacity"), T.NllbMoeConfig(**hf)


def test_switch_capacity_matches_transformers_router():
    cfg, hf_cfg = switch_cfg(expert_capacity=2)
    router = SwitchTransformersTop1Router(hf_cfg).eval()
    hidden = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask, probs, logits = router(hidden)
    weights, ids = capacity_route(cfg, jnp.asarray(logits.numpy()), jnp.ones((3, 9), bool), capacity_for(cfg, 9))
    kept = mask.sum(-1).reshape(-1).numpy() > 0
    assert (~kept).any(), "no token was dropped"
    np.testing.assert_array_equal(np.asarray(ids[:, 0]), np.where(kept, mask.argmax(-1).reshape(-1).numpy(), 4))
    np.testing.assert_allclose(np.asarray(weights[:, 0]), np.where(kept, probs.reshape(-1).numpy(), 0), rtol=1e-6)


@pytest.mark.parametrize("options", [
    dict(moe_eval_capacity_token_fraction=0.3),
    dict(moe_eval_capacity_token_fraction=0.4, batch_prioritized_routing=True),
    dict(moe_eval_capacity_token_fraction=-1.0, expert_capacity=3, normalize_router_prob_before_dropping=True),
    dict(moe_eval_capacity_token_fraction=0.25, batch_prioritized_routing=True, padding=True),
], ids=["fraction", "prioritized", "fixed-normalized-early", "padding"])
def test_nllb_capacity_matches_transformers_router(options):
    options = dict(options)
    padding = options.pop("padding", False)
    cfg, hf_cfg = nllb_cfg(**options)
    router = NllbMoeTop2Router(hf_cfg).eval()
    logits = torch.randn(2 * 8, 4, generator=torch.Generator().manual_seed(1)) * 2
    counted = np.ones((2, 8), bool)
    pad_mask = None
    if padding:  # the last 3 tokens of row 1 are padding, which transformers neither routes nor counts
        counted[1, 5:] = False
        pad_mask = torch.tensor(~counted.reshape(-1))
    with torch.no_grad():
        _, gates = router.route_tokens(logits.clone(), torch.float32, pad_mask)
    capacity = capacity_for(cfg, 16)  # transformers counts every token of the call, padding included
    weights, ids = capacity_route(cfg, jnp.asarray(logits.numpy()).reshape(2, 8, 4), jnp.asarray(counted), capacity)
    ours = np.zeros((16, 5), np.float32)
    np.add.at(ours, (np.arange(16)[:, None].repeat(2, 1), np.asarray(ids)), np.asarray(weights))
    np.testing.assert_allclose(ours[:, :4], gates.numpy(), rtol=1e-6, atol=1e-7)
    assert (np.asarray(ids)[counted.reshape(-1)] == 4).any(), "no pair was dropped"


# -- positions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("buckets,distance", [(8, 20), (32, 128), (16, 9)])
def test_relative_buckets_match_transformers(buckets, distance):
    rel = torch.arange(-3 * distance, 3 * distance + 1)
    for bidirectional in (True, False):
        table = relative_bucket_table(bidirectional, buckets, distance)
        ours = table[np.clip(rel.numpy(), -distance, distance) + distance]
        ref = SwitchTransformersAttention._relative_position_bucket(rel, bidirectional, buckets, distance).numpy()
        np.testing.assert_array_equal(ours, ref)


def test_sinusoidal_positions_match_transformers():
    dim, pad = 10, 1
    table = NllbMoeSinusoidalPositionalEmbedding(64, dim, pad)
    tokens = torch.tensor([[5, 7, 1, 9, 1, 1], [4, 4, 4, 4, 4, 4]])  # pad tokens inside and after a row
    for past in (0, 5):
        ref = table(tokens, None, past).numpy()  # the offset keyword was renamed in transformers 5.2x
        ours = sinusoidal_positions(jnp.asarray(tokens.numpy()), jnp.full((2,), past, jnp.int32), pad, dim)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)


# -- sparse-layer patterns and tied tables -----------------------------------------------------


@pytest.mark.parametrize("layers,sparse", [(4, 2), (3, 3), (5, 0), (1, 0), (2, 5), (6, 4)])
def test_switch_sparse_layers_match_transformers(layers, sparse):
    cfg, hf_cfg = switch_cfg(num_layers=layers, num_decoder_layers=layers, num_sparse_encoder_layers=sparse,
                             num_sparse_decoder_layers=sparse)
    model = T.SwitchTransformersModel(hf_cfg)
    expected = [b.is_sparse for b in model.encoder.block] + [b.is_sparse for b in model.decoder.block]
    assert list(cfg.moe_layers) == expected


@pytest.mark.parametrize("layers,step", [(4, 2), (3, 1), (5, 4), (2, 0)])
def test_nllb_sparse_layers_match_transformers(layers, step):
    cfg, hf_cfg = nllb_cfg(encoder_layers=layers, decoder_layers=layers, encoder_sparse_step=step, decoder_sparse_step=step)
    model = T.NllbMoeModel(hf_cfg)
    expected = [layer.is_sparse for layer in model.encoder.layers] + [layer.is_sparse for layer in model.decoder.layers]
    assert list(cfg.moe_layers) == expected


@pytest.mark.parametrize("variant", ["separate-lm-head", "equal-copies", "no-shared"])
def test_tied_tables_resolve_as_transformers_ties_them(variant, tmp_path_factory, tmp_path):
    """Rewrites a tied checkpoint's tables; the tables moejax keeps separate are those transformers leaves untied."""
    _, tied_dir, _ = build(("switch_transformers", "basic"), tmp_path_factory.getbasetemp())
    hf_dir = shutil.copytree(tied_dir, tmp_path / "hf")
    tensors = {name: read_tensor(info) for name, info in index_tensors(hf_dir).items()}
    shared = tensors["shared.weight"]
    if variant == "separate-lm-head":
        tensors["lm_head.weight"] = shared[::-1].copy()
    elif variant == "equal-copies":
        tensors["encoder.embed_tokens.weight"] = shared.copy()
        tensors["lm_head.weight"] = shared.copy()
    else:
        tensors["decoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    write_file(hf_dir / "model.safetensors", tensors)
    cfg, targets, ignored = switch_transformers.resolve_tensors(
        switch_transformers.config_from_hf(read_hf_config(hf_dir)), index_tensors(hf_dir)
    )
    model = T.AutoModelForSeq2SeqLM.from_pretrained(hf_dir)
    hf_separate = {name for name, module in (("encoder_embed", model.encoder.embed_tokens), ("decoder_embed", model.decoder.embed_tokens),
                                             ("lm_head", model.lm_head)) if module.weight is not model.shared.weight}
    assert set(cfg.own_tables) == hf_separate
    assert set(targets) | ignored == set(tensors)
    table = {"separate-lm-head": "shared.weight", "equal-copies": "shared.weight", "no-shared": "decoder.embed_tokens.weight"}[variant]
    assert targets[table].path == ("shared", "embedding")
