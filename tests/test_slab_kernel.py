"""The in-place expert compute (`kernels.slab_experts`, expert_compute 'inplace'), in the Pallas interpreter on the
CPU: its per-expert outputs against gather + einsum (`batched_expert_ffn` on `gathered` weights) for gated, plain,
biased and gpt-oss experts, padding slots, split and row-blocked tilings; through the engine, the same tokens and
logits bit for bit in every offload mode, and union's within float32 rounding.

Tolerance: f32 slabs, rtol = atol = 1e-5 (the kernels multiply at full f32 precision and add the K tiles in
another order than XLA's dot); bf16 slabs, 1e-2 of the largest output against the f32 computation on the same
values (the kernels round only the hidden units to bf16; union also rounds each projection).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax.errors import ParameterError
from moejax.kernels.slab_experts import (Tiling, choose_tiling, grouped_inplace_experts, inplace_problem, pallas_triton,
                                         slab_expert_outputs)
from moejax.models.moe import ClampedSwiGLU, batched_expert_ffn, experts_from_slab, gathered, route, routed_experts
from moejax.offload.device_cache import distinct_experts

SLAB_SHAPES = {
    "gated": {"gate": "DF", "up": "DF", "down": "FD"},
    "plain": {"up": "DF", "down": "FD", "up_bias": "F", "down_bias": "D"},
    "gpt-oss": {"gate": "DF", "up": "DF", "down": "FD", "gate_bias": "F", "up_bias": "F", "down_bias": "D"},
}
ACTS = {"gated": "silu", "plain": "gelu", "gpt-oss": ClampedSwiGLU(alpha=1.3, limit=0.6)}


def random_slab(kind, slots=6, dim=32, ffn=48, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"D": dim, "F": ffn}
    return {name: jnp.asarray(rng.normal(size=(slots, *(sizes[a] for a in axes))) * 0.3, dtype)
            for name, axes in SLAB_SHAPES[kind].items()}


@functools.partial(jax.jit, static_argnames=("act", "tilings"))
def kernel_outputs(x, slab, slots, act, tilings=None):
    return slab_expert_outputs(x, slab, slots, act, tilings=tilings)


# (kind, rows, slots, tilings): decode rows with the default tiling; K split in 2 and 3 row blocks of 16 (40 rows);
# padding slots (-1) among the chosen.
CASES = [("gated", 1, (4, 1), None), ("gated", 40, (5, 0, 2), (Tiling(16, 16, 16, 2), Tiling(16, 32, 16, 3))),
         ("plain", 6, (3, -1, 0, -1), None), ("gpt-oss", 9, (2, 5, -1), (Tiling(16, 16, 16, 2), Tiling(16, 16, 16, 1)))]


@pytest.mark.parametrize("kind,rows,slots,tilings", CASES)
def test_kernel_outputs_equal_gather_and_einsum(kind, rows, slots, tilings):
    slab = random_slab(kind)
    x = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, 32)), jnp.float32)
    slots = jnp.asarray(slots, jnp.int32)
    ours = np.asarray(kernel_outputs(x, slab, slots, ACTS[kind], tilings))
    expected = np.asarray(batched_expert_ffn(x, gathered(slab, slots), ACTS[kind]))
    chosen = np.asarray(slots) >= 0
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours[chosen], expected[chosen], rtol=1e-5, atol=1e-5)
    assert not ours[~chosen].any()  # padding: zeros, nothing read


def test_bf16_slab_within_bf16_rounding():
    """bf16 weights and rows: the f32 computation on the same values, but for the hidden units rounded to bf16 (and
    closer to it than union, which rounds each projection to bf16 too)."""
    slab = random_slab("gated", dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32)), jnp.bfloat16)
    slots = jnp.asarray([1, 4], jnp.int32)
    ours = np.asarray(kernel_outputs(x, slab, slots, "silu"))
    as_f32 = {name: w.astype(jnp.float32) for name, w in gathered(slab, slots).items()}
    exact = np.asarray(batched_expert_ffn(x.astype(jnp.float32), as_f32, "silu"))
    union = np.asarray(batched_expert_ffn(x, gathered(slab, slots), "silu"), np.float32)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-2 * scale)
    assert np.abs(ours - exact).max() < np.abs(union - exact).max()


def test_inplace_compute_adds_rows_like_union():
    """routed_experts 'inplace' against union on a routed layer (each row's experts weighted and added alike)."""
    slab = random_slab("gated", slots=8)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 32)), jnp.float32)
    weights, ids = route(jnp.asarray(rng.normal(size=(5, 8)) * 2, jnp.float32), 2, normalize=True)
    distinct = distinct_experts(ids, None, 8, 10)  # 10 entries: padding among them
    slots = jnp.where(distinct < 8, distinct, -1)
    ours = jax.jit(functools.partial(routed_experts, "inplace"))(x, ids, weights, distinct, slots, slab)
    np.testing.assert_allclose(ours, experts_from_slab(x, ids, weights, distinct, slots, slab), rtol=1e-5, atol=1e-5)


