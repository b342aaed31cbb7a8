"""Expert parallelism (`engine.expert_parallel`) on 4 CPU devices, in a fresh process (the device count is fixed
when JAX starts): resident and cached (a cache per device), with and without hot replicas, the same tokens and
logits as the single-device engine; per-device load, hit rate and bytes in the stats; one-line errors for bad
`devices`, `hot_replicas` and combinations not supported yet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
import numpy as np
import moejax
from moejax.errors import MoejaxError
from moejax.routing.eams import EAMCollection, eam_counts

eams, hot_eams = sys.argv[1], sys.argv[1].replace(".npz", "_hot.npz")
out = {}

def run(**kw):
    engine = moejax.load(moejax.SHIPPED_CHECKPOINT, slots=2, max_seq_len=96, prefill_chunk=96, **kw)
    result = engine.generate([[7, 3, 2], [1, 5, 9, 13]], max_new_tokens=5)  # union compute
    routed = sum(int(((r >= 0) & (r < engine.cfg.num_experts)).sum()) for r in (engine.routing(b)[0] for b in range(2)))
    stats = {**engine.stats(), "routed_pairs": routed}
    logits = engine.logits([list(range(1, 71))])  # 70 rows: grouped compute
    return engine, result.tokens, logits, stats

engine, tokens, logits, _ = run()
cfg = engine.cfg
load = np.zeros((len(cfg.moe_layer_ids), cfg.num_experts), np.int32)
load[:, :4] = 100  # the first four experts hot: round-robin would put them on different devices anyway,
load[:, 4] = 50    # balanced must spread by load, not by id
collection = EAMCollection(*load.shape)
collection.add(load)
collection.save(eams)
real = np.concatenate([engine.routing(b)[0] for b in range(2)], axis=1)  # the reference's own routing: its hot
collection = EAMCollection(*load.shape)                                  # experts get the replicas
collection.add(eam_counts(real, cfg.num_experts))
collection.save(hot_eams)
RUNS = {"4 balanced": dict(devices=4, placement="balanced", placement_traces=eams),
        "2 cached": dict(devices=2, offload="cached", expert_budget=0.25, cache_policy="lfu"),
        "4 cached replicas": dict(devices=4, offload="cached", expert_budget=0.25, placement="balanced",
                                  placement_traces=hot_eams, hot_replicas=2, prefetch="lookahead")}
for name, kw in RUNS.items():
    other, t, l, stats = run(**kw)
    out[name] = {
        "tokens_equal": t == tokens,
        "logits_max_diff": max(float(np.abs(a - b).max()) for a, b in zip(l, logits)),
        "stats": stats["expert_parallel"], "total": stats["total"], "capacity": stats["capacity_experts"],
        "routed_pairs": stats["routed_pairs"],
        "slab_devices": sorted({len(w.sharding.device_set) for w in other.slab.values()}),
        "placement": other.placement.devices.tolist(), "replicas": [list(map(list, r)) for r in other.placement.replicas]}
errors = {}
for kw in ({"devices": 0}, {"devices": 8}, {"devices": 3}, {"devices": 2, "offload": "cached", "cpu_experts": "auto"},
           {"devices": 2, "offload": "cached", "cpu_experts": "auto", "host_budget": 0.5},
           {"devices": 2, "placement": "balanced"}, {"devices": 2, "hot_replicas": 1}):
    try:
        moejax.load(moejax.SHIPPED_CHECKPOINT, slots=1, max_seq_len=16, **kw)
        errors[str(kw)] = None
    except MoejaxError as err:
        errors[str(kw)] = str(err)
out["errors"] = errors
print(json.dumps(out))
"""


