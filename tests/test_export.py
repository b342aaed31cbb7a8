"""`moejax export` against transformers: a tiny random moejax checkpoint exported to HF format (in
several shards) loads in MixtralForCausalLM with the same logits and greedy tokens, and `moejax
convert` brings back identical weights and config (the converter proven in both directions). Export
streams: it checks its output first and holds one checkpoint group at a time, never the model."""

import json
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers as T
from hf_zoo import assert_logits_close, hf_greedy, hf_logits, random_prompts

import moejax
from moejax import checkpoint
from moejax.checkpoint import save_checkpoint
from moejax.cli import DEFAULT_CHECKPOINT
from moejax.cli import main as moejax_cli
from moejax.config import ModelConfig
from moejax.convert.export import export
from moejax.convert.safetensors_file import INDEX_FILE, SINGLE_FILE, read_header
from moejax.models.decoder import init_params, parameter_counts
from moejax.train.bpe import BOS_ID, EOS_ID, train_bpe_tokenizer, write_tokenizer_files

TEXTS = ["The cat sat on the mat.", "Der Hund schläft.", "def f(x):\n    return x + 1"] * 10


def random_checkpoint(root, dtype: str, tie: bool = False):
    tokenizer = train_bpe_tokenizer(TEXTS, 300)
    cfg = ModelConfig(family="mixtral", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, num_experts=4, top_k=2, expert_intermediate_size=24, moe_layers=(True, True),
                      sliding_windows=(None, None), rms_norm_eps=1e-5, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), dtype=dtype)
    params = init_params(cfg, jax.random.PRNGKey(7), std=0.15)  # clear logit and routing margins
    tok_dir = root / f"tok-{dtype}"
    tok_dir.mkdir()
    write_tokenizer_files(tokenizer, tok_dir, cfg.max_position_embeddings)
    ckpt = root / f"mj-{dtype}-{tie}"
    save_checkpoint(ckpt, cfg, *params, tokenizer_dir=tok_dir)
    return cfg, ckpt


