"""Bad input through the CLI: one line on stderr, exit status 2, nothing half-written."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import moejax
from moejax.cli import FLAGS, build_parser, main
from moejax.convert.safetensors_file import read_header, read_tensor, write_file
from moejax.errors import ParameterError
from moejax.tools.lab import replay
from moejax.offload.budget import cache_capacity
from moejax.engine.results import GenerationConfig
from moejax.engine.slots import SamplingParams
from moejax.routing.traces import RoutingTrace, load_routing

SUPPORTED = ("deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, kimi_k2 (as deepseek_v3), mixtral, nllb-moe, olmoe, qwen2_moe, "
             "qwen3_moe, switch_transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-MoE checkpoint (dense layer 0, MoE layer 1), as transformers saves it."""
    torch.manual_seed(0)
    config = T.Qwen2MoeConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                              num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=8,
                              shared_expert_intermediate_size=12, num_experts=3, num_experts_per_tok=2,
                              mlp_only_layers=[0], max_position_embeddings=64)
    path = tmp_path_factory.mktemp("bad") / "hf"
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(hf_dir) -> Path:
    out = hf_dir.parent / "mj"
    assert main(["convert", str(hf_dir), str(out), "--quiet"]) == 0
    return out


def one_line_error(capsys, argv, *expected) -> str:
    """Runs the CLI, expecting exit status 2 and one stderr line naming each of `expected`."""
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("moejax: error: ")
    for text in expected:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]


def broken_copy(hf_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    return copy


def rewrite_weights(hf: Path, edit) -> None:
    """Rewrites model.safetensors with `edit(tensors)` applied to {name: array}."""
    path = hf / "model.safetensors"
    tensors = {name: read_tensor(info) for name, info in read_header(path).items()}
    edit(tensors)
    write_file(path, tensors)


def assert_convert_fails(capsys, hf: Path, tmp_path: Path, *expected) -> None:
    out = tmp_path / "out" / "ckpt"
    one_line_error(capsys, ["convert", hf, out, "--quiet"], *expected)
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir()), list(out.parent.iterdir())


