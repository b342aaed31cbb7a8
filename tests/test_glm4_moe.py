"""GLM-4.5 (`glm4_moe`) beyond the zoo's parity tests (tests/test_decoder_reference.py, test_offload.py): `moejax info`
figures against transformers, the checkpoint's multi-token-prediction layers skipped, the router's correction bias
kept in float32, and export back to a checkpoint transformers loads with the same logits."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers as T
from hf_zoo import build, hf_logits, random_prompts
from safetensors.numpy import load_file, save_file
from test_bad_input import assert_convert_fails

import moejax
from moejax import checkpoint
from moejax.cli import main as moejax_cli

CASE = ("glm4_moe", "qk_norm_groups")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(CASE, tmp_path_factory.mktemp("glm"))


def test_info_figures_equal_transformers(built, capsys):
    model, _, ckpt = built
    assert moejax_cli(["info", str(ckpt), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["parameters"]
    assert params["total"] == model.num_parameters()
    assert params["experts"] == sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert params["one_expert"] == 3 * 32 * 16
    # per token: the dense first layer and 2 MoE layers' attention, shared experts and routers, 3 of 8 experts each
    assert params["active_per_token"] == params["total"] - 2 * (8 - 3) * params["one_expert"]
    assert moejax_cli(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "router: sigmoid scores, noaux_tc top-3 within the best 2 of 4 groups, correction bias for selection, " \
           "weights renormalised, x 2.5" in text


def test_multi_token_prediction_layers_are_skipped_and_the_bias_stays_float32(built, tmp_path, capsys):
    """A checkpoint with an MTP layer past the last (as GLM-4.5's) converts to the same weights, with a note; in
    bfloat16 the router (weight and correction bias) stays float32, as transformers keeps it, and the engine runs."""
    _, hf_dir, ckpt = built
    with_mtp = tmp_path / "with-mtp"
    shutil.copytree(hf_dir, with_mtp)
    tensors = load_file(with_mtp / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = np.ones((32, 64), np.float32)
    tensors["model.layers.3.mlp.gate.weight"] = np.ones((8, 32), np.float32)
    save_file(tensors, with_mtp / "model.safetensors")
    out = tmp_path / "mj"
    assert moejax_cli(["convert", str(with_mtp), str(out), "--quiet", "--dtype", "bfloat16"]) == 0
    assert "note: skipping layer(s) 3 (2 tensors): multi-token-prediction" in capsys.readouterr().err
    cfg = checkpoint.load_config(out)
    assert cfg.num_layers == 3 and cfg.dtype == "bfloat16"
    ours, theirs = checkpoint.load_layer(out, 1), checkpoint.load_layer(ckpt, 1)
    assert ours["router"]["e_score_correction_bias"].dtype == np.float32
    np.testing.assert_array_equal(ours["router"]["e_score_correction_bias"], theirs["router"]["e_score_correction_bias"])
    np.testing.assert_array_equal(ours["router"]["kernel"], theirs["router"]["kernel"])
    assert ours["attn"]["q_proj"]["kernel"].dtype == cfg.np_dtype
    assert len(moejax.load(out).generate([[1, 2, 3]], max_new_tokens=2).tokens[0]) == 2


def test_export_loads_in_transformers_with_the_same_logits(built, tmp_path):
    model, _, ckpt = built
    hf_dir = tmp_path / "exported"
    assert moejax_cli(["export", str(ckpt), str(hf_dir), "--quiet"]) == 0
    exported = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(exported).__name__ == "Glm4MoeForCausalLM"
    prompt = random_prompts(model.config.vocab_size, [9])[0]
    np.testing.assert_array_equal(hf_logits(exported, prompt), hf_logits(model, prompt))


@pytest.mark.parametrize("fields,expected", [
    ({"topk_method": "beam"}, "topk_method 'beam' is not supported"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    ({"n_group": 3}, "n_group 3 must divide num_experts 8"),
])
def test_unsupported_router_fields_are_one_line_errors(built, tmp_path, capsys, fields, expected):
    _, hf_dir, _ = built
    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **fields}))
    assert_convert_fails(capsys, broken, tmp_path, expected)
