"""Model cards: every card loads, and its parameter counts match the published ones."""

import pytest

from moejax.cards import list_cards, load_card, read_card
from moejax.convert.families import family
from moejax.convert.families.common import common_hf_config
from moejax.errors import MoejaxError
from moejax.models.decoder import parameter_counts

CARDS = list_cards("decoder")
TOLERANCE = 0.02


def test_the_shipped_cards():
    assert CARDS == sorted(["mixtral-8x7b", "mixtral-8x22b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "qwen3-235b-a22b",
                            "olmoe-1b-7b", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "gpt-oss-20b",
                            "gpt-oss-120b", "glm-4.5-air", "glm-4.5", "kimi-k2"])


@pytest.mark.parametrize("name", CARDS)
def test_card_loads_with_its_metadata(name):
    card, cfg = read_card(name), load_card(name)
    assert card["name"] == name
    assert "/" in card["source"]
    assert cfg.dtype == "bfloat16"
    assert cfg.num_layers == len(cfg.moe_layers) and any(cfg.moe_layers)


@pytest.mark.parametrize("name", CARDS)
def test_parameter_counts_match_published(name):
    published, cfg = read_card(name)["published"], load_card(name)
    counts, tolerance = parameter_counts(cfg), published.get("tolerance", TOLERANCE)
    assert counts["total"] == pytest.approx(published["total_params"], rel=tolerance)
    # Some publishers count active parameters without the embedding table (a token only indexes it) or the head.
    left_out = published.get("active_excludes", [])
    assert set(left_out) <= {"embedding", "lm_head"}
    embedding = cfg.vocab_size * cfg.hidden_size
    active = counts["active_per_token"] - embedding * ("embedding" in left_out)
    active -= embedding * ("lm_head" in left_out and not cfg.tie_word_embeddings)
    assert active == pytest.approx(published["active_params"], rel=tolerance)



def test_fewer_layers_keep_the_layer_pattern():
    cfg = load_card("deepseek-v2-lite", num_layers=4)
    assert cfg.num_layers == 4 and cfg.moe_layers == (False, True, True, True)
    full = load_card("deepseek-v2-lite")
    assert cfg.replace(num_layers=full.num_layers, moe_layers=full.moe_layers, sliding_windows=full.sliding_windows) == full
    assert parameter_counts(load_card("mixtral-8x7b", num_layers=2))["one_expert_bytes"] == 2 * 3 * 4096 * 14336


def test_card_errors_are_clear(tmp_path):
    with pytest.raises(MoejaxError, match="unknown model card 'gpt-5'.*mixtral-8x7b"):
        load_card("gpt-5")
    with pytest.raises(MoejaxError, match=r"num_layers must be in \[1, 32\]"):
        load_card("mixtral-8x7b", num_layers=33)
    with pytest.raises(MoejaxError, match="first 1 layer"):
        load_card("deepseek-v2-lite", num_layers=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "bad", "source": "x/y", "architecture": {"family": "mixtral"}}')
    with pytest.raises(MoejaxError, match="invalid architecture"):
        load_card(bad)
    bad.write_text('{"name": "bad", "architecture": {"family": "mixtral"}}')
    with pytest.raises(MoejaxError, match="lacks 'source'"):
        load_card(bad)
    bad.write_text('{"name": "bad", "source": "x/y", "kind": "encdec"}')
    with pytest.raises(MoejaxError, match="encdec model card needs a 'config' object"):
        load_card(bad)


@pytest.mark.parametrize("name", CARDS)
def test_card_exports_to_transformers_with_the_same_parameters(name):
    """The card's family writes a config.json that transformers builds (on the meta device) into a
    model of the same parameter count, and that converts back to the card."""
    import torch
    import transformers as T

    cfg = load_card(name)
    hf = T.AutoConfig.for_model(**{**common_hf_config(cfg), **family(cfg.family).hf_config(cfg)})
    assert family(cfg.family).config_from_hf(hf.to_dict()).replace(dtype=cfg.dtype) == cfg
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(hf)
    assert model.num_parameters() == parameter_counts(cfg)["total"]