def test_unknown_model_type_lists_supported(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neo"}))
    assert_convert_fails(capsys, hf, tmp_path, "'gpt_neo'", SUPPORTED)


def test_converting_a_moejax_checkpoint_says_it_is_one(capsys, ckpt, tmp_path):
    """It said "config.json: model_type None is not supported"."""
    assert_convert_fails(capsys, ckpt, tmp_path, f"{ckpt}: a moejax checkpoint already; convert reads HuggingFace")


def test_missing_tensor_is_named(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    rewrite_weights(hf, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    assert_convert_fails(capsys, hf, tmp_path, "missing tensor 'model.layers.1.mlp.experts.2.up_proj.weight'")


def test_extra_tensor_is_named(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    rewrite_weights(hf, lambda t: t.update({"model.layers.1.mlp.experts.3.up_proj.weight": t["model.layers.1.mlp.experts.0.up_proj.weight"]}))
    assert_convert_fails(capsys, hf, tmp_path, "unexpected tensor 'model.layers.1.mlp.experts.3.up_proj.weight'")


def test_wrong_shape_names_tensor_expected_and_found(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    rewrite_weights(hf, lambda t: t.update({name: t[name][:, :20]}))
    assert_convert_fails(capsys, hf, tmp_path, f"tensor '{name}'", "expected shape [16, 24]", "found [16, 20]")


def test_truncated_safetensors_file(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    path = hf / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_convert_fails(capsys, hf, tmp_path, "model.safetensors", "truncated")


def test_missing_config(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    (hf / "config.json").unlink()
    assert_convert_fails(capsys, hf, tmp_path, "missing config.json")


@pytest.mark.parametrize("index,expected", [
    ("{\"weight_map\": {", "not a valid safetensors index"),
    ("[1, 2]", "not a valid safetensors index"),
    ("{\"weight_map\": [\"model.safetensors\"]}", "'weight_map' must map tensor names to file names"),
    ("{\"weight_map\": {\"lm_head.weight\": \"model-00002.safetensors\"}}", "missing shard"),
])
def test_corrupt_index(capsys, hf_dir, tmp_path, index, expected):
    hf = broken_copy(hf_dir, tmp_path)
    (hf / "model.safetensors.index.json").write_text(index)
    assert_convert_fails(capsys, hf, tmp_path, "model.safetensors.index.json", expected)


def test_config_field_of_wrong_type(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": "two"}))
    assert_convert_fails(capsys, hf, tmp_path, "config.json", "invalid qwen2_moe config")


def test_existing_output_is_kept(capsys, hf_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    one_line_error(capsys, ["convert", hf_dir, out, "--quiet"], "already exists", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("args,expected", [
    (["--prompt-ids", "1,50"], ["token id 50", "[0, 50)"]),
    (["--prompt-ids=-1,3"], ["token id -1"]),
    (["--prompt-ids", "1,x"], ["--prompt-ids", "comma-separated integers"]),
    (["--prompt-ids", ","], ["prompt 0 is empty"]),
    (["--prompt-ids", "1,2", "--prompt-ids", ""], ["prompt 1 is empty"]),
    (["--prompt", "hello"], ["no tokenizer.json", "--prompt-ids"]),
    (["--prompt-ids", "1,2,3", "--max-new-tokens", "62"], ["3 tokens + 62 new tokens", "64 positions"]),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    (["--prompt-ids", "1", "--max-new-tokens", "many"], ["--max-new-tokens", "'many'"]),
    (["--prompt-ids", "1", "--temperature", "0"], ["--temperature must be", "got 0"]),
    (["--prompt-ids", "1", "--temperature", "-1"], ["--temperature must be"]),
    (["--prompt-ids", "1", "--temperature", "nan"], ["--temperature must be"]),
    (["--prompt-ids", "1", "--temperature", "1", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
    (["--prompt-ids", "1", "--temperature", "1", "--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
    (["--prompt-ids", "1", "--temperature", "1", "--top-k", "-2"], ["--top-k must be an integer >= 0"]),
    (["--prompt-ids", "1", "--top-p", "0.5"], ["give --temperature"]),
    (["--prompt-ids", "1", "--greedy", "--temperature", "1"], ["--temperature", "not allowed with argument --greedy"]),
    ([], ["give --prompt TEXT or --prompt-ids"]),
])
def test_generate_refuses_bad_requests(capsys, ckpt, args, expected):
    one_line_error(capsys, ["generate", ckpt, *args], *expected)


def test_generate_missing_checkpoint(capsys, tmp_path):
    one_line_error(capsys, ["generate", tmp_path / "nothing", "--prompt-ids", "1"], "no such checkpoint")


def test_unknown_command(capsys):
    one_line_error(capsys, ["serve-all"], "invalid choice", "'serve-all'")


# -- library errors name the parameter, the CLI the flag ------------------------------------------

def parameter_error(call) -> ParameterError:
    with pytest.raises(ParameterError) as info:
        call()
    return info.value


@pytest.mark.parametrize("call,parameter,argv,flag_message", [
    (lambda ckpt: moejax.load(ckpt, offload="cached", expert_budget="2.0"), "expert_budget",
     ["--offload", "cached", "--expert-budget", "2.0"], "--expert-budget '2.0': a bare number is a fraction"),
    (lambda ckpt: moejax.load(ckpt, offload="on-demand", cache_policy="lfu"), "cache_policy",
     ["--offload", "on-demand", "--cache-policy", "lfu"], "--cache-policy applies to --offload cached, not 'on-demand'"),
    (lambda ckpt: GenerationConfig(max_new_tokens=0), "max_new_tokens",
     ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (lambda ckpt: SamplingParams(greedy=False, temperature=0.0), "temperature",
     ["--temperature", "0"], "--temperature must be a finite number > 0"),
    (lambda ckpt: moejax.load(ckpt).generate([1, 2], stop_token_ids=(50,)), "stop_token_ids",
     ["--stop-ids", "3,50"], "--stop-ids: token id 50 is outside the vocabulary [0, 50)"),
])
def test_library_errors_name_the_parameter_and_the_cli_the_flag(capsys, ckpt, call, parameter, argv, flag_message):
    err = parameter_error(lambda: call(ckpt))
    assert parameter in err.parameters
    assert str(err).startswith(parameter) and "--" not in str(err), str(err)
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1,2", *argv], flag_message)


def test_lab_replay_names_its_parameters_and_the_cli_its_flags(capsys, tmp_path):
    trace = RoutingTrace(np.array([[[0, 1], [2, 3]]]), np.array([2]), num_experts=4)
    err = parameter_error(lambda: replay(trace, capacity_fraction=0.5, policy="lru", expert_bytes=-5))
    assert err.parameters == ("expert_bytes",) and str(err) == "expert_bytes must be a positive number of bytes, got -5"
    err = parameter_error(lambda: replay(trace, capacity_fraction=1.5, policy="lru"))
    assert str(err).startswith("capacity_fraction must be a fraction in (0, 1]")
    trace.save(tmp_path / "routing.npz")
    one_line_error(capsys, ["lab", "--traces", tmp_path / "routing.npz", "--capacity", "0.5", "--expert-bytes", "-5"],
                   "--expert-bytes must be a positive number of bytes, got -5")
    one_line_error(capsys, ["lab", "--traces", tmp_path / "routing.npz", "--capacity", "0.5", "--policy", "bogus"],
                   "--policy 'bogus' is not one of lru, lfu, fifo, lifo, activation, belady")


def test_every_flag_a_parameter_maps_to_exists():
    """Each parameter's name on the command line is a flag, or words naming the flags that set it."""
    options = {option for command in build_parser()._subparsers._group_actions[0].choices.values()
               for action in command._actions for option in action.option_strings}
    named = {flag for text in FLAGS.values() for flag in re.findall(r"--[a-z][a-z-]*", text)}
    assert all(re.search(r"--[a-z]", text) for text in FLAGS.values())
    assert named <= options, named - options


def test_a_value_with_braces_is_not_read_as_a_template():
    err = ParameterError("{offload} {value!r} is not one of a, b", value="{x}")
    assert str(err) == "offload '{x}' is not one of a, b"
    assert err.render({"offload": "--offload"}) == "--offload '{x}' is not one of a, b"


# -- expert budget ------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,expected", [
    ("2.0", ["--expert-budget '2.0': a bare number is a fraction", "2.0GB", "2.0B for bytes"]),
    ("1e30", ["--expert-budget '1e30': a bare number is a fraction"]),
    ("1e400GB", ["--expert-budget '1e400GB' is too large to represent"]),
    ("1e300TB", ["--expert-budget '1e300TB' is too large to represent"]),
    ("1536B", ["--expert-budget of 1,536 bytes holds 1 expert, but a step of this engine can need 3 at once",
               "minimum budget 4,608 bytes", "or a smaller --prefill-chunk and the number of prompts"]),
])
def test_expert_budget_that_means_nothing_sensible_is_refused(capsys, ckpt, budget, expected):
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1,2", "--offload", "cached", "--expert-budget", budget],
                   *expected)


@pytest.mark.parametrize("budget", ["1TB", "1000000GiB"])
def test_expert_budget_above_all_experts_is_capped_with_a_note(capsys, ckpt, budget):
    argv = ["generate", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--offload", "cached", "--expert-budget", budget]
    assert main([str(a) for a in argv + ["--json"]]) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)["stats"]
    assert stats["capacity_experts"] == stats["host_experts"] == 3
    notes = [line for line in captured.err.splitlines() if line.startswith("moejax: note:")]
    assert len(notes) == 1 and "more than all 3 experts take" in notes[0] and "the cache holds all of them" in notes[0]
    assert main([str(a) for a in argv]) == 0
    assert "cached lru, 3 slots (all experts)" in capsys.readouterr().err


def test_capped_budget_is_logged_by_the_library(caplog):
    with caplog.at_level(logging.WARNING, logger="moejax"):
        assert cache_capacity(10**12, 100, min_experts=2, max_experts=8, memory=None) == 8
    assert ["the expert budget (1,000,000,000,000 bytes) is more than all 8 experts take (800 bytes): "
            "the cache holds all of them"] == [r.getMessage() for r in caplog.records]


# -- files of the wrong kind ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["info"], ["generate"], ["export"]])
def test_unconverted_hf_directory_says_to_convert(capsys, hf_dir, tmp_path, command):
    argv = command + [hf_dir] + {"info": [], "generate": ["--prompt-ids", "1"], "export": [tmp_path / "out"]}[command[0]]
    one_line_error(capsys, argv, f"{hf_dir}: a HuggingFace checkpoint (model_type 'qwen2_moe'), not a moejax one",
                   f"moejax convert {hf_dir} OUT_DIR")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,expected", [
    (lambda config: {k: v for k, v in config.items() if k != "format_version"}, "no format_version: not a moejax checkpoint"),
    (lambda config: {**config, "format_version": 2}, "checkpoint format_version 2 is not supported (expected 1)"),
    (lambda config: {k: v for k, v in config.items() if k != "rope"}, "not a valid moejax config (KeyError: 'rope')"),
])
def test_bad_moejax_config_names_the_file(capsys, ckpt, tmp_path, edit, expected):
    copy = tmp_path / "mj"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(edit(config)))
    one_line_error(capsys, ["info", copy], f"{copy / 'config.json'}: {expected}")


def test_npz_that_is_no_archive_says_what_the_file_should_hold(capsys, tmp_path):
    path = tmp_path / "not_really.npz"
    path.write_text("hello\n")
    line = one_line_error(capsys, ["lab", "--traces", path, "--capacity", "0.5"],
                          f"{path}: not an .npz archive", "experts [MoE layers, tokens, k] and seq_lens [sequences]")
    assert "pickle" not in line


def test_npz_of_python_objects_is_not_unpickled(capsys, tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, experts=np.array([{"a": 1}], dtype=object), seq_lens=np.array([1]))
    line = one_line_error(capsys, ["lab", "--traces", path, "--capacity", "0.5"], "holds Python objects, which moejax never loads")
    assert "pickle" not in line


@pytest.fixture(scope="module")
def trace_dir(ckpt) -> Path:
    """What `moejax trace` writes for two labelled prompts of token ids."""
    prompts = ckpt.parent / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3], "task": "math"}\n{"prompt_ids": [4, 5], "task": "code"}\n')
    out = ckpt.parent / "traces"
    assert main(["trace", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "2", "--quiet",
                 "--router-probs"]) == 0
    return out


def test_trace_directory_is_accepted_everywhere(capsys, ckpt, trace_dir):
    assert main(["lab", "--traces", str(trace_dir), "--fit", str(trace_dir), "--capacity", "0.7", "--policy", "activation",
                 "--prefetch", "trace", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["collection_size"] == 2
    assert main(["generate", str(ckpt), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--offload", "cached",
                 "--expert-budget", "1", "--prefetch", "trace", "--traces", str(trace_dir), "--task", "code"]) == 0
    routed = load_routing(trace_dir)  # the fed tokens' ids: prompt, then the new tokens but the last
    assert routed.seq_lens.tolist() == [4, 3] and routed.token_ids[[0, 1, 2, 4, 5]].tolist() == [1, 2, 3, 4, 5]
    probs = routed.router_probs  # the chosen experts' router probabilities: the top-k of a softmax
    assert probs.shape == routed.experts.shape and (probs > 0).all() and (probs.sum(-1) <= 1 + 1e-5).all()
    assert (np.diff(probs, axis=-1) <= 1e-6).all()  # in the router's order, likeliest first
    assert (probs.sum(-1) * routed.num_experts >= routed.top_k - 1e-4).all()  # the top k of E hold at least k / E
    out = trace_dir.parent / "sida"
    assert main(["train-predictor", "--kind", "sida", "--traces", str(trace_dir), "--out", str(out), "--epochs", "1",
                 "--hidden", "8", "--context", "16", "--validation", "0", "--quiet"]) == 0
    assert json.loads((out / "predictor.json").read_text())["summary"]["soft_labels"]  # distilled from router_probs


def test_trace_file_of_the_other_kind_names_the_one_wanted(capsys, ckpt, trace_dir):
    for flag in ("--traces", "--fit"):
        argv = ["lab", "--traces", trace_dir, "--capacity", "0.7", flag, trace_dir / "eams.npz"]
        one_line_error(capsys, argv, f"{trace_dir / 'eams.npz'}: an EAM collection", "give routing.npz or the directory")
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1", "--offload", "cached", "--prefetch", "trace",
                            "--traces", trace_dir / "routing.npz"],
                   f"{trace_dir / 'routing.npz'}: a routing trace", "give eams.npz or the directory")


# -- flags that were accepted without a word ------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["--offload", "cached", "--cache-policy", "bogus"], ["--cache-policy 'bogus' is not one of lru, lfu, fifo, lifo, activation"]),
    (["--offload", "cached", "--cache-policy", "belady"], ["is not one of lru, lfu, fifo, lifo, activation (belady needs the future"]),
    (["--offload", "on-demand", "--cache-policy", "lru"], ["--cache-policy applies to --offload cached, not 'on-demand'"]),
    (["--offload", "cached", "--prefetch-per-layer", "2"],
     ["--prefetch-per-layer applies to --prefetch lookahead or trace+lookahead, not 'none'"]),
    (["--offload", "cached", "--task", "code"], ["--task labels the prompts for --prefetch trace"]),
])
def test_options_that_would_be_ignored_are_refused(capsys, ckpt, args, expected):
    line = one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1,2", *args], *expected)
    assert "activation, belady" not in line


def test_traces_without_a_reader_are_refused(capsys, ckpt, trace_dir):
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1", "--offload", "cached", "--traces", trace_dir],
                   "--traces feeds --prefetch trace / trace+lookahead and --cache-policy activation")


def test_task_unknown_to_the_traces_is_refused(capsys, ckpt, trace_dir):
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1", "--offload", "cached", "--expert-budget", "1",
                            "--cache-policy", "activation", "--traces", trace_dir, "--task", "nosuchtask"],
                   f"--task 'nosuchtask' is not a task of {trace_dir}: its tasks are code, math")


@pytest.mark.parametrize("line,expected", [
    ('{"prompt_ids": [1, 2], "task": 5}', ":1: 'task' must be a string (a task label), got 5"),
    ('{"prompt_ids": [1, 99]}', ": prompt 1: token id 99 is outside the vocabulary [0, 50)"),
    ('{"prompt_ids": "1,2,3"}', ":1: 'prompt_ids' must be a non-empty list of integer token ids, got \"1,2,3\""),  # was text
    ('{"prompt_ids": [true, 2]}', ":1: 'prompt_ids' must be a non-empty list of integer token ids, got [true, 2]"),  # was 1
    ('{"prompt_ids": [1.5]}', ":1: 'prompt_ids' must be a non-empty list of integer token ids"),
    ('{"prompt_ids": []}', ":1: 'prompt_ids' must be a non-empty list of integer token ids"),
    ('{"text": "hi"}', ":1: 'prompt' must be non-empty text"),
])
def test_bad_trace_prompt_lines(capsys, ckpt, tmp_path, line, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line + "\n")
    text = one_line_error(capsys, ["trace", ckpt, "--prompts", prompts, "--out", tmp_path / "out"], f"{prompts}{expected}")
    assert text.count("prompt ") <= 1, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_trace_limit_must_be_positive(capsys, ckpt, tmp_path, limit):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3]}\n')
    one_line_error(capsys, ["trace", ckpt, "--prompts", prompts, "--out", tmp_path / "out", f"--limit={limit}"],
                   f"--limit must be >= 1 (got {limit})")
    assert not (tmp_path / "out").exists()


