"""What MLX computes on here, and what a pass of several tokens costs on it.

Drafting pays only where a pass of a few tokens costs about what a 1-token
pass costs. That holds on GPUs and on CPUs whose BLAS is fast for small
matrices (Accelerate on macOS, OpenBLAS), but not with the reference (Netlib)
BLAS that MLX's Linux CPU wheel links: there a pass costs about one more
1-token pass for every two or three tokens it carries. The engine and ``bench``
use this module to say which case they are in and to choose the foresight
layout (:func:`pass_costs`).
"""

import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import mlx.core as mx

REFERENCE_BLAS = "reference BLAS"


def blas_library() -> str:
    """The BLAS that MLX's CPU matrix products go through in this process:
    ``"Accelerate"`` on macOS; on Linux the first BLAS found among the loaded
    libraries (a library put in front with ``LD_PRELOAD`` wins, as the dynamic
    linker resolves it first)."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return "unknown"
    seen = []
    for line in lines:
        name = Path(line.split()[-1]).name.lower() if "/" in line else ""
        if name.endswith((".so",)) or ".so." in name:
            if name not in seen:
                seen.append(name)
    for name in seen:  # load order: preloaded libraries come first
        if "openblas" in name and "scipy" not in name:  # numpy's copy has renamed symbols
            return "OpenBLAS"
        if "mkl_rt" in name or "libblis" in name:
            return "MKL" if "mkl" in name else "BLIS"
        if name.startswith("libblas"):
            return REFERENCE_BLAS
    return "unknown"


def describe() -> str:
    """``"gpu"`` or ``"cpu (<BLAS>)"``, for reports."""
    if mx.default_device() == mx.gpu:
        return "gpu"
    return f"cpu ({blas_library()})"


def pass_costs(model, sizes: Sequence[int], cached: int = 64, rounds: int = 7) -> Dict[int, float]:
    """Median seconds of one forward pass of each size in ``sizes`` over a KV
    cache of ``cached`` entries, measured interleaved on ``model`` (a few
    dozen small passes). Results are kept on the model, so each size is
    measured once per loaded model."""
    from .cache import KVCache
    from .model import forward

    memo = model.__dict__.setdefault("_memosight_pass_costs", {})
    todo = [T for T in sizes if T not in memo]
    if todo:
        vocab = model.args.vocab_size
        cache = KVCache.for_model(model)
        cache.begin_pass(0, "causal")
        mx.eval(forward(model, mx.array([[i % vocab for i in range(cached)]]), None, cache=cache))
        times = {T: [] for T in todo}
        for r in range(rounds + 2):
            for T in todo:
                x = mx.array([[(7 * i + 3) % vocab for i in range(T)]])
                cache.begin_pass(cached, "causal" if T > 1 else None)
                tic = time.perf_counter()
                mx.eval(forward(model, x, None, cache=cache))
                if r >= 2:  # the first rounds warm up
                    times[T].append(time.perf_counter() - tic)
                cache.trim(T)
        for T, v in times.items():
            memo[T] = statistics.median(v)
    return {T: memo[T] for T in sizes}