def test_grouped_inplace_equals_grouped():
    """'grouped-inplace' against grouped's loop on the same blocks: several blocks per expert (blocks of 4 rows),
    rows left out (valid_rows), padding among the distinct experts, a plain slab with biases."""
    slab = random_slab("plain", slots=8)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(13, 32)), jnp.float32)
    weights, ids = route(jnp.asarray(rng.normal(size=(13, 8)) * 2, jnp.float32), 2, normalize=True)
    valid = jnp.asarray(rng.random(13) < 0.8)
    distinct = distinct_experts(ids, valid, 8, 10)
    slots = jnp.where(distinct < 8, (distinct * 3) % 8, -1)  # the experts anywhere in the slab
    run = lambda how: np.asarray(jax.jit(functools.partial(routed_experts, how, act="gelu", block_rows=4))(  # noqa: E731
        x, ids, weights, distinct, slots, slab, valid_rows=valid))
    ours, loop = run("grouped-inplace"), run("grouped")
    np.testing.assert_allclose(ours, loop, rtol=1e-5, atol=1e-5)
    assert not ours[~np.asarray(valid)].any() and ours[np.asarray(valid)].any()


def test_tiling_of_the_measured_shapes():
    """Power-of-two tiles >= 16 that divide the matrices of Mixtral, DeepSeek-V2-Lite and Qwen3-30B-A3B experts;
    the reduction split where a decode step has few programs (Mixtral's down projection: 128 without)."""
    for experts, dim, ffn in ((2, 4096, 14336), (6, 2048, 1408), (8, 2048, 768)):
        for k, cols in ((dim, ffn), (ffn, dim)):
            t = choose_tiling(experts, 1, k, cols)
            for tile in (t.block_rows, t.block_cols, t.block_k):
                assert tile >= 16 and tile & (tile - 1) == 0
            assert cols % t.block_cols == 0 and k % (t.block_k * t.splits) == 0
    assert choose_tiling(2, 1, 14336, 4096).splits == 2
    assert choose_tiling(2, 40, 64, 64).block_rows == 64 and choose_tiling(2, 3, 64, 64).block_rows == 16


def test_what_inplace_refuses():
    shapes = {name: ((32, 48), np.dtype(np.float32)) for name in ("gate", "up")}
    assert inplace_problem(shapes, on_gpu=True) is None
    assert "multiples of 16 on the GPU, not [24]" in inplace_problem({"down": ((24, 32), np.float32)}, on_gpu=True)
    assert inplace_problem({"down": ((24, 32), np.float32)}, on_gpu=False) is None  # the interpreter takes any tile
    with pytest.raises(ParameterError, match="expert_compute 'inplace' reads float experts in place; compact int8/int4"):
        moejax.load(moejax.SHIPPED_CHECKPOINT, expert_compute="inplace", expert_format="int4")


