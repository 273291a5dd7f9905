"""Which BLAS MLX uses, and what a pass costs (mlx_memosight.backend)."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_memosight import backend

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, kind", [
    ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so", "OpenBLAS"),
    ("/x/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0", backend.REFERENCE_BLAS),
    ("/usr/lib/libcblas.so.3", backend.REFERENCE_BLAS),
    ("/opt/intel/lib/libmkl_rt.so.2", "MKL"),
    ("/usr/lib/libblis.so.4", "BLIS"),
    ("/usr/lib/libfoo.so", "unknown"),
])
def test_library_names_are_classified(name, kind):
    assert backend._classify(name) == kind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux wheel's BLAS")
def test_the_wheels_own_blas_is_found_without_a_preload():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", "import mlx.core as mx; mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)));"
         "from mlx_memosight import backend; print(backend.blas_library())"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True,
    )
    # the wheel links a BLAS of its own; whichever it is, it is named
    assert out.stdout.strip() != "unknown", out.stdout + out.stderr


def test_describe_names_the_device():
    text = backend.describe()
    assert text == "gpu" or text.startswith("cpu (")


def test_the_with_openblas_script_refuses_no_command():
    out = subprocess.run(["bash", str(REPO / "examples" / "with_openblas.sh")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_cpu_dtype_advice(monkeypatch):
    """On the CPU, float16 weights and quantized weights with half-precision
    scales get a notice; float32 and bfloat16 weights and quantized ones with
    float32 scales do not, and nothing does on a GPU."""
    import mlx.core as mx

    from mlx_memosight import backend

    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert backend.cpu_dtype_advice("float32") is None and backend.cpu_dtype_advice("bfloat16") is None
    assert "half the speed" in backend.cpu_dtype_advice("float16")
    assert "bfloat16 scales run 8-36x slower" in backend.cpu_dtype_advice("bfloat16", quantized=True)
    assert backend.cpu_dtype_advice("float32", quantized=True) is None
    # a q4_1 GGUF export needs float16 scales: no --dtype float32 hint then
    assert "--dtype float32" in backend.cpu_dtype_advice("float16", quantized=True)
    assert "--dtype float32" not in backend.cpu_dtype_advice("float16", quantized=True, hint=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert backend.cpu_dtype_advice("float16", quantized=True) is None


def test_quantized_models_compute_in_float32_on_the_cpu(tmp_path, monkeypatch):
    """A quantized model with float16 scales is cast to float32 on the CPU:
    the packed weights stay as they were, every float becomes float32, the
    logits stay those of the float16 model within its precision; nothing
    changes on a GPU, for a model in float32 already, or unquantized."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_memosight import backend
    from mlx_memosight.convert import convert
    from mlx_memosight.demo import demo_model_path
    from mlx_memosight.loading import load

    convert(demo_model_path(), tmp_path / "q", dtype="float16", quantize=True, q_group_size=32, progress=False,
            log=lambda *a: None)
    model, _ = load(tmp_path / "q")
    before = dict(tree_flatten(model.parameters()))
    x = mx.array([[1, 5, 9, 200, 31]])
    want = model(x).astype(mx.float32)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert backend.float32_on_cpu(model) is None
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert "float16 scales" in backend.float32_on_cpu(model)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert v.dtype == (mx.uint32 if before[k].dtype == mx.uint32 else mx.float32), k
        assert np.array_equal(np.array(v.astype(mx.float32)), np.array(before[k].astype(mx.float32))), k
    got = model(x)
    assert got.dtype == mx.float32
    assert np.allclose(np.array(got), np.array(want), atol=0.05 * float(mx.abs(want).max()))
    assert backend.float32_on_cpu(model) is None  # float32 already
    plain, _ = load(demo_model_path())
    assert backend.float32_on_cpu(plain) is None


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the notices are about MLX's CPU backend")
def test_generate_and_convert_say_so(tmp_path, capsys):
    from helpers import run_command
    from mlx_memosight.convert import main as convert_main
    from mlx_memosight.demo import demo_model_path
    from mlx_memosight.generate import main as generate_main

    code, _, err = run_command(convert_main, [demo_model_path(), "-o", tmp_path / "q", "-q", "--q-group-size", 32,
                                              "--dtype", "float16"], capsys)
    assert code == 0 and "float16 scales run 8-36x slower" in err and "--dtype float32" in err
    code, _, err = run_command(generate_main, ["--model", tmp_path / "q", "--prompt", "x", "--max-tokens", 2], capsys)
    assert code == 0 and "computing in float32" in err
    code, _, err = run_command(convert_main, [demo_model_path(), "-o", tmp_path / "q32", "-q", "--q-group-size", 32],
                               capsys)
    assert code == 0 and "notice" not in err  # the demo model is float32: so are the scales
    code, _, err = run_command(generate_main, ["--prompt", "x", "--max-tokens", 2], capsys)
    assert code == 0 and "notice" not in err  # the demo model is float32


