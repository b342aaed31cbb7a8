"""Compilation: its time is measured and left out of the speed figures, and compiled programs are
kept in a persistent cache (MOEJAX_COMPILATION_CACHE) so that a second run starts fast."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from moejax.errors import MoejaxError
from moejax.engine.compilation import CACHE_ENV, compile_seconds, on_first_compile, use_compilation_cache

REPO = Path(__file__).resolve().parent.parent
TRACE_EVENT, BACKEND_EVENT = "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration"


def test_compile_seconds_measure_a_first_call_and_nothing_after():
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) * 3.0)
    x = jnp.ones((32, 48))
    notices = []
    before, start = compile_seconds(), time.perf_counter()
    with on_first_compile(lambda: notices.append(time.perf_counter())):
        f(x).block_until_ready()
    wall, compiled = time.perf_counter() - start, compile_seconds() - before
    assert 0.5 * wall < compiled <= wall and len(notices) == 1
    before = compile_seconds()
    f(x).block_until_ready()
    assert compile_seconds() == before


def test_a_compile_event_inside_another_counts_once():
    # An eager op compiled while a function is traced reports its own events inside the tracing's.
    before = compile_seconds()
    jax.monitoring.record_scalar(TRACE_EVENT, 100.0)
    jax.monitoring.record_scalar(BACKEND_EVENT, 101.0)
    jax.monitoring.record_event_time_span(BACKEND_EVENT, 101.0, 102.0)
    jax.monitoring.record_event_time_span(TRACE_EVENT, 100.0, 105.0)
    assert compile_seconds() - before == pytest.approx(5.0)


@pytest.fixture
def jax_cache_config(monkeypatch):
    """Restores JAX's cache settings, which use_compilation_cache changes for the whole process."""
    for name in (CACHE_ENV, "XDG_CACHE_HOME", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    saved = {name: getattr(jax.config, name) for name in
             ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_cache_lives_in_the_user_cache_directory_by_default(jax_cache_config, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    use_compilation_cache()
    directory = tmp_path / "moejax" / "jax"
    assert jax.config.jax_compilation_cache_dir == str(directory)
    assert directory.is_dir() and directory.stat().st_mode & 0o077 == 0  # nobody else may plant programs there
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_the_cache_can_be_moved_turned_off_or_left_to_jax(jax_cache_config, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setenv(CACHE_ENV, "off")
    use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "home-cache").exists()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "elsewhere")
    monkeypatch.delenv(CACHE_ENV)
    use_compilation_cache()  # JAX's own setting (here the one above) is kept
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "elsewhere") and not (tmp_path / "home-cache").exists()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(MoejaxError, match=f"{CACHE_ENV}=.*a-file/cache: cannot create"):
        use_compilation_cache()


def _generate_in_a_fresh_process(cache: Path, cwd: Path) -> tuple[dict, str]:
    env = {**os.environ, CACHE_ENV: str(cache), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "moejax", "generate", "--prompt", "hi", "--max-new-tokens", "2", "--json"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_a_second_run_loads_its_programs_from_the_cache_and_timings_leave_compiling_out(tmp_path):
    cache = tmp_path / "cache"
    first, err = _generate_in_a_fresh_process(cache, tmp_path)
    timing = first["timing"]
    assert "compiling..." in err and len(list(cache.iterdir())) > 0
    # Before compile time was taken out, the one decode step of this run took about half of it.
    assert timing["decode_steps"] == 1 and timing["compile_s"] > 5 * max(timing["tpot_s"], timing["ttft_s"])
    programs = sorted(cache.iterdir())
    second, _ = _generate_in_a_fresh_process(cache, tmp_path)
    assert second["tokens"] == first["tokens"]
    assert sorted(cache.iterdir()) == programs  # every program came from the cache: none was compiled anew
    # Tracing and lowering still run, so on a busy 2-core machine only "less" is certain, not "half".
    assert second["timing"]["compile_s"] < timing["compile_s"]
