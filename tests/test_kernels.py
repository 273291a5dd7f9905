"""The Metal kernels equal the pure-MLX references: run by the CPU emulator
everywhere and on the Apple GPU on a Mac; the dispatcher's choices and
fallbacks; the model and cache paths through the dispatcher."""

import importlib.util
import shutil
import subprocess
import sys
import warnings
import zipfile

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import (  # noqa: F401  (fixtures)
    ORACLE_TOLERANCE,
    TOLERANCE,
    as_numpy,
    attention_inputs,
    emulator,
    fresh_seed,
    launch,
    make_rule,
    oracle_attention,
)
from mlx_memosight import kernels
from mlx_memosight.cache import KVCache
from conftest import ROOT

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16

# kind of pass, dtype, head dim, query heads, KV heads (GQA 1 / 4 / 8)
ATTENTION_CASES = [
    ("decode", F32, 64, 2, 2),
    ("fused", F16, 128, 8, 2),
    ("compress", BF16, 96, 8, 1),
    ("compress_start", F16, 80, 4, 4),
    ("accelerate", F32, 80, 4, 1),
    ("training", BF16, 64, 16, 2),
    ("ragged", F16, 128, 2, 2),
    ("random", F32, 96, 8, 2),
    ("random", BF16, 128, 4, 1),
    ("fused_long", F16, 64, 8, 2),
]


def _check_attention(launch, kind, dtype, D, Hq, Hkv, plan_splits=None, cache_len=None):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    rule = make_rule(kind, rng, cache_len)
    batch = rule.query_slot.shape[0] if rule.query_slot.ndim == 2 else 1
    q, k, v, mask = attention_inputs(rng, rule, dtype, D, Hq, Hkv, batch)
    scale = D**-0.5
    plan = kernels.AttentionPlan(q, k, splits=plan_splits)
    out = kernels.attention_kernel(q, k, v, scale, mask, launch=launch, plan=plan)
    ref = kernels.attention_reference(q, k, v, scale, mask)
    assert out.shape == ref.shape and out.dtype == dtype
    got = as_numpy(out)
    assert np.isfinite(got).all(), f"seed {seed}"
    np.testing.assert_allclose(got, as_numpy(ref), **TOLERANCE[dtype], err_msg=f"seed {seed}")
    np.testing.assert_allclose(got, oracle_attention(q, k, v, scale, mask), **ORACLE_TOLERANCE[dtype],
                               err_msg=f"seed {seed}")
    return plan


@pytest.mark.parametrize(
    "kind,dtype,D,Hq,Hkv", ATTENTION_CASES, ids=[f"{c[0]}-{str(c[1])[9:]}-d{c[2]}-g{c[3] // c[4]}" for c in ATTENTION_CASES]
)
def test_attention_kernel_equals_reference(launch, kind, dtype, D, Hq, Hkv):
    _check_attention(launch, kind, dtype, D, Hq, Hkv)


@pytest.mark.parametrize("dtype,D,splits", [(F32, 80, 4), (BF16, 128, 2)], ids=["float32-d80", "bfloat16-d128"])
def test_attention_kernel_key_splits(launch, dtype, D, splits):
    """Keys split across threadgroups, merged by the second kernel."""
    plan = _check_attention(launch, "compress", dtype, D, 4, 1, plan_splits=splits, cache_len=200)
    assert plan.splits == splits


def test_attention_plan_splits_long_caches_only():
    q = mx.zeros((1, 28, 9, 128))
    assert kernels.AttentionPlan(q, mx.zeros((1, 4, 4096, 128))).splits > 1
    assert kernels.AttentionPlan(q, mx.zeros((1, 4, 100, 128))).splits == 1
    big = kernels.AttentionPlan(mx.zeros((1, 28, 320, 128)), mx.zeros((1, 4, 4096, 128)))
    assert big.splits == 1 and big.blocks * 16 >= 7 * 320


# ----------------------------------------------------------------------------
# Compaction


