"""Expert predictors: a learned one picks up a synthetic routing rule that needs context (the token-id table
cannot), baselines against hand counts, save/load round trips, damaged directories refused, the
`train-predictor` CLI end to end with the lab's quality report and predictor prefetching."""

import json
import shutil

import numpy as np
import pytest

from moejax.cli import main
from moejax.errors import MoejaxError
from moejax.offload.manager import OffloadManager
from moejax.predictors import store
from moejax.predictors.approximate import PredictedRouting, perplexity
from moejax.predictors.base import FrequencyPredictor, Predictor, TokenTablePredictor, known_token_probabilities
from moejax.predictors.data import TraceData, load_trace_data
from moejax.predictors.quality import top_k_quality
from moejax.predictors.sida import SiDAPredictor, TrainingConfig
from moejax.routing.traces import RoutingTrace

LAYERS, EXPERTS, K = 3, 8, 2


def rule_data(seed, sequences):
    """Token w{a} after w{b} uses experts (a + b (l + 1)) mod 8 and the one l + 1 further at MoE layer l: the
    token alone does not decide them, the previous token does too (b = 0 at a sequence's start)."""
    rng = np.random.default_rng(seed)
    return routed_by_rule([rng.integers(0, 10, int(rng.integers(6, 24))) for _ in range(sequences)], f"rule-{seed}")


def routed_by_rule(sequences, source):
    """TraceData of token id sequences w{i} routed by rule_data's rule."""
    routing = []
    for ids in sequences:
        prev = np.concatenate([[0], ids[:-1]])
        first = [(ids + prev * (layer + 1)) % EXPERTS for layer in range(LAYERS)]
        routing.append(np.stack([np.stack([f, (f + layer + 1) % EXPERTS], -1) for layer, f in enumerate(first)]))
    trace = RoutingTrace(np.concatenate(routing, 1), np.array([len(ids) for ids in sequences]), EXPERTS)
    return TraceData(trace, [[f"w{i}" for i in ids] for ids in sequences], source)


def write_external(data, path):
    """The external layout: NAME.npz (experts, seq_lens) + NAME_tokens.json."""
    np.savez(path, experts=data.trace.experts.astype(np.uint8), seq_lens=data.trace.seq_lens)
    path.with_name(f"{path.stem}_tokens.json").write_text(json.dumps(data.tokens))


TINY = dict(embed=16, hidden=32, context=32, batch_tokens=256, ngram_buckets=0, dropout=0.0, unknown_rate=0.0)


@pytest.fixture(scope="module")
def trained():
    predictor = SiDAPredictor(LAYERS, EXPERTS, K, TrainingConfig(epochs=25, learning_rate=2e-2, **TINY))
    summary = predictor.fit(rule_data(0, 80))
    return predictor, summary


def test_sida_learns_a_rule_the_token_table_cannot(trained):
    predictor, summary = trained
    held_out = rule_data(1, 20)
    table = TokenTablePredictor(LAYERS, EXPERTS, K)
    table.fit(rule_data(0, 80))
    learned, baseline = top_k_quality(predictor, held_out), top_k_quality(table, held_out)
    assert learned["predictor_recall"] > 0.9, summary
    assert baseline["predictor_recall"] < 0.6
    assert min(learned["per_layer_recall"]) > max(baseline["per_layer_recall"])
    assert summary["validation_sequences"] == 8 and len(summary["epochs"]) == 25


def successor_data(seed, sequences):
    """rule_data's routing over sequences that count up: w{i} is always followed by w{(i + 1) mod 10}, so the
    next token and its experts follow from the tokens so far."""
    rng = np.random.default_rng(seed)
    counting = [(int(rng.integers(0, 10)) + np.arange(int(rng.integers(6, 24)))) % 10 for _ in range(sequences)]
    return routed_by_rule(counting, f"successor-{seed}")


@pytest.fixture(scope="module")
def ahead():
    """SiDA predictors trained on successor_data, with the next-token head (the default) and without."""
    trained = {}
    for next_token in (True, False):
        config = TrainingConfig(epochs=25, learning_rate=2e-2, next_token=next_token, **TINY)
        trained[next_token] = SiDAPredictor(LAYERS, EXPERTS, K, config)
        trained[next_token].fit(successor_data(0, 80))
    return trained


