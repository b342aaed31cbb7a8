"""Encoder-decoder models through the command line, the model cards, and bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from hf_zoo_encdec import LANGS, build, hf_generate

import moejax
from moejax import checkpoint
from moejax.cli import main
from moejax.config import ModelConfig
from moejax.convert.converter import index_tensors
from moejax.convert.families import nllb_moe
from moejax.convert.safetensors_file import read_tensor, write_file
from moejax.cards import list_cards, load_card, read_card
from moejax.errors import MoejaxError
from moejax.models import encdec

NLLB = ("nllb-moe", "basic")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_encdec_cli")


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_translates_text_with_target_language(root, capsys):
    model, _, ckpt = build(NLLB, root)
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "w5 w17 w23 w42", "--prompt", "w8",
                       "--target-lang", "fra_Latn", "--max-new-tokens", "6", "--ignore-eos", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"tokens", "text", "finish_reasons", "timing", "stats"}
    assert set(result["timing"]) == {"ttft_s", "tpot_s", "tokens_per_s", "total_s", "decode_steps", "compile_s"}
    sources = [[LANGS["eng_Latn"], 5, 17, 23, 42, 2], [LANGS["eng_Latn"], 8, 2]]  # the tokenizer's NLLB framing
    assert result["tokens"] == hf_generate(model, sources, 6, forced_bos_token_id=LANGS["fra_Latn"])
    assert all(t[0] == LANGS["fra_Latn"] for t in result["tokens"])
    assert len(result["text"]) == 2 and "fra_Latn" not in result["text"][0]
    ids = [a for s in sources for a in ("--prompt-ids", ",".join(map(str, s)))]
    code, out, _ = run(capsys, "generate", ckpt, *ids, "--forced-bos-id", LANGS["fra_Latn"], "--max-new-tokens", "6",
                       "--ignore-eos", "--json")
    assert code == 0 and json.loads(out)["tokens"] == result["tokens"]


def test_info_counts_the_parameters_transformers_has(root, capsys):
    model, _, ckpt = build(NLLB, root)
    code, out, _ = run(capsys, "info", ckpt, "--json")
    assert code == 0
    assert json.loads(out)["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    code, out, _ = run(capsys, "info", ckpt)
    assert code == 0 and "encoder-decoder" in out


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "w5", "--target-lang", "xxx_Latn"], "--target-lang 'xxx_Latn' is not a token of"),
    (["--max-new-tokens", "2"], "give --prompt TEXT or --prompt-ids"),
    (["--prompt-ids", "5,6", "--forced-bos-id", "101"], "--forced-bos-id 101 is outside the vocabulary"),
    (["--prompt-ids", "5,600"], "token id 600 is outside the vocabulary"),
    (["--prompt", "w5", "--target-lang", "fra_Latn", "--forced-bos-id", "3"], "not both"),
])
def test_bad_generate_input_is_one_clear_line(root, capsys, argv, message):
    _, _, ckpt = build(NLLB, root)
    code, _, err = run(capsys, "generate", ckpt, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_trace_router_probs_is_refused_before_tracing(root, tmp_path, capsys):
    """It was an AttributeError traceback from the decoder-only teacher pass, after the whole trace."""
    _, _, ckpt = build(NLLB, root)
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [5, 6]}\n')
    code, _, err = run(capsys, "trace", ckpt, "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "t", "--router-probs")
    assert code == 2 and f"--router-probs is for decoder models, not {ckpt} (encoder-decoder)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()


def test_serve_refuses_encoder_decoder_checkpoints_before_loading(root, capsys):
    """It loaded the model, then named the Python parameter `engine`."""
    _, _, ckpt = build(NLLB, root)
    code, _, err = run(capsys, "serve", ckpt, "--port", "0")
    assert code == 2 and err == f"moejax: error: {ckpt}: an encoder-decoder model; serve takes decoder-only models\n"


def test_export_refuses_encoder_decoder_checkpoints(root, tmp_path, capsys):
    _, _, ckpt = build(NLLB, root)
    code, _, err = run(capsys, "export", ckpt, tmp_path / "hf", "--quiet")
    assert code == 2 and "encoder-decoder checkpoints (nllb-moe) is not supported" in err
    assert not (tmp_path / "hf").exists()


def test_seq2seq_flags_on_a_decoder_model_are_refused(tmp_path, capsys):
    cfg = ModelConfig(family="mixtral", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                      num_experts=2, top_k=1, expert_intermediate_size=8, moe_layers=(True,), sliding_windows=(None,))
    (tmp_path / "dec").mkdir()
    cfg.save(tmp_path / "dec" / "config.json")  # both flags are refused before any weight is read
    code, _, err = run(capsys, "generate", tmp_path / "dec", "--prompt-ids", "1,2", "--target-lang", "fra_Latn")
    assert code == 2 and "for encoder-decoder models" in err
    code, _, err = run(capsys, "generate", tmp_path / "dec", "--prompt-ids", "1,2", "--routing", "capacity")
    assert code == 2 and "always dropless" in err


def test_offloading_an_encoder_decoder_model_matches_resident(root, capsys):
    _, _, ckpt = build(NLLB, root)
    outputs = []
    for flags in ([], ["--offload", "cached", "--expert-budget", "0.3", "--cache-policy", "lfu"], ["--offload", "on-demand"]):
        code, out, _ = run(capsys, "generate", ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json", *flags)
        assert code == 0
        outputs.append(json.loads(out))
    assert outputs[1]["tokens"] == outputs[2]["tokens"] == outputs[0]["tokens"]
    for result in outputs[1:]:
        total = result["stats"]["total"]
        assert total["activations"] > 0 and total["hits"] + total["misses"] == total["activations"]
    assert outputs[1]["stats"]["policy"] == "lfu"


def _broken_copy(root, tmp_path, change):
    """A copy of the tiny NLLB HF checkpoint with its tensors or config.json changed."""
    _, hf_dir, _ = build(NLLB, root)
    copy = shutil.copytree(hf_dir, tmp_path / "hf")
    tensors = {name: read_tensor(info) for name, info in index_tensors(copy).items()}
    config = json.loads((copy / "config.json").read_text())
    change(tensors, config)
    write_file(copy / "model.safetensors", tensors)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


EXPERT = "model.encoder.layers.1.ffn.experts.expert_2.fc1.weight"


@pytest.mark.parametrize("change,message", [
    (lambda t, c: t.pop(EXPERT), f"missing tensor '{EXPERT}'"),
    (lambda t, c: t.update(extra=np.zeros(3, np.float32)), "unexpected tensor 'extra'"),
    (lambda t, c: t.update({EXPERT: np.zeros((3, 3), np.float32)}), f"tensor '{EXPERT}' in model.safetensors: expected shape [48, 32]"),
    (lambda t, c: c.update(second_expert_policy="sampling"), "second_expert_policy 'sampling'"),
    (lambda t, c: c.update(decoder_start_token_id=1000), "'decoder_start_token_id' in [0, 101)"),
    (lambda t, c: c.pop("d_model"), "lacks 'd_model'"),
    (lambda t, c: c.update(activation_function="swiglu"), "activation_function 'swiglu' is not supported"),
], ids=["missing", "extra", "shape", "sampling-policy", "start-token", "no-dims", "activation"])
def test_bad_checkpoints_are_refused_and_nothing_is_written(root, tmp_path, capsys, change, message):
    hf_dir = _broken_copy(root, tmp_path, change)
    code, _, err = run(capsys, "convert", hf_dir, tmp_path / "out", "--quiet")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_unknown_config_fields_are_refused(root, tmp_path):
    _, _, ckpt = build(NLLB, root)
    copy = shutil.copytree(ckpt, tmp_path / "ckpt")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_gates": 3}))
    with pytest.raises(MoejaxError, match=r"unknown fields \['num_gates'\]"):
        moejax.load(copy)
    (copy / "config.json").write_text(json.dumps({**config, "routing": "random"}))
    with pytest.raises(MoejaxError, match="routing 'random' is not one of dropless, capacity"):
        moejax.load(copy)


# -- model cards -------------------------------------------------------------------------------

CARDS = list_cards("encdec")


def test_every_architecture_has_a_card():
    expected = {f"switch-base-{n}" for n in (8, 16, 32, 64, 128, 256)} | {"switch-large-128", "switch-c-2048", "nllb-moe-54b"}
    assert expected <= set(CARDS)


@pytest.mark.parametrize("name", CARDS)
def test_card_sizes_agree_with_its_config_and_published_counts(name):
    card = read_card(name)
    cfg = load_card(name)
    counts = encdec.parameter_counts(cfg)
    sizes = card["sizes_bfloat16"]
    assert sizes["parameters"] == counts["total"] and sizes["one_expert_bytes"] == cfg.expert_bytes
    assert sizes["all_experts_bytes"] == counts["all_experts_bytes"] and sizes["dense_bytes"] == counts["dense_bytes"]
    # Published counts are rounded (e.g. "7B" for switch-base-128).
    assert abs(counts["total"] / card["published_parameters"] - 1) < 0.07
    # A random-weight model of these shapes can be built layer by layer (shapes only here).
    g = cfg.moe_layer_ids[-1]
    experts = jax.eval_shape(lambda k: encdec.random_experts(cfg, g, k), jax.random.PRNGKey(0))
    assert experts["up"].shape == (cfg.num_experts, cfg.hidden_size, cfg.ffn_size(g))
    layer = jax.eval_shape(lambda k: encdec.random_layer_params(cfg, g, k), jax.random.PRNGKey(0))
    assert layer["router"]["kernel"].shape == (cfg.hidden_size, cfg.num_experts)


def test_unknown_card_lists_the_known_ones():
    with pytest.raises(MoejaxError, match="switch-base-8"):
        load_card("switch-base-9")


def test_random_model_of_a_card_saves_loads_and_generates(tmp_path):
    """The benchmark path: a card's architecture (shrunk here) with random weights, as a checkpoint."""
    card = read_card("nllb-moe-54b")
    small = {**card["config"], "vocab_size": 64, "d_model": 16, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_ffn_dim": 24, "decoder_ffn_dim": 24, "num_experts": 4, "encoder_sparse_step": 2, "decoder_sparse_step": 2}
    cfg = nllb_moe.config_from_hf(small)
    checkpoint.save_checkpoint(tmp_path / "ckpt", cfg, *encdec.init_params(cfg, jax.random.PRNGKey(0)))
    engine = moejax.load(tmp_path / "ckpt")
    assert engine.cfg == cfg
    result = engine.generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)
    assert len(result.tokens[0]) == 3