def test_trace_of_one_prompt_says_one_sequence(capsys, ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1]}\n')
    assert main(["trace", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--max-new-tokens", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith(": 1 sequence, 1 token x 1 MoE layer\n")
    assert "1/1 " in captured.err and "prompts/" not in captured.err


def test_special_token_outside_the_vocabulary_is_dropped_with_a_note(capsys, hf_dir, tmp_path):
    hf = broken_copy(hf_dir, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "eos_token_id": [7, 50], "bos_token_id": 60}))
    assert main(["convert", str(hf), str(tmp_path / "mj"), "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moejax: note:")]
    assert notes == ["moejax: note: config.json: bos_token_id 60 is outside the vocabulary [0, 50): left out of the converted config",
                     "moejax: note: config.json: eos_token_id 50 is outside the vocabulary [0, 50): left out of the converted config"]
    saved = json.loads((tmp_path / "mj" / "config.json").read_text())
    assert saved["eos_token_ids"] == [7] and saved["bos_token_id"] is None


# -- the policy lab's plot --------------------------------------------------------------------------------

def small_routing_file(tmp_path: Path) -> Path:
    path = tmp_path / "routing.npz"
    RoutingTrace(np.array([[[0, 1], [2, 3], [0, 2]]]), np.array([3]), num_experts=4).save(path)
    return path


