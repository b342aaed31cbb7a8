"""Prefetching, the trace collection and routing records in the engine.

The engine records what each MoE layer routed (the benchmark's replacement of it: tests/test_bench_scripts.py),
`moejax trace` writes files the engine and the lab read back, and the trace prefetcher learns from
the sequences it sees. That outputs never change with any prefetcher and policy is test_offload's.
"""

import json

import numpy as np
import pytest
from hf_zoo import build, random_prompts
from whole_model import whole_model_routing

import moejax
from moejax.cli import main as cli
from moejax.errors import MoejaxError, ParameterError
from moejax.routing.eams import EAMCollection, eam_counts
from moejax.routing.files import EAMS_FILE, ROUTING_FILE
from moejax.routing.traces import NO_PREDICTION, load_routing


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("prefetch")


@pytest.fixture(scope="module")
def qwen(root):
    """Qwen2-MoE with a dense first layer: the lookahead router must skip to the next MoE layer."""
    _, _, ckpt = build(("qwen2_moe", "dense_first_window"), root)
    return ckpt


def test_recorded_routing_and_eam_match_the_model(qwen):
    """engine.routing(b): every token fed (the prompt and all new tokens but the last), the experts the model's
    routers pick (the whole-model program's), the next MoE layer's guess once asked for, the same for a
    sequence decoded alone or beside others; its activation matrix counts them."""
    engine = moejax.load(qwen)  # its own engine: record_guesses changes what its programs compute
    cfg = engine.cfg
    prompts = random_prompts(cfg.vocab_size, [6, 3], seed=1)
    result = engine.generate(prompts, max_new_tokens=4)
    assert engine.routing(0)[1] is None  # no guesses unless asked for
    engine.record_guesses()
    assert engine.generate(prompts, max_new_tokens=4).tokens == result.tokens
    fed = [prompt + tokens[:-1] for prompt, tokens in zip(prompts, result.tokens, strict=True)]
    for b, (sequence, routed) in enumerate(zip(fed, whole_model_routing(qwen, fed), strict=True)):
        experts, lookahead = engine.routing(b)
        assert experts.shape == (len(cfg.moe_layer_ids), len(sequence), cfg.top_k)
        np.testing.assert_array_equal(np.sort(experts, axis=-1), np.sort(routed, axis=-1))
        eam = eam_counts(experts, cfg.num_experts)
        hand = np.zeros_like(eam)
        for layer in range(experts.shape[0]):
            for token in experts[layer]:
                for e in token:
                    hand[layer, e] += 1
        np.testing.assert_array_equal(eam, hand)
        assert lookahead.shape == experts.shape
        assert (lookahead[0] == NO_PREDICTION).all() and (lookahead[1:] >= 0).all()
    # Each sequence's routing equals its routing alone (the padded batch changes nothing).
    engine.generate(prompts[1:], max_new_tokens=4)
    alone, _ = engine.routing(0)
    engine.generate(prompts, max_new_tokens=4)
    np.testing.assert_array_equal(engine.routing(1)[0], alone)
    with pytest.raises(MoejaxError, match="no routing recorded for prompt 2: run generate first"):
        engine.routing(2)


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
        (["--offload", "cached", "--prefetch", "lookahead", "--prefetch-per-layer", "-1"], "--prefetch-per-layer must be >= 0"),
        (["--offload", "cached", "--prefetch", "trace", "--prefetch-per-layer", "2"],
         "--prefetch-per-layer applies to --prefetch lookahead or trace+lookahead, not 'trace'"),
        (["--offload", "cached", "--prefetch", "trace", "--prefetch-per-step", "-1"], "--prefetch-per-step must be >= 0"),
        (["--offload", "cached", "--prefetch", "lookahead", "--prefetch-per-step", "2"],
         "--prefetch-per-step applies to --prefetch trace, trace+lookahead or predictor, not 'lookahead'"),
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
    limit = 64
    args = ["trace", str(qwen), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--quiet", "--max-seq-len", str(limit)]
    assert cli([*args, "--max-new-tokens", str(limit - 4)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompt 2 has 6 tokens" in err and "set --max-prompt-tokens to 4" in err and not (tmp_path / "o").exists()
    assert cli([*args, "--max-new-tokens", str(limit)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-new-tokens 64 leaves no room for a prompt in a sequence's 64 positions (--max-seq-len)" in err
    assert cli([*args, "--max-prompt-tokens", "0"]) == 2
    assert "--max-prompt-tokens must be >= 1" in capsys.readouterr().err
    from moejax.tools.tracing import prepare_prompts, read_prompts

    kept = prepare_prompts(moejax.load(qwen, max_seq_len=limit), read_prompts(prompts), prompts, limit - 4, max_prompt_tokens=4)
    assert kept == [([1, 2, 3], None), ([4, 5, 6, 7], None)]


def test_trace_prefetcher_learns_from_finished_sequences(qwen):
    """Without traces the collection starts empty; each generation adds its sequences, with their task labels,
    and the prefetcher refits on them."""
    engine = moejax.load(qwen, offload="cached", expert_budget="0.5", prefetch="trace")
    prefetcher = engine.manager.prefetcher
    assert len(engine.collection) == 0 and prefetcher.matcher is None
    prompts = random_prompts(engine.cfg.vocab_size, [6, 4], seed=9)
    engine.generate(prompts, max_new_tokens=3, tasks=["math", "code"])
    assert len(engine.collection) == 2 and prefetcher.matcher is not None
    assert sorted(engine.collection.tasks) == ["code", "math"]
    assert engine.collection.transitions.sum() > 0
    with pytest.raises(ParameterError, match="^tasks gives 1 label for 2 prompts$"):
        engine.generate(prompts, max_new_tokens=3, tasks=["math"])
