"""The benchmark scripts' logic that decides what their numbers mean: the routing replay (which recorded token
each slot and position runs), the lab's count of the same steps (LRU and Belady), and the floors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax.cards import load_card
from moejax.models.decoder import kv_cache_bytes
from moejax.routing.traces import RoutingTrace
from moejax.tools.lab import simulate_lookahead
from reference_directory import ExpertDirectory
from reference_policies import Belady
from scripts.bench_offload import add_floor, run_config
from scripts.bench_prefetch import ReplayedTokens, RoutingReplay, engine_steps, lab_replay
from scripts.bench_serve import gating_part, slo_verdicts
from scripts.benchlib import (
    active_bytes_per_token, build_random_engine, decode_stats, model_config, pinned_stacks, random_dense_params,
    tiny_widths,
)


def random_trace(num_layers: int, num_experts: int, top_k: int, seq_lens: list[int], seed: int) -> RoutingTrace:
    """Distinct random experts per token and layer, as a trace records them."""
    rng = np.random.default_rng(seed)
    experts = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(sum(seq_lens))])
                        for _ in range(num_layers)])
    return RoutingTrace(experts, np.array(seq_lens), num_experts)


def test_replay_maps_each_slot_to_its_sequence_and_position():
    trace = random_trace(num_layers=2, num_experts=8, top_k=2, seq_lens=[3, 5], seed=0)
    replay = RoutingReplay(trace)
    replay.assign(0, 1)
    replay.assign(2, 0)
    out = replay([0, -1, 2], np.array([[1, 2, 7], [0, 0, 0], [0, 1, 2]]))
    assert out.shape == (2, 9, 2) and out.dtype == np.int32
    filler = np.array([0, 1])
    np.testing.assert_array_equal(out[:, 0:2], trace.experts[:, [3 + 1, 3 + 2]])  # sequence 1 starts at token 3
    np.testing.assert_array_equal(out[:, 2], np.broadcast_to(filler, (2, 2)))  # position 7: past its 5 tokens
    np.testing.assert_array_equal(out[:, 3:6], np.broadcast_to(filler, (2, 3, 2)))  # padding row
    np.testing.assert_array_equal(out[:, 6:9], trace.experts[:, 0:3])
    guessing = RoutingReplay(trace, guesses=trace.experts[..., ::-1] + 10)  # row l: layer l's guess
    guessing.assign(0, 1)
    experts, guesses = guessing([0, -1], np.array([[1, 7], [0, 0]]))
    np.testing.assert_array_equal(experts, out[:, [0, 2, 3, 4]])
    np.testing.assert_array_equal(guesses[0, 0], trace.experts[1, 3 + 1, ::-1] + 10)  # made at layer 0, for layer 1
    assert (guesses[1] == -1).all() and (guesses[:, 1:] == -1).all()  # the last layer; past the sequence; padding


def test_forced_guesses_are_the_lookaheads_and_change_no_token():
    """With the replay's guesses (accuracy 1: the next layer's true experts) the lookahead engine records them as
    its guesses, every expert it fetches on a guess is used, and it gives the tokens of the engine that guesses
    with its own router."""
    cfg = model_config("deepseek-v2-lite", None, tiny=True)
    trace = random_trace(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, seq_lens=[30], seed=3)
    dense, stacks = random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0])
    runs = []
    for guesses in (None, simulate_lookahead(trace, 1.0)):
        engine = build_random_engine(cfg, "cached", dense, stacks, max_seq_len=64, prefill_chunk=8,
                                     expert_budget="0.5", prefetch="lookahead")
        engine.routing_override = replay = RoutingReplay(trace, guesses)
        replay.assign(0, 0)
        result = engine.generate([list(range(1, 9))], max_new_tokens=8, ignore_eos=True)
        runs.append((result.tokens, engine.routing(0), result))
    (tokens, _, _), (tokens_guessed, (experts, lookahead), result) = runs
    assert tokens == tokens_guessed
    np.testing.assert_array_equal(lookahead[1:], trace.experts[1:, : experts.shape[1]])
    counts = result.stats["total"]
    assert counts["prefetch_issued"] > 0 and counts["prefetch_used"] == counts["prefetch_issued"], counts


def test_engine_runs_the_replayed_routing_and_the_lab_counts_its_steps():
    """The engine records exactly the replayed routing, and the lab's LRU over `engine_steps` (prompt chunks
    of 5 tokens included: up to 30 of the 32 experts a 25% budget of 2 x 64 holds) misses exactly as often as
    the engine."""
    cfg = model_config("deepseek-v2-lite", None, tiny=True)
    trace = random_trace(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, seq_lens=[20, 25, 30], seed=1)
    engine = build_random_engine(cfg, "cached", random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0]),
                                 max_seq_len=64, prefill_chunk=5, expert_budget="0.25")
    replay = RoutingReplay(trace)
    engine.routing_override = replay
    prompt, new_tokens, sequences, misses = list(range(1, 13)), 6, [2, 0, 1], []
    for sequence in sequences:
        replay.assign(0, sequence)
        result = engine.generate([prompt], max_new_tokens=new_tokens, ignore_eos=True)
        start = trace.offsets()[sequence]
        np.testing.assert_array_equal(engine.routing(0)[0], trace.experts[:, start : start + len(prompt) + new_tokens - 1])
        misses.append((result.stats["total"]["misses"], decode_stats(result)["misses"]))
    steps = engine_steps(trace, sequences, len(prompt), new_tokens, engine.prefill_chunk)
    added = lab_replay(steps, engine.cache.num_slots, cfg.num_experts, "lru", jax.devices()[0])
    for sequence, (total, decode) in zip(sequences, misses, strict=True):
        mine = [i for i, (s, _, _) in enumerate(steps) if s == sequence]
        decoding = [i for i in mine if steps[i][1] == "decode"]
        assert added[mine, :, 2].sum() == total and added[decoding, :, 2].sum() == decode  # column 2: misses
    assert sum(total for total, _ in misses) > 0


def test_the_whole_layer_threshold_follows_the_measured_rates():
    """From how many misses a layer step moves its whole layer: none below four layers of slots; 60% of the experts
    by default; else the fewest misses whose fetches take the copy's time (`time_layer_fetches` measures both)."""
    from moejax.offload.device_cache import whole_layer_from
    from moejax.offload.expert_stacks import time_layer_fetches

    assert whole_layer_from(64, 255) is None and whole_layer_from(64, 256) == 39
    assert whole_layer_from(64, 256, (1.0, 37.2)) == 38  # a miss read at 0.58x the copy's rate
    assert whole_layer_from(64, 256, (1.0, 54.3)) == 55 and whole_layer_from(64, 256, (1.0, 64.5)) is None
    cfg = model_config("deepseek-v2-lite", None, tiny=True)
    one_s, whole_s = time_layer_fetches(pinned_stacks(cfg, jax.devices()[0])[0], repeats=1)
    assert 0 < one_s and 0 < whole_s