@pytest.mark.parametrize("plot", ["missing/dir/p.png", "a_directory"])
def test_unwritable_plot_is_refused_before_computing(capsys, tmp_path, plot):
    (tmp_path / "a_directory").mkdir()
    one_line_error(capsys, ["lab", "--traces", small_routing_file(tmp_path), "--capacity", "0.5", "--plot", tmp_path / plot],
                   f"{tmp_path / plot}: cannot write the plot there")
    assert capsys.readouterr().out == ""


def test_plot_replaces_only_an_earlier_plot(capsys, tmp_path, monkeypatch):
    """It wrote its PNG over any file, e.g. a prompt file given as --plot by mistake."""
    from moejax.tools import lab

    # a stand-in for matplotlib (the plot extra, not the test one) that writes a PNG's signature
    monkeypatch.setattr(lab, "_pyplot", lambda: None)
    monkeypatch.setattr(lab, "plot_curves", lambda curves, path, title: Path(path).write_bytes(b"\x89PNG\r\n\x1a\n"))
    mine = tmp_path / "prompts.jsonl"
    mine.write_text('{"prompt_ids": [1]}\n')
    one_line_error(capsys, ["lab", "--traces", small_routing_file(tmp_path), "--capacity", "0.5", "--plot", mine],
                   f"{mine}: exists and is not a PNG; --plot replaces only an earlier plot")
    assert mine.read_text() == '{"prompt_ids": [1]}\n'
    plot = tmp_path / "p.png"
    for _ in range(2):  # the second run replaces the first's plot
        assert main(["lab", "--traces", str(tmp_path / "routing.npz"), "--capacity", "0.5", "--plot", str(plot)]) == 0


