"""The Python API on the shipped model: sampling keywords, streaming, the result's repr, the README's
Python examples."""

import json
import re
from pathlib import Path

import pytest

import moejax
from moejax import GenerationConfig, MoejaxError, SamplingParams

README = Path(__file__).resolve().parent.parent / "README.md"
PROMPT = "The history of"


@pytest.fixture(scope="module")
def engine():
    return moejax.load(moejax.SHIPPED_CHECKPOINT)


def test_sampling_keywords_are_accepted_directly(engine):
    sampled = SamplingParams(greedy=False, temperature=0.8, top_p=0.9)
    direct = engine.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    configured = engine.generate(PROMPT, GenerationConfig(max_new_tokens=8, sampling=sampled, seed=3))
    assert direct.tokens == configured.tokens
    # A keyword overrides the config's sampling; top_k alone samples (at temperature 1).
    assert engine.generate(PROMPT, GenerationConfig(max_new_tokens=8, seed=3), temperature=0.8, top_p=0.9).tokens == direct.tokens
    top_k = engine.generate(PROMPT, max_new_tokens=8, top_k=5, seed=3)
    assert top_k.tokens == engine.generate(PROMPT, max_new_tokens=8, sampling=SamplingParams(greedy=False, top_k=5), seed=3).tokens
    greedy = engine.generate(PROMPT, GenerationConfig(max_new_tokens=8, sampling=sampled), greedy=True)
    assert greedy.tokens == engine.generate(PROMPT, max_new_tokens=8).tokens


def test_contradicting_or_unknown_keywords_are_refused(engine):
    with pytest.raises(MoejaxError, match=r"greedy=True .* ignores temperature, top_p"):
        engine.generate(PROMPT, greedy=True, temperature=0.8, top_p=0.5)
    with pytest.raises(TypeError, match="'temprature'.*temperature"):
        engine.generate(PROMPT, temprature=0.8)


def test_stream_yields_the_text_generate_returns(engine):
    kwargs = dict(max_new_tokens=24, temperature=0.8, seed=2)
    pieces = list(engine.stream(PROMPT, **kwargs))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == engine.generate(PROMPT, **kwargs).text[0]
    with pytest.raises(MoejaxError, match="one prompt"):
        next(engine.stream([PROMPT, "Once"]))


def test_stream_holds_back_a_character_split_over_tokens(engine, monkeypatch):
    # Byte-level BPE: the bytes of "é" (C3 A9) as two tokens; the first alone decodes to U+FFFD.
    first, second = engine.tokenizer.token_id("Ã"), engine.tokenizer.token_id("©")

    def two_steps(prompt, config, **kwargs):
        yield [[first]]
        yield [[first, second]]

    monkeypatch.setattr(engine, "_generation", two_steps)
    assert list(engine.stream(PROMPT)) == ["é"]


def test_a_stream_left_early_ends_its_sequence(engine):
    offloaded = moejax.load(moejax.SHIPPED_CHECKPOINT, offload="cached", expert_budget=0.5, prefetch="trace")
    stream = offloaded.stream(PROMPT, max_new_tokens=16)
    next(stream)
    stream.close()
    assert offloaded.occupied == [] and len(offloaded.collection) == 1  # its slot is free, its activations kept
    assert offloaded.generate(PROMPT, max_new_tokens=4).tokens == engine.generate(PROMPT, max_new_tokens=4).tokens


def test_generation_result_is_documented_and_its_repr_is_short(engine):
    assert "finish_reasons" in moejax.GenerationResult.__doc__
    shown = repr(engine.generate([PROMPT, "Once"], max_new_tokens=40, ignore_eos=True))
    assert len(shown) < 250, shown
    assert shown.startswith("GenerationResult([") and "finish_reasons=['length', 'length']" in shown and "tpot" in shown
    assert "hit_rate" not in shown and "per_layer" not in shown


def test_readme_python_examples_run_on_the_shipped_model(tmp_path, monkeypatch, capsys):
    blocks = [block for block in readme_python_blocks() if SERVER_URL not in block]  # test_serve_http runs those
    assert blocks
    monkeypatch.chdir(tmp_path)  # the examples name no file of the repository but the task mix the reader brings
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [
        {"task": "story", "prompt": "Once upon a time", "reference": "there was a cat."},
        {"task": "qa", "prompt": "What is two and two?", "reference": "Four."}]))
    names = {}  # one namespace, as a reader runs the examples top to bottom
    for block in blocks:
        exec(compile(block, str(README), "exec"), names)
    assert capsys.readouterr().out.strip()


SERVER_URL = "http://127.0.0.1:8000"  # where the README's client examples find `moejax serve`


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