def test_per_expert_host_buffers_change_nothing():
    """Pinned host stacks one buffer per expert (`expert_stacks.per_expert_layout`: a miss copies its whole buffers,
    picked by a switch; or the copy kernel, `miss_copy='kernel'`, copies them into their slots) give the tokens,
    routing and counters of stacked ones, cached (with the lookahead's installs, and a wide prompt chunk's
    whole-layer copy) and on-demand; the stats say which layout and miss copy; the rule takes only few
    large experts on a GPU; the time a fetch takes is measured in either layout; the layer programs' staging
    copies the same layer and counts the same bytes."""
    from moejax.offload.expert_stacks import (host_sharding, per_expert_layout, place_on_host, stack_bytes,
                                              stack_to_device, time_layer_fetches)

    assert per_expert_layout(8, 352 << 20, "gpu") and not per_expert_layout(8, 352 << 20, "cpu")
    assert not per_expert_layout(64, 352 << 20, "gpu") and not per_expert_layout(8, 17 << 20, "gpu")
    cfg = tiny_widths(load_card("mixtral-8x7b", num_layers=3))
    dense, stacks = random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0])
    split = place_on_host({n: np.asarray(w) for n, w in stacks[0].items()}, host_sharding(jax.devices()[0]), 0,
                          per_expert=True)
    assert all(len(w) == cfg.num_experts for w in split.values()) and min(time_layer_fetches(split, repeats=1)) > 0
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the layer programs' staging by the host
    for name, w in stack_to_device(split, on_device).items():
        np.testing.assert_array_equal(np.asarray(w), np.asarray(stacks[0][name]))
    assert stack_bytes(split) == stack_bytes(stacks[0]) == cfg.num_experts * cfg.expert_bytes
    prompt = [list(range(1, 14))]
    for mode, options in (("cached", dict(expert_budget="0.7", prefetch="lookahead", whole_layer_from=5)),
                          ("on-demand", {})):
        results = []
        for layout, copy in (("stacked", "xla"), ("per-expert", "xla"), ("per-expert", "kernel")):
            engine = build_random_engine(cfg, mode, dense, stacks, max_seq_len=64, prefill_chunk=8,
                                         host_layout=layout, miss_copy=copy, **options)
            result = engine.generate(prompt, max_new_tokens=6, ignore_eos=True)
            assert (result.stats["host_layout"], result.stats["miss_copy"]) == (layout, copy)
            results.append((result.tokens, engine.routing(0)[0].tolist(), result.stats["total"]))
            if copy == "kernel":  # the kernel writes the slab in place: no program copies it around the call
                slabs = {f"[{engine.cache.num_slots},{','.join(map(str, w.shape[1:]))}]" for w in engine.slab.values()}
                for key, compiled in engine._compiled.items():
                    copies = [line for line in compiled.as_text().splitlines() if " copy(" in line
                              and any(shape in line.split(" copy(")[0] for shape in slabs)]
                    assert not copies, (key[0], copies[:2])
        assert results[0] == results[1] == results[2], mode
        assert results[0][2]["misses"] > 0 and (mode == "on-demand" or results[0][2]["streamed"] > 0)


