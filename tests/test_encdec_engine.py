"""The encoder-decoder step engine: outputs bit-identical in every offload mode, budget, policy and prefetcher;
each slot's target its own whatever the other slots hold; the routing record, statistics and bad input."""

import warnings

import numpy as np
import pytest
from hf_zoo_encdec import LANGS, build, case_id, random_sources

import moejax
from moejax.engine.slots import SamplingParams
from moejax.errors import MoejaxError, ParameterError

NEW_TOKENS = 6
SWITCH, NLLB = ("switch_transformers", "basic"), ("nllb-moe", "basic")
SMALLEST = "smallest"  # the experts one step can need: a source's, one layer's worth
# Each mode, policy and prefetcher on one of the two models (an engine compiles its programs: seconds each).
OFFLOADS = [
    (SWITCH, dict(offload="on-demand")),
    (NLLB, dict(offload="dense-offload")),
    (SWITCH, dict(offload="cached", expert_budget=SMALLEST, cache_policy="fifo")),
    (NLLB, dict(offload="cached", expert_budget=SMALLEST)),
    (NLLB, dict(offload="cached", expert_budget="0.5", cache_policy="lifo", prefetch="lookahead")),
    (SWITCH, dict(offload="cached", expert_budget="0.5", cache_policy="activation", prefetch="trace+lookahead")),
    (NLLB, dict(offload="cached", expert_budget="0.3", cache_policy="lfu", prefetch="trace")),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("encdec_engine")


@pytest.fixture(scope="module")
def references(root):
    return {}


@pytest.fixture(params=[SWITCH, NLLB], ids=case_id)
def reference(request, root, references):
    return _reference(request.param, root, references)


def _reference(case, root, references):
    """(checkpoint, resident engine, sources, teacher-forced targets, its tokens, its logits), made once per case."""
    if case in references:
        return references[case]
    _, _, ckpt = build(case, root)
    resident = moejax.load(ckpt, slots=2)
    sources = random_sources([9, 3, 5], seed=4)
    targets = [[resident.cfg.decoder_start_token_id, *t] for t in random_sources([6, 4, 5], seed=5)]
    tokens = resident.generate(sources, max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens
    references[case] = ckpt, resident, sources, targets, tokens, resident.logits(sources, targets)
    return references[case]


@pytest.mark.parametrize("case,options", OFFLOADS,
                         ids=[f"{case_id(c)}-{'-'.join(map(str, o.values()))}" for c, o in OFFLOADS])
def test_every_mode_budget_policy_and_prefetcher_equals_resident(root, references, case, options):
    ckpt, resident, sources, targets, tokens, logits = _reference(case, root, references)
    if options.get("expert_budget") == SMALLEST:
        options = {**options, "expert_budget": f"{resident.cfg.num_experts * resident.cfg.expert_bytes}B"}
    engine = moejax.load(ckpt, slots=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the host-side manager sees only the layers a step ran (no 0/0)
        for _ in range(2):  # the second run uses what the first taught the collection
            result = engine.generate(sources, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert result.tokens == tokens
    for ours, ref in zip(engine.logits(sources, targets), logits, strict=True):
        np.testing.assert_array_equal(ours, ref)
    stats = result.stats
    total = stats["total"]
    assert total["hits"] + total["misses"] == total["activations"] > 0
    moved = total["misses"] + total["prefetch_issued"] + total["streamed"]
    assert total["bytes_h2d"] == moved * stats["expert_bytes"] == moved * resident.cfg.expert_bytes
    if "prefetch" in options:
        assert total["prefetch_issued"] > 0 and total["prefetch_used"] > 0
    if options["offload"] == "dense-offload":  # each layer step moves all E experts, used or not
        assert total["streamed"] > 0
        assert all((layer["streamed"] + layer["misses"]) % resident.cfg.num_experts == 0 for layer in stats["per_layer"])
    if engine.collection is not None:
        assert len(engine.collection) == 2 * len(sources)


def _solo(engine, source, sampling, forced):
    """The target of `source` generated alone (seeded as generate seeds its first prompt)."""
    return engine.generate([source], max_new_tokens=NEW_TOKENS, ignore_eos=True, forced_bos_id=forced,
                           temperature=sampling.temperature, seed=sampling.seed // 65537).tokens[0]


def test_each_slot_decodes_its_source_alone(reference):
    """Sequences enter and leave slots while the others decode; each gets its solo tokens, greedy or sampled."""
    _, engine, sources, _, _, _ = reference
    forced = LANGS["fra_Latn"] if engine.cfg.family == "nllb-moe" else None
    samplings = [SamplingParams(greedy=False, temperature=0.9, seed=65537 * (n + 3)) for n in range(len(sources))]
    expected = [_solo(engine, s, p, forced) for s, p in zip(sources, samplings, strict=True)]
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}

    def admit(n: int, slot: int) -> None:
        got[n] = [engine.prefill(slot, sources[n], samplings[n], forced_bos_id=forced, max_new_tokens=NEW_TOKENS)]
        owner[slot] = n

    admit(2, 1)
    for step in range(3 * NEW_TOKENS):
        if step == 1:
            admit(0, 0)
        for slot, token in engine.decode().items():
            got[owner[slot]].append(token)
        for slot, n in list(owner.items()):
            if len(got[n]) == NEW_TOKENS:
                engine.release(slot)
                del owner[slot]
                if 1 not in got:
                    admit(1, slot)
        if not owner:
            break
    assert [got[n] for n in range(len(sources))] == expected
    assert len({tuple(t) for t in expected}) == len(expected)  # the sequences differ: the test can tell them apart


def test_routing_lists_the_source_then_the_target(root):
    _, _, ckpt = build(("switch_transformers", "basic"), root)
    engine = moejax.load(ckpt, slots=1)
    engine.record_guesses()
    cfg, source = engine.cfg, random_sources([7], seed=8)[0]
    engine.generate([source], max_new_tokens=4, ignore_eos=True)
    experts, lookahead = engine.routing(0)
    decoder = np.array([cfg.is_decoder_layer(g) for g in cfg.moe_layer_ids])
    E, S = cfg.num_experts, len(source)
    assert experts.shape == (len(cfg.moe_layer_ids), S + 4, cfg.top_k)  # source, start token, 3 new tokens fed
    assert (experts[~decoder, :S] < E).all() and (experts[~decoder, S:] == E).all()
    assert (experts[decoder, :S] == E).all() and (experts[decoder, S:] < E).all()
    first_decoder = int(np.argmax(decoder))
    assert (lookahead[0] == -1).all() and (lookahead[first_decoder] == -1).all()  # no guess across the stacks
    assert (lookahead[1:first_decoder, :S] >= 0).all() and (lookahead[first_decoder + 1:, S:] >= 0).all()


def test_bad_step_input_is_refused(reference):
    ckpt, engine, sources, _, _, _ = reference
    cfg = engine.cfg
    with pytest.raises(ParameterError, match=r"a step of this engine can need 4 at once \(a source of 8 tokens, or one "
                                             r"token of 2 sequences.*a smaller max_seq_len and slots"):
        moejax.load(ckpt, "cached", slots=2, max_seq_len=8, expert_budget=f"{(cfg.num_experts - 1) * cfg.expert_bytes}B")
    with pytest.raises(ParameterError, match="forced_bos_id"):
        engine.prefill(0, sources[0], forced_bos_id=engine.cfg.vocab_size)
    with pytest.raises(ParameterError, match="not both"):
        engine.generate(sources, target_lang="fra_Latn", forced_bos_id=3)
    with pytest.raises(MoejaxError, match=r"source has \d+ tokens; this engine holds"):
        engine.prefill(0, [5] * (engine.max_seq_len + 1))
    with pytest.raises(MoejaxError, match="max_new_tokens .* exceeds the engine's"):
        engine.generate(sources, max_new_tokens=engine.max_seq_len + 1)
    with pytest.raises(MoejaxError, match="2 sources but 1 decoder inputs"):
        engine.logits(sources[:2], [[engine.cfg.decoder_start_token_id]])
    engine.prefill(0, sources[0])
    try:
        with pytest.raises(MoejaxError, match="slot 0 is busy"):
            engine.prefill(0, sources[1])
    finally:
        engine.release(0)
    engine.routing_override = lambda slots, positions: None
    try:
        with pytest.raises(MoejaxError, match="routing_override"):
            engine.generate(sources[:1], max_new_tokens=2)
    finally:
        engine.routing_override = None
    assert not engine.occupied