def test_results_are_printed_before_the_plot_is_written(capsys, tmp_path, monkeypatch):
    from moejax.tools import lab

    def fail(curves, path, title):
        raise moejax.MoejaxError(f"{path}: cannot write the plot (No space left on device)")

    monkeypatch.setattr(lab, "check_plot_path", lambda path: None)
    monkeypatch.setattr(lab, "plot_curves", fail)
    argv = ["lab", "--traces", small_routing_file(tmp_path), "--capacity", "0.5,1", "--plot", tmp_path / "p.png"]
    one_line_error(capsys, argv, "cannot write the plot (No space left on device)")
    assert main([str(a) for a in argv]) == 2
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["lru, capacity 0.5 (2 experts)", "lru, capacity 1 (4 experts)"]


# -- the bad-input audit: values that reached numpy, JAX or a silent default --------------------------

@pytest.mark.parametrize("top_k", [1.5, True])
def test_top_k_must_be_an_integer(top_k):
    assert parameter_error(lambda: SamplingParams(greedy=False, top_k=top_k)).parameters == ("top_k",)


def test_top_k_past_int32_keeps_every_token():
    from moejax.engine.slots import sampling_row

    assert sampling_row(SamplingParams(greedy=False, top_k=10**12))[1] == 2**31 - 1


