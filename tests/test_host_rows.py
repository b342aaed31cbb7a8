"""The copy kernel's logic (`kernels.host_rows`), through its CPU twin: rows of host arrays copied into the slots
that device-side keys and slots name, nothing written for a key or slot out of range; and the engine option that
uses it (`miss_copy`), whose bad uses are one-line errors naming it."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax.engine.loading import addressed_host, check_miss_copy, resolve_miss_copy
from moejax.errors import ParameterError
from moejax.kernels import host_rows
from moejax.offload.expert_stacks import AddressedHost, host_sharding, place_on_host


@pytest.fixture(scope="module")
def pinned():
    return host_sharding(jax.devices()[0])


def test_rows_land_in_their_slots_and_bad_keys_or_slots_copy_nothing(pinned):
    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((n, 3, 5)).astype(np.float32) for n in (4, 2))
    held = [jax.device_put(first, pinned), jax.device_put(second, pinned)]  # alive while the table is read
    table = host_rows.row_table([(held[0], 4), (held[1], 2)])
    rows = np.concatenate([first, second])  # the table's rows, in order
    keys = np.array([5, 0, -1, 2, 6, 3], np.int32)  # -1 and 6 (past the 6 rows): nothing
    slots = np.array([0, 2, 1, 7, 1, -1], np.int32)  # 7 (past the 4 slots) and -1: nothing
    start = np.full((4, 3, 5), 9.0, np.float32)
    copy = jax.jit(lambda dst, keys, slots: host_rows.host_rows_to_slots(table, keys, slots, dst), donate_argnums=0)
    out = np.asarray(copy(jnp.asarray(start), keys, slots))
    expected = start.copy()
    for key, slot in zip(keys, slots):
        if 0 <= key < len(rows) and 0 <= slot < len(expected):
            expected[slot] = rows[key]
    np.testing.assert_array_equal(out, expected)
    assert np.array_equal(out[0], rows[5]) and np.array_equal(out[2], rows[0]) and (out[1] == 9).all()


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_addressed_host_writes_what_the_stacks_hold(pinned, per_expert):
    """`AddressedHost.write` puts expert e of MoE layer m in a slot, in either host layout, inside a loop as the
    step programs call it: the expert's bytes, every weight."""
    rng = np.random.default_rng(1)
    layers = [{"up": rng.standard_normal((3, 4, 6)).astype(np.float32),
               "down": rng.standard_normal((3, 6, 4)).astype(jnp.bfloat16)} for _ in range(2)]
    host = addressed_host(tuple(place_on_host(stack, pinned, m, per_expert) for m, stack in enumerate(layers)))
    assert isinstance(host, AddressedHost) and len(host) == 2
    wanted = jnp.array([[1, 0, 1], [2, 0, 1], [0, 3, 1]], jnp.int32)  # rows: layers, experts, slots

    @jax.jit
    def write(host, slab):
        return jax.lax.fori_loop(0, 3, lambda i, slab: host.write(slab, wanted[0, i], wanted[1, i], wanted[2, i]), slab)

    slab = write(host, {"up": jnp.zeros((4, 4, 6), jnp.float32), "down": jnp.zeros((4, 6, 4), jnp.bfloat16)})
    for m, e, slot in zip(*np.asarray(wanted)):
        for name in ("up", "down"):
            np.testing.assert_array_equal(np.asarray(slab[name][slot]), layers[m][name][e])
    assert not np.asarray(slab["up"][2]).any()


@pytest.mark.parametrize("mode,options,message", [
    ("cached", dict(miss_copy="dma"), "miss_copy 'dma' is not one of auto, xla, kernel"),
    ("resident", dict(miss_copy="kernel"), "it needs offload cached or on-demand on one device, without host_budget"),
    ("cached", dict(miss_copy="kernel", devices=2), "on one device"),
    ("cached", dict(miss_copy="kernel", host_budget="0.5"), "without host_budget"),
])
def test_bad_miss_copy_is_a_one_line_error(mode, options, message):
    """Refused by `moejax.load` before it reads any weights."""
    with pytest.raises(ParameterError, match=message):
        moejax.load(moejax.SHIPPED_CHECKPOINT, mode, **options)
    for value in ("auto", "xla"):  # suit every engine
        check_miss_copy(value, pinned_stacks=False)


def test_kernel_that_cannot_be_built_is_a_one_line_error(monkeypatch, pinned):
    def no_compiler(platform):
        raise host_rows.KernelUnavailable("no compiler for host_rows_cpu.cc ($CXX or g++)")

    monkeypatch.setattr(host_rows, "compiler", no_compiler)
    monkeypatch.setenv("MOEJAX_KERNEL_DIR", "/nonexistent-moejax-kernels")
    host_rows.register.cache_clear()
    try:
        with pytest.raises(ParameterError, match=r"^miss_copy 'kernel' is unavailable: no compiler for host_rows_cpu"):
            addressed_host((place_on_host({"up": np.zeros((2, 3), np.float32)}, pinned, 0),))
    finally:
        host_rows.register.cache_clear()


def test_auto_takes_the_kernel_on_a_gpu_for_stacked_host_arrays_only(monkeypatch):
    """(value, pinned host stacks, per-expert layout or unaligned rows, device) -> the copy: the kernel for stacked
    host arrays on a GPU (it beat XLA's slices there), XLA elsewhere and where it won't build."""
    gpu, cpu = types.SimpleNamespace(platform="gpu"), types.SimpleNamespace(platform="cpu")
    monkeypatch.setattr(host_rows, "register_here", lambda: None)
    assert resolve_miss_copy("auto", True, False, gpu) == "kernel"
    # per-expert or unaligned; the CPU; no pinned stacks (resident, dense-offload, expert parallel: a sharding)
    for args in ((True, True, gpu), (True, False, cpu), (False, False, gpu), (False, False, "a sharding: never read")):
        assert resolve_miss_copy("auto", *args) == "xla", args
    assert resolve_miss_copy("kernel", True, True, cpu) == "kernel"  # asked for: as asked
    assert resolve_miss_copy("xla", True, False, gpu) == "xla"

    def unavailable():
        raise host_rows.KernelUnavailable("no compiler for host_rows.cu (nvcc)")

    monkeypatch.setattr(host_rows, "register_here", unavailable)
    assert resolve_miss_copy("auto", True, False, gpu) == "xla"
