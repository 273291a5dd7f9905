"""What MLX computes on here, and what a pass of several tokens costs on it.

Drafting pays only where a pass of a few tokens costs about what a 1-token
pass costs. That holds on GPUs and on CPUs whose BLAS is fast for small
matrices (Accelerate on macOS, OpenBLAS), but not with the reference (Netlib)
BLAS that MLX's Linux CPU wheel links: there a pass costs about one more
1-token pass for every two or three tokens it carries. The engine and ``bench``
use this module to say which case they are in and to choose the foresight
layout (:func:`pass_costs`).
"""

import ctypes
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import mlx.core as mx

REFERENCE_BLAS = "reference BLAS"


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_cblas_file() -> Optional[str]:
    """The file that serves ``cblas_sgemm`` from the global namespace (a
    library put in front with ``LD_PRELOAD``), or None."""
    try:
        proc = ctypes.CDLL(None)
        fn = proc.cblas_sgemm
        info = _DlInfo()
        if not proc.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
        return os.fsdecode(info.dli_fname) if info.dli_fname else None
    except (OSError, AttributeError):
        return None


def _classify(name: str) -> str:
    name = Path(name).name.lower()
    if "openblas" in name:
        return "OpenBLAS"
    if "mkl" in name:
        return "MKL"
    if "blis" in name:
        return "BLIS"
    if name.startswith("libblas") or name.startswith("libcblas"):
        return REFERENCE_BLAS
    return "unknown"


@functools.lru_cache(maxsize=None)
def blas_library() -> str:
    """The BLAS that MLX's CPU matrix products (``cblas_sgemm``) go through in
    this process: ``"Accelerate"`` on macOS; on Linux the library in front of
    the global namespace if one exports ``cblas_sgemm`` (``LD_PRELOAD``),
    else the one MLX's wheel loaded for itself."""
    if sys.platform == "darwin":
        return "Accelerate"
    front = _global_cblas_file()
    if front is not None:
        return _classify(front)
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in maps:
        path = line.split()[-1] if "/" in line else ""
        if "mlx" in path and ("blas" in Path(path).name.lower()):
            return _classify(path)
    return "unknown"


def reference_blas_in_use() -> bool:
    """True when MLX runs on the CPU with the reference BLAS, where drafting
    cannot pay (callers say so to the user)."""
    return mx.default_device() == mx.cpu and blas_library() == REFERENCE_BLAS


def describe() -> str:
    """``"gpu"`` or ``"cpu (<BLAS>)"``, for reports."""
    if mx.default_device() == mx.gpu:
        return "gpu"
    return f"cpu ({blas_library()})"


def median_seconds(keys: Sequence, run: Callable, rounds: int = 7, warmup: int = 2,
                   reset: Optional[Callable] = None, statistic: Callable = statistics.median) -> Dict:
    """Seconds of ``run(key)`` for each of ``keys``, the median of the rounds
    (or ``statistic``'s): the keys
    interleaved within each round, so a slow spell of the machine spreads
    over all of them instead of skewing one; ``warmup`` untimed rounds first;
    ``reset(key)``, untimed, before every run. The median resists the odd
    slow run when other work shares the machine; ``statistic=min`` gives the
    fastest run instead, the one least disturbed."""
    times = {k: [] for k in keys}
    for r in range(warmup + rounds):
        for k in keys:
            if reset is not None:
                reset(k)
            tic = time.perf_counter()
            run(k)
            if r >= warmup:
                times[k].append(time.perf_counter() - tic)
    return {k: statistic(v) for k, v in times.items()}


def pass_costs(model, sizes: Sequence[int], cached: int = 64, rounds: int = 7,
               warmup: int = 2, statistic: Callable = statistics.median) -> Dict[int, float]:
    """Median seconds (or ``statistic``'s, see :func:`median_seconds`) of one
    forward pass of each size in ``sizes``: the model's own call (causal,
    contiguous positions) over a KV cache of ``cached`` entries, the sizes
    interleaved, ``warmup`` untimed rounds first. Results are kept on the
    model, so each (cache, size, statistic) is measured once per loaded
    model."""
    from mlx_lm.models.cache import make_prompt_cache

    memo = model.__dict__.setdefault("_memosight_pass_costs", {})
    tag = () if statistic is statistics.median else (statistic.__name__,)
    todo = [T for T in sizes if (cached, T, *tag) not in memo]
    if todo:
        vocab = model.args.vocab_size
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[i % vocab for i in range(cached)]]), cache=cache))
        passes = {T: mx.array([[(7 * i + 3) % vocab for i in range(T)]]) for T in todo}
        fed = [0]  # the tokens the last pass added to the cache

        def run(T):
            mx.eval(model(passes[T], cache=cache))
            fed[0] = T

        times = median_seconds(todo, run, rounds, warmup, reset=lambda T: [c.trim(fed[0]) for c in cache],
                               statistic=statistic)
        memo.update({(cached, T, *tag): t for T, t in times.items()})
    return {T: memo[(cached, T, *tag)] for T in sizes}


