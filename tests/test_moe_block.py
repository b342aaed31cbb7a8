"""The MoE expert computation against a naive per-token, per-expert loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models.moe import accumulate_experts, device_routed_experts, expert_ffn, route


def naive_moe(x, router_logits, stacked, top_k, normalize):
    """For each token: softmax, pick the top-k experts, run each alone, add weighted outputs."""
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        logits = np.asarray(router_logits[t], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:top_k]
        weights = probs[chosen] / (probs[chosen].sum() if normalize else 1.0)
        for e, w in zip(chosen, weights):
            xt = np.asarray(x[t], np.float64)
            gate = xt @ np.asarray(stacked["gate"][e], np.float64)
            up = xt @ np.asarray(stacked["up"][e], np.float64)
            hidden = gate / (1 + np.exp(-gate)) * up
            out[t] += w * (hidden @ np.asarray(stacked["down"][e], np.float64))
    return out


def random_layer(seed, tokens, dim=16, ffn=24, experts=6):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (tokens, dim))
    logits = jax.random.normal(keys[1], (tokens, experts)) * 2
    stacked = {
        "gate": jax.random.normal(keys[2], (experts, dim, ffn)) * 0.3,
        "up": jax.random.normal(keys[3], (experts, dim, ffn)) * 0.3,
        "down": jax.random.normal(keys[4], (experts, ffn, dim)) * 0.3,
    }
    return x, logits, stacked


@pytest.mark.parametrize("layout", ["stacked", "tuple"])
@pytest.mark.parametrize("tokens,top_k,normalize", [(1, 2, True), (2, 2, False), (3, 2, False), (17, 3, True), (40, 1, False)])
def test_device_routed_equals_naive_loop(tokens, top_k, normalize, layout):
    """Covers both device paths: a switch per distinct expert (pairs < experts) and every expert on every row."""
    x, logits, stacked = random_layer(tokens, tokens)
    weights, ids = route(logits, top_k, normalize)
    experts = stacked if layout == "stacked" else tuple(_experts(stacked, range(6)))
    ours = jax.jit(device_routed_experts)(x, ids, weights, experts)
    np.testing.assert_allclose(np.asarray(ours), naive_moe(x, logits, stacked, top_k, normalize), rtol=1e-5, atol=1e-5)


def _experts(stacked, ids):
    return [{k: v[e] for k, v in stacked.items()} for e in ids]


@pytest.mark.parametrize("split", ["one", "halves", "singletons"])
def test_waves_of_experts_sum_exactly_like_one_pass(split):
    """Splitting the chosen experts into waves (in increasing id order) gives bit-identical sums."""
    x, logits, stacked = random_layer(7, 9)
    weights, ids = route(logits, 2, True)
    used = sorted(set(np.asarray(ids).ravel().tolist()))
    waves = {"one": [used], "halves": [used[: len(used) // 2], used[len(used) // 2 :]], "singletons": [[e] for e in used]}[split]
    one_pass = accumulate_experts(x, ids, weights, jnp.asarray(used), _experts(stacked, used), jnp.zeros(x.shape))
    acc = jnp.zeros(x.shape)
    for wave in waves:
        acc = accumulate_experts(x, ids, weights, jnp.asarray(wave), _experts(stacked, wave), acc)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(one_pass))


def test_expert_ffn_is_gated_silu():
    x, _, stacked = random_layer(3, 4)
    expert = {k: v[2] for k, v in stacked.items()}
    gate = np.asarray(x) @ np.asarray(expert["gate"])
    expected = (gate / (1 + np.exp(-gate)) * (np.asarray(x) @ np.asarray(expert["up"]))) @ np.asarray(expert["down"])
    np.testing.assert_allclose(np.asarray(expert_ffn(x, expert)), expected, rtol=1e-5, atol=1e-5)