class Recording:
    """The model, recording each call's (tokens, cached entries, cache)."""

    def __init__(self, model):
        self.model, self.args, self.layers, self.calls = model, model.args, model.layers, []

    def __call__(self, inputs, cache=None):
        self.calls.append((inputs.shape[1], cache[0].offset, id(cache)))
        return self.model(inputs, cache=cache)


def test_one_token_costs_grow_one_cache():
    """Each length is timed with exactly that many cached entries, the
    lengths in turn each round, all in one cache prefilled once up to the
    longest (chunk by chunk); each length is measured once per model."""
    from helpers import mlx_model, vocab_size

    model = Recording(mlx_model("qwen2", vocab_size())[0])
    costs = backend.one_token_costs(model, [300, 1, 40, 300], rounds=3, warmup=1, chunk=128)
    assert set(costs) == {1, 40, 300} and all(t > 0 for t in costs.values())
    assert [(T, n) for T, n, _ in model.calls] == (
        [(128, 0), (128, 128), (44, 256)] + [(1, 1), (1, 40), (1, 300)] * 4)
    assert len({c for _, _, c in model.calls}) == 1  # one cache
    n = len(model.calls)
    assert backend.one_token_costs(model, [40, 1]) == {40: costs[40], 1: costs[1]} and len(model.calls) == n
    with pytest.raises(ValueError, match="at least one cached entry"):
        backend.one_token_costs(model, [0])


def test_pass_costs_run_every_pass_over_the_same_cache():
    """Each pass size is timed over exactly ``cached`` entries: what the
    previous pass added is trimmed before the next."""
    from helpers import mlx_model, vocab_size

    model = Recording(mlx_model("qwen2", vocab_size())[0])
    costs = backend.pass_costs(model, [1, 5, 9], cached=20, rounds=2, warmup=1)
    assert set(costs) == {1, 5, 9} and all(t > 0 for t in costs.values())
    assert [(T, n) for T, n, _ in model.calls] == [(20, 0)] + [(1, 20), (5, 20), (9, 20)] * 3
    assert len({c for _, _, c in model.calls}) == 1


def test_median_seconds_interleaves_keys_and_resets_untimed(monkeypatch):
    """Every round runs each key once in turn, each run after its reset; the
    warm-up rounds and the resets are not timed (a fake clock: a run of key
    ``k`` takes its own time per round, a reset 100 s)."""
    clock, calls = [0.0], []
    monkeypatch.setattr(backend.time, "perf_counter", lambda: clock[0])
    spent = {"a": iter([50.0, 1.0, 3.0, 2.0]), "b": iter([50.0, 10.0, 30.0, 20.0])}

    def run(k):
        calls.append(("run", k))
        clock[0] += next(spent[k])

    def reset(k):
        calls.append(("reset", k))
        clock[0] += 100.0

    times = backend.median_seconds(["a", "b"], run, rounds=3, warmup=1, reset=reset)
    assert calls == [(what, k) for _ in range(4) for k in "ab" for what in ("reset", "run")]
    assert times == {"a": 2.0, "b": 20.0}
    # the fastest round instead (how the drafting policy's pass costs are timed)
    spent = {"a": iter([50.0, 1.0, 3.0, 2.0]), "b": iter([50.0, 10.0, 30.0, 20.0])}
    assert backend.median_seconds(["a", "b"], run, rounds=3, warmup=1, statistic=min) == {"a": 1.0, "b": 10.0}


def test_bench_quantized_cpu_script():
    """The script behind the 8-36x figure: dense and 4-bit products per dtype,
    each quantized one against the one with float32 scales."""
    r = subprocess.run([sys.executable, str(REPO / "examples" / "bench_quantized_cpu.py"), "--shape", "256", "128",
                        "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["float32", "bfloat16", "float16"]
    assert rows[0][3] == "1.0x" and all(float(x) > 0 for row in rows for x in row[1:3])


@pytest.mark.parametrize("command, argv", [
    ("generate", ["--prompt", "x", "--max-tokens", "1"]),
    ("chat", []),
    ("server", ["--port", "0"]),
    ("evaluate", ["--data", "HELDOUT", "--max-tokens", "1"]),
    ("bench", ["--prompt", "x", "--max-tokens", "1"]),
    ("bench", ["--prompt", "x", "--max-tokens", "1", "--batch-size", "1", "2"]),
])
def test_decoding_commands_load_for_decoding(command, argv, tmp_path, capsys, monkeypatch):
    """Every command that decodes loads through load_for_decoding (on the CPU,
    a quantized model with half-precision scales then computes in float32)."""
    import importlib

    from helpers import run_command
    from mlx_memosight import demo, loading
    from mlx_memosight.errors import MemoSightError

    seen = []

    def spy(path, *a, **k):
        seen.append(path)
        raise MemoSightError("stopped by the test")

    heldout = tmp_path / "heldout.jsonl"
    demo.write_jsonl(heldout, demo.heldout_items(1))
    monkeypatch.setattr(loading, "load_for_decoding", spy)
    main = importlib.import_module(f"mlx_memosight.{command}").main
    code, _, err = run_command(main, [heldout if a == "HELDOUT" else a for a in argv], capsys)
    assert seen and code == 1 and "stopped by the test" in err, err