def one_token_costs(model, lengths: Sequence[int], rounds: int = 7, warmup: int = 2,
                    chunk: int = 512) -> Dict[int, float]:
    """Median seconds of a one-token pass over a KV cache of each of
    ``lengths`` entries. One cache is prefilled once to the longest length
    (``chunk`` tokens at a time); each round then times a pass at every
    length in turn, the cache's length set back before each, so a slow spell
    of the machine spreads over all lengths instead of skewing one, and
    measuring costs one prefill rather than one per length. Kept on the
    model as :func:`pass_costs` keeps its results."""
    from mlx_lm.models.cache import make_prompt_cache

    memo = model.__dict__.setdefault("_memosight_pass_costs", {})
    todo = sorted({n for n in lengths if (n, 1) not in memo})
    if todo:
        if todo[0] < 1:
            raise ValueError(f"a pass needs at least one cached entry, got {todo[0]}")
        vocab = model.args.vocab_size
        cache = make_prompt_cache(model)
        for start in range(0, todo[-1], chunk):
            step = min(chunk, todo[-1] - start)
            mx.eval(model(mx.array([[(start + i) % vocab for i in range(step)]]), cache=cache))
        token = mx.array([[3 % vocab]])

        def cut(n):
            for c in cache:
                c.offset = n  # the entries past it stay in the buffer: the pass sees exactly n

        times = median_seconds(todo, lambda n: mx.eval(model(token, cache=cache)), rounds, warmup, reset=cut)
        memo.update({(n, 1): t for n, t in times.items()})
    return {n: memo[n, 1] for n in lengths}


# Measured on MLX's CPU backend (Linux wheel, reference BLAS, 2-core x86-64;
# examples/bench_scale.py prints the decode figures): a one-token product with
# a 896 x 4864 matrix took 5.1 ms in float32, 4.7 ms in bfloat16 and 10.0 ms in
# float16. Quantized products run in the precision of their scales
# (examples/bench_quantized_cpu.py): one token with an 8960 x 1536 4-bit
# matrix took 11.9 ms with float32 scales (dense float32: 11.6 ms), 95.9 ms
# with bfloat16 ones (8.0x) and 427 ms with float16 ones (35.7x).
SLOW_ON_CPU = {"float16": "about half the speed of float32",
               "quantized": "8-36x slower than with float32 ones"}
HALF = (mx.float16, mx.bfloat16)


def cpu_dtype_advice(dtype: str, quantized: bool = False, hint: bool = True) -> Optional[str]:
    """What to tell a user about to run (or write) weights of ``dtype``
    (quantized: the dtype of their scales) on MLX's CPU backend, or None where
    nothing is slow (any GPU; float32 or bfloat16 weights, quantized weights
    with float32 scales, on the CPU). ``hint``: name ``--dtype float32``
    (not where the output's dtype is fixed, as for a q4_1 GGUF file)."""
    if mx.default_device() != mx.cpu:
        return None
    if quantized:
        if dtype == "float32":
            return None
        hint = "--dtype float32 keeps float32 scales; " if hint else ""
        return (f"quantized weights with {dtype} scales run {SLOW_ON_CPU['quantized']} on MLX's CPU "
                f"backend; {hint}generate and the server compute a model like this one in float32 "
                "there (README: Real models)")
    if dtype not in SLOW_ON_CPU:
        return None
    return (f"{dtype} weights run {SLOW_ON_CPU[dtype]} on MLX's CPU backend; float32 or bfloat16 weights "
            "are the fast choice here (README: Real models)")


def float32_on_cpu(model) -> Optional[str]:
    """On MLX's CPU backend, make a quantized model whose scales, biases and
    other floating weights are half precision compute in float32: its
    quantized products run in the precision of the scales, 8-36x slower in
    half precision there (:data:`SLOW_ON_CPU`). The packed weights stay as
    they are; scales and biases take twice the bytes (half a bit more per
    4-bit weight), as do any layers left unquantized, and the KV cache is
    float32. Greedy tokens can then differ from mlx-lm's decoding of the
    same model in half precision. Returns what was done, for a
    notice, or None where nothing changed (any GPU, an unquantized model, or
    one in float32 already)."""
    from mlx.utils import tree_flatten, tree_unflatten

    if mx.default_device() != mx.cpu or not model_dtype(model)[1]:
        return None
    params = tree_flatten(model.parameters())
    half = [(k, v) for k, v in params if v.dtype in HALF]
    if not half:
        return None
    scales = [v.dtype for k, v in params if k.endswith(".scales")]
    dtype = str(scales[0] if scales else half[0][1].dtype).replace("mlx.core.", "")
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in half]))
    del half, params  # the half-precision arrays go as their float32 copies are made
    mx.eval(model.parameters())
    return (f"quantized weights with {dtype} scales run {SLOW_ON_CPU['quantized']} on MLX's CPU backend: "
            "computing in float32 (scales, norms, any unquantized layer and the activations; the "
            "packed weights as they are)")


def model_dtype(model) -> Tuple[str, bool]:
    """``(dtype of the model's float weights, whether any layer is quantized)``."""
    from mlx.utils import tree_flatten

    quantized = any(hasattr(m, "scales") for _, m in model.named_modules())
    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
              and v.ndim == 2]
    name = str(floats[0]).replace("mlx.core.", "") if floats else "float32"
    return name, quantized