def test_the_next_token_head_names_the_experts_of_a_token_not_yet_known(ahead):
    """Decode's run-ahead knows the tokens before a step's own: the next-token head learns which experts the
    token after them uses, where the token before's own prediction (what stands in without the head, and
    the token-id table) cannot tell; the per-token predictions are those of the predictor trained without
    the head (its loss does not reach the encoder)."""
    held_out = successor_data(1, 20)
    with_head, without = (top_k_quality(ahead[n], held_out) for n in (True, False))
    table = TokenTablePredictor(LAYERS, EXPERTS, K)
    table.fit(successor_data(0, 80))
    assert with_head["next_token_recall"] > 0.9
    assert without["next_token_recall"] < 0.6 and top_k_quality(table, held_out)["next_token_recall"] < 0.6
    tokens = held_out.tokens[0]
    np.testing.assert_allclose(ahead[True].predict(tokens), ahead[False].predict(tokens), atol=1e-5)
    assert with_head["predictor_recall"] == pytest.approx(without["predictor_recall"], abs=1e-3)
    assert ahead[False].predict_next(tokens) is None and ahead[False].predict_each_next(tokens) is None


def test_next_token_predictions_read_only_the_tokens_given(ahead):
    """predict_next(tokens[:t + 1]) is row t of predict_each_next(tokens), across the overlapping windows of a
    sequence longer than the context (32 tokens)."""
    predictor = ahead[True]
    tokens = [f"w{i % 10}" for i in range(70)]
    each = predictor.predict_each_next(tokens)
    assert each.shape == (70, LAYERS, EXPERTS) and 0 <= each.min() and each.max() <= 1
    for stop in (1, 17, 32, 33, 48, 49, 70):
        np.testing.assert_allclose(predictor.predict_next(tokens[:stop]), each[stop - 1], atol=1e-5)
    assert predictor.predict_next([]) is None


def test_the_lab_predicts_a_trace_without_prompts_as_decode_steps(ahead):
    """The lab replays a trace without prompt lengths token by token in decode order, so the predictor's
    probabilities for it are the run-ahead's: the first token's own, then each next token's from the tokens
    before it."""
    from moejax.tools.lab import predictor_probabilities

    data = successor_data(1, 3)
    rows, tokens = predictor_probabilities(ahead[True], data)[0], data.tokens[0]
    np.testing.assert_allclose(rows[0], ahead[True].predict(tokens[:1])[0], atol=1e-5)
    np.testing.assert_allclose(rows[1:], ahead[True].predict_each_next(tokens)[:-1], atol=1e-5)


def test_baselines_against_hand_counts():
    trace = RoutingTrace(np.array([[[0, 1], [0, 2], [3, 1]]]), np.array([3]), 4)
    data = TraceData(trace, [["a", "b", "a"]])
    frequency = FrequencyPredictor(1, 4, 2)
    frequency.fit(data)
    np.testing.assert_allclose(frequency.predict(["z"])[0, 0], [2 / 3, 2 / 3, 1 / 3, 1 / 3])
    table = TokenTablePredictor(1, 4, 2, prior_tokens=0.0)
    table.fit(data)
    np.testing.assert_allclose(table.predict(["a", "z"])[:, 0], [[0.5, 1, 0, 0.5], [2 / 3, 2 / 3, 1 / 3, 1 / 3]])
    quality = top_k_quality(table, data)
    assert quality["predictor_recall"] == pytest.approx(5 / 6)  # the second "a" ties 0 and 3 at 0.5: 0 wins


def test_generated_tokens_are_predicted_from_earlier_tokens_only(ahead):
    """A prompt's tokens from the whole prompt; a generated one (unknown when its step is due) by the
    next-token prediction from the tokens before it, or without one, by the last one's prediction."""
    tokens = ["w1", "w2", "w3", "w4"]
    for predictor in ahead.values():
        out = known_token_probabilities(predictor, tokens, 2)
        np.testing.assert_allclose(out[:2], predictor.predict(tokens[:2]), atol=1e-6)
        for t in (2, 3):
            expected = predictor.predict_next(tokens[:t])
            expected = predictor.predict(tokens[:t])[-1] if expected is None else expected
            np.testing.assert_allclose(out[t], expected, atol=1e-5)
        assert out.shape == (4, LAYERS, EXPERTS)
    all_prompt = known_token_probabilities(ahead[True], tokens, 4)
    np.testing.assert_allclose(all_prompt, ahead[True].predict(tokens), atol=1e-6)