def test_expert_parallel_equals_the_single_device_engine(tmp_path):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()  # and conftest's
    env = {**os.environ, "XLA_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "eams.npz")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    for name, run in out.items():
        if name == "errors":
            continue
        devices = int(name[0])
        assert run["tokens_equal"], name
        # top-2 routing: each token's two experts are added once, on one device or across two (replicas: by one copy
        # each), so the bits agree in every mode
        assert run["logits_max_diff"] == 0.0, name
        assert run["slab_devices"] == [devices]
        stats, total = run["stats"], run["total"]
        assert stats["devices"] == devices and len(stats["device_load"]) == devices == len(stats["per_device"])
        assert sum(stats["device_load"]) == run["routed_pairs"] > 0 and stats["max_over_mean"]["total"] >= 1.0
        for key in ("activations", "hits", "misses", "bytes_h2d", "evictions", "prefetch_issued"):
            assert sum(d[key] for d in stats["per_device"]) == total[key], (name, key)
        assert [d["pairs"] for d in stats["per_device"]] == stats["device_load"]
        assert all(d["activations"] > 0 for d in stats["per_device"])
        if "cached" in name:
            assert run["capacity"] == 32  # 0.25 of the 8 x 16 experts, per device
            assert 0 < total["hit_rate"] < 1 and total["misses"] > 0 and total["bytes_h2d"] > 0
        if "replicas" in name:
            assert [len(r) for r in run["replicas"]] == [2] * 8
            assert stats["hot_replicas"] == 2 and stats["experts_per_device"] == 5  # ceil((16 + 2) / 4)
    assert out["4 cached replicas"]["total"]["prefetch_issued"] > 0  # the lookahead ran on each device's own experts
    assert out["2 cached"]["placement"][0][:4] == [0, 1, 0, 1]  # round-robin
    hot = [row[:4] for row in out["4 balanced"]["placement"]]
    assert all(sorted(row) == [0, 1, 2, 3] for row in hot)  # the four hot experts on four devices
    errors = out["errors"]
    assert errors["{'devices': 0}"] == "devices must be an integer >= 1 (got 0)"
    assert errors["{'devices': 8}"].startswith("devices 8: JAX sees 4 cpu device(s) (the CPU splits")
    assert "devices 3 does not divide the 16 experts" in errors["{'devices': 3}"]
    assert errors["{'devices': 2, 'offload': 'cached', 'cpu_experts': 'auto'}"].startswith(
        "devices 2: expert parallelism does not combine with cpu_experts")
    assert errors["{'devices': 2, 'offload': 'cached', 'cpu_experts': 'auto', 'host_budget': 0.5}"] == (
        "devices 2: expert parallelism does not combine with cpu_experts or the disk tier (host_budget) yet")
    assert "hot_replicas copies the experts that measured load calls hot: it needs placement 'balanced'" in errors[
        "{'devices': 2, 'hot_replicas': 1}"]
    assert "placement 'balanced' places experts by measured load: give placement_traces" in errors["{'devices': 2, 'placement': 'balanced'}"]
    assert all("\n" not in e for e in errors.values())


PROCESS = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
import moejax

prompts = [[7, 3, 2], [1, 5, 9, 13]]
out, logits = {"devices": jax.device_count(), "local": jax.local_device_count()}, {}
for devices in (1, 4):  # 1: this process's first device alone; 4: both processes' devices
    engine = moejax.load(moejax.SHIPPED_CHECKPOINT, slots=2, max_seq_len=32, prefill_chunk=16, devices=devices,
                         device=jax.local_devices()[0])
    out[f"tokens {devices}"] = engine.generate(prompts, max_new_tokens=4).tokens
    logits[devices] = np.asarray(engine.logits([prompts[1]])[0])
out["logits_equal"] = bool((logits[1] == logits[4]).all())
out["stats"] = engine.stats()["expert_parallel"]
print("RESULT", json.dumps(out), flush=True)
"""


def test_two_processes_share_the_experts_through_jax_distributed(tmp_path):
    """Multi-host on one machine: two processes of 2 CPU devices each (`jax.distributed`, gloo collectives), one
    mesh of 4 devices, each process holding its devices' experts: the same tokens and logits as one device."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "XLA_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a process
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS, address, str(i)], env=env, stdout=log.open("w"),
                                  stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        for p in processes:
            p.wait(timeout=180)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    results = []
    for p, log in zip(processes, logs):
        text = log.read_text()  # gloo writes to stdout too
        assert p.returncode == 0, text[-3000:]
        results.append(json.loads(text.split("RESULT ", 1)[1].splitlines()[0]))
    for out in results:
        assert (out["devices"], out["local"]) == (4, 2)
        assert out["tokens 4"] == out["tokens 1"] and out["logits_equal"]
        assert out["stats"]["devices"] == 4 and sum(out["stats"]["device_load"]) > 0
    assert results[0] == results[1]


def test_metrics_have_a_series_per_device():
    """/metrics under expert parallelism: each device's pairs, hit rate and bytes moved, labelled by device."""
    pytest.importorskip("prometheus_client")
    from moejax.serving.http.metrics import ServerMetrics

    devices = [{"device": 0, "pairs": 30, "hit_rate": 0.5, "bytes_h2d": 1000},
               {"device": 1, "pairs": 12, "hit_rate": 0.25, "bytes_h2d": 3000}]
    engine = {"hit_rate": 0.4, "bytes_h2d": 4000, "host_wait_s": 0.0, "prefetch_precision": 0.0, "per_device": devices}

    class Loop:
        def metrics(self):
            return {"queue_depth": 0, "running": 0, "engine": engine, "approximate_routing": False}

    text = ServerMetrics(Loop()).text().decode()
    assert 'moejax_device_expert_pairs_total{device="0"} 30.0' in text
    assert 'moejax_device_expert_pairs_total{device="1"} 12.0' in text
    assert 'moejax_device_expert_cache_hit_rate{device="1"} 0.25' in text
    assert 'moejax_device_expert_bytes_moved_total{device="1"} 3000.0' in text
    engine["per_device"] = []  # one device: no per-device series
    assert "moejax_device_" not in ServerMetrics(Loop()).text().decode()
