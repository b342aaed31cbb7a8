"""The generalised router (`moe.route`: softmax or sigmoid scores, greedy or group-limited top-k, correction bias,
scaling) against a naive NumPy twin, one token at a time; and the config's router fields checked with clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.errors import MoejaxError
from moejax.models.moe import forced_weights, route


def naive_route(logits, top_k, normalize, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                routed_scaling_factor=1.0, correction_bias=None):
    """Row by row with Python sorting: -> (weights [N, k], ids [N, k]), ids in decreasing order of choice score."""
    logits = np.asarray(logits, np.float64)
    all_weights, all_ids = [], []
    for row in logits:
        scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if scoring_func == "softmax" else 1 / (1 + np.exp(-row))
        choice = scores + (0 if correction_bias is None else np.asarray(correction_bias, np.float64))
        allowed = set(range(len(row)))
        if topk_method != "greedy":
            size = len(row) // n_group
            groups = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
            if topk_method == "group_limited_greedy":
                value = [max(choice[e] for e in group) for group in groups]
            else:
                value = [sum(sorted((choice[e] for e in group), reverse=True)[:2]) for group in groups]
            best = sorted(range(n_group), key=lambda g: -value[g])[:topk_group]
            allowed = {e for g in best for e in groups[g]}
        ids = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        weights = np.array([scores[e] for e in ids])
        if normalize:
            weights = weights / weights.sum()
        all_weights.append(weights * routed_scaling_factor)
        all_ids.append(ids)
    return np.array(all_weights), np.array(all_ids)


ROUTERS = {
    "softmax_greedy": dict(top_k=2, normalize=False),
    "softmax_greedy_scaled": dict(top_k=3, normalize=True, routed_scaling_factor=2.5),
    "v2_group_limited": dict(top_k=3, normalize=False, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             routed_scaling_factor=16.0),
    "v3_noaux_tc_groups": dict(top_k=4, normalize=True, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
                               topk_group=2, routed_scaling_factor=2.5, correction_bias=True),
    "v3_noaux_tc_one_group": dict(top_k=2, normalize=True, scoring_func="sigmoid", topk_method="noaux_tc",
                                  correction_bias=True),
    "sigmoid_greedy_bias_unnormalised": dict(top_k=2, normalize=False, scoring_func="sigmoid", correction_bias=True),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_route_equals_the_naive_router(name):
    rng = np.random.default_rng(sorted(ROUTERS).index(name))
    options = dict(ROUTERS[name])
    num_experts = 16
    if options.pop("correction_bias", False):
        # Large enough to change the choice: the bias must move selection, and only selection.
        options["correction_bias"] = rng.normal(size=num_experts).astype(np.float32)
    logits = (rng.normal(size=(64, num_experts)) * 2).astype(np.float32)
    top_k, normalize = options.pop("top_k"), options.pop("normalize")
    bias = options.pop("correction_bias", None)
    routed = jax.jit(lambda x, b: route(x, top_k, normalize, **options, correction_bias=b))
    weights, ids = (np.asarray(a) for a in routed(jnp.asarray(logits), None if bias is None else jnp.asarray(bias)))
    ref_weights, ref_ids = naive_route(logits, top_k, normalize, **options, correction_bias=bias)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5)
    if bias is not None:
        unbiased_ids = naive_route(logits, top_k, normalize, **options)[1]
        assert (unbiased_ids != ref_ids).any(), "the test's bias never changed a choice"


def test_group_limits_change_the_choice():
    """The group configs route differently from greedy on the same logits (a test that cannot pass by ignoring groups)."""
    logits = np.random.default_rng(7).normal(size=(64, 16)).astype(np.float32) * 2
    greedy = naive_route(logits, 3, False)[1]
    grouped = np.asarray(route(jnp.asarray(logits), 3, False, topk_method="group_limited_greedy", n_group=4,
                               topk_group=1)[1])
    assert (np.sort(greedy, axis=1) != np.sort(grouped, axis=1)).any()


def test_forced_weights_are_the_scores_of_the_given_experts_renormalised():
    logits = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    ids = np.array([[0, 3]] * 5, np.int32)
    sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = sig[:, [0, 3]] / sig[:, [0, 3]].sum(axis=1, keepdims=True) * 2.0
    np.testing.assert_allclose(np.asarray(forced_weights(jnp.asarray(logits), jnp.asarray(ids), "sigmoid", 2.0)),
                               expected, rtol=1e-6)


BASE = dict(family="mixtral", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
            num_experts=8, top_k=2, expert_intermediate_size=8, moe_layers=(True,), sliding_windows=(None,))


@pytest.mark.parametrize("fields,message", [
    ({"scoring_func": "softplus"}, "scoring_func 'softplus' is not one of softmax, sigmoid"),
    ({"topk_method": "beam"}, "topk_method 'beam' is not one of greedy, group_limited_greedy, noaux_tc"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor 0.0 must be a positive number"),
    ({"topk_method": "noaux_tc", "n_group": 3}, "n_group 3 must divide num_experts 8"),
    ({"topk_method": "noaux_tc", "n_group": 4, "topk_group": 5}, r"topk_group 5 must be in \[1, n_group=4\]"),
    ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 1}, "top_k 2 is more than"),
    ({"topk_method": "noaux_tc", "n_group": 8, "topk_group": 2}, "n_group 8 leaves 1 expert per group; topk_method noaux_tc"),
    ({"partial_rotary_factor": 0.3}, "partial_rotary_factor 0.3"),
])
def test_router_config_errors_name_the_field(fields, message):
    ModelConfig(**BASE)
    with pytest.raises(MoejaxError, match=f"^config: {message}"):
        ModelConfig(**{**BASE, **fields})


def test_router_fields_round_trip_through_json():
    cfg = ModelConfig(**{**BASE, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
                         "routed_scaling_factor": 2.5, "router_correction_bias": True, "shared_expert_gate": False,
                         "partial_rotary_factor": 0.5})
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_route_equals_transformers_deepseek_routers(model_type):
    """DeepSeek-V2's softmax router with group-limited greedy top-k and DeepSeek-V3's sigmoid router with its
    correction bias and group top-2 scores, as transformers runs them (the converters map their configs here)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=16,
                  num_experts_per_tok=3, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5)
    if model_type == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router

        config = T.DeepseekV2Config(**common, topk_method="group_limited_greedy")
        options = dict(normalize=False, topk_method="group_limited_greedy")
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router

        config = T.DeepseekV3Config(**common, norm_topk_prob=True)
        options = dict(normalize=True, scoring_func="sigmoid", topk_method="noaux_tc")
    router = Router(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.normal_(0.0, 0.3)
        hidden = torch.randn(64, 16)
        _, ref_weights, ref_ids = router(hidden)
    logits = hidden.numpy() @ router.weight.detach().numpy().T
    weights, ids = route(jnp.asarray(logits), 3, options.pop("normalize"), **options, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, correction_bias=None if bias is None else jnp.asarray(bias.numpy()))
    order = np.argsort(ref_ids.numpy(), axis=1)
    np.testing.assert_array_equal(np.sort(np.asarray(ids), axis=1), np.take_along_axis(ref_ids.numpy(), order, 1))
    ours = np.take_along_axis(np.asarray(weights), np.argsort(np.asarray(ids), axis=1), 1)
    np.testing.assert_allclose(ours, np.take_along_axis(ref_weights.numpy(), order, 1), rtol=1e-5)