@pytest.mark.parametrize("prefetch,option,all_experts,keywords", [
    ("trace", "prefetch_per_step", 12, {}), ("lookahead", "prefetch_per_layer", 4, {"lookahead_accuracy": 0.5}),
])
def test_prefetching_more_than_every_expert_fetches_every_expert(prefetch, option, all_experts, keywords):
    """A huge --prefetch-per-step / --prefetch-per-layer was a MemoryError or OverflowError traceback."""
    trace = RoutingTrace(np.array([[[0, 1], [2, 3], [0, 2]]] * 3), np.array([3]), num_experts=4)
    huge, capped = ({k: v for k, v in replay(trace, capacity_fraction=0.5, policy="lru", prefetch=prefetch,
                                               **keywords, **{option: n}).items() if k != "replay_s"}
                    for n in (10**12, all_experts))
    assert huge == capped and huge[option] == all_experts


@pytest.mark.parametrize("args,expected", [
    (["--learning-rate", "inf"], "--learning-rate must be a finite number > 0 (got inf)"),  # trained to loss nan
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0 (got nan)"),
    (["--validation", "1"], "--validation must be in [0, 1) (got 1.0)"),
    (["--unknown-rate", "nan"], "--unknown-rate must be in [0, 1) (got nan)"),
    (["--seed=-1"], "--seed must be >= 0 (got -1)"),  # was a numpy traceback
])
def test_train_predictor_names_the_bad_flag(capsys, tmp_path, args, expected):
    argv = ["train-predictor", "--kind", "sida", "--traces", small_routing_file(tmp_path), "--out", tmp_path / "p", *args]
    one_line_error(capsys, argv, expected)
    assert not (tmp_path / "p").exists()