def test_a_causal_predictor_reads_no_later_token(trained):
    """Token t's prediction is the same from the whole sequence and from its first t + 1 tokens, across the
    overlapping windows of a sequence longer than the context (32 tokens)."""
    from moejax.predictors.sida import _windows

    predictor, _ = trained
    tokens = [f"w{i % 10}" for i in range(70)]
    whole = predictor.predict(tokens)
    for stop in (1, 17, 32, 33, 48, 49, 70):
        np.testing.assert_allclose(predictor.predict(tokens[:stop]), whole[:stop], atol=1e-5)
    windows = _windows(70, 32)
    assert windows == [(0, 32, 0), (16, 48, 32), (32, 64, 48), (48, 70, 64)]  # every token scored once


def test_save_load_round_trip(trained, tmp_path):
    predictor, summary = trained
    store.save(predictor, tmp_path / "p", summary)
    loaded = store.load(tmp_path / "p")
    tokens = ["w3", "w1", "unseen", "w7"]
    np.testing.assert_array_equal(loaded.predict(tokens), predictor.predict(tokens))
    assert loaded.summary["epochs"] == summary["epochs"]
    table = TokenTablePredictor(LAYERS, EXPERTS, K)
    table.fit(rule_data(0, 10))
    store.save(table, tmp_path / "t")
    np.testing.assert_array_equal(store.load(tmp_path / "t").predict(tokens), table.predict(tokens))
    with pytest.raises(MoejaxError, match="already exists"):
        store.save(table, tmp_path / "t")


def test_a_predictor_saved_before_the_next_token_head_loads_without_it(ahead, tmp_path):
    tokens = ["w3", "w4", "unseen"]
    store.save(ahead[True], tmp_path / "new")
    np.testing.assert_array_equal(store.load(tmp_path / "new").predict_next(tokens), ahead[True].predict_next(tokens))
    store.save(ahead[False], tmp_path / "old")
    settings = json.loads((tmp_path / "old" / store.SETTINGS_FILE).read_text())
    del settings["settings"]["config"]["next_token"]  # as written before the head existed
    (tmp_path / "old" / store.SETTINGS_FILE).write_text(json.dumps(settings))
    old = store.load(tmp_path / "old")
    assert old.predict_next(tokens) is None
    np.testing.assert_array_equal(old.predict(tokens), ahead[False].predict(tokens))


