"""The step API: `prefill(slot, ids, sampling)`, `decode()`, `release(slot)`. A sequence's tokens are its
tokens alone, whatever the other slots hold and whatever order they are filled and released in; `generate`
runs more prompts than slots by making them wait for a free one.

Engines of 4 slots: resident (a decode step takes every occupied slot: 1, 2 or 4 rows), the smallest
cache (one layer's experts, shared by all slots: every step evicts), and the smallest cache computing its
experts grouped (dropless dynamic gating: each expert computes exactly its tokens).
"""

import collections
import functools

import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax import SamplingParams, checkpoint
from moejax.errors import MoejaxError

SLOTS, MAX_SEQ_LEN = 4, 64
MODES = ["resident", "smallest-cache", "smallest-cache-grouped"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(("mixtral", "basic"), tmp_path_factory.mktemp("steps"))[2]


@functools.lru_cache(maxsize=None)
def load(ckpt, mode="resident", slots=SLOTS):
    if mode == "resident":
        return moejax.load(ckpt, slots=slots, max_seq_len=MAX_SEQ_LEN)
    cfg = checkpoint.load_config(ckpt)
    compute = "grouped" if mode.endswith("grouped") else "auto"
    return moejax.load(ckpt, "cached", expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B", slots=slots,
                       max_seq_len=MAX_SEQ_LEN, expert_compute=compute)


def solo(engine, prompt, decodes: int, sampling=None, slot: int = 0) -> list[int]:
    """A prompt's first token and `decodes` more, with the engine to itself."""
    assert engine.occupied == []
    tokens = [engine.prefill(slot, prompt, sampling)]
    for _ in range(decodes):
        produced = engine.decode()
        assert list(produced) == [slot]
        tokens.append(produced[slot])
    engine.release(slot)
    return tokens


class Slots:
    """Drives an engine's slots by name and collects each sequence's tokens."""

    def __init__(self, engine, prompts: dict, sampling: dict):
        self.engine, self.prompts, self.sampling = engine, prompts, sampling
        self.tokens = collections.defaultdict(list)
        self.owner = {}

    def prefill(self, name: str, slot: int) -> None:
        self.tokens[name].append(self.engine.prefill(slot, self.prompts[name], self.sampling[name]))
        self.owner[slot] = name

    def decode(self, times: int = 1) -> None:
        for _ in range(times):
            produced = self.engine.decode()
            assert sorted(produced) == sorted(self.owner)  # one token for every occupied slot
            for slot, token in produced.items():
                self.tokens[self.owner[slot]].append(token)

    def release(self, slot: int) -> None:
        self.engine.release(slot)
        del self.owner[slot]


@pytest.mark.parametrize("mode", MODES)
def test_each_sequence_gets_its_solo_tokens_whatever_the_other_slots_do(ckpt, mode):
    """Greedy and sampled sequences (each with its own seed) started at different steps in different slots,
    released early (with steps in flight), a slot reused while the others run: every sequence's tokens are
    those it gets alone in slot 0."""
    engine = load(ckpt, mode)
    vocab = engine.cfg.vocab_size
    prompts = dict(zip("ABCD", random_prompts(vocab, [9, 4, 12, 6], seed=11), strict=True))
    sampling = {"A": None, "B": SamplingParams(greedy=False, temperature=0.9, top_k=20, seed=7),
                "C": SamplingParams(greedy=False, temperature=1.2, top_p=0.9, seed=8), "D": None}
    expected = {name: solo(engine, prompts[name], 12, sampling[name]) for name in prompts}
    other_seed = SamplingParams(greedy=False, temperature=0.9, top_k=20, seed=9)
    assert solo(engine, prompts["B"], 12, other_seed, slot=3) != expected["B"]  # sampling samples

    slots = Slots(engine, prompts, sampling)
    slots.prefill("B", 2)
    slots.decode(2)
    slots.prefill("A", 1)
    slots.decode()
    slots.prefill("C", 3)
    slots.decode(2)
    slots.release(2)  # B leaves early
    slots.decode()
    slots.prefill("D", 2)  # its slot taken again while A and C run
    slots.decode()
    slots.release(3)  # C leaves early
    slots.decode(6)
    slots.release(1)  # A is done
    slots.decode(5)
    slots.release(2)
    assert engine.occupied == [] and engine.decode() == {}
    assert [len(slots.tokens[name]) for name in "ABCD"] == [12, 6, 5, 13]
    for name in "ABCD":
        assert slots.tokens[name] == expected[name][: len(slots.tokens[name])], name


def test_step_api_errors(ckpt):
    engine = load(ckpt)
    prompt = [1, 2, 3]
    for slot in (SLOTS, -1):
        with pytest.raises(MoejaxError, match=rf"slot {slot} is not one of this engine's slots 0..3"):
            engine.prefill(slot, prompt)
    with pytest.raises(MoejaxError, match=r"prompt has 64 tokens; this engine holds 64 per sequence \(max_seq_len\)"):
        engine.prefill(0, [1] * MAX_SEQ_LEN)
    with pytest.raises(MoejaxError, match=r"prompt: token id 101 is outside the vocabulary \[0, 101\)"):
        engine.prefill(0, [1, 101])
    with pytest.raises(MoejaxError, match="prompt is empty"):
        engine.prefill(0, [])
    assert engine.occupied == []  # nothing refused took a slot
    with pytest.raises(MoejaxError, match="slot 0 holds no sequence"):
        engine.release(0)
    engine.prefill(0, prompt)
    with pytest.raises(MoejaxError, match="slot 0 is busy: release it first"):
        engine.prefill(0, prompt)
    with pytest.raises(MoejaxError, match=r"generate needs every slot free, but slots \[0\] hold sequences"):
        engine.generate([prompt], max_new_tokens=2)
    engine.release(0)
    with pytest.raises(MoejaxError, match="slot 0 holds no sequence"):
        engine.release(0)


def test_a_sequence_stops_at_its_limit_or_a_full_slot(ckpt):
    """`max_new_tokens` stops a slot's decode steps; a slot whose KV cache is full gets no more tokens."""
    engine = load(ckpt)
    limited = Slots(engine, {"short": [5, 6, 7], "long": [8] * (MAX_SEQ_LEN - 4)}, {"short": None, "long": None})
    limited.tokens["short"].append(engine.prefill(0, [5, 6, 7], max_new_tokens=3))
    limited.owner[0] = "short"
    limited.prefill("long", 1)
    for _ in range(6):
        for slot, token in engine.decode().items():
            limited.tokens[limited.owner[slot]].append(token)
    # The long prompt's slot holds 64 positions: 60 for the prompt, 4 for fed tokens, so 5 tokens in all.
    assert [len(limited.tokens[name]) for name in ("short", "long")] == [3, 5]
    assert engine.decode() == {}
    engine.release(0)
    engine.release(1)
    assert limited.tokens["long"] == solo(engine, [8] * (MAX_SEQ_LEN - 4), 4)


def test_generate_runs_more_prompts_than_slots(ckpt):
    """Seven prompts through 4 slots, some stopping early (a stop token) so that waiting prompts take their
    slots mid-run: each prompt's tokens and finish reason are its own alone; sampled, they are those of an
    engine of one slot, which runs one prompt at a time."""
    engine = load(ckpt)
    prompts = random_prompts(engine.cfg.vocab_size, [5, 9, 3, 12, 7, 4, 10], seed=12)
    plain = engine.generate(prompts, max_new_tokens=8)
    stop = plain.tokens[1][2]
    result = engine.generate(prompts, max_new_tokens=8, stop_token_ids=(stop,))
    assert result.finish_reasons.count("stop") >= 1 and result.finish_reasons.count("length") >= 1
    for b, prompt in enumerate(prompts):
        alone = engine.generate([prompt], max_new_tokens=8, stop_token_ids=(stop,))
        assert (result.tokens[b], result.finish_reasons[b]) == (alone.tokens[0], alone.finish_reasons[0]), b
    sampled = dict(max_new_tokens=8, temperature=0.9, top_k=20, seed=4, stop_token_ids=(stop,))
    one_at_a_time = load(ckpt, slots=1).generate(prompts, **sampled)
    assert engine.generate(prompts, **sampled).tokens == one_at_a_time.tokens


def test_any_uint32_seed_samples(ckpt):
    """Seeds up to 2**32 - 1 (a server draws them at random) sample; before, one over 2**31 overflowed int32."""
    engine = load(ckpt)
    for seed in (2**31, 2**32 - 1):
        sampling = SamplingParams(greedy=False, temperature=0.9, seed=seed)
        assert solo(engine, [1, 2, 3], 2, sampling) == solo(engine, [1, 2, 3], 2, sampling)


def test_warm_up_compiles_every_decode_row_count_and_leaves_nothing_behind(ckpt):
    """What `moejax serve` runs before it listens: afterwards a batch of any size up to the slots compiles no
    decode step, the statistics are zero, the trace collection holds nothing, and tokens are unchanged."""
    engine = moejax.load(ckpt, "cached", expert_budget=0.5, cache_policy="activation", slots=3, max_seq_len=MAX_SEQ_LEN)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    engine.warm_up()
    programs = set(engine._compiled)
    assert len([key for key in programs if key[0] == "decode"]) == 3  # rows 1, 2 and 4 (for 3 slots)
    assert engine.stats()["total"]["activations"] == 0 and len(engine.collection) == 0 and engine.occupied == []
    warm = engine.generate(prompts, max_new_tokens=4)
    assert set(engine._compiled) == programs  # nothing compiled on the way
    cold = moejax.load(ckpt, "cached", expert_budget=0.5, cache_policy="activation", slots=3,
                       max_seq_len=MAX_SEQ_LEN).generate(prompts, max_new_tokens=4)
    assert warm.tokens == cold.tokens
    engine.prefill(0, [1, 2])
    with pytest.raises(MoejaxError, match=r"warm_up needs every slot free, but slots \[0\] hold sequences"):
        engine.warm_up()