def _filled_cache(rng, n_layers, length, dtype, B=1, H=2, D=64):
    cache = KVCache(n_layers)
    for c in cache.layers:
        for chunk in (length // 2, length - length // 2):
            k = mx.array(rng.standard_normal((B, H, chunk, D)).astype(np.float32)).astype(dtype)
            v = mx.array(rng.standard_normal((B, H, chunk, D)).astype(np.float32)).astype(dtype)
            c.update_and_fetch(k, v)
    mx.eval(cache.state_arrays())
    return cache


def _copy_cache(cache):
    other = KVCache(len(cache))
    for a, b in zip(cache.layers, other.layers):
        b.keys, b.values, b.length = mx.array(a.keys), mx.array(a.values), a.length
    mx.eval(other.state_arrays())
    return other


@pytest.mark.parametrize(
    "dtype,span",
    [(F16, (0, 9)), (BF16, (13, 40)), (F32, (31, 59))],
    ids=["start-float16", "middle-bfloat16", "end-float32"],
)
def test_compaction_kernel_equals_reference(launch, monkeypatch, dtype, span):
    rng = np.random.default_rng(fresh_seed())
    length = 61
    cache = _filled_cache(rng, 2, length, dtype)
    expected = _copy_cache(cache)
    expected.evict(*span)  # the reference (no Metal here, or forced below)
    monkeypatch.setattr(kernels, "compact", lambda *a: kernels.compact_kernel(*a, launch=launch))
    cache.evict(*span)
    assert cache.length == expected.length == length - (span[1] - span[0])
    for a, b in zip(cache.layers, expected.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            n = cache.length
            assert np.array_equal(np.array(x[..., :n, :].view(mx.uint16 if dtype != F32 else mx.uint32)),
                                  np.array(y[..., :n, :].view(mx.uint16 if dtype != F32 else mx.uint32)))


@pytest.mark.parametrize("dtype,row", [(F16, 0), (BF16, 2), (F32, 1)])
def test_compaction_kernel_moves_one_batch_row(launch, dtype, row):
    """A batched cache evicts per row: the kernel moves that row's tail and
    leaves the other rows as they were."""
    rng = np.random.default_rng(fresh_seed())
    cache = _filled_cache(rng, 2, 50, dtype, B=3)
    expected = _copy_cache(cache)
    before = _copy_cache(cache)
    kernels.compact_kernel(cache.layers, 7, 19, 50, launch=launch, row=row)
    kernels.compact_reference(expected.layers, 7, 19, 50, row=row)
    bits = mx.uint16 if dtype != F32 else mx.uint32
    for a, b, c in zip(cache.layers, expected.layers, before.layers):
        for x, y, z in ((a.keys, b.keys, c.keys), (a.values, b.values, c.values)):
            assert np.array_equal(np.array(x.view(bits)), np.array(y.view(bits)))
            # the row's entries after the span moved down; the other rows are untouched
            assert np.array_equal(np.array(x[row, :, 7:38].view(bits)), np.array(z[row, :, 19:50].view(bits)))
            others = [r for r in range(3) if r != row]
            assert np.array_equal(np.array(x[others].view(bits)), np.array(z[others].view(bits)))


def test_compaction_kernel_many_layers(launch):
    """More arrays than one dispatch can bind: two dispatches, each layer right."""
    rng = np.random.default_rng(fresh_seed())
    cache = _filled_cache(rng, 15, 20, F16, H=1)
    expected = _copy_cache(cache)
    calls = []

    def counting(kernel, **kw):
        calls.append(len(kw["inputs"]) - 1)
        return launch(kernel, **kw)

    kernels.compact_kernel(cache.layers, 3, 8, 20, launch=counting)
    kernels.compact_reference(expected.layers, 3, 8, 20)
    assert calls == [15, 15]
    for a, b in zip(cache.layers, expected.layers):
        assert np.array_equal(np.array(a.keys[..., :15, :]), np.array(b.keys[..., :15, :]))
        assert np.array_equal(np.array(a.values[..., :15, :]), np.array(b.values[..., :15, :]))


def _peak_growth(compact):
    """Peak memory growth while moving a short tail of a 16 MiB cache, as a
    fraction of the cache."""
    rng = np.random.default_rng(fresh_seed())
    cache = _filled_cache(rng, 2, 2048, F32, H=4, D=128)  # 4 MiB per buffer
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    compact(cache.layers, 1000, 1990, 2048)
    mx.eval(cache.state_arrays())
    return (mx.get_peak_memory() - before) / cache.capacity_nbytes


def test_compaction_reference_writes_in_place():
    """Moving a short tail must not copy the whole cache: peak memory grows by
    about the tails (3% here), not by the buffers."""
    assert _peak_growth(kernels.compact_reference) < 0.125


def test_compaction_kernel_writes_in_place(launch):
    assert _peak_growth(lambda *a: kernels.compact_kernel(*a, launch=launch)) < 0.125


# ----------------------------------------------------------------------------
# Through the model and the cache, as the decoder runs them


def test_model_passes_through_the_kernel(emulator, monkeypatch):
    """A prefill, a compress pass (then eviction) and a fused decode pass of a
    tiny model give the same logits with the emulated kernels as with the
    references."""
    from mlx_lm.models import qwen2

    from kernel_cases import builder
    from mlx_memosight.layout import StepState
    from mlx_memosight.model import TokenPositions, attach_token_rope, forward

    mx.random.seed(fresh_seed() % 2**31)
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=500,
        tie_word_embeddings=True,
    )
    model = qwen2.Model(args)
    attach_token_rope(model)
    b = builder()
    prompt = list(range(3, 23))

    def run(attention, compact):
        monkeypatch.setattr(kernels, "attention", attention)
        monkeypatch.setattr(kernels, "compact", compact)
        cache = KVCache.for_model(model)
        logits = []
        for i in range(3):
            if i == 0:
                p = b.prefill(prompt)
            elif i == 1:  # the step began at slot 12
                p = b.compress(StepState(start_slot=12, begin=12), cache.length, draft_len=2)
            else:
                p = b.decode(40, 30, cache.length, drafts=[41, 42], draft_len=2)
            mask = kernels.CompactMask.from_rule(p.rule)
            cache.begin_pass(TokenPositions(mx.array(p.positions)[None]), mask)
            logits.append(np.array(forward(model, p.tokens, None, cache=cache.layers)[0]))
            cache.trim(len(p) - p.keep)
            if p.evict:
                cache.evict(*p.evict)
        return logits

    used = []

    def attention(*a):
        used.append("attention")
        return kernels.attention_kernel(*a, launch=emulator)

    def compact(*a):
        used.append("compact")
        return kernels.compact_kernel(*a, launch=emulator)

    with_kernel = run(attention, compact)
    assert used.count("attention") == 3 * 2 and used.count("compact") == 1  # 3 passes, 2 layers
    reference = run(kernels.attention_reference, kernels.compact_reference)
    for a, r in zip(with_kernel, reference):
        assert np.abs(r).max() > 1.0
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


def _engine_case():
    """A random model (head dim 64, so the attention kernel applies) whose
    most frequent output token plays the splitter, so that steps get
    compressed and evicted; returns the model, config, prompt and what the
    no-cache oracle decodes in 40 tokens."""
    from collections import Counter

    from helpers import mlx_model, reference_decode
    from mlx_memosight.config import TEMPLATES, MemoSightConfig, TokenIds

    seed = fresh_seed()
    vocab = 400
    model, _ = mlx_model("qwen2", vocab, seed=seed % 2**31, hidden_size=128, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=256)
    prompt = np.random.default_rng(seed).integers(0, vocab, size=6).tolist()

    def config(splitter):
        # EOS outside the vocabulary: both decoders use the whole budget
        rest = [i for i in range(vocab) if i != splitter]
        ids = TokenIds(splitter=splitter, continue_=rest[0], foresight=rest[1], memory=rest[2:302], eos=vocab)
        return MemoSightConfig(token_ids=ids, template=TEMPLATES["qwen"], compression_ratio=2)

    plain = reference_decode(model, config(0), prompt, 40, compress=False)
    cfg = config(Counter(plain[:-1]).most_common(1)[0][0])
    return model, cfg, prompt, reference_decode(model, cfg, prompt, 40), seed


def _decode_through_dispatcher(monkeypatch, launch, model, cfg, prompt, expected, seed):
    from mlx_memosight.engine import Engine

    monkeypatch.setattr(kernels, "kernels_available", lambda: True)
    monkeypatch.setattr(kernels, "metal_launch", launch)
    monkeypatch.setattr(kernels, "_failed", set())
    monkeypatch.setattr(kernels, "_checked", set())
    for kw in (dict(foresight=False), dict(draft_len=2), dict(draft_len=3, schedule="two-pass")):
        e = Engine(model, cfg, **kw)
        tokens = [ev.token for ev in e.generate(prompt, 40)]
        assert tokens == expected, (kw, f"seed {seed}")
        assert e.stats.compress_events >= 1


def test_engine_output_is_unchanged_by_the_kernels(launch, monkeypatch):
    """The decode engine commits the same tokens with the kernels behind the
    dispatcher as the no-cache oracle does."""
    from collections import Counter

    case = _engine_case()
    used = Counter()

    def counting(kernel, **kw):
        used[kernel.name] += 1
        return launch(kernel, **kw)

    _decode_through_dispatcher(monkeypatch, counting, *case)
    assert used["memosight_attention"] > 0 and used["memosight_compact_4"] > 0
    assert not kernels._failed


def test_batched_engine_through_the_kernel(launch, monkeypatch):
    """Batched passes give the attention kernel per-row (ragged) compact
    masks over rows of different lengths, compress blocks beside drafted
    ones: each sequence still commits its own tokens."""
    from collections import Counter

    from mlx_memosight.engine import BatchEngine, Engine

    model, cfg, prompt, _, seed = _engine_case()
    prompts = [prompt, prompt[:2], prompt + prompt[:5], prompt[3:], prompt * 3]
    expected = [[ev.token for ev in Engine(model, cfg, draft_len=2).generate(p, 40)] for p in prompts]
    used = Counter()

    def counting(kernel, **kw):
        used[kernel.name] += 1
        if kernel.name == "memosight_attention":
            used["batched"] += kw["inputs"][0].shape[0] > 1
        return launch(kernel, **kw)

    monkeypatch.setattr(kernels, "kernels_available", lambda: True)
    monkeypatch.setattr(kernels, "metal_launch", counting)
    monkeypatch.setattr(kernels, "_failed", set())
    monkeypatch.setattr(kernels, "_checked", set())
    assert BatchEngine(model, cfg, draft_len=2).generate_all(prompts, 40) == expected, f"seed {seed}"
    assert used["batched"] > 0 and not kernels._failed
    # rows evict on their own through the compaction kernel
    assert sum(n for name, n in used.items() if name.startswith("memosight_compact")) > 0


@pytest.mark.parametrize("broken", ["attention", "compaction"])
def test_wrong_kernel_is_caught_by_its_self_check(emulator, monkeypatch, broken):
    """A kernel that runs but computes the wrong thing (as a compiler or MLX
    change could make it) is caught by its self-check on first use: one
    warning naming it, the pure-MLX path from then on, and generation
    token-identical to the no-cache oracle."""
    from collections import Counter

    used = Counter()

    def wrong(kernel, **kw):
        used[kernel.name] += 1
        outs = emulator(kernel, **kw)
        if broken == "attention" and kernel.name == "memosight_attention":
            return [o + 0.5 for o in outs]
        if broken == "compaction" and kernel.name.startswith("memosight_compact"):
            return [o[..., ::-1, :] for o in outs]  # entries in the wrong order
        return outs

    case = _engine_case()
    with pytest.warns(RuntimeWarning) as record:
        _decode_through_dispatcher(monkeypatch, wrong, *case)
    messages = [str(w.message) for w in record if "Metal" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"Metal {broken} kernel differs" in messages[0] or f"Metal {broken} kernel copies" in messages[0]
    assert "pure-MLX path" in messages[0] and "MLX " in messages[0]
    assert kernels._failed == {broken}
    other = "memosight_compact" if broken == "attention" else "memosight_attention"
    assert sum(n for k, n in used.items() if k.startswith(other)) > 0  # the sound kernel kept running


# ----------------------------------------------------------------------------
# Dispatcher


@pytest.fixture
def pretend_metal(monkeypatch):
    """The dispatcher believes Metal is there; failures start afresh."""
    monkeypatch.setattr(kernels.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_failed", set())
    monkeypatch.setattr(kernels, "_checked", set())
    monkeypatch.delenv(kernels.FORCE_REFERENCE_ENV, raising=False)


def _small_case(D=64, dtype=F32):
    rng = np.random.default_rng(fresh_seed())
    rule = make_rule("fused", rng)
    return attention_inputs(rng, rule, dtype, D, 4, 2)


def test_dispatcher_uses_kernel_when_supported(pretend_metal, monkeypatch, emulator):
    monkeypatch.setattr(kernels, "metal_launch", emulator)
    q, k, v, mask = _small_case()
    seen = []
    real = kernels.attention_kernel
    monkeypatch.setattr(kernels, "attention_kernel", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    out = kernels.attention(q, k, v, 0.125, mask)
    assert seen == [1, 1]  # its self-check on first use, then the call
    np.testing.assert_allclose(as_numpy(out), as_numpy(kernels.attention_reference(q, k, v, 0.125, mask)),
                               atol=1e-5, rtol=1e-5)
    # head dim 32, or a mask over other keys: the reference
    q2, k2, v2, mask2 = _small_case(D=64)
    kernels.attention(q2[..., :32], k2[..., :32], v2[..., :32], 0.125, mask2)
    assert seen == [1, 1]
    kernels.attention(q, k, v, 0.125, mask)  # checked already
    assert seen == [1, 1, 1]


def test_dispatcher_environment_forces_reference(pretend_metal, monkeypatch):
    monkeypatch.setenv(kernels.FORCE_REFERENCE_ENV, "1")
    assert kernels.use_reference() and not kernels.kernels_available()
    monkeypatch.setattr(kernels, "attention_kernel", lambda *a, **kw: pytest.fail("kernel used"))
    q, k, v, mask = _small_case()
    kernels.attention(q, k, v, 0.125, mask)


def test_failing_kernel_warns_once_and_falls_back(pretend_metal, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("[metal::Device] Unable to build metal library from source")

    monkeypatch.setattr(kernels, "attention_kernel", broken)
    monkeypatch.setattr(kernels, "compact_tails", broken)
    q, k, v, mask = _small_case()
    ref = as_numpy(kernels.attention_reference(q, k, v, 0.125, mask))
    with pytest.warns(RuntimeWarning, match="Metal attention kernel failed"):
        out = kernels.attention(q, k, v, 0.125, mask)
    np.testing.assert_array_equal(as_numpy(out), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(as_numpy(kernels.attention(q, k, v, 0.125, mask)), ref)

    cache = _filled_cache(np.random.default_rng(0), 2, 10, F32)
    expected = _copy_cache(cache)
    with pytest.warns(RuntimeWarning, match="Metal compaction kernel failed"):
        cache.evict(2, 5)
    expected.evict(2, 5)
    assert np.array_equal(np.array(cache.layers[1].values[..., :7, :]), np.array(expected.layers[1].values[..., :7, :]))


# ----------------------------------------------------------------------------
# Packaging


def test_sources_have_a_body_marker():
    for name in ("attention.metal", "attention_merge.metal", "compact.metal"):
        header, body = kernels.read_kernel_source(name)
        assert body.strip() and kernels.BODY_MARKER not in body


def test_wheel_contains_metal_sources(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: the wheel is built without network (--no-build-isolation)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for d in ("mlx_memosight", "metal"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mlx_memosight/metal/{p.name}" for p in (ROOT / "metal").glob("*.metal")}
    assert len(shipped) == 3 and shipped <= names


# ----------------------------------------------------------------------------
# The benchmark script


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "examples" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_refuses_without_metal():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal: the benchmark runs here")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_kernels.py")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "mx.metal.is_available() is False" in r.stderr


def test_bench_runs_end_to_end_on_the_emulator(emulator, monkeypatch, capsys):
    """The benchmark's plumbing (not its figures) with the emulator standing in
    for the GPU."""
    bench = _load_bench()
    monkeypatch.setattr(bench.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "metal_launch", emulator)
    rc = bench.main(["--cache", "80", "--layers", "1", "--heads", "4", "1", "--head-dim", "64",
                     "--dtype", "float32", "--iters", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()[2:]}
    assert set(rows) == {"decode", "accelerate g=2", "fused k=2 g=2", "compress m=11", "compaction"}
    for name, line in rows.items():
        assert line.split()[-1 if name == "compaction" else -2].endswith("x")
