"""The CPU emulation harness itself: it writes the source mx.fast.metal_kernel
writes, its built-ins behave like Metal's, and it catches broken kernels
(a removed barrier, an off-by-one index, a deadlock, an out-of-bounds write)."""

import copy
import re
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import as_numpy, attention_inputs, emulator, fresh_seed, make_rule  # noqa: F401
from metal_emulation.emulator import EmulationError, full_source
from mlx_memosight import kernels
from mlx_memosight.cache import KVCache

BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def _mlx_generated_source(kernel, inputs, call, tmp_path, capfd):
    """The source MLX generates for a call, printed by its verbose mode while
    tracing an export (which needs no Metal device)."""
    k = mx.fast.metal_kernel(
        name=kernel.name, input_names=kernel.input_names, output_names=kernel.output_names,
        source=kernel.source, header=kernel.header, ensure_row_contiguous=kernel.ensure_row_contiguous,
    )
    capfd.readouterr()
    mx.export_function(str(tmp_path / "k.mlxfn"), lambda *xs: k(inputs=list(xs), verbose=True, **call), *inputs)
    printed = capfd.readouterr().out
    m = re.search(r"```\n(.*)\n```", printed, re.S)
    assert m, printed[-2000:]
    return m.group(1)


def _recording_launch():
    calls = []

    def launch(kernel, **kw):
        calls.append((kernel, kw))
        out = [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]
        return out

    return calls, launch


def test_generated_source_matches_mlx(tmp_path, capfd):
    rng = np.random.default_rng(fresh_seed())
    calls, record = _recording_launch()
    for kind, dtype, D, splits in (("decode", mx.float16, 128, 1), ("fused", mx.bfloat16, 80, 3)):
        q, k, v, mask = attention_inputs(rng, make_rule(kind, rng, 120), dtype, D, 4, 1)
        kernels.attention_kernel(q, k, v, 0.1, mask, launch=record,
                                 plan=kernels.AttentionPlan(q, k, splits=splits))
    cache = KVCache(2)
    for c in cache.layers:
        c.update_and_fetch(mx.ones((1, 2, 8, 64)), mx.ones((1, 2, 8, 64)))
    kernels.compact_tails(cache.layers, 3, 8, launch=record)
    assert [c[0].name for c in calls] == [
        "memosight_attention", "memosight_attention", "memosight_attention_merge", "memosight_compact_4"
    ]
    for kernel, call in calls:
        inputs = call.pop("inputs")
        call["template"] = list(call["template"])
        expected = _mlx_generated_source(kernel, inputs, call, tmp_path, capfd)
        _, ours, _, _ = full_source(kernel, inputs, call["template"], call["output_dtypes"])
        assert ours.rstrip() == expected.rstrip()


# ----------------------------------------------------------------------------
# Broken kernels are caught


def _with_source(key, edit):
    """A copy of a kernel with its source (body or header) edited."""
    k = copy.copy(kernels.get_kernel(key))
    k.source, k.header = edit(k.source), edit(k.header)
    return k


def _replace_once(old, new):
    def edit(text):
        if old not in text:
            return text
        assert text.count(old) == 1, old
        return text.replace(old, new)

    return edit


def _drop_barrier(n):
    """Remove the n-th threadgroup barrier."""

    def edit(text):
        pieces = text.split(BARRIER)
        if len(pieces) == 1:
            return text
        assert len(pieces) == 5  # the attention kernel has four barriers
        out = pieces[0]
        for i, piece in enumerate(pieces[1:]):
            out += ("" if i == n else BARRIER) + piece
        return out

    return edit


def _attention_error(emulator, broken):
    """How far the attention with ``broken`` in place of the real kernel is
    from the reference (inf for NaN or a reported error), on a fused pass
    with all four simdgroups busy and several key tiles."""
    rng = np.random.default_rng(fresh_seed())
    q, k, v, mask = attention_inputs(rng, make_rule("fused", rng, 100), mx.float32, 64, 8, 2)

    def launch(kernel, **kw):
        return emulator(broken if kernel.name == broken.name else kernel, **kw)

    try:
        out = as_numpy(kernels.attention_kernel(q, k, v, 0.125, mask, launch=launch))
    except EmulationError:
        return np.inf
    ref = as_numpy(kernels.attention_reference(q, k, v, 0.125, mask))
    err = np.abs(out - ref)
    return np.inf if np.isnan(err).any() else float(err.max())


def test_intact_kernel_passes_the_same_check(emulator):
    assert _attention_error(emulator, kernels.get_kernel("attention")) < 1e-4


@pytest.mark.parametrize("n", range(4), ids=["before-key-load", "after-key-load", "before-value-load", "after-value-load"])
def test_removed_barrier_is_caught(emulator, n):
    broken = _with_source("attention", _drop_barrier(n))
    assert broken.source.count(BARRIER) == 3
    assert _attention_error(emulator, broken) > 1e-2


