"""Tests run on JAX's CPU backend; several host devices are available for multi-device logic."""

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the whole run, never the user's: a temporary directory that the first process
# (pytest itself, or xdist's controller) makes and removes at the end, and that the xdist workers inherit. Test files
# compile many of the same tiny models' programs (test_offload.py alone: 203 s with it, 243 s without; the whole suite
# on 2 cores, which varies by minutes: 14:28 and 16:37 with it, 16:02 and 16:07 without). test_compilation sets its
# own. Entries are written without a lock: a worker that reads one the other is still writing gets a warning from JAX
# and compiles the program itself.
CACHE_VARIABLE = "MOEJAX_COMPILATION_CACHE"
OWN_CACHE = CACHE_VARIABLE not in os.environ
if OWN_CACHE:
    os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="moejax-tests-jax-cache-")
# The copy kernel's CPU twin (`kernels.host_rows`) is built once per run, into a temporary directory likewise.
KERNEL_VARIABLE = "MOEJAX_KERNEL_DIR"
OWN_KERNELS = KERNEL_VARIABLE not in os.environ
if OWN_KERNELS:
    os.environ[KERNEL_VARIABLE] = tempfile.mkdtemp(prefix="moejax-tests-kernels-")

# The interruption tests need Ctrl-C, hang-up and SIGTERM to act as in a terminal, in this process and in the
# commands it starts; a harness may have left them ignored (a background job of a non-interactive shell ignores
# SIGINT, nohup SIGHUP, and children inherit that), which moejax rightly honours.
signal.signal(signal.SIGINT, signal.default_int_handler)
for signum in (signal.SIGHUP, signal.SIGTERM):
    signal.signal(signum, signal.SIG_DFL)

# The tests compile hundreds of tiny programs: LLVM's optimisations and XLA's fusion emitters
# cost more time than they save (compilation is 3x faster without). XLA aborts on a flag it does
# not know, so the flags are used only if this jaxlib accepts them.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if "XLA_FLAGS" not in os.environ:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS},
        capture_output=True,
    )
    if probe.returncode == 0:
        os.environ["XLA_FLAGS"] = FAST_COMPILE_FLAGS

from moejax.engine.compilation import use_compilation_cache  # noqa: E402 (imports JAX: after XLA_FLAGS)

use_compilation_cache()  # for the programs of tests that build engines without `moejax.load`


def pytest_unconfigure(config):
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    for variable, own in ((CACHE_VARIABLE, OWN_CACHE), (KERNEL_VARIABLE, OWN_KERNELS)):
        if own:
            shutil.rmtree(os.environ[variable], ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def free_compiled_programs(request):
    """Frees a finished module's compiled programs: its cached engines (module-level functions with
    `cache_clear`) and JAX's caches. XLA:CPU maps each step program's code into hundreds of memory regions,
    and Linux allows a process 65,530 (vm.max_map_count): a suite that keeps them all crashes in XLA."""
    yield
    for value in vars(request.module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    import jax

    jax.clear_caches()
    gc.collect()
