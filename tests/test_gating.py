"""Expert compute (issue 21 item 2): grouped and ragged (dropless dynamic gating) and capacity (static capacity
gating) against naive per-expert loops and against union; capacity drops exactly the pairs past capacity; through the
engine, grouped is exact and capacity labelled approximate.

Bit for bit where the design promises it: grouped computes every expert product as a block of one shape
[block_rows, D] whatever the batch, so a row's result is the same alone as in any batch (XLA:CPU rounds a
matmul's rows alike at one shape); capacity with room for every row computes union's shapes. Elsewhere
(grouped against union: blocks of block_rows rows against products of N rows, which XLA:CPU rounds differently)
allclose.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax.cli import FLAGS
from moejax.errors import ParameterError
from moejax.models.capacity import capacity_slots, drop_over_capacity
from moejax.models.moe import (
    capacity_experts, experts_from_slab, grouped_blocks, grouped_experts, ragged_experts, resolve_expert_compute, route,
)
from moejax.offload.device_cache import distinct_experts
from moejax.offload.stats import summary_line


def random_layer(seed, rows, experts, top_k, dim=16, ffn=24, plain=False):
    """(x [N, D], ids, weights, slab {name: [E, ...]}) of a random layer; plain: Switch-like experts with biases."""
    rng = np.random.default_rng(seed)
    names = {"up": (dim, ffn), "down": (ffn, dim), "up_bias": (ffn,), "down_bias": (dim,)} if plain else \
        {"gate": (dim, ffn), "up": (dim, ffn), "down": (ffn, dim)}
    slab = {name: jnp.asarray(rng.normal(size=(experts, *shape)) * 0.3, jnp.float32) for name, shape in names.items()}
    x = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    weights, ids = route(jnp.asarray(rng.normal(size=(rows, experts)) * 2, jnp.float32), top_k, normalize=not plain)
    return x, ids, weights, slab


@functools.partial(jax.jit, static_argnums=1)
def union_of(ids, experts, valid=None):
    """(distinct, slots) as the resident step program makes them (the slab holds every expert at its id)."""
    distinct = distinct_experts(ids, valid, experts, min(ids.size, experts))
    return distinct, jnp.where(distinct < experts, distinct, -1)


def naive_moe(x, ids, weights, slab, act, keep):
    """Float64, one (row, expert) pair at a time: sum over the kept pairs of weight x expert(row)."""
    x, ids, weights = np.asarray(x, np.float64), np.asarray(ids), np.asarray(weights, np.float64)
    w = {name: np.asarray(v, np.float64) for name, v in slab.items()}
    out = np.zeros(x.shape)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if not keep[n, j]:
                continue
            e = ids[n, j]
            if "gate" in w:
                gate = x[n] @ w["gate"][e]
                hidden = gate / (1 + np.exp(-gate)) * (x[n] @ w["up"][e])
                out[n] += weights[n, j] * (hidden @ w["down"][e])
            else:
                hidden = np.maximum(x[n] @ w["up"][e] + w["up_bias"][e], 0)
                out[n] += weights[n, j] * (hidden @ w["down"][e] + w["down_bias"][e])
    return out


# (rows, experts, top_k, block_rows, plain): decode batches (1, 6 rows) and prefill chunks (37, 130 rows), blocks
# smaller and larger than an expert's pairs, Switch-like top-1 plain experts with biases.
CASES = [(1, 8, 2, 64, False), (6, 6, 3, 2, False), (37, 8, 2, 8, False), (130, 16, 4, 64, False), (40, 32, 1, 4, True)]


@pytest.mark.parametrize("rows,experts,top_k,block_rows,plain", CASES)
def test_grouped_and_ragged_equal_naive_loop_and_union(rows, experts, top_k, block_rows, plain):
    x, ids, weights, slab = random_layer(rows, rows, experts, top_k, plain=plain)
    act = "relu" if plain else "silu"
    distinct, slots = union_of(ids, experts)
    grouped = jax.jit(grouped_experts, static_argnames=("act", "block_rows"))(
        x, ids, weights, distinct, slots, slab, act, block_rows=block_rows)
    expected = naive_moe(x, ids, weights, slab, act, np.ones(ids.shape, bool))
    np.testing.assert_allclose(np.asarray(grouped), expected, rtol=1e-5, atol=1e-5)
    union = jax.jit(experts_from_slab, static_argnames="act")(x, ids, weights, distinct, slots, slab, act)
    # Not bitwise: union's products have `rows` rows, grouped's block_rows, and XLA:CPU rounds them differently.
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(union), rtol=1e-6, atol=1e-6)
    ragged = jax.jit(ragged_experts, static_argnames="act")(x, ids, weights, distinct, slots, slab, act)
    np.testing.assert_allclose(np.asarray(ragged), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,experts,top_k,block_rows,plain", CASES[1:])
def test_a_row_gets_the_same_bits_alone_as_in_a_batch_under_grouped(rows, experts, top_k, block_rows, plain):
    """Each row of a batch computed alone (its own distinct experts, a step of one row) equals its row of the batch,
    bit for bit; and rows marked invalid get nothing and change nothing."""
    x, ids, weights, slab = random_layer(rows + 1, rows, experts, top_k, plain=plain)
    act = "relu" if plain else "silu"
    run = jax.jit(grouped_experts, static_argnames=("act", "block_rows"))
    valid = jnp.arange(rows) % 3 != 1
    distinct, slots = union_of(ids, experts, valid)
    batch = np.asarray(run(x, ids, weights, distinct, slots, slab, act, valid_rows=valid, block_rows=block_rows))
    for n in range(rows):
        alone = run(x[n : n + 1], ids[n : n + 1], weights[n : n + 1], *union_of(ids[n : n + 1], experts), slab, act,
                    block_rows=block_rows)
        np.testing.assert_array_equal(batch[n], np.asarray(alone)[0] if valid[n] else 0.0, err_msg=f"row {n}")


def test_capacity_with_room_for_every_row_is_union_bit_for_bit():
    """capacity = rows: nothing dropped, and the padded [U, rows] products are union's own shapes."""
    x, ids, weights, slab = random_layer(3, 24, 8, 2)
    distinct, slots = union_of(ids, 8)
    padded = jax.jit(capacity_experts, static_argnums=6)(x, ids, weights, distinct, slots, slab, 24)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(experts_from_slab(x, ids, weights, distinct, slots, slab)))


