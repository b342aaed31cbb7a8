"""Commands never write onto, into or above their own input, never replace what they did not write,
never leave a partial output behind, and stop on SIGTERM and SIGHUP as cleanly as on Ctrl-C."""

import gc
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hf_zoo import build, random_prompts

from moejax import checkpoint
from moejax.cli import main as cli
from moejax.interrupts import Terminated, stop_like_ctrl_c, uninterrupted
from moejax.routing.eams import EAMCollection
from moejax.routing.traces import RoutingTrace

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(HF checkpoint dir, converted moejax checkpoint) of a tiny Mixtral."""
    _, hf_dir, ckpt = build(("mixtral", "basic"), tmp_path_factory.mktemp("outputs"))
    return hf_dir, ckpt


@pytest.fixture
def work(originals, tmp_path):
    """A directory of inputs every test may lose: hf/, mj/ (checkpoint), prompts.jsonl, trace/routing.npz."""
    hf_dir, ckpt = originals
    shutil.copytree(hf_dir, tmp_path / "hf")
    shutil.copytree(ckpt, tmp_path / "mj")
    rows = [{"prompt_ids": p} for p in random_prompts(101, [4, 3], seed=1)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "trace").mkdir()
    RoutingTrace(np.zeros((2, 5, 2), np.int16), np.array([5]), 4).save(tmp_path / "trace" / "routing.npz")
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every entry under root: file bytes, link target or 'dir'."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = path.read_bytes()
    return entries


def trace_args(w: Path, out) -> list:
    return ["trace", w / "mj", "--prompts", w / "prompts.jsonl", "--out", out, "--max-new-tokens", "2", "--quiet"]


# (command line in the work directory w, what the error says); every case passes --overwrite.
OVERLAPS = {
    "convert-onto-input": (lambda w: ["convert", w / "hf", w / "hf"], "is the input"),
    "convert-into-input": (lambda w: ["convert", w / "hf", w / "hf" / "mj"], "is inside the input"),
    "convert-above-input": (lambda w: ["convert", w / "hf", w], "contains the input"),
    "convert-relative-path": (lambda w: ["convert", w / "hf", w / "trace" / ".." / "hf"], "is the input"),
    "convert-through-link": (lambda w: ["convert", w / "hf", w / "link-to-hf"], "is the input"),
    "export-onto-input": (lambda w: ["export", w / "mj", w / "mj"], "is the input"),
    "export-into-input": (lambda w: ["export", w / "mj", w / "mj" / "experts"], "is inside the input"),
    "export-above-input": (lambda w: ["export", w / "mj", w], "contains the input"),
    "export-into-link": (lambda w: ["export", w / "mj", w / "link-to-mj" / "hf"], "is inside the input"),
    "trace-onto-checkpoint": (lambda w: trace_args(w, w / "mj"), "is the input"),
    "trace-onto-prompts": (lambda w: trace_args(w, w / "prompts.jsonl"), "is the input"),
    "trace-above-inputs": (lambda w: trace_args(w, w), "contains the input"),
    "trace-onto-traces": (lambda w: [*trace_args(w, w / "trace"), "--traces", w / "trace"], "is the input"),
    "lab-plot-onto-traces": (lambda w: ["lab", "--traces", w / "trace" / "routing.npz", "--capacity", "0.5",
                                        "--plot", w / "trace" / "routing.npz"], "is the input"),
}


@pytest.mark.parametrize("case", OVERLAPS, ids=list(OVERLAPS))
def test_an_output_overlapping_an_input_is_refused_and_nothing_is_touched(work, capsys, case):
    (work / "link-to-hf").symlink_to(work / "hf")
    (work / "link-to-mj").symlink_to(work / "mj")
    argv, problem = OVERLAPS[case]
    before = snapshot(work)
    assert cli([str(a) for a in argv(work)] + ["--overwrite"] * (not case.startswith("lab"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moejax: error: output ") and problem in err and "\n" not in err, err
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["convert", "export", "trace"])
def test_overwrite_replaces_only_what_the_command_writes(work, capsys, command):
    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = {"convert": ["convert", work / "hf", mine], "export": ["export", work / "mj", mine], "trace": trace_args(work, mine)}
    assert cli([str(a) for a in argv[command]] + ["--overwrite"]) == 2
    assert "exists and is not a" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"


def test_trace_keeps_an_earlier_trace_without_overwrite_and_writes_files_alike(work, capsys):
    out = work / "traced"
    umask = os.umask(0o022)
    try:
        assert cli([str(a) for a in trace_args(work, out)] + ["--limit", "1"]) == 0
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert modes == {"eams.npz": 0o644, "routing.npz": 0o644, "summary.json": 0o644}
    earlier = snapshot(out)
    assert cli([str(a) for a in trace_args(work, out)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == earlier
    assert cli([str(a) for a in trace_args(work, out)] + ["--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["sequences"] == 2


def test_a_trace_that_fails_while_writing_leaves_the_earlier_one_whole(work, monkeypatch):
    out = work / "traced"
    assert cli([str(a) for a in trace_args(work, out)] + ["--limit", "1"]) == 0
    earlier = snapshot(out)

    def disk_full(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(EAMCollection, "save", disk_full)  # routing.npz is written first
    for target, flags in ((out, ["--overwrite"]), (work / "new", [])):
        with pytest.raises(OSError, match="disk full"):
            cli([str(a) for a in trace_args(work, target)] + flags)
    assert snapshot(out) == earlier and not (work / "new").exists()
    assert not [p.name for p in work.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# A child that runs the CLI with one writing function slowed down: after its first call it prints
# "writing" and sleeps, so the parent can signal it while the output is half-written.
SLOW_WRITER = """
import importlib, sys, time
from moejax.cli import main
module, _, attr = sys.argv[1].partition(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(120)
setattr(owner, name, slow)
sys.exit(main(sys.argv[2:]))
"""
SLOWED = {"convert": "moejax.checkpoint:save_group", "export": "moejax.convert.export:write_tensors",
          "trace": "moejax.routing.traces:RoutingTrace.save"}


def first_line(process: subprocess.Popen, timeout_s: float = 300) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            process.kill()
            pytest.fail(f"no output within {timeout_s} s")
    return process.stdout.readline()


@pytest.mark.parametrize("command,signum", [
    ("convert", signal.SIGTERM), ("convert", signal.SIGHUP), ("export", signal.SIGTERM), ("export", signal.SIGINT),
    ("trace", signal.SIGTERM),
], ids=lambda v: getattr(v, "name", v))
def test_a_signal_mid_write_removes_the_partial_output_and_exits_128_plus_signum(work, command, signum):
    out = work / "out"
    argv = {"convert": ["convert", work / "hf", out, "--quiet"], "export": ["export", work / "mj", out, "--quiet"],
            "trace": trace_args(work, out)}[command]
    before = sorted(os.listdir(work))
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, SLOWED[command], *map(str, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    line = first_line(process)
    if line != "writing\n":
        process.kill()
        pytest.fail(f"the child stopped before writing: {process.communicate()[1]}")
    assert [name for name in os.listdir(work) if name.startswith(".out.partial-")]  # really half-written
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    expected = "moejax: interrupted" if signum == signal.SIGINT else f"moejax: stopped by {signal.Signals(signum).name}"
    assert err.strip() == expected
    assert sorted(os.listdir(work)) == before


def test_uninterrupted_blocks_finish_before_the_signal_raises():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            signal.raise_signal(signal.SIGINT)
            finished.append("after SIGINT")
    with stop_like_ctrl_c(), pytest.raises(Terminated) as stop:
        with uninterrupted():
            signal.raise_signal(signal.SIGTERM)
            finished.append("after SIGTERM")
    assert stop.value.signum == signal.SIGTERM and finished == ["after SIGINT", "after SIGTERM"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_orbax_reads_and_writes_run_to_their_end_before_ctrl_c_stops_them(tmp_path, monkeypatch):
    """Cut midway, orbax's asynchronous save and restore print 'Event loop is closed' tracebacks."""
    real, finished = checkpoint._checkpointer(), []

    class InterruptedMidway:
        def save(self, path, tree):
            signal.raise_signal(signal.SIGINT)
            real.save(path, tree)
            finished.append("save")

        def restore(self, path):
            signal.raise_signal(signal.SIGINT)
            tree = real.restore(path)
            finished.append("restore")
            return tree

    monkeypatch.setattr(checkpoint, "_checkpointer", InterruptedMidway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_group(tmp_path, ("globals",), {"w": np.arange(3.0)})
    with pytest.raises(KeyboardInterrupt):
        checkpoint.load_group(tmp_path, ("globals",))
    assert finished == ["save", "restore"]


def test_a_signal_landing_in_a_gc_callback_is_not_lost():
    """Python prints and ignores an exception raised in a gc callback (JAX has one): the signal
    must stop the command all the same."""
    fired = []

    def callback(phase, info):
        if not fired:
            fired.append(phase)
            signal.raise_signal(signal.SIGINT)

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt), stop_like_ctrl_c():
            gc.collect()
            time.sleep(10)
    finally:
        gc.callbacks.remove(callback)
    assert fired


def test_a_signal_the_process_ignores_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with stop_like_ctrl_c():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with uninterrupted():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("status", [0, 2, 130, 143])
def test_the_command_leaves_without_finalization_only_when_a_signal_stopped_it(monkeypatch, status):
    """An interrupted command (exit 128 + signal) has cleaned up when main returns; the interpreter's finalization,
    with XLA threads still running a dispatched step, could crash it (exit 139), so it exits at once."""
    from moejax import cli

    exits = []

    def leaving(how):
        def leave(code):
            exits.append((how, code))
            raise SystemExit(code)
        return leave

    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(cli.os, "_exit", leaving("_exit"))
    monkeypatch.setattr(cli.sys, "exit", leaving("exit"))
    with pytest.raises(SystemExit):
        cli.run()
    assert exits == [("_exit" if status >= 128 else "exit", status)]