def test_misses_moved_out_of_a_whole_layer_change_no_token():
    """A cached engine moving a layer step's misses out of one copy of its whole layer when it misses at least
    `whole_layer_from` experts (`decoder_programs.admit_misses`: prompt chunks of 12 tokens need up to 64 experts a
    layer, decode steps 6) gives the tokens and routing of one fetching every miss by itself, with trace+lookahead
    (staged and guessed installs beside it; the counts differ: a wide step evicts nothing, the next test); the
    experts carried past count as streamed; no compiled program copies the slab (a first version, the slab under
    the lax.cond, copied it in every prefill); and no layer step writes a layer buffer of zeros (the buffer is handed
    on from layer to layer, `ExpertInputs.layer_buffer`)."""
    cfg = tiny_widths(load_card("deepseek-v2-lite", num_layers=6))  # 5 MoE layers of 64 experts
    trace = random_trace(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, seq_lens=[30], seed=2)
    dense, stacks = random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0])
    results = []
    for options in ({"whole_layer_from": None}, {}):  # every miss by itself; build_engine's default
        engine = build_random_engine(cfg, "cached", dense, stacks, max_seq_len=64, prefill_chunk=12,
                                     expert_budget="0.9", prefetch="trace+lookahead", **options)
        replay = RoutingReplay(trace)
        engine.routing_override = replay
        replay.assign(0, 0)
        result = engine.generate([list(range(1, 25))], max_new_tokens=6, ignore_eos=True)
        results.append((engine.spec.whole_layer_from, result.tokens, engine.routing(0)[0], result.stats["total"]))
    # The slab stays in place: the condition chooses only the layer buffer (a slab inside a lax.cond was copied).
    slab_shapes = {f"bf16[{engine.cache.num_slots},{','.join(map(str, w.shape[1:]))}]" for w in engine.slab.values()}
    layer_shapes = {f"bf16[{cfg.num_experts},{','.join(map(str, w.shape[1:]))}]" for w in engine.slab.values()}
    for key, compiled in engine._compiled.items():
        lines = compiled.as_text().splitlines()
        copies = [line for line in lines if " copy(" in line and any(f"= {shape}" in line for shape in slab_shapes)]
        assert not copies, (key[0], copies[:2])
        zeros = [line for line in lines if "broadcast" in line and "while/body" in line
                 and any(f"= {shape}" in line for shape in layer_shapes)]
        assert not zeros, (key[0], zeros[:2])
    (none, tokens, routing, counts), (threshold, tokens_whole, routing_whole, counts_whole) = results
    assert none is None and threshold == 39  # 60% of 64 experts; the 288 slots hold more than four layers
    assert tokens == tokens_whole and np.array_equal(routing, routing_whole)
    assert counts["activations"] == counts_whole["activations"] and counts["streamed"] == 0 < counts_whole["streamed"]