def all_groups(cfg: ModelConfig):
    yield ("globals",)
    for i in range(cfg.num_layers):
        yield ("layer", i)
        for e in range(cfg.num_experts):
            yield ("expert", i, e)


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}/{key}").items()}
    return {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg, ckpt = random_checkpoint(root, "float32")
    hf_dir = root / "hf"
    assert moejax_cli(["export", str(ckpt), str(hf_dir), "--quiet", "--max-shard-size", "20kB"]) == 0
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1
    model = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return cfg, ckpt, hf_dir, model


def test_exported_model_is_mixtral_with_moejax_logits(exported):
    cfg, ckpt, _, model = exported
    assert type(model).__name__ == "MixtralForCausalLM"
    engine = moejax.load(ckpt)
    prompts = random_prompts(cfg.vocab_size, [12, 5, 1])
    for prompt, ours in zip(prompts, engine.logits(prompts)):
        assert_logits_close(ours, hf_logits(model, prompt))
    for prompt, tokens in zip(prompts[:2], engine.generate(prompts[:2], max_new_tokens=10, ignore_eos=True).tokens):
        assert tokens == hf_greedy(model, prompt, 10)


def test_exported_tokenizer_loads_in_transformers(exported):
    _, ckpt, hf_dir, _ = exported
    hf_tokenizer = T.AutoTokenizer.from_pretrained(hf_dir)
    engine = moejax.load(ckpt)
    for text in TEXTS[:3]:
        assert hf_tokenizer(text)["input_ids"] == engine.encode(text)[0]
        assert hf_tokenizer.decode(engine.encode(text)[0], skip_special_tokens=True) == text


@pytest.mark.parametrize("dtype,tie,shard_size", [("float32", False, "5GB"), ("bfloat16", False, "9KiB"), ("float32", True, "5GB")])
def test_export_then_convert_gives_identical_weights(tmp_path, dtype, tie, shard_size):
    cfg, ckpt = random_checkpoint(tmp_path, dtype, tie)
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert moejax_cli(["export", str(ckpt), str(hf_dir), "--quiet", "--max-shard-size", shard_size]) == 0
    assert (hf_dir / SINGLE_FILE).is_file() == (shard_size == "5GB")
    assert moejax_cli(["convert", str(hf_dir), str(back), "--quiet"]) == 0
    assert checkpoint.load_config(back) == cfg
    for group in all_groups(cfg):
        original, returned = flat(checkpoint.load_group(ckpt, group)), flat(checkpoint.load_group(back, group))
        assert original.keys() == returned.keys(), group
        for name, array in original.items():
            assert returned[name].dtype == array.dtype and np.array_equal(returned[name], array), (group, name)
    assert (back / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()


def test_export_errors_are_one_line(tmp_path, capsys, exported):
    _, ckpt, hf_dir, _ = exported
    assert moejax_cli(["export", str(ckpt), str(hf_dir), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert moejax_cli(["export", str(tmp_path / "nothing"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_model_exports_in_shards_that_transformers_loads_with_identical_logits(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    assert moejax_cli(["export", str(DEFAULT_CHECKPOINT), str(sharded), "--quiet", "--max-shard-size", "3MB"]) == 0
    assert moejax_cli(["export", str(DEFAULT_CHECKPOINT), str(single), "--quiet"]) == 0
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) >= 4 and not (sharded / SINGLE_FILE).exists()
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((sharded / INDEX_FILE).read_text())
    headers = {p.name: read_header(p) for p in shards}
    assert index["weight_map"] == {name: file for file, tensors in headers.items() for name in tensors}
    assert index["metadata"]["total_size"] == sum(t.nbytes for tensors in headers.values() for t in tensors.values())
    assert index["weight_map"].keys() == read_header(single / SINGLE_FILE).keys()
    for tensors in headers.values():  # at most 3 MB, unless one tensor alone is larger
        assert sum(t.nbytes for t in tensors.values()) <= 3e6 or len(tensors) == 1

    load = lambda path: T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    from_shards, from_single = load(sharded), load(single)
    prompt = random_prompts(from_single.config.vocab_size, [9])[0]
    assert np.array_equal(hf_logits(from_shards, prompt), hf_logits(from_single, prompt))


def test_export_checks_its_output_before_reading_the_checkpoint(tmp_path, monkeypatch, capsys):
    def no_reading(*args):
        raise AssertionError("export read the checkpoint before checking its output")

    monkeypatch.setattr(checkpoint, "load_group", no_reading)
    (tmp_path / "taken").mkdir()
    assert moejax_cli(["export", str(DEFAULT_CHECKPOINT), str(tmp_path / "taken"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_holds_one_checkpoint_group_at_a_time_not_the_model(tmp_path):
    cfg = checkpoint.load_config(DEFAULT_CHECKPOINT)
    model_bytes = parameter_counts(cfg)["total"] * cfg.dtype_bytes
    export(DEFAULT_CHECKPOINT, tmp_path / "warm-up", show_progress=False)  # imports and caches outside the measure
    tracemalloc.start()
    try:
        export(DEFAULT_CHECKPOINT, tmp_path / "measured", show_progress=False, max_shard_size="2MB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The largest group, the globals (embedding + lm_head), is 22% of this model.
    assert peak < model_bytes / 3, (peak, model_bytes)


@pytest.mark.parametrize("size,problem", [
    ("5", "is not a size with a unit"), ("5XB", "is not a size with a unit"), ("big", "is not a size with a unit"),
    ("-1GB", "is not a size with a unit"), ("0MB", "must be at least 1 byte"),
])
def test_bad_shard_sizes_are_one_line_errors(tmp_path, capsys, size, problem):
    assert moejax_cli(["export", str(DEFAULT_CHECKPOINT), str(tmp_path / "out"), f"--max-shard-size={size}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moejax: error: --max-shard-size '{size}' {problem} (e.g. 5GB, 500MB, 2GiB)"
    assert not (tmp_path / "out").exists()
