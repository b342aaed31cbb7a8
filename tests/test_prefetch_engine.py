"""Prefetching, activation-aware caching and routing recording in the engine.

Outputs never change: every prefetcher with every policy gives the resident model's tokens and
logits bit for bit. The recorder's routing and activation matrices match what the model routed,
and `moejax trace` writes files the engine and the lab read back (the benchmark's routing replay:
tests/test_bench_scripts.py).
"""

import json

import numpy as np
import pytest
from hf_zoo import build, random_prompts

import moejax
from moejax import checkpoint
from moejax.cli import main as cli
from moejax.errors import MoejaxError
from moejax.routing.files import EAMS_FILE, ROUTING_FILE
from moejax.runtime.recorder import NO_PREDICTION, RoutingRecorder
from moejax.routing.eams import EAMCollection, eam_counts
from moejax.routing.traces import load_routing

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("prefetch")


@pytest.fixture(scope="module")
def qwen(root):
    """Qwen2-MoE with a dense first layer: the lookahead router must skip to the next MoE layer."""
    _, _, ckpt = build(("qwen2_moe", "dense_first_window"), root)
    return ckpt


def test_every_prefetcher_and_policy_equals_resident(qwen):
    resident = moejax.load(qwen)
    prompts = random_prompts(resident.cfg.vocab_size, [9, 3, 5], seed=4)
    expected = resident.generate(prompts, max_new_tokens=NEW_TOKENS).tokens
    expected_logits = resident.logits(prompts)
    minimum = f"{resident.cfg.top_k * resident.cfg.expert_bytes}B"
    for prefetch in ("none", "lookahead", "trace", "trace+lookahead"):
        for policy in ("lru", "lifo", "activation"):
            for budget in (minimum, "0.5"):
                label = f"{prefetch} {policy} {budget}"
                engine = moejax.load(qwen, offload="cached", expert_budget=budget, cache_policy=policy, prefetch=prefetch)
                for _ in range(2):  # the second run uses what the first taught the collection
                    result = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
                    assert result.tokens == expected, label
                for ours, ref in zip(engine.logits(prompts), expected_logits, strict=True):
                    np.testing.assert_array_equal(ours, ref, err_msg=label)
                total = result.stats["total"]
                assert total["hits"] + total["misses"] == total["activations"]
                assert total["prefetch_used"] + total["prefetch_wasted"] <= total["prefetch_issued"]
                assert total["bytes_h2d"] == (total["misses"] + total["prefetch_fetches"]) * result.stats["expert_bytes"]
                if prefetch != "none" and budget == "0.5":
                    assert total["prefetch_issued"] > 0, label
                assert 0 <= total["prefetch_precision"] <= 1 and 0 <= total["prefetch_recall"] <= 1


def test_recorded_routing_and_eam_match_the_model(qwen):
    engine = moejax.load(qwen)
    cfg = engine.cfg
    prompts = random_prompts(cfg.vocab_size, [6, 3], seed=1)
    engine.executor.runner.record_lookahead = True
    engine.generate(prompts, max_new_tokens=4)
    for b, prompt in enumerate(prompts):
        experts, lookahead = engine.executor.routing(b)
        # Every token fed: the prompt and all generated tokens but the last.
        assert experts.shape == (len(cfg.moe_layer_ids), len(prompt) + 3, cfg.top_k)
        eam = eam_counts(experts, cfg.num_experts)
        hand = np.zeros_like(eam)
        for layer in range(experts.shape[0]):
            for token in experts[layer]:
                for e in token:
                    hand[layer, e] += 1
        np.testing.assert_array_equal(eam, hand)
        assert (lookahead[0] == NO_PREDICTION).all() and (lookahead[1:] >= 0).all()
    # Each sequence's routing equals its routing alone (the padded batch changes nothing).
    engine.generate(prompts[1:], max_new_tokens=4)
    alone, _ = engine.executor.routing(0)
    engine.generate(prompts, max_new_tokens=4)
    np.testing.assert_array_equal(engine.executor.routing(1)[0], alone)


def test_recorder_pads_layers_that_saw_fewer_tokens():
    recorder = RoutingRecorder(num_moe_layers=2, num_experts=4, top_k=1)
    recorder.start(batch=2, sequences=1)
    recorder.record(0, np.array([[1], [2], [0], [4]]), np.array([True, True, False, False]))  # 2 rows x 2 tokens
    recorder.record(1, np.array([[3], [4]]), None)  # 2 rows x 1 token; row 1 is padding (id 4)
    experts, lookahead = recorder.routing(0)
    np.testing.assert_array_equal(experts[:, :, 0], [[1, 2], [3, 4]])
    assert lookahead is None
    np.testing.assert_array_equal(eam_counts(experts, 4), [[0, 1, 1, 0], [0, 0, 0, 1]])


