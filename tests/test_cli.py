"""The `moejax` command end to end on a tiny Qwen3-MoE checkpoint with a BPE tokenizer."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import moejax
from moejax.cli import main

VOCAB = 300
CORPUS = ["the history of the world is the history of words", "once upon a time there was a tiny model"]


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with fewer than VOCAB ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    assert tokenizer.get_vocab_size() <= VOCAB
    return tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(transformers model, converted checkpoint with tokenizer, tokenizer)."""
    torch.manual_seed(0)
    config = T.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=8, num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=8,
                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], initializer_range=0.2,
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = T.AutoModelForCausalLM.from_config(config)
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "hf")
    tokenizer = train_tokenizer()
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    assert main(["convert", str(root / "hf"), str(root / "mj"), "--quiet"]) == 0
    return model, root / "mj", tokenizer


def run_json(capsys, argv) -> dict:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_convert_copies_the_tokenizer(built):
    """The checkpoint carries the source's tokenizer.json byte for byte, and the engine encodes with it."""
    _, ckpt, tokenizer = built
    source = Path(ckpt).parent / "hf" / "tokenizer.json"
    assert (Path(ckpt) / "tokenizer.json").read_bytes() == source.read_bytes()
    text = "once upon a time, the history"
    assert moejax.load(ckpt).encode(text) == [tokenizer.encode(text).ids]


def test_info_json_counts_match_transformers(capsys, built):
    model, ckpt, _ = built
    info = run_json(capsys, ["info", ckpt, "--json"])
    params = info["parameters"]
    assert info["config"]["family"] == "qwen3_moe"
    assert params["total"] == model.num_parameters()
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert params["experts"] == sum(p.numel() for p in experts)
    assert params["one_expert"] == 3 * 16 * 8
    assert params["one_expert_bytes"] == 4 * params["one_expert"]
    assert params["dense_bytes"] == 4 * (params["total"] - params["experts"])


def test_info_text_shows_architecture_counts_and_bytes(capsys, built):
    model, ckpt, _ = built
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    for text in ("qwen3_moe", "float32", "layers 2 (1 MoE)", "experts 4 per MoE layer, top-2",
                 f"total {model.num_parameters():,}", "one expert", "dense"):
        assert text in out, text


def test_generate_json_has_tokens_text_and_timing(capsys, built):
    _, ckpt, tokenizer = built
    out = run_json(capsys, ["generate", ckpt, "--prompt-ids", "5,6,7", "--prompt-ids", "9", "--max-new-tokens", "5", "--json"])
    assert [len(t) for t in out["tokens"]] == [5, 5]
    assert out["text"] == [tokenizer.decode(t) for t in out["tokens"]]
    for key in ("ttft_s", "tpot_s", "tokens_per_s"):
        assert out["timing"][key] > 0


def test_greedy_generate_matches_transformers(capsys, built):
    model, ckpt, _ = built
    out = run_json(capsys, ["generate", ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json"])
    with torch.no_grad():
        expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out["tokens"] == [expected[0, 3:].tolist()]


def test_sampling_is_deterministic_per_seed(capsys, built):
    _, ckpt, _ = built

    def sample(seed):
        argv = ["generate", ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--temperature", "1.5",
                "--top-p", "0.95", "--seed", seed, "--json"]
        return run_json(capsys, argv)["tokens"]

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first


def test_prompt_text_through_the_tokenizer(capsys, built):
    _, ckpt, tokenizer = built
    prompt = "the history of"
    with_text = run_json(capsys, ["generate", ckpt, "--prompt", prompt, "--max-new-tokens", "4", "--json"])
    ids = ",".join(map(str, tokenizer.encode(prompt).ids))
    with_ids = run_json(capsys, ["generate", ckpt, "--prompt-ids", ids, "--max-new-tokens", "4", "--json"])
    assert with_text["tokens"] == with_ids["tokens"]
    assert with_text["text"] == [tokenizer.decode(with_text["tokens"][0])]


def test_generate_text_output(capsys, built):
    _, ckpt, _ = built
    assert main(["generate", str(ckpt), "--prompt", "once upon", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("[0] ")
    assert "tokens/s" in captured.err