def _damage(directory, how):
    settings = directory / store.SETTINGS_FILE
    document = json.loads(settings.read_text())
    if how == "no settings":
        settings.unlink()
    elif how == "bad json":
        settings.write_text("{not json")
    elif how == "old format":
        settings.write_text(json.dumps({**document, "format": 1}))
    elif how == "unknown kind":
        settings.write_text(json.dumps({**document, "kind": "oracle"}))
    elif how == "truncated weights":
        data = (directory / store.ARRAYS_FILE).read_bytes()
        (directory / store.ARRAYS_FILE).write_bytes(data[: len(data) // 2])
    elif how == "missing weights":
        arrays = dict(np.load(directory / store.ARRAYS_FILE))
        arrays.pop(sorted(arrays)[0])
        np.savez(directory / store.ARRAYS_FILE, **arrays)
    elif how == "wrong shape":
        document["settings"]["config"]["hidden"] = 24
        settings.write_text(json.dumps(document))


@pytest.mark.parametrize("how, message", [
    ("no settings", "not a predictor directory"), ("bad json", "damaged predictor settings"),
    ("old format", "a predictor of format 1, but this moejax reads format 2 .*train it again"),
    ("unknown kind", "unknown predictor kind 'oracle'"), ("truncated weights", "arrays.npz"),
    ("missing weights", "damaged predictor \\(missing weights"), ("wrong shape", "damaged predictor \\(weights .* shape"),
])
def test_damaged_directory_is_refused(trained, tmp_path, how, message):
    store.save(trained[0], tmp_path / "p")
    _damage(tmp_path / "p", how)
    with pytest.raises(MoejaxError, match=message):
        store.load(tmp_path / "p")


def test_missing_directory_and_tokens_are_named(tmp_path):
    with pytest.raises(MoejaxError, match="no such predictor directory"):
        store.load(tmp_path / "nothing")
    data = rule_data(2, 3)
    write_external(data, tmp_path / "t.npz")
    (tmp_path / "t_tokens.json").write_text(json.dumps(data.tokens[:2]))
    with pytest.raises(MoejaxError, match="2 token sequences for 3 routed ones"):
        load_trace_data(tmp_path / "t.npz")
    (tmp_path / "t_tokens.json").unlink()
    with pytest.raises(MoejaxError, match="t_tokens.json"):
        load_trace_data(tmp_path / "t.npz")


def test_manager_stages_the_predicted_experts_not_resident():
    manager = OffloadManager(2, 4, 1, prefetch="predictor", staged_per_step=2, prefetch_floor=0.1, device=None)
    predicted = np.zeros((3, 2, 4), np.float32)
    predicted[1, 0, 2], predicted[1, 1, 3], predicted[2, 1, 1], predicted[1, 0, 0] = 0.9, 0.8, 0.5, 0.05
    manager.start_sequence(None, predicted)
    assert np.asarray(manager.next_inputs((1, 3)).staged_keys).tolist() == [2, 7]  # 1 * 4 + 3 and 0 * 4 + 2
    resident = np.zeros(8, bool)
    resident[2] = True
    manager.observe(np.zeros((2, 4), np.int64), resident)
    assert np.asarray(manager.next_inputs((1, 3)).staged_keys).tolist() == [7, 5]
    assert manager.next_inputs((0, 1)).staged_keys is None  # nothing above the floor


def test_train_predictor_cli_and_lab(tmp_path, capsys):
    write_external(rule_data(0, 30), tmp_path / "rule.npz")
    argv = ["train-predictor", "--kind", "sida", "--traces", str(tmp_path / "rule.npz"), "--out", str(tmp_path / "p"),
            "--epochs", "1", "--hidden", "8", "--context", "16", "--sequences", ":20", "--quiet"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "predictor.json").read_text())["summary"]["train_sequences"] == 18
    assert main(argv) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    lab = ["lab", "--traces", str(tmp_path / "rule.npz"), "--sequences", "20:", "--predictor", str(tmp_path / "p"), "--json"]
    assert main(lab) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == int(rule_data(0, 30).trace.seq_lens[20:].sum())
    assert len(report["per_layer_recall"]) == LAYERS and 0 <= report["predictor_precision"] <= 1
    assert main(lab + ["--capacity", "0.5", "--prefetch", "predictor", "--expert-bytes", "10"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["prefetch"] == "predictor" and replayed["prefetch_issued"] > 0
    assert replayed["predictor_recall"] == report["predictor_recall"]
    write_external(rule_data(5, 3), tmp_path / "other.npz")
    data = load_trace_data(tmp_path / "other.npz")
    data.trace.num_experts = EXPERTS + 4  # another model's routing
    with pytest.raises(MoejaxError, match="12 experts, but the sida predictor is for 3 of 8"):
        top_k_quality(store.load(tmp_path / "p"), data)
    shutil.rmtree(tmp_path / "p")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "predictor.json").write_text("[]")
    assert main(lab) == 2
    assert "not a predictor of format" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped():
    """The shipped model with a cached expert budget and the predictor prefetcher, and a tiny SiDA predictor
    for its shape trained on random routing (only the plumbing is tested with it)."""
    import moejax

    engine = moejax.load(moejax.SHIPPED_CHECKPOINT, "cached", expert_budget=0.3, prefetch="predictor", slots=2,
                         max_seq_len=64, prefill_chunk=16)
    cfg = engine.cfg
    layers, experts = len(cfg.moe_layer_ids), cfg.num_experts
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cfg.vocab_size, 300)
    routing = rng.integers(0, experts, (layers, 300, cfg.top_k))
    data = TraceData(RoutingTrace(routing, np.array([100, 200]), experts), [[str(t) for t in ids[:100]],
                                                                            [str(t) for t in ids[100:]]])
    predictor = SiDAPredictor(layers, experts, cfg.top_k, TrainingConfig(epochs=1, validation=0.0, **TINY))
    predictor.fit(data)
    return engine, predictor, [ids[:20].tolist(), ids[40:47].tolist()]


def test_run_ahead_never_changes_outputs_and_stops_cleanly(shipped):
    import time

    engine, predictor, prompts = shipped
    cfg = engine.cfg
    exact = engine.generate(prompts, max_new_tokens=12)  # no predictor attached yet: nothing staged
    assert exact.stats["total"]["prefetch_issued"] == 0
    engine.use_predictor(predictor)
    run_ahead = engine.manager.run_ahead
    for _ in range(3):
        assert engine.generate(prompts, max_new_tokens=12).tokens == exact.tokens
    deadline = time.monotonic() + 30
    while run_ahead.predicted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_ahead.predicted > 0 and run_ahead.error is None
    assert run_ahead.used > 0  # some finished prediction reached a step
    engine.close()
    assert not run_ahead.alive
    assert engine.generate(prompts, max_new_tokens=12).tokens == exact.tokens  # usable without the thread
    with pytest.raises(MoejaxError, match="MoE layers"):
        engine.use_predictor(SiDAPredictor(len(cfg.moe_layer_ids) + 1, cfg.num_experts, cfg.top_k))


def test_the_serving_loop_with_a_run_ahead_predictor_gives_the_exact_tokens(shipped, capsys):
    from moejax.cli import main as moejax_cli
    from moejax.serving.loop import ServingLoop
    from moejax.serving.requests import Request

    engine, predictor, prompts = shipped
    exact = engine.generate(prompts, max_new_tokens=8).tokens
    engine.use_predictor(predictor)
    try:
        with ServingLoop(engine) as loop:
            handles = [loop.submit(Request(prompt, max_tokens=8)) for prompt in prompts]
            assert [list(h.result(timeout=120).token_ids) for h in handles] == exact
    finally:
        engine.close()
    assert moejax_cli(["serve", "--port", "0", "--predictor", "somewhere"]) == 2  # moejax serve, as generate
    assert "--predictor DIR goes with --prefetch predictor" in capsys.readouterr().err


class _Oracle(Predictor):
    """Probability 1 for the experts the model itself routed each token of a known prompt to."""

    def __init__(self, routed: dict, num_layers, num_experts, top_k):
        super().__init__(num_layers, num_experts, top_k)
        self.routed = routed

    def predict(self, tokens, experts=None, lookahead=None):
        out = np.zeros((len(tokens), self.num_layers, self.num_experts), np.float32)
        if tuple(tokens) not in self.routed:  # a sequence it does not know: experts 0..k-1
            out[..., : self.top_k] = 1.0
            return out
        chosen = self.routed[tuple(tokens)]  # [L, T, k]
        out[np.arange(len(tokens))[None, :, None], np.arange(self.num_layers)[:, None, None], chosen] = 1.0
        return out


def test_predicted_routing_is_exact_with_the_true_experts_and_approximate_otherwise(shipped):
    engine, _, prompts = shipped
    cfg = engine.cfg
    routed = {}
    for prompt in prompts:
        engine.generate([prompt], max_new_tokens=1)
        routed[tuple(str(t) for t in prompt)] = engine.routing(0)[0]
    exact = perplexity(engine, prompts)
    oracle = PredictedRouting(_Oracle(routed, len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k), cfg.top_k)
    assert perplexity(engine, prompts, oracle) == pytest.approx(exact, rel=1e-4)
    assert engine.routing_override is None
    frequency = FrequencyPredictor(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)
    frequency.probabilities = np.linspace(1, 0, cfg.num_experts, dtype=np.float32)[None].repeat(len(cfg.moe_layer_ids), 0)
    fixed = PredictedRouting(frequency, cfg.top_k, budget=0.25)
    assert perplexity(engine, prompts, fixed) != pytest.approx(exact, rel=1e-3)
    assert fixed.saved == [pytest.approx(1 - cfg.top_k / cfg.num_experts)] * len(prompts)  # the same 2 of 16
    # In generation: the prompt's routing is the model's, so the first token is exact; later tokens follow
    # the tokens the host has read; the engine tells the override every token.
    exact_run = engine.generate(prompts[:1], max_new_tokens=4)
    engine.routing_override = oracle
    try:
        approximate = engine.generate(prompts[:1], max_new_tokens=4)
    finally:
        engine.routing_override = None
    assert approximate.tokens[0][0] == exact_run.tokens[0][0]
    assert oracle._sequences[0]["tokens"] == [str(t) for t in prompts[0] + approximate.tokens[0]]


def test_predicted_routing_takes_an_unread_token_from_the_next_token_prediction():
    """A generated token the host has not read yet gets the next-token prediction from the tokens read; once
    read, its own."""

    class Ahead(Predictor):
        def predict(self, tokens, experts=None, lookahead=None):
            return np.tile(np.array([0.9, 0.5, 0.1, 0.0], np.float32), (len(tokens), 1, 1))  # expert 0 first

        def predict_next(self, tokens):
            return np.array([[0.1, 0.2, 0.9, 0.0]], np.float32)  # expert 2 first

    routing = PredictedRouting(Ahead(1, 4, 1), top_k=1)
    routing.prompt([5, 6, 7], slot=0)
    assert routing([0], np.array([[3]]))[0, 0, 0] == 2  # token 3 unread: from tokens 0-2
    assert routing([0], np.array([[4]]))[0, 0, 0] == 2  # 3 and 4 unread: still the guess from tokens 0-2
    assert routing([0], np.array([[1, 2, 3, 3]])).ravel().tolist() == [0, 0, 0, 0]  # a prompt step's padding
    routing.extend(0, 8)
    assert routing([0], np.array([[3]]))[0, 0, 0] == 0 and routing([0], np.array([[4]]))[0, 0, 0] == 2


class _Counting(Predictor):
    """A per-request predictor that counts its calls; its prediction is the call number."""

    per = "request"

    def __init__(self):
        super().__init__(1, 2, 1)
        self.calls = 0

    def predict(self, tokens, experts=None, lookahead=None):
        self.calls += 1
        return np.full((len(tokens), 1, 2), self.calls, np.float32)


def test_run_ahead_predicts_a_decode_step_with_the_next_token_prediction():
    """NEXT jobs take the predictor's own next-token prediction; without one, the last token's stands in."""
    import time

    from moejax.predictors.run_ahead import NEXT, RunAhead

    class Ahead(_Counting):
        def predict_next(self, tokens):
            return np.full((1, 2), -len(tokens), np.float32)

    for predictor, expected in ((Ahead(), -3.0), (_Counting(), 1.0)):
        run_ahead = RunAhead(predictor)
        run_ahead.submit("s", NEXT, [1, 2, 3])
        deadline, result = time.monotonic() + 10, None
        while result is None and time.monotonic() < deadline:
            result = run_ahead.take("s", NEXT)
            time.sleep(0.01)
        run_ahead.close()
        assert result.shape == (1, 1, 2) and result[0, 0, 0] == expected


def test_run_ahead_reuses_a_request_prediction_for_predict_every_prompts():
    import time

    from moejax.errors import ParameterError
    from moejax.predictors.run_ahead import PROMPT, RunAhead

    predictor = _Counting()
    run_ahead = RunAhead(predictor, predict_every=2)

    def ready(owner):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            result = run_ahead.take(owner, PROMPT)
            if result is not None:
                return result
            time.sleep(0.01)
        raise AssertionError("no prediction")

    seen = []
    for owner, prompt in enumerate([[1, 2], [3], [4, 5, 6]]):
        run_ahead.submit(owner, PROMPT, prompt)
        result = ready(owner)
        assert result.shape == (len(prompt), 1, 2)
        seen.append(int(result[0, 0, 0]))
    assert seen == [1, 1, 2] and predictor.calls == 2
    run_ahead.close()
    assert not run_ahead.alive
    with pytest.raises(ParameterError, match="per-request"):
        RunAhead(FrequencyPredictor(1, 2, 1), predict_every=3)


def test_distillation_targets_are_the_truncated_router_distribution():
    predictor = SiDAPredictor(1, 4, 2)
    experts = np.array([[[0, 3], [2, 4]]])  # [L, T, k]; 4: a dropped slot
    probs = np.array([[[0.3, 0.1], [0.5, 0.2]]], np.float32)
    ids, weights = predictor._targets(experts, probs)
    assert ids.tolist() == [[[0, 3]], [[2, 0]]]
    np.testing.assert_allclose(weights, [[[0.75, 0.25]], [[1.0, 0.0]]])
    _, hard = predictor._targets(experts, None)
    np.testing.assert_allclose(hard, [[[0.5, 0.5]], [[1.0, 0.0]]])


def test_trace_matcher_reads_only_earlier_tokens():
    from moejax.predictors.base import TraceMatcherPredictor

    data = rule_data(4, 6)
    matcher = TraceMatcherPredictor(LAYERS, EXPERTS, K)
    matcher.fit(data)
    tokens, experts, _, _ = next(data.sequences())
    out = matcher.predict(tokens, experts)
    assert out.shape == (len(tokens), LAYERS, EXPERTS)
    changed = experts.copy()
    changed[:, 3:] = (changed[:, 3:] + 1) % EXPERTS
    np.testing.assert_array_equal(matcher.predict(tokens, changed)[:4], out[:4])  # token 3 reads tokens 0-2 only
    assert not np.array_equal(matcher.predict(tokens, changed)[4:], out[4:])
    with pytest.raises(MoejaxError, match="give experts"):
        matcher.predict(tokens)


class _ByTokenId(Predictor):
    """Each token uses expert (id mod experts) at every MoE layer; records the threads that called it."""

    def __init__(self, num_layers, num_experts, top_k):
        super().__init__(num_layers, num_experts, top_k)
        self.threads = set()

    def predict(self, tokens, experts=None, lookahead=None):
        import threading

        self.threads.add(threading.get_ident())
        out = np.zeros((len(tokens), self.num_layers, self.num_experts), np.float32)
        out[np.arange(len(tokens)), :, [int(t) % self.num_experts for t in tokens]] = 1.0
        return out


def test_the_slo_scheduler_reads_the_predicted_expert_profile_made_on_the_submitting_thread(shipped):
    import threading

    from moejax.predictors.base import step_profile
    from moejax.serving.loop import ServingLoop
    from moejax.serving.requests import Request
    from moejax.serving.scheduler import SLOScheduler

    engine, _, prompts = shipped
    cfg = engine.cfg
    seen = {}

    class Recording(SLOScheduler):
        def order(self, waiting, running, now, times):
            seen.update({e.id: e.profile for e in [*waiting, *running]})
            return super().order(waiting, running, now, times)

    predictor = _ByTokenId(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)
    with ServingLoop(engine, scheduler=Recording(), predictor=predictor) as loop:
        handles = [loop.submit(Request(prompt, max_tokens=2)) for prompt in prompts]
        for h in handles:
            h.result(timeout=120)
    assert predictor.threads == {threading.get_ident()}  # predicted here, never on the loop's thread
    for prompt, handle in zip(prompts, handles, strict=True):
        profile = seen[handle.request.id]
        np.testing.assert_allclose(profile, step_profile(predictor, prompt))
        assert profile.shape == (len(cfg.moe_layer_ids), cfg.num_experts) and profile.sum(-1)[0] == pytest.approx(1.0)
    with ServingLoop(engine, scheduler=Recording()) as loop:  # no predictor, no collection: no profile
        loop.submit(Request(prompts[0], max_tokens=1, id="plain")).result(timeout=120)
    assert seen["plain"] is None
    with pytest.raises(MoejaxError, match="MoE layers"):
        ServingLoop(engine, predictor=_ByTokenId(len(cfg.moe_layer_ids) + 1, cfg.num_experts, cfg.top_k))


def test_serve_with_predicted_routing_says_it_is_approximate(shipped, tmp_path, monkeypatch, capsys):
    from starlette.testclient import TestClient

    import moejax.serving.http.app as http_app
    from moejax.cli import main as moejax_cli

    store.save(shipped[1], tmp_path / "p")
    answers = {}

    def serve_in_process(app, sock):  # instead of uvicorn: the application through Starlette's test client
        with TestClient(app) as client:
            answers["completion"] = client.post("/v1/completions", json={
                "model": "tiny-moe", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}).json()
            answers["metrics"] = client.get("/metrics").text

    monkeypatch.setattr(http_app, "run", serve_in_process)
    argv = ["serve", "--port", "0", "--max-batch", "1", "--max-seq-len", "32", "--no-warmup", "--predictor",
            str(tmp_path / "p")]
    assert moejax_cli(argv + ["--routing", "predicted"]) == 0
    err = capsys.readouterr().err
    assert "APPROXIMATE routing" in err and "--routing predicted is APPROXIMATE" in err
    assert answers["completion"]["system_fingerprint"] == http_app.APPROXIMATE_FINGERPRINT
    assert answers["completion"]["usage"]["completion_tokens"] == 3
    assert "\nmoejax_approximate_routing 1.0" in answers["metrics"]
    assert moejax_cli(argv + ["--scheduler", "slo"]) == 0  # exact routing; the predictor gives the slo profiles
    assert "APPROXIMATE" not in capsys.readouterr().err
    assert "system_fingerprint" not in answers["completion"] and "\nmoejax_approximate_routing 0.0" in answers["metrics"]
    assert moejax_cli(argv) == 2
    assert "--predictor DIR goes with --prefetch predictor or --routing predicted or --scheduler slo" in capsys.readouterr().err