@pytest.mark.skipif(pallas_triton is None, reason="this jax has no Pallas Triton backend")
def test_kernels_lower_to_triton_for_cuda_at_real_shapes():
    """The GPU path up to Triton IR, on the CPU (no PTX): power-of-two tiles, every primitive with a Triton lowering
    rule, at Mixtral's whole-model slab (over 4 GiB per weight: 64-bit offsets), DeepSeek-V2-Lite with 8 rows, a
    Qwen3-sized f32 plain slab with biases and 40 rows (row blocks), gpt-oss's ClampedSwiGLU (D = F = 2880)."""
    cases = [(64, 4096, 14336, 2, 1, jnp.bfloat16, "gated", "silu"), (64, 2048, 1408, 6, 8, jnp.bfloat16, "gated", "silu"),
             (128, 2048, 768, 8, 40, jnp.float32, "plain", "gelu"), (4, 2880, 2880, 4, 3, jnp.bfloat16, "gpt-oss", ACTS["gpt-oss"])]
    for slots, dim, ffn, chosen, rows, dtype, kind, act in cases:
        sizes = {"D": dim, "F": ffn}
        slab = {name: jax.ShapeDtypeStruct((slots, *(sizes[a] for a in axes)), dtype)
                for name, axes in SLAB_SHAPES[kind].items()}
        args = jax.ShapeDtypeStruct((rows, dim), dtype), slab, jax.ShapeDtypeStruct((chosen,), jnp.int32)
        compute = jax.jit(lambda x, slab, slots: slab_expert_outputs(x, slab, slots, act, interpret=False))  # noqa: B023
        text = compute.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 2, (kind, dim)  # gate/up and down: two kernels
    # grouped-inplace on a DeepSeek-V2-Lite layer: a prompt chunk of 128 rows in blocks of 64 pairs
    rows, slab = 128, {name: jax.ShapeDtypeStruct((64, *({"D": 2048, "F": 1408}[a] for a in axes)), jnp.bfloat16)
                       for name, axes in SLAB_SHAPES["gated"].items()}
    grouped = jax.jit(functools.partial(grouped_inplace_experts, interpret=False))
    text = grouped.trace(jax.ShapeDtypeStruct((rows, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((rows, 6), jnp.int32),
                         jax.ShapeDtypeStruct((rows, 6), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.int32),
                         jax.ShapeDtypeStruct((64,), jnp.int32), slab).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(("mixtral", "basic"), tmp_path_factory.mktemp("slab_kernel"))[2]


def test_inplace_engine_is_the_same_in_every_mode_and_close_to_union(ckpt):
    """Resident, cached (half the experts: misses and evictions) and on-demand engines computing 'inplace' give the
    same tokens and logits, bit for bit; union's tokens, and its logits within f32 rounding; 'grouped-inplace'
    and 'auto' with the kernels forced on give the same tokens."""
    options = dict(slots=2, max_seq_len=32)
    resident = moejax.load(ckpt, expert_compute="inplace", **options)
    cfg = resident.cfg
    prompts = random_prompts(cfg.vocab_size, [9, 5], seed=3)
    tokens, logits = resident.generate(prompts, max_new_tokens=4).tokens, resident.logits(prompts)
    half = f"{cfg.num_experts * len(cfg.moe_layer_ids) // 2 * cfg.expert_bytes}B"
    for mode, offload in (("cached", dict(expert_budget=half, cache_policy="lfu")), ("on-demand", {})):
        engine = moejax.load(ckpt, mode, expert_compute="inplace", **options, **offload)
        result = engine.generate(prompts, max_new_tokens=4)
        assert result.tokens == tokens and result.stats["expert_compute"] == "inplace", mode
        assert result.stats["total"]["misses"] > 0
        for ours, ref in zip(engine.logits(prompts), logits, strict=True):
            np.testing.assert_array_equal(ours, ref, err_msg=mode)
    union = moejax.load(ckpt, expert_compute="union", **options)
    assert union.generate(prompts, max_new_tokens=4).tokens == tokens
    grouped = moejax.load(ckpt, "cached", expert_compute="grouped-inplace", expert_budget=half, **options)
    assert grouped.generate(prompts, max_new_tokens=4).tokens == tokens  # dynamic gating's blocks, read in place
    # 'auto' where the kernels run (a GPU: forced here) computes decode steps as 'inplace', prompts as before
    auto = moejax.load(ckpt, **options)
    assert auto.stats()["decode_expert_compute"] == "union"  # the CPU backend: the kernels only interpret
    auto.spec = dataclasses.replace(auto.spec, inplace=True)
    assert auto.generate(prompts, max_new_tokens=4).tokens == tokens
    assert auto.stats()["decode_expert_compute"] == "inplace"
    for ours, ref in zip(logits, union.logits(prompts), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