def test_layers_copied_whole_keep_their_slots_and_the_lab_counts_alike():
    """Prompt chunks of 24 tokens need ~57 of each layer's 64 experts, and the cache holds 4.25 of the 5 MoE layers:
    the first four layers stay whole after the first chunk, the last is copied whole at every chunk (evicting
    nothing: `device_cache.access`'s `whole`); the tokens are those of the engine moving every miss by itself;
    and the lab's `Replayer` and bench_prefetch's lab, given the same threshold, count what the engine counted."""
    from moejax.offload import device_cache as dc
    from moejax.offload.manager import OffloadManager
    from moejax.offload.replay import Replayer

    cfg = tiny_widths(load_card("deepseek-v2-lite", num_layers=6))
    L, E, k = len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k
    trace = random_trace(L, E, k, seq_lens=[100], seed=3)
    dense, stacks = random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0])
    prompt, results = list(range(1, 97)), []
    for options in ({"whole_layer_from": None}, {}):
        engine = build_random_engine(cfg, "cached", dense, stacks, max_seq_len=128, prefill_chunk=24,
                                     expert_budget="0.85", **options)
        replay = RoutingReplay(trace)
        engine.routing_override = replay
        replay.assign(0, 0)
        result = engine.generate([prompt], max_new_tokens=4, ignore_eos=True)
        results.append((engine, result))
    (_, one_by_one), (engine, whole) = results
    assert engine.cache.num_slots == 272 and engine.spec.whole_layer_from == 39
    assert whole.tokens == one_by_one.tokens
    per_layer = whole.stats["per_layer"]
    moved = [layer["misses"] + layer["streamed"] for layer in per_layer]
    assert moved[-1] >= 4 * E and max(moved[:-1]) < 2 * E, moved  # the last layer at each chunk, the others once
    assert whole.stats["total"]["evictions"] < one_by_one.stats["total"]["evictions"]
    manager = OffloadManager(L, E, k, policy="lru", prefetch="none")
    lab = Replayer(L, E, engine.cache.num_slots, manager, prefill_chunk=24, whole_layer_from=39)
    lab.sequence(engine.routing(0)[0], len(prompt))
    counters = [[layer[name] for name in dc.COUNTERS] for layer in per_layer]
    np.testing.assert_array_equal(counters, lab.counters())
    steps = engine_steps(trace, [0], len(prompt), 4, prefill_chunk=24)  # bench_prefetch's lab
    np.testing.assert_array_equal(counters, lab_replay(steps, 272, E, "lru", jax.devices()[0], 39).sum(axis=0))


def test_replay_batches_counts_a_wide_batch_moving_less_under_the_engines_rule(tmp_path):
    """scripts/replay_batches.py on random routing of 8 MoE layers x 64 experts at a 50% budget: at batch 16 the
    engine's rule (wide steps evict nothing) keeps whole layers where one-by-one LRU hits next to nothing; at
    batch 1 both see the same steps need the same experts."""
    import argparse

    from scripts.replay_batches import run

    trace = random_trace(8, 64, 6, seq_lens=[12] * 40, seed=5)
    np.savez(tmp_path / "routing.npz", experts=trace.experts, seq_lens=trace.seq_lens)
    args = argparse.Namespace(traces=tmp_path / "routing.npz", card="deepseek-v2-lite", budget=0.5, batches=[1, 16],
                              prompt_len=4, new_tokens=8, policy="lru", whole_from=None)
    rows = {(r["batch"], r["rule"]): r for r in run(args)}
    wide, lru = rows[16, "engine"], rows[16, "one-by-one"]
    assert wide["whole_layer_from"] == 39 and lru["whole_layer_from"] is None
    assert wide["hits_per_step"] > 10 * lru["hits_per_step"]
    assert wide["experts_moved_per_step"] < 0.8 * lru["experts_moved_per_step"]
    # a whole copy takes the time of whole_from fetches: the link time, in fetches, is below the experts moved
    assert wide["fetch_times_per_step"] < wide["experts_moved_per_step"]
    assert lru["fetch_times_per_step"] == lru["experts_moved_per_step"]
    args.whole_from = 60  # the threshold a GPU measured, given: the engine rule uses it
    assert run(args)[2]["whole_layer_from"] == 60
    assert rows[1, "engine"]["experts_needed_per_step"] == rows[1, "one-by-one"]["experts_needed_per_step"]


