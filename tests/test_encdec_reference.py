"""Encoder-decoder families against transformers on the same weights (float32, CPU).

Cases whose transformers config drops tokens at these sizes (small expert capacity) are compared in
capacity routing; the others in the default dropless routing (transformers drops nothing there). The
engine routes each sequence as its own capacity group, so it is compared with transformers run on each
source alone (in dropless routing that is also what a padded batch gives). The engine's step programs are
compared with the whole-model reference functions of `models.encdec` too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_zoo import assert_logits_close
from hf_zoo_encdec import CASES, LANGS, build, case_id, hf_forward, hf_generate, random_sources

import moejax
from moejax import checkpoint
from moejax.models import encdec
from moejax.models.capacity import capacity_for

DROPPING = {("switch_transformers", "untied"), ("nllb-moe", "untied"), ("nllb-moe", "capacity")}


def routing(case) -> str:
    return "capacity" if case in DROPPING else "dropless"


def forced(case):
    """NLLB targets start with the target language, as transformers' forced_bos_token_id does."""
    return LANGS["fra_Latn"] if case[0] == "nllb-moe" else None


def decoder_inputs(engine, n: int, length: int = 7, seed: int = 9):
    return [[engine.cfg.decoder_start_token_id, *s] for s in random_sources([length - 1] * n, seed)]


def dropped_pairs(engine, sources) -> int:
    """(token, expert) pairs of the sources that the encoder's MoE layers dropped (routed to id E)."""
    engine.generate(sources, max_new_tokens=1)
    cfg = engine.cfg
    encoder = [m for m, g in enumerate(cfg.moe_layer_ids) if not cfg.is_decoder_layer(g)]
    return sum(int((engine.routing(b)[0][encoder, : len(s)] == cfg.num_experts).sum()) for b, s in enumerate(sources))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_encdec")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_outputs_and_greedy_tokens_match_transformers(case, root):
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt, routing=routing(case), slots=2)
    sources = random_sources([13, 1])
    targets = decoder_inputs(engine, len(sources))
    encoded, logits = engine.encoder_outputs(sources), engine.logits(sources, targets)
    for source, target, ours_enc, ours in zip(sources, targets, encoded, logits, strict=True):
        enc_ref, logits_ref = hf_forward(model, [source], [target])
        assert_logits_close(ours_enc, enc_ref[0])
        assert_logits_close(ours, logits_ref[0])
    if case in DROPPING:
        assert dropped_pairs(engine, sources) > 0

    sources = random_sources([9, 4], seed=1)
    ours = engine.generate(sources, max_new_tokens=20, ignore_eos=True, forced_bos_id=forced(case)).tokens
    assert ours == [hf_generate(model, [s], 20, forced_bos_token_id=forced(case))[0] for s in sources]


def test_stop_token_ends_a_target_as_in_transformers(root):
    case = ("nllb-moe", "capacity")
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt, routing="capacity", slots=2)
    sources = random_sources([9, 4], seed=4)
    stop = hf_generate(model, sources[:1], 12, forced_bos_token_id=forced(case))[0][2]
    expected = [hf_generate(model, [s], 12, eos_token_id=stop, forced_bos_token_id=forced(case))[0] for s in sources]
    result = engine.generate(sources, max_new_tokens=12, stop_token_ids=(stop,), ignore_eos=True, forced_bos_id=forced(case))
    assert result.tokens == expected
    assert result.finish_reasons[0] == "stop" and len(result.tokens[0]) < 12


@pytest.mark.parametrize("case", [("switch_transformers", "basic"), ("nllb-moe", "basic")], ids=case_id)
def test_padded_batch_in_transformers_equals_each_source_alone(case, root):
    """Dropless routing: what the engine computes per source is transformers' padded batch too."""
    model, _, ckpt = build(case, root)
    engine = moejax.load(ckpt, slots=2)
    sources = random_sources([11, 2], seed=2)
    ours = engine.generate(sources, max_new_tokens=8, ignore_eos=True, forced_bos_id=forced(case)).tokens
    assert ours == hf_generate(model, sources, 8, forced_bos_token_id=forced(case))
    targets = decoder_inputs(engine, len(sources), seed=3)
    for ours, ref in zip(engine.logits(sources, targets), hf_forward(model, sources, targets)[1], strict=True):
        assert_logits_close(ours, ref)


@functools.partial(jax.jit, static_argnums=0)
def _reference_logits(cfg, globals_, layers, experts, source, target):
    """The whole-model functions of `models.encdec` on one source and one teacher-forced target."""
    def route_in(tokens):
        ones = jnp.ones(tokens.shape, bool)
        return encdec.RouteInputs(ones, ones, jnp.int32(capacity_for(cfg, tokens.shape[1])))

    enc_out, _ = encdec.encode(cfg, globals_, layers, experts, source, jnp.ones(source.shape, bool), route_in(source))
    cross = encdec.cross_keys_values(cfg, layers, enc_out)
    positions = jnp.arange(target.shape[1], dtype=jnp.int32)[None]
    caches = [(jnp.zeros(encdec.kv_cache_shape(cfg, 1, target.shape[1]), cfg.dtype),) * 2 for _ in cfg.decoder_layer_ids]
    y, _, _ = encdec.decode(cfg, globals_, layers, experts, target, positions, caches, cross, jnp.ones(source.shape, bool),
                            route_in(target))
    return encdec.apply_globals(cfg, globals_, "logits", y)[0]


def test_step_programs_equal_the_whole_model_reference(root):
    """In capacity routing, so dropped pairs flow through every path; this case has dense and MoE layers in
    both stacks. The smallest cache (one layer's experts) changes no bit."""
    case = ("switch_transformers", "untied")
    _, _, ckpt = build(case, root)
    resident = moejax.load(ckpt, routing="capacity", slots=1)
    cfg = resident.cfg
    smallest = moejax.load(ckpt, routing="capacity", slots=1, offload="cached",
                           expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B")
    weights = (checkpoint.load_globals(ckpt), [checkpoint.load_layer(ckpt, g) for g in range(cfg.num_layers)],
               [checkpoint.load_stacked_experts(ckpt, cfg, g) if cfg.moe_layers[g] else None for g in range(cfg.num_layers)])
    sources = random_sources([10, 3], seed=5)
    targets = decoder_inputs(resident, len(sources), seed=6)
    ours = resident.logits(sources, targets)
    for source, target, logits in zip(sources, targets, ours, strict=True):
        reference = _reference_logits(cfg, *weights, jnp.asarray([source]), jnp.asarray([target]))
        assert_logits_close(logits, np.asarray(reference), rel=1e-5)
    for a, b in zip(smallest.logits(sources, targets), ours, strict=True):
        np.testing.assert_array_equal(a, b)
    assert smallest.stats()["capacity_experts"] == cfg.num_experts < len(cfg.moe_layer_ids) * cfg.num_experts
