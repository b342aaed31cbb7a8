"""Training: the load-balancing loss by hand and against transformers, steps that lower the loss,
corpus splitting and packing, the BPE tokenizer, and scripts/train_small_moe.py end to end at tiny size."""

import importlib.util
import json
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax.config import ModelConfig
from moejax.errors import MoejaxError
from moejax.models.decoder import init_params
from moejax.train.bpe import BOS_ID, EOS_ID, train_bpe_tokenizer
from moejax.train.corpus import Document, clean_wikitext, expand_paths, file_documents, pack, split_documents, windows
from moejax.train.objective import expert_load, load_balancing_loss
from moejax.train.step import learning_rate, make_eval_step, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parent.parent


def tiny_config(**changes) -> ModelConfig:
    base = dict(family="mixtral", vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                num_experts=4, top_k=2, expert_intermediate_size=16, moe_layers=(True,), sliding_windows=(None,),
                max_position_embeddings=64, dtype="float32")
    return ModelConfig(**{**base, **changes})


def test_load_balancing_loss_hand_computed():
    # 2 experts, top-1. Three tokens prefer expert 0 with p = (3/4, 1/4), one prefers expert 1 with (1/4, 3/4).
    # f = (3/4, 1/4); P = ((3 * 3/4 + 1/4) / 4, (3 * 1/4 + 3/4) / 4) = (0.625, 0.375);
    # loss = 2 * (3/4 * 0.625 + 1/4 * 0.375) = 1.125.
    ln3 = np.log(3.0)
    logits = jnp.array([[ln3, 0.0], [ln3, 0.0], [ln3, 0.0], [0.0, ln3]])
    np.testing.assert_allclose(np.asarray(expert_load(logits, 1)), [0.75, 0.25])
    np.testing.assert_allclose(float(load_balancing_loss(logits, 1)), 1.125, rtol=1e-6)


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_collapse():
    uniform = jnp.zeros((6, 3))  # equal probabilities; top-2 ties broken by index, so load is skewed...
    balanced = jnp.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])  # ...this one spreads load evenly
    assert float(load_balancing_loss(uniform, 2)) == pytest.approx(1.0)
    assert float(load_balancing_loss(balanced, 2)) == pytest.approx(1.0)
    collapsed = jnp.tile(jnp.array([[5.0, 4.0, -5.0]]), (3, 1))
    assert float(load_balancing_loss(collapsed, 2)) > 1.4