def test_the_predictor_prefetcher_is_asked_about_the_replayed_sequence():
    """bench_prefetch's lru/predictor engine takes the predictor through `ReplayedTokens`, which asks it about
    the recorded tokens of the sequence slot 0 replays (never the random model's), for the model's MoE layers."""
    from moejax.predictors.base import Predictor

    cfg = model_config("deepseek-v2-lite", None, tiny=True)
    layers = len(cfg.moe_layer_ids)
    trace = random_trace(layers, cfg.num_experts, cfg.top_k, seq_lens=[20, 25], seed=4)
    tokens = [[f"s{s}-{i}" for i in range(n)] for s, n in enumerate(trace.seq_lens)]

    class Recording(Predictor):  # for one MoE layer more than the model: the bench keeps the first ones
        asked = []

        def predict(self, strings, experts=None, lookahead=None):
            self.asked.append(list(strings))
            out = np.zeros((len(strings), self.num_layers, self.num_experts), np.float32)
            out[:, np.arange(self.num_layers), np.arange(self.num_layers)] = 1.0  # layer l: expert l
            return out

    engine = build_random_engine(cfg, "cached", random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0]),
                                 max_seq_len=64, prefill_chunk=5, expert_budget="0.25", prefetch="predictor")
    replay = RoutingReplay(trace)
    recording = Recording(layers + 1, cfg.num_experts, cfg.top_k)
    replayed = ReplayedTokens(recording, tokens, replay, layers)
    engine.use_predictor(replayed)  # its shape is the model's
    engine.close()
    replay.assign(0, 1)
    out = replayed.predict(["7", "3", "9"])
    assert recording.asked == [tokens[1][:3]] and out.shape == (3, layers, cfg.num_experts)
    assert out[0].argmax(-1).tolist() == list(range(layers))
    replay.assign(0, 0)
    replayed.predict(["1"] * 22)  # past sequence 0's 20 tokens: its last one repeats
    assert recording.asked[-1] == tokens[0] + [tokens[0][-1]] * 2


@pytest.mark.parametrize("capacity", [4, 6])
def test_belady_priorities_miss_as_belady(capacity):
    """The lab's Belady (the device cache's priority policy told each step's next uses) misses as often as the
    slow, obviously-right Belady (Python `ExpertDirectory` + `policies.Belady`), and less than LRU."""
    num_layers, num_experts = 3, 8
    trace = random_trace(num_layers, num_experts, top_k=2, seq_lens=[44], seed=capacity)
    steps = engine_steps(trace, [0], prompt_len=4, new_tokens=41, prefill_chunk=2)  # 2 steps of 2 tokens, then 40 of 1
    device = jax.devices()[0]
    belady = lab_replay(steps, capacity, num_experts, "belady", device)[..., 2].sum()
    lru = lab_replay(steps, capacity, num_experts, "lru", device)[..., 2].sum()
    needed = [(layer, sorted(set(experts[layer].ravel().tolist()))) for _, _, experts in steps for layer in range(num_layers)]
    directory = ExpertDirectory(capacity, Belady(needed), num_layers)
    for layer, experts in needed:
        _, missed = directory.begin_layer(layer, experts)
        for key in missed:
            directory.admit(key)
        directory.end_layer()
    assert belady == directory.total.misses < lru


def test_active_bytes_are_the_weights_a_token_reads():
    """Every non-expert weight but the embedding table, top_k experts per MoE layer and the KV cache, counted
    from the arrays themselves (a dense first layer, a shared expert)."""
    cfg = model_config("deepseek-v2-lite", None, tiny=True)
    globals_, layers = random_dense_params(cfg)
    weights = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves((globals_, layers)))
    embedding = globals_["embed"]["embedding"].nbytes
    expected = weights - embedding + len(cfg.moe_layer_ids) * cfg.top_k * cfg.expert_bytes + kv_cache_bytes(cfg, 1, 40)
    assert active_bytes_per_token(cfg, context=40)["total_bytes"] == expected


def test_offload_floor_is_the_slower_of_link_and_compute():
    resident = {"decode_s_per_token": 0.01, "ttft_s": 0.2}
    link_bound = {"decode_bytes_per_token": 2e9, "prefill_bytes": 1e9, "decode_s_per_token": 0.05, "ttft_s": 0.1}
    add_floor(link_bound, resident, bandwidth=1e11)
    assert link_bound["floor_s_per_token"] == pytest.approx(0.02) and link_bound["x_floor"] == pytest.approx(2.5)
    assert link_bound["floor_ttft_s"] == pytest.approx(0.2)  # the prompt's 10 ms of link is under its compute
    compute_bound = {"decode_bytes_per_token": 1e8, "prefill_bytes": 0, "decode_s_per_token": 0.011, "ttft_s": 0.2}
    add_floor(compute_bound, resident, bandwidth=1e11)
    assert compute_bound["floor_s_per_token"] == pytest.approx(0.01) and compute_bound["x_floor"] == pytest.approx(1.1)