def test_lab_refuses_a_negative_seed(capsys, tmp_path):
    """The simulated lookahead's numpy generator raised a traceback for it."""
    one_line_error(capsys, ["lab", "--traces", small_routing_file(tmp_path), "--capacity", "0.5", "--prefetch", "lookahead",
                            "--lookahead-accuracy", "0.5", "--seed=-1"], "--seed must be >= 0 (got -1)")


@pytest.mark.parametrize("args,expected", [
    (["--placement", "balanced"], "--placement, --placement-traces and --hot-replicas share the experts out among "
                                  "several devices: give --devices N > 1 too"),
    (["--placement", "balanced", "--placement-traces", "missing", "--hot-replicas", "1"], "give --devices N > 1 too"),
    (["--placement-traces", "missing"], "--placement-traces is the load --placement 'balanced' reads, not 'round-robin'"),
])
def test_placement_options_that_would_be_ignored_are_refused(capsys, ckpt, args, expected):
    """On one device, or with round-robin placement, they were accepted and ignored (a missing file too)."""
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1,2", *args], expected)


@pytest.mark.parametrize("every", ["0", "3"])
def test_predict_every_without_the_predictor_prefetcher_is_refused(capsys, ckpt, every):
    """It was accepted and ignored (0 too)."""
    one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1,2", "--offload", "cached", "--predict-every", every],
                   "--predict-every paces the predictor of --prefetch predictor")