def test_load_balancing_loss_is_transformers_mixtral_over_k():
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32) * 2
    ref = float(load_balancing_loss_func((torch.tensor(logits),), num_experts=6, top_k=2))
    assert 2 * float(load_balancing_loss(jnp.asarray(logits), 2)) == pytest.approx(ref, rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    assert learning_rate(0, 0.0, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 0.0, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(50, 0.5, 1.0, 10) == pytest.approx(0.55)
    assert learning_rate(99, 1.0, 1.0, 10) == pytest.approx(0.1)


def test_train_steps_lower_the_loss():
    cfg = tiny_config()
    stream = jnp.asarray(np.tile(np.arange(2, 30, dtype=np.int32), 40))  # a learnable cycle
    held = jnp.asarray(windows(np.asarray(stream), 16, 4))
    params = init_params(cfg, jax.random.PRNGKey(0))
    optimizer = make_optimizer()
    opt_state = optimizer.init(params)
    step = make_train_step(cfg, optimizer, batch=8, length=16, aux_coef=0.01)
    evaluate = make_eval_step(cfg)
    before, balance, load = evaluate(params, held)
    assert load.shape == (1, 4) and np.allclose(np.asarray(load).sum(axis=1), 1.0)
    for i in range(25):
        params, opt_state, metrics = step(params, opt_state, stream, jax.random.PRNGKey(1), i, 1e-2)
        assert np.isfinite(float(metrics["loss"]))
    after, _, _ = evaluate(params, held)
    assert float(before) > np.log(cfg.vocab_size) - 0.5
    assert float(after) < float(before) - 1.5, (float(before), float(after))


def test_wikitext_articles_are_split_and_cleaned(tmp_path):
    raw = " \n = Alpha = \n \n Alpha @-@ beta , gamma ( delta ) . \n \n = = History = = \n \n It 's old . \n = Beta = \n Two . \n"
    path = tmp_path / "wiki.txt"
    path.write_text(raw)
    docs = file_documents(path)
    assert [d.text for d in docs] == ["= Alpha =\n\nAlpha-beta, gamma (delta).\n\n== History ==\n\nIt's old.", "= Beta =\nTwo."]
    assert clean_wikitext(" 3 @.@ 5 @,@ 000 ") == "3.5,000"
    assert clean_wikitext("the <unk> river , named <unk> ") == "the river, named"


def test_jsonl_records_plain_files_and_bad_input(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task": "math", "prompt": "Q: 1+1?\nA:", "reference": "2"}) + "\n\n"
                     + json.dumps({"task": "story", "prompt": "Once"}) + "\n")
    assert [d.text for d in file_documents(tasks)] == ["Q: 1+1?\nA: 2", "Once"]
    plain = tmp_path / "notes.md"
    plain.write_text("just text\n")
    assert [d.text for d in file_documents(plain)] == ["just text"]
    assert expand_paths([tmp_path]) == [plain, tasks]
    with pytest.raises(MoejaxError, match="no such file"):
        expand_paths([tmp_path / "missing"])
    tasks.write_text("{not json\n")
    with pytest.raises(MoejaxError, match="tasks.jsonl:1"):
        file_documents(tasks)


def test_split_is_stable_and_proportional():
    docs = [Document("x", f"document number {i}") for i in range(3000)]
    splits = split_documents(docs)
    assert splits == split_documents(docs)
    assert 0.02 < len(splits["test"]) / 3000 < 0.06 and 0.02 < len(splits["valid"]) / 3000 < 0.06
    assert sum(len(v) for v in splits.values()) == 3000


def test_bpe_tokenizer_round_trips_and_packs_with_bos_eos():
    texts = ["The cat sat on the mat.", "Le chat dort. Über alles, 東京!", "def f(x):\n    return x * 2"] * 20
    tokenizer = train_bpe_tokenizer(texts, 300)
    assert tokenizer.get_vocab_size() == 300
    for text in set(texts):
        ids = tokenizer.encode(text).ids
        assert ids[0] == BOS_ID and tokenizer.decode(ids) == text
    stream = pack(tokenizer, [Document("a", "ab"), Document("b", "cd")], BOS_ID, EOS_ID)
    assert stream[0] == BOS_ID and stream[-1] == EOS_ID and list(stream).count(BOS_ID) == 2
    w = windows(np.arange(10), 3)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def synthetic_corpus(root: Path) -> Path:
    """Made-up sentences (a few hundred documents) in a text file and a JSON-lines file."""
    rng = np.random.default_rng(0)
    words = "the a cat dog runs sleeps under over red blue house tree quickly slowly and or".split()
    sentence = lambda: " ".join(rng.choice(words, size=rng.integers(5, 12))) + "."  # noqa: E731
    root.mkdir()
    (root / "plain.txt").write_text(" ".join(sentence() for _ in range(400)))
    with open(root / "tasks.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"task": "t", "prompt": sentence(), "reference": sentence(), "id": i}) + "\n")
    return root


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_small_moe", REPO / "scripts" / "train_small_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_ARGS = ["--layers", "1", "--experts", "4", "--hidden", "32", "--expert-ffn", "16", "--heads", "2", "--kv-heads", "1",
             "--head-dim", "16", "--vocab-size", "300", "--seq-len", "16", "--batch", "4", "--warmup-steps", "2",
             "--max-seconds", "120", "--log-every", "0", "--eval-windows", "4"]


def test_training_script_end_to_end(tmp_path):
    script = load_training_script()
    corpus = synthetic_corpus(tmp_path / "corpus")
    ckpt, artifacts = tmp_path / "tiny-moe", tmp_path / "out"
    # 0.05 epochs of ~14,000 tokens: about 11 steps of 64 tokens.
    args = [*TINY_ARGS, "--max-epochs", "0.05", "--corpus", str(corpus), "--checkpoint", str(ckpt), "--artifacts", str(artifacts)]
    assert script.main(args) == 0
    record = json.loads((artifacts / "tiny-moe.train.json").read_text())
    assert record["history"][-1]["step"] >= 2 and record["best_step"] >= 1
    assert record["checkpoint_bytes"] == script.directory_bytes(ckpt) < 16e6
    with tarfile.open(artifacts / "tiny-moe.tar.gz") as tar:
        names = tar.getnames()
    assert "tiny-moe/config.json" in names and "tiny-moe/tokenizer.json" in names
    engine = moejax.load(ckpt)
    assert engine.cfg.dtype == "bfloat16" and engine.cfg.num_experts == 4 and engine.cfg.bos_token_id == BOS_ID
    assert isinstance(engine.generate("the cat", max_new_tokens=4).text[0], str)
    with pytest.raises(MoejaxError, match="already exists"):
        script.main(args)


def test_training_script_refuses_a_model_over_the_size_limit(tmp_path):
    script = load_training_script()
    corpus = synthetic_corpus(tmp_path / "corpus")
    with pytest.raises(MoejaxError, match="over --max-mb"):
        script.main([*TINY_ARGS, "--max-mb", "0.01", "--corpus", str(corpus), "--checkpoint", str(tmp_path / "c")])