def test_off_by_one_mask_is_caught(emulator):
    broken = _with_source("attention", _replace_once("key < limit", "key <= limit"))
    assert "key <= limit" in broken.header
    assert _attention_error(emulator, broken) > 1e-2


def test_off_by_one_compaction_index_is_caught(emulator):
    rng = np.random.default_rng(fresh_seed())
    cache = KVCache(2)
    for c in cache.layers:
        x = mx.array(rng.standard_normal((1, 2, 30, 64)).astype(np.float32))
        c.update_and_fetch(x, x + 1)
    mx.eval(cache.state_arrays())
    expected = kernels.compact_tails(cache.layers, 10, 30, launch=emulator)
    broken = _with_source(("compact", 4), _replace_once("end + t)", "end + t + 1)"))

    def launch(kernel, **kw):
        return emulator(broken if kernel.name == broken.name else kernel, **kw)

    try:
        got = kernels.compact_tails(cache.layers, 10, 30, launch=launch)
    except EmulationError:
        return
    assert not all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(got, expected))


# ----------------------------------------------------------------------------
# The harness's built-ins


def _kernel(name, inputs, outputs, source, header=""):
    return SimpleNamespace(name=name, input_names=inputs, output_names=outputs, source=source,
                           header=header, ensure_row_contiguous=True)


SIMD_SOURCE = """
uint i = thread_position_in_grid.x;
uint lane = thread_index_in_simdgroup;
float x = a[i];
threadgroup float shared[64];
shared[thread_index_in_threadgroup] = x;
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i * 6 + 0] = simd_sum(x);
out[i * 6 + 1] = simd_max(x);
out[i * 6 + 2] = simd_shuffle(x, 31 - lane);
out[i * 6 + 3] = simd_shuffle_xor(x, 3);
out[i * 6 + 4] = shared[63 - thread_index_in_threadgroup];
out[i * 6 + 5] = float(static_cast<T>(x * 1.001f));
"""


@pytest.mark.parametrize(
    "dtype,soft_half", [(mx.float16, False), (mx.float16, True), (mx.bfloat16, False)],
    ids=["float16", "float16-without-_Float16", "bfloat16"],
)
def test_simd_operations_and_rounding(emulator, tmp_path, dtype, soft_half):
    if soft_half:
        from metal_emulation.emulator import Emulator

        emulator = Emulator(tmp_path, flags=["-DMETAL_EMU_SOFT_HALF"])
    k = _kernel("simd_check", ["a"], ["out"], SIMD_SOURCE)
    rng = np.random.default_rng(fresh_seed())
    # normal, subnormal and out-of-range half values
    a = (rng.standard_normal(128) * np.exp2(rng.integers(-26, 18, size=128))).astype(np.float32)
    (out,) = emulator(k, inputs=[mx.array(a)], template=[("T", dtype)], grid=(128, 1, 1),
                      threadgroup=(64, 1, 1), output_shapes=[(128, 6)], output_dtypes=[mx.float32])
    out = np.array(out)
    sg = a.reshape(4, 32)
    # simd_sum adds the lanes in order, in float32
    np.testing.assert_array_equal(out[:, 0], np.repeat(np.cumsum(sg, axis=1, dtype=np.float32)[:, -1], 32))
    np.testing.assert_array_equal(out[:, 1], np.repeat(sg.max(1), 32))
    np.testing.assert_array_equal(out[:, 2], sg[:, ::-1].reshape(-1))
    np.testing.assert_array_equal(out[:, 3], sg[:, np.arange(32) ^ 3].reshape(-1))
    np.testing.assert_array_equal(out[:, 4], a.reshape(2, 64)[:, ::-1].reshape(-1))
    rounded = np.array((mx.array(a) * 1.001).astype(dtype).astype(mx.float32))
    np.testing.assert_array_equal(out[:, 5], rounded)


def test_deadlock_is_reported(emulator):
    k = _kernel("early_return", ["a"], ["out"], """
uint i = thread_position_in_grid.x;
if (i == 5) { return; }
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i] = a[i];
""")
    with pytest.raises(EmulationError, match="deadlock"):
        emulator(k, inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                 output_shapes=[(64,)], output_dtypes=[mx.float32])


def test_out_of_bounds_write_is_reported(emulator):
    k = _kernel("overrun", ["a"], ["out"], """
uint i = thread_position_in_grid.x;
out[i + 1] = a[i];
""")
    with pytest.raises(EmulationError, match="out-of-bounds write"):
        emulator(k, inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(32, 1, 1),
                 output_shapes=[(64,)], output_dtypes=[mx.float32])


def test_unwritten_output_reads_as_nan(emulator):
    k = _kernel("half_write", ["a"], ["out"], """
uint i = thread_position_in_grid.x;
if (i % 2 == 0) { out[i] = a[i]; }
""")
    (out,) = emulator(k, inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(32, 1, 1),
                      output_shapes=[(64,)], output_dtypes=[mx.float32])
    out = np.array(out)
    assert np.array_equal(out[::2], np.arange(0, 64, 2)) and np.isnan(out[1::2]).all()