def test_capacity_drops_exactly_the_pairs_past_capacity():
    """By hand, capacity 2: first choices queue in row order, then second choices. Row 1 is padding (takes no
    capacity). Expert 0: rows 0, 2 (first choices), row 3's second choice third: dropped. Expert 1: row 3 (first),
    rows 0, 2 (second): row 2's dropped. Experts 2, 3: room."""
    E = 4
    ids = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0], [3, 2]], jnp.int32)
    weights = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2], [0.9, 0.1]], jnp.float32)
    valid = jnp.array([True, False, True, True, True])
    kept_ids, kept_weights = drop_over_capacity(ids, weights, valid, 2, E)
    dropped = np.zeros((5, 2), bool)
    dropped[2, 1] = dropped[3, 1] = True
    np.testing.assert_array_equal(np.asarray(kept_ids), np.where(dropped, E, np.asarray(ids)))
    np.testing.assert_array_equal(np.asarray(kept_weights), np.where(dropped, 0.0, np.asarray(weights)))
    assert capacity_slots(1.25, 5, 2, 4) == 4 and capacity_slots(0.01, 5, 2, 4) == 1

    # The padded compute on the gated routing computes exactly the kept pairs of valid rows.
    x, _, _, slab = random_layer(5, 5, E, 2)
    distinct, slots = union_of(kept_ids, E, valid)
    out = jax.jit(capacity_experts, static_argnums=6)(x, kept_ids, kept_weights, distinct, slots, slab, 2, valid_rows=valid)
    keep = ~dropped & np.asarray(valid)[:, None]
    np.testing.assert_allclose(np.asarray(out), naive_moe(x, ids, weights, slab, "silu", keep), rtol=1e-5, atol=1e-6)
    # Without the gating first, the compute alone drops the same pairs (a full expert's later pairs get no slot).
    all_rows = jax.jit(capacity_experts, static_argnums=6)(x, ids, weights, *union_of(ids, E, valid), slab, 2, valid_rows=valid)
    np.testing.assert_array_equal(np.asarray(all_rows), np.asarray(out))