def test_trace_command_writes_what_engine_and_lab_read(qwen, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt_ids": p, "task": "ab"[i % 2]} for i, p in enumerate(random_prompts(64, [5, 3, 4, 6], seed=3))]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "traces"
    assert cli(["trace", str(qwen), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3",
                "--batch-size", "3", "--quiet"]) == 0
    assert "4 sequences" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequences"] == 4 and 0 <= summary["lookahead_accuracy"] <= 1
    assert sorted(summary["task_expert_share"]) == ["a", "b"]
    trace = load_routing(out / ROUTING_FILE)
    assert list(trace.seq_lens) == [5 + 2, 3 + 2, 4 + 2, 6 + 2] and trace.tasks == ["a", "b", "a", "b"]
    collection = EAMCollection.load(out / EAMS_FILE)
    assert len(collection) == 4
    layers, _, k = trace.experts.shape
    np.testing.assert_array_equal(np.asarray(collection.eams).sum(axis=(1, 2)), trace.seq_lens * layers * k)
    # The engine reads the directory; the lab replays the routing.
    assert cli(["generate", str(qwen), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--offload", "cached",
                "--expert-budget", "0.5", "--prefetch", "trace", "--traces", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["prefetch"] == "trace" and "prefetch_precision" in stats["total"]
    assert cli(["generate", str(qwen), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--offload", "cached",
                "--expert-budget", "0.5", "--prefetch", "trace+lookahead", "--prefetch-floor", "0.4", "--traces", str(out),
                "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["prefetch"] == "trace+lookahead"
    assert cli(["lab", "--traces", str(out / ROUTING_FILE), "--fit", str(out / ROUTING_FILE), "--capacity", "0.5",
                "--policy", "activation", "--prefetch", "trace", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["hit_rate"] <= 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--offload", "cached", "--prefetch", "oracle"], "none, lookahead, trace"),
        (["--offload", "on-demand", "--prefetch", "trace"], "needs --offload cached"),
        (["--offload", "cached", "--prefetch", "trace", "--prefetch-per-layer", "-1"], "--prefetch-per-layer"),
        (["--offload", "cached", "--cache-policy", "belady"], "lab only"),
        (["--offload", "cached", "--prefetch-floor", "0.3"], "--prefetch-floor applies to --prefetch trace"),
        (["--offload", "cached", "--prefetch", "trace", "--prefetch-floor", "2"], "--prefetch-floor must be a probability"),
        (["--offload", "cached", "--prefetch", "trace", "--traces", "/nonexistent/eams.npz"], "/nonexistent/eams.npz"),
    ],
)
def test_bad_prefetch_flags_are_one_line_errors(qwen, capsys, flags, message):
    assert cli(["generate", str(qwen), "--prompt-ids", "1,2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moejax: error:") and message in err and "\n" not in err


def test_trace_collection_of_another_model_is_refused(qwen, tmp_path):
    other = EAMCollection(num_layers=7, num_experts=3)
    other.add(np.ones((7, 3), np.int32))
    other.save(tmp_path / "eams.npz")
    with pytest.raises(MoejaxError, match="7 MoE layers x 3 experts"):
        moejax.load(qwen, offload="cached", prefetch="trace", traces=tmp_path)


def test_bad_prompt_file_is_a_one_line_error(qwen, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"task": "x"}\n')
    assert cli(["trace", str(qwen), "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_trace_refuses_too_long_prompts_before_running(qwen, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt_ids": [4, 5, 6, 7, 8, 9]}\n')
    limit = checkpoint.load_config(qwen).max_position_embeddings
    args = ["trace", str(qwen), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--quiet"]
    assert cli([*args, "--max-new-tokens", str(limit - 4)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompt 2 has 6 tokens" in err and "set --max-prompt-tokens to 4" in err and not (tmp_path / "o").exists()
    assert cli([*args, "--max-prompt-tokens", "0"]) == 2
    assert "--max-prompt-tokens must be >= 1" in capsys.readouterr().err
    from moejax.tracing import prepare_prompts, read_prompts

    kept = prepare_prompts(moejax.load(qwen), read_prompts(prompts), prompts, limit - 4, max_prompt_tokens=4)
    assert kept == [([1, 2, 3], None), ([4, 5, 6, 7], None)]


def test_trace_prefetcher_learns_from_finished_sequences(qwen):
    """Without --traces the collection starts empty; each generation adds its sequences and the
    prefetcher refits on them."""
    engine = moejax.load(qwen, offload="cached", expert_budget="0.5", prefetch="trace")
    runner = engine.executor.runner
    assert len(runner.collection) == 0 and runner.prefetcher.matcher is None
    engine.generate(random_prompts(engine.cfg.vocab_size, [6, 4], seed=9), max_new_tokens=3)
    assert len(runner.collection) == 2 and runner.prefetcher.matcher is not None
    assert runner.collection.transitions.sum() > 0