@pytest.mark.parametrize("args,expected", [
    (["--lookahead-accuracy", "0.5"], "--lookahead-accuracy simulates the lookahead: it applies to --prefetch lookahead "
                                      "or trace+lookahead, not 'none'"),
    (["--fit-sequences", "0:1"], "--fit-sequences selects sequences of --fit: give --fit too"),
])
def test_lab_options_that_would_be_ignored_are_refused(capsys, tmp_path, args, expected):
    one_line_error(capsys, ["lab", "--traces", small_routing_file(tmp_path), "--capacity", "0.5", *args], expected)


@pytest.mark.parametrize("keywords,parameter", [
    ({"slots": 1.5}, "slots"), ({"max_seq_len": 2.5}, "max_seq_len"), ({"prefill_chunk": None}, "prefill_chunk"),
    ({"slots": "4"}, "slots"),
])
def test_load_sizes_must_be_integers(keywords, parameter):
    """A fraction reached JAX's shape checks (a TypeError from inside JAX), after the weights were read."""
    err = parameter_error(lambda: moejax.load("no/such/checkpoint", **keywords))
    assert err.parameters == (parameter,) and "must be an integer" in str(err)


@pytest.mark.parametrize("field", ["max_new_tokens", "seed"])
def test_generation_counts_and_seeds_must_be_integers(field):
    """1.5 was accepted."""
    assert parameter_error(lambda: GenerationConfig(**{field: 1.5})).parameters == (field,)


def test_expert_dir_of_something_else_is_named_and_kept(capsys, ckpt, trace_dir, tmp_path):
    """A directory without a manifest (here the traces) was to be deleted "to rebuild it"; a file was an errno."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for expert_dir, expected in ((trace_dir, f"{trace_dir} has no manifest, so it is not an expert directory"),
                                 (a_file, f"{a_file}: not a directory")):
        line = one_line_error(capsys, ["generate", ckpt, "--prompt-ids", "1,2", "--offload", "cached", "--expert-budget",
                                       "1", "--host-budget", "0.5", "--expert-dir", expert_dir], expected)
        assert "delete" not in line
    assert a_file.read_text() == "mine" and sorted(p.name for p in trace_dir.iterdir()) == [
        "eams.npz", "routing.npz", "summary.json"]


def test_token_ids_must_be_integers(ckpt):
    """[[1.5, 2]] and [[True, 2]] generated from [1, 2]; [1.5, 2] was a TypeError."""
    engine = moejax.load(ckpt, slots=1, max_seq_len=8)
    for prompts, expected in (([[1.5, 2]], "prompt 0: token id 1.5 is not an integer"),
                              ([[True, 2]], "prompt 0: token id True is not an integer"),
                              ([1.5, 2], "prompt 0 must be a list of token ids, got 1.5")):
        with pytest.raises(moejax.MoejaxError, match=re.escape(expected)):
            engine.generate(prompts, max_new_tokens=1)
    with pytest.raises(moejax.MoejaxError, match=re.escape("prompt: token id 2.0 is not an integer")):
        engine.prefill(0, [1, 2.0])
    assert engine.encode([np.int64(3), 4]) == [[3, 4]] and type(engine.encode([np.int64(3)])[0][0]) is int


def test_training_flags_of_a_counting_predictor_are_refused(capsys, tmp_path):
    """--kind frequency / token-table train no network: --epochs, --hidden etc. were accepted and ignored."""
    argv = ["train-predictor", "--kind", "frequency", "--traces", small_routing_file(tmp_path), "--out", tmp_path / "p",
            "--epochs", "5", "--bidirectional"]
    one_line_error(capsys, argv, "--bidirectional, --epochs set how sida and emoe predictors learn; --kind frequency "
                                 "counts routing instead")
    assert not (tmp_path / "p").exists()