def test_offload_bench_rows_with_the_lookahead_prefetcher():
    """bench_offload's cached row with `--prefetch lookahead` (its guesses fetched while a layer computes) gives the
    resident row's tokens and reports the prefetcher's precision and recall; a row without one reports none."""
    cfg = tiny_widths(load_card("mixtral-8x7b", num_layers=2))
    dense, stacks = random_dense_params(cfg), pinned_stacks(cfg, jax.devices()[0])
    prompts = [list(range(1, 9)), list(range(9, 17))]
    resident = run_config(cfg, dense, stacks, "resident", None, "lru", prompts, 6, 32)
    plain, guessing = (run_config(cfg, dense, stacks, "cached", "0.5", "lru", prompts, 6, 32, prefetch=prefetch)
                       for prefetch in ("none", "lookahead"))
    assert plain["tokens"] == guessing["tokens"] == resident["tokens"]
    assert plain["prefetch"] == "none" and plain["prefetch_precision"] is None and resident["prefetch"] is None
    assert guessing["prefetch"] == "lookahead" and 0 <= guessing["prefetch_precision"] <= 1
    assert 0 <= guessing["prefetch_recall"] <= 1


def test_bench_serve_smoke(tmp_path):
    """scripts/bench_serve.py --dims tiny, throughput and slo parts, on a random routing trace and a task mix of
    two tasks: every row is there (each batch with and without cpu experts, then all resident), batch 1's ratio is 1 in
    each, each load ran both schedulers on the same requests."""
    cfg = model_config("deepseek-v2-lite", None, tiny=True)
    random_trace(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, seq_lens=[12] * 8, seed=2).save(tmp_path / "routing.npz")
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [
        {"task": "short", "prompt": "What is two and two?", "reference": "four"},
        {"task": "long", "prompt": "Tell a story about a cat.", "reference": "Once upon a time a cat sat on a mat and slept."}]))
    out = tmp_path / "serve.json"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "scripts/bench_serve.py", "--dims", "tiny", "--parts", "throughput,slo", "--traces",
         str(tmp_path / "routing.npz"), "--task-mix", str(tmp_path / "tasks.jsonl"), "--budget", "0.5", "--batches", "1,2",
         "--policies", "activation,resident", "--cpu-experts", "off,auto", "--prompt-len", "4", "--new-tokens", "4",
         "--slo-models", "tiny-moe", "--slots", "2", "--loads", "4x,50",
         "--requests", "3", "--calibration-per-task", "1", "--warmup-requests", "4", "--serve-max-seq-len", "64", "--prefill-chunk", "16",
         "--max-prompt", "16", "--max-tokens", "6", "--out", str(out)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    throughput, resident = result["throughput"]["rows"][:4], result["throughput"]["rows"][4:]
    assert [(r["cpu_experts"], r["batch"]) for r in throughput] == [("off", 1), ("off", 2), ("auto", 1), ("auto", 2)]
    # the all-resident engine once (no cpu experts): nothing moves
    assert [(r["policy"], r["cpu_experts"], r["batch"], r["gb_per_step"]) for r in resident] == [
        ("resident", "off", 1, 0.0), ("resident", "off", 2, 0.0)]
    assert throughput[0]["x_batch1"] == throughput[2]["x_batch1"] == 1.0
    assert all(r["cpu_experts_per_step"] >= 0 for r in throughput)
    assert all(r["link_floor_s"] > 0 and r["experts_needed_per_step"] >= r["experts_moved_per_step"] for r in throughput)
    rows = result["slo"]["rows"]
    assert [(r["scheduler"], r["load"]) for r in rows] == [("fcfs", "4x"), ("slo", "4x"), ("fcfs", "50"), ("slo", "50")]
    assert rows[2]["offered_rps"] == 50 and all(r["requests"] == 3 and 0 <= r["attainment_pct"] <= 100 for r in rows)
    assert all(r["programs_compiled"] == 0 for r in rows)  # Engine.warm_up(longest=...) compiled them all first
    runs = result["slo"]["models"]["tiny-moe"]["runs"]
    assert [x["arrival_s"] for x in runs[0]["records"]] != [x["arrival_s"] for x in runs[2]["records"]]
    assert [x["task"] for x in runs[0]["records"]] == [x["task"] for x in runs[1]["records"]]
    assert set(result["slo"]["models"]["tiny-moe"]["slos"]) == {"short", "long"}
    assert result["slo"]["models"]["tiny-moe"]["step_times"]["decode_step_s"] > 0  # what every run's loop is given
    assert result["slo"]["plot"] is None or Path(result["slo"]["plot"]).stat().st_size > 0  # None without matplotlib
    assert "SLO %" in done.stdout.split("\n\n")[-1]  # the tables come last, after one empty line
    # scripts/simulate_serve.py replays the recorded model on more workloads, its steps varied, another table
    simulated = tmp_path / "sim.json"
    done = subprocess.run(
        [sys.executable, "scripts/simulate_serve.py", "--run", str(out), "--task-mix", str(tmp_path / "tasks.jsonl"),
         "--loads", "2x", "--requests", "5", "--seeds", "2", "--variation", "0.3", "--decode-by-batch", "1:0.01,2:0.02",
         "--out", str(simulated)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sim = json.loads(simulated.read_text())
    assert sim["variation"] == 0.3 and sim["step_times"]["decode_by_batch"] == [[1, 0.01], [2, 0.02]]
    assert [(r["load"], r["scheduler"]) for r in sim["rows"]] == [("2x", "fcfs"), ("2x", "slo")]


def test_bench_serve_reports_a_missing_gating_module(capsys):
    out, saved = {}, []
    gating_part(None, None, None, None, out, lambda: saved.append(dict(out)))
    assert out["gating"]["error"] == "scripts/bench_gating.py is missing: part not run" and saved
    assert "bench_gating.py is missing" in capsys.readouterr().out


def test_slo_verdicts_compare_the_schedulers_where_fcfs_misses_30_percent():
    row = lambda scheduler, load, pct: {"model": "m", "scheduler": scheduler, "load": load, "attainment_pct": pct}  # noqa: E731
    rows = [row("fcfs", "2x", 90.0), row("slo", "2x", 95.0), row("fcfs", "8x", 60.0), row("slo", "8x", 85.0),
            row("fcfs", "16x", 10.0)]
    assert slo_verdicts(rows) == ["m at 8x: fcfs meets 60% of SLOs, slo 85% (+25 points)"]

def test_largest_fitting_doubles_then_bisects():
    from scripts.bench_gating import largest_fitting

    tried = []

    def under(limit):
        def fits(n):
            tried.append(n)
            return n <= limit
        return fits

    found, cut = largest_fitting(under(37), 1000)
    assert 37 - 37 // 16 <= found <= 37 and not cut and tried[:6] == [1, 2, 4, 8, 16, 32] and max(tried) == 64
    assert largest_fitting(under(10**9), 100) == (100, False) and largest_fitting(under(0), 100) == (0, False)
    tried.clear()  # out of time after three tries: the largest size known to fit, marked as cut short
    assert largest_fitting(under(37), 1000, out_of_time=lambda: len(tried) >= 3) == (4, True) and tried == [1, 2, 4]
    for start, first in ((32, [1, 32, 64]), (512, [1, 512, 256, 128, 64, 32])):  # a guess below or above
        tried.clear()
        found, cut = largest_fitting(under(37), 1000, start=start)
        assert 37 - 37 // 16 <= found <= 37 and not cut and tried[: len(first)] == first


def test_timed_fitting_shrinks_a_batch_the_device_cannot_run():
    """A largest batch that exhausts the device's memory when it runs is timed at 7/8 of its rows, then 7/8 of
    that...; another runtime error is reported at once; a batch of no rows is not run."""
    import jax

    from scripts.bench_gating import timed_fitting

    class Bench:
        def __init__(self, runs_up_to, message="RESOURCE_EXHAUSTED: Out of memory"):
            self.runs_up_to, self.message, self.tried = runs_up_to, message, []

        def row(self, how, rows):
            self.tried.append(rows)
            if rows > self.runs_up_to:
                raise jax.errors.JaxRuntimeError(self.message)
            return {"compute": how, "rows": rows}

    bench = Bench(800)
    assert timed_fitting(bench, "grouped", 1000) == {"compute": "grouped", "rows": 765, "runtime_shrunk": 2}
    assert bench.tried == [1000, 875, 765]
    never = Bench(0)
    assert "RESOURCE_EXHAUSTED" in timed_fitting(never, "grouped", 1000)["error"] and len(never.tried) == 4
    other = Bench(0, "INTERNAL: something else")
    assert "INTERNAL" in timed_fitting(other, "grouped", 1000)["error"] and other.tried == [1000]
    assert timed_fitting(Bench(10), "grouped", 0) == {}


def test_gating_bench_smoke_run():
    """The gating part on a tiny Mixtral shape: a row per compute and batch, the computes agree on the layers'
    output, capacity computes fewer expert rows and drops at most what a capacity factor of 1 can, and each
    largest batch fits the memory the search was given."""
    import argparse

    from scripts.bench_gating import Bench, add_arguments, moe_shape, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--dims", "tiny", "--gating-models", "mixtral-8x7b", "--gating-rows", "1,8",
                              "--capacity-factor", "1", "--memory-gb", "0.001", "--gating-max-rows", "8"])
    rows = run(args)
    batch = {(r["compute"], r["rows"]): r for r in rows if r["kind"] == "batch"}
    computes = ("union", "grouped", "grouped-inplace", "ragged", "capacity", "capacity-einsum")
    assert set(batch) == {(c, n) for c in computes for n in (1, 8)}
    assert all(r["tokens_per_s"] > 0 for r in batch.values())
    assert batch["capacity", 8]["expert_rows_per_layer"] < batch["union", 8]["expert_rows_per_layer"]
    assert batch["grouped", 1]["dropped_fraction"] == 0 and batch["capacity", 8]["dropped_fraction"] < 1
    largest = [r for r in rows if r["kind"] == "max-batch"]
    assert batch["capacity-einsum", 8]["dropped_fraction"] == batch["capacity", 8]["dropped_fraction"]
    assert len(largest) == 6 and all(0 < r["rows"] <= 8 and r["footprint_bytes"] <= 1e6 for r in largest)
    assert not any(r["search_cut_short"] for r in largest)
    for r in largest:  # the best of its compute's rows, over capacity-einsum's best
        best = max(row["tokens_per_s"] for row in rows if row["compute"] == r["compute"])
        einsum = max(row["tokens_per_s"] for row in rows if row["compute"] == "capacity-einsum")
        assert r["best_tokens_per_s"] == best and r["x_capacity_einsum_best"] == pytest.approx(best / einsum)
    bench = Bench(moe_shape("mixtral-8x7b", tiny=True), 2, args, repeats=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 64)).astype(bench.shape.dtype)
    union, *dropless = (np.asarray(bench.compiled(how, 8)(bench.params, x)[0], np.float32)
                        for how in ("union", "grouped", "grouped-inplace", "ragged"))
    for out in dropless:
        np.testing.assert_allclose(out, union, rtol=0.02, atol=0.02)  # bf16 rows, rounded in other shapes
    padded, einsum = (bench.compiled(how, 8)(bench.params, x) for how in ("capacity", "capacity-einsum"))
    assert int(padded[1]) == int(einsum[1]) > 0  # capacity factor 1: the same pairs dropped
    np.testing.assert_allclose(np.asarray(einsum[0], np.float32), np.asarray(padded[0], np.float32),
                               rtol=0.02, atol=0.02)

    def too_large(how, rows):  # what XLA's autotuner raises where a program's buffers exceed the device
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Failed to get configs ... RESOURCE_EXHAUSTED: Out of memory")

    assert all(bench.least_bytes(how, n) <= r["footprint_bytes"] for (how, n), r in batch.items())
    bench.compiled = too_large
    assert bench.fits("union", 1 << 17, 1e9) is False
    bench.compiled = None  # past its least bytes a program is not even compiled
    assert bench.fits("union", 1 << 17, bench.least_bytes("union", 1 << 17) - 1) is False


def test_running_out_of_pinned_memory_is_named(monkeypatch):
    """Pinned host memory running out while the stacks are placed is one error naming the limit's variable."""
    from moejax.errors import MoejaxError
    from moejax.offload import expert_stacks

    def full(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: pinned host allocation failed")
    monkeypatch.setattr(expert_stacks.jax, "device_put", full)
    with pytest.raises(MoejaxError, match="out of pinned host memory after 3 MoE layers.*XLA_PJRT_GPU_HOST_MEMORY"):
        expert_stacks.place_on_host({"w": np.zeros((2, 3))}, None, 3, per_expert=True)