def test_block_count_bounds_and_auto_rule():
    # Mixtral-like 1024 rows: 2048 pairs over 8 experts in blocks of 64: 32 full blocks + 7 cut short at most.
    assert grouped_blocks(1024, 2, 8, 64) == 39
    assert grouped_blocks(1, 2, 2, 64) == 2  # each expert one block
    assert grouped_blocks(3, 2, 6, 64) == 6
    assert [resolve_expert_compute("auto", n) for n in (1, 63, 64, 512)] == ["union", "union", "grouped", "grouped"]
    assert resolve_expert_compute("capacity", 1) == "capacity"
    # where the in-place kernels run: a decode step's few rows in place, more rows as before
    assert [resolve_expert_compute("auto", n, inplace=True) for n in (1, 16, 17, 64)] == [
        "inplace", "inplace", "union", "grouped"]
    assert resolve_expert_compute("union", 1, inplace=True) == "union"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(("mixtral", "basic"), tmp_path_factory.mktemp("gating"))[2]


def test_capacity_engine_is_labelled_and_with_room_equals_union(ckpt):
    """Through the engine: capacity with room for every pair (factor E / k) is union bit for bit; its stats and
    summary line say it is approximate; a small factor drops pairs and changes the logits."""
    union = moejax.load(ckpt, expert_compute="union", slots=2, max_seq_len=32)
    cfg = union.cfg
    prompts = random_prompts(cfg.vocab_size, [9, 5], seed=3)
    roomy = moejax.load(ckpt, expert_compute="capacity", capacity_factor=cfg.num_experts / cfg.top_k, slots=2, max_seq_len=32)
    union_logits = union.logits(prompts)
    for ours, ref in zip(roomy.logits(prompts), union_logits, strict=True):
        np.testing.assert_array_equal(ours, ref)
    tight = moejax.load(ckpt, expert_compute="capacity", capacity_factor=0.5, slots=2, max_seq_len=32)
    result = tight.generate(prompts, max_new_tokens=2)
    assert result.stats["expert_compute"] == "capacity" and result.stats["capacity_factor"] == 0.5
    assert "approximate" in summary_line(result.stats, 4)
    assert not np.array_equal(tight.logits(prompts[:1])[0], union_logits[0])
    routing, _ = tight.routing(0)  # the dropped pairs are recorded as no expert
    assert (routing == cfg.num_experts).any()


def test_ragged_engine_in_cached_mode_is_union_to_the_last_bits(ckpt):
    union = moejax.load(ckpt, expert_compute="union", slots=2, max_seq_len=32)
    cfg = union.cfg
    ragged = moejax.load(ckpt, "cached", expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B", expert_compute="ragged",
                         slots=2, max_seq_len=32)
    prompts = random_prompts(cfg.vocab_size, [9, 5], seed=3)
    for ours, ref in zip(ragged.logits(prompts), union.logits(prompts), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert ragged.generate(prompts, max_new_tokens=3).tokens == union.generate(prompts, max_new_tokens=3).tokens


def test_expert_compute_errors_name_the_parameter():
    with pytest.raises(ParameterError,
                       match="expert_compute 'dense' is not one of auto, union, grouped, ragged, capacity, inplace"):
        moejax.load(moejax.SHIPPED_CHECKPOINT, expert_compute="dense")
    with pytest.raises(ParameterError, match="capacity_factor applies to expert_compute 'capacity', not 'grouped'"):
        moejax.load(moejax.SHIPPED_CHECKPOINT, expert_compute="grouped", capacity_factor=1.0)
    with pytest.raises(ParameterError, match=r"capacity_factor must be > 0 \(got 0\)") as err:
        moejax.load(moejax.SHIPPED_CHECKPOINT, expert_compute="capacity", capacity_factor=0)
    assert err.value.render(FLAGS).startswith("capacity_factor")  # library only: no flag
    with pytest.raises(ParameterError) as err:
        moejax.load(moejax.SHIPPED_CHECKPOINT, expert_compute="x")
    assert err.value.render(FLAGS).startswith("--expert-compute 'x'")
