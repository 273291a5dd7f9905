"""Dispatch for the two operations that have custom kernels on Apple GPUs:
MemoSight-masked attention and KV-cache compaction.

Each has a pure-MLX reference here, used on every backend without Metal and
as the oracle in tests. The Metal sources live in ``metal/`` (installed as
``mlx_memosight/metal``); each kernel is built once, on first use. A kernel
that fails to compile or run is reported once with a warning and the
reference takes over. ``MLX_MEMOSIGHT_REFERENCE=1`` forces the references.
"""

import math
import os
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .layout import attention_mask

FORCE_REFERENCE_ENV = "MLX_MEMOSIGHT_REFERENCE"
BODY_MARKER = "// ---- kernel body ----"


class CompactMask:
    """The layout's compact attention rule as MLX arrays, passed through
    mlx-lm's attention in place of a mask array.

    ``query_slot`` / ``query_limit`` are ``(Q,)`` (or ``(B, Q)``) and
    ``key_visible_until`` is ``(K,)`` (or ``(B, K)``) int32 arrays; ``K`` counts
    the cached entries plus the pass's own tokens. The boolean mask is
    materialised at most once per pass, however many layers ask for it.
    """

    def __init__(self, query_slot, query_limit, key_visible_until):
        self.query_slot = query_slot
        self.query_limit = query_limit
        self.key_visible_until = key_visible_until
        self._array = None

    @classmethod
    def from_rule(cls, rule) -> "CompactMask":
        return cls(
            mx.array(rule.query_slot, dtype=mx.int32),
            mx.array(rule.query_limit, dtype=mx.int32),
            mx.array(rule.key_visible_until, dtype=mx.int32),
        )

    @property
    def num_keys(self) -> int:
        return self.key_visible_until.shape[-1]

    def attend(self, queries, keys, values, scale: float) -> mx.array:
        """Attention under this mask (the kernel dispatcher's choice of path)."""
        return attention(queries, keys, values, scale, self)

    @property
    def array(self) -> mx.array:
        """The boolean mask, ``(Q, K)`` or ``(B, 1, Q, K)``."""
        if self._array is None:
            m = attention_mask(self.query_slot, self.query_limit, self.key_visible_until, xp=mx)
            self._array = m[:, None] if m.ndim == 3 else m
        return self._array


def attention_reference(queries, keys, values, scale: float, mask: CompactMask) -> mx.array:
    """MemoSight-masked attention with the materialised mask."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask.array)


def use_reference() -> bool:
    """True when ``MLX_MEMOSIGHT_REFERENCE=1`` forces the pure-MLX paths."""
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def _rows(row: Optional[int]):
    return slice(None) if row is None else slice(row, row + 1)


def compact_reference(layers, start: int, end: int, length: int, row: Optional[int] = None):
    """Move entries ``[end, length)`` of every layer down to ``start``, in
    every batch row or in ``row`` only.

    The tails are copied out and evaluated first so that the slice updates
    below write into the existing buffers instead of copying them whole.
    """
    rows = _rows(row)
    tails = []
    for c in layers:
        tails.append(mx.contiguous(c.keys[rows, :, end:length, :]))
        tails.append(mx.contiguous(c.values[rows, :, end:length, :]))
    mx.eval(tails)
    _write_tails(layers, start, tails, row)


def _write_tails(layers, start: int, tails, row: Optional[int] = None):
    rows = _rows(row)
    n = tails[0].shape[2]
    for i, c in enumerate(layers):
        c.keys[rows, :, start : start + n, :] = tails[2 * i]
        c.values[rows, :, start : start + n, :] = tails[2 * i + 1]


# ----------------------------------------------------------------------------
# Metal kernels

SUPPORTED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
MAX_QUERIES = 512  # longer blocks (prompt chunks) stay with mx.fast's attention
ATTENTION_THREADS = 128  # 4 simdgroups, as attention.metal assumes
MIN_KEYS_PER_SPLIT = 256
TARGET_THREADGROUPS = 64
# A dispatch binds at most 31 buffers: the sources, src0's shape, the span
# and the output.
MAX_COMPACT_ARRAYS = 28
COMPACT_THREADS = 256


def source_dir() -> Path:
    """The folder holding the ``*.metal`` sources (installed or in a checkout)."""
    here = Path(__file__).resolve().parent
    for d in (here / "metal", here.parent / "metal"):
        if (d / "attention.metal").exists():
            return d
    raise FileNotFoundError(f"the Metal sources (attention.metal) are not beside {here}")


def read_kernel_source(filename: str):
    """Split a kernel file into ``(header, body)`` at its body marker."""
    path = source_dir() / filename
    header, marker, body = path.read_text().partition(BODY_MARKER)
    if not marker:
        raise ValueError(f"{path}: no '{BODY_MARKER}' line")
    return header, body


class MetalKernel:
    """One kernel of ``metal/``, built with ``mx.fast.metal_kernel`` on its
    first call and then reused.

    Calls take ``mx.fast.metal_kernel``'s call arguments (``inputs``,
    ``template``, ``grid``, ``threadgroup``, ``output_shapes``,
    ``output_dtypes``). The wrappers launch kernels through a ``launch``
    function (by default :func:`metal_launch`) so that a CPU emulator can run
    the very same calls in tests.
    """

    def __init__(self, name, filename, input_names, output_names, ensure_row_contiguous=True,
                 extra_header=""):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.ensure_row_contiguous = ensure_row_contiguous
        header, self.source = read_kernel_source(filename)
        self.header = extra_header + header
        self._kernel = None

    def __call__(self, **kwargs):
        if self._kernel is None:
            self._kernel = mx.fast.metal_kernel(
                name=self.name,
                input_names=self.input_names,
                output_names=self.output_names,
                source=self.source,
                header=self.header,
                ensure_row_contiguous=self.ensure_row_contiguous,
            )
        return self._kernel(**kwargs)


def metal_launch(kernel: MetalKernel, **kwargs):
    return kernel(**kwargs)


_KERNELS = {}


def get_kernel(key) -> MetalKernel:
    """The kernel for ``key`` (``"attention"``, ``"attention_merge"`` or
    ``("compact", n_arrays)``), made on first request."""
    if key not in _KERNELS:
        if key == "attention":
            k = MetalKernel(
                "memosight_attention",
                "attention.metal",
                ["queries", "keys", "values", "scale", "query_slot", "query_limit",
                 "key_visible_until"],
                ["out"],
                ensure_row_contiguous=False,
            )
        elif key == "attention_merge":
            k = MetalKernel("memosight_attention_merge", "attention_merge.metal", ["parts"], ["out"])
        elif isinstance(key, tuple) and key[0] == "compact":
            n = key[1]
            select = " ".join(f"if ((a) == {i}) p = src{i};" for i in range(n))
            k = MetalKernel(
                f"memosight_compact_{n}",
                "compact.metal",
                [f"src{i}" for i in range(n)] + ["span"],
                ["tails"],
                extra_header=f"#define MEMOSIGHT_SELECT_SOURCE(p, a) {select}\n",
            )
        else:
            raise KeyError(key)
        _KERNELS[key] = k
    return _KERNELS[key]


class AttentionPlan:
    """How :func:`attention_kernel` splits one call into threadgroups."""

    def __init__(self, queries, keys, splits=None):
        B, Hq, Q, D = queries.shape
        Hkv, K = keys.shape[1], keys.shape[2]
        self.group = Hq // Hkv
        rows = self.group * Q
        # Threadgroup memory (32 KB) holds 4 * rs query rows and a key tile.
        cap = 8 if D <= 96 else 4
        rs = 1
        while rs < cap and 4 * rs < rows:
            rs *= 2
        self.rows_per_simdgroup = rs
        self.blocks = math.ceil(rows / (4 * rs))
        base = B * Hkv * self.blocks
        if splits is None:
            splits = 1
            if base < TARGET_THREADGROUPS:
                splits = min(math.ceil(K / MIN_KEYS_PER_SPLIT), math.ceil(TARGET_THREADGROUPS / base))
        self.splits = max(1, min(splits, math.ceil(K / 32)))
        self.grid = (ATTENTION_THREADS * self.blocks, B * Hkv, self.splits)
        dtype = queries.dtype
        self.out_dtype = dtype if self.splits == 1 else mx.float32
        self.template = [
            ("T", dtype),
            ("O", self.out_dtype),
            ("D", D),
            ("G", self.group),
            ("RS", rs),
            ("SPLIT", self.splits > 1),
        ]
        # Inputs under 8 elements are bound as constant memory: another variant.
        self.key = tuple((n, str(v)) for n, v in self.template) + (B * Q < 8, B * K < 8)


def attention_supported(queries, keys, values, mask: CompactMask) -> bool:
    """True when the attention kernel handles these shapes and dtypes."""
    if queries.ndim != 4 or keys.ndim != 4 or values.shape != keys.shape:
        return False
    B, Hq, Q, D = queries.shape
    Hkv, K = keys.shape[1], keys.shape[2]
    return (
        queries.dtype in SUPPORTED_DTYPES
        and keys.dtype == queries.dtype
        and values.dtype == queries.dtype
        and D in SUPPORTED_HEAD_DIMS
        and keys.shape[0] == B
        and keys.shape[3] == D
        and Hkv > 0
        and Hq % Hkv == 0
        and 0 < Q <= MAX_QUERIES
        and K > 0
        and mask.num_keys == K
        and mask.query_slot.shape[-1] == Q
        and mask.query_limit.shape[-1] == Q
        and all(x.ndim == 1 or (x.ndim == 2 and x.shape[0] == B)
                for x in (mask.query_slot, mask.query_limit, mask.key_visible_until))
    )


def _per_batch(x, batch: int, n: int):
    if x.dtype != mx.int32:
        x = x.astype(mx.int32)
    return mx.broadcast_to(x, (batch, n)) if x.ndim == 1 else x


def attention_kernel(queries, keys, values, scale: float, mask: CompactMask, launch=None,
                     plan: AttentionPlan = None) -> mx.array:
    """MemoSight-masked attention with the Metal kernel (see
    ``metal/attention.metal``). ``keys`` / ``values`` may be views of larger
    buffers: the kernel reads them through their strides.

    Args:
        launch: runs one kernel call (default :func:`metal_launch`: on the
            Apple GPU).
        plan: the threadgroup split (default: :class:`AttentionPlan`).

    Returns:
        ``(B, Hq, Q, D)`` in the queries' dtype.
    """
    B, Hq, Q, D = queries.shape
    K = keys.shape[2]
    launch = launch or metal_launch
    plan = plan or AttentionPlan(queries, keys)
    inputs = [
        queries,
        keys,
        values,
        mx.array(scale, dtype=mx.float32),
        _per_batch(mask.query_slot, B, Q),
        _per_batch(mask.query_limit, B, Q),
        _per_batch(mask.key_visible_until, B, K),
    ]
    out_shape = (B, Hq, Q, D) if plan.splits == 1 else (plan.splits, B * Hq * Q, D + 2)
    (out,) = launch(
        get_kernel("attention"),
        inputs=inputs,
        template=plan.template,
        grid=plan.grid,
        threadgroup=(ATTENTION_THREADS, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[plan.out_dtype],
    )
    if plan.splits == 1:
        return out
    n = B * Hq * Q * D
    (merged,) = launch(
        get_kernel("attention_merge"),
        inputs=[out],
        template=[("T", queries.dtype), ("D", D)],
        grid=(math.ceil(n / COMPACT_THREADS) * COMPACT_THREADS, 1, 1),
        threadgroup=(COMPACT_THREADS, 1, 1),
        output_shapes=[(B * Hq * Q, D)],
        output_dtypes=[queries.dtype],
    )
    return merged.reshape(B, Hq, Q, D)


def compact_supported(layers) -> bool:
    """True when every layer's keys and values share one 4-D shape and a
    supported dtype (what the compaction kernel copies in one go)."""
    arrays = [x for c in layers for x in (c.keys, c.values)]
    if not arrays or any(x is None for x in arrays):
        return False
    first = arrays[0]
    return (
        first.ndim == 4
        and first.size >= 8  # smaller inputs would be bound as constant memory
        and first.dtype in SUPPORTED_DTYPES
        and all(x.shape == first.shape and x.dtype == first.dtype for x in arrays)
    )


def compact_tails(layers, end: int, length: int, launch=None, row: Optional[int] = None):
    """Entries ``[end, length)`` of every layer's keys and values (in every
    batch row, or in ``row`` only), copied out by the compaction kernel in
    ``ceil(2 * layers / 28)`` dispatches and evaluated.

    Returns:
        ``[keys_0, values_0, keys_1, ...]``, each ``(B, H, length - end, D)``
        (``B`` is 1 with ``row``).
    """
    launch = launch or metal_launch
    arrays = [x for c in layers for x in (c.keys, c.values)]
    B, H, _, D = arrays[0].shape
    if row is not None:
        if not 0 <= row < B:
            raise ValueError(f"row {row} of a batch of {B}")
        B = 1
    count = length - end
    n_chunks = math.ceil(len(arrays) / MAX_COMPACT_ARRAYS)
    size = math.ceil(len(arrays) / n_chunks)
    span = mx.array([end, count, -1 if row is None else row], dtype=mx.int32)
    outs = []
    for i in range(0, len(arrays), size):
        chunk = arrays[i : i + size]
        n = len(chunk)
        total = n * B * H * count * D
        (tails,) = launch(
            get_kernel(("compact", n)),
            inputs=chunk + [span],
            template=[("T", chunk[0].dtype), ("N", n)],
            grid=(math.ceil(total / COMPACT_THREADS) * COMPACT_THREADS, 1, 1),
            threadgroup=(COMPACT_THREADS, 1, 1),
            output_shapes=[(n, B, H, count, D)],
            output_dtypes=[chunk[0].dtype],
        )
        outs.append(tails)
    mx.eval(outs)
    return [t[j] for t in outs for j in range(t.shape[0])]


def compact_kernel(layers, start: int, end: int, length: int, launch=None, row: Optional[int] = None):
    """:func:`compact_reference` with the tails copied out by the kernel."""
    _write_tails(layers, start, compact_tails(layers, end, length, launch, row), row)


# ----------------------------------------------------------------------------
# Self-check and dispatch

_failed = set()
_checked = set()
# Largest difference from the reference a kernel may show on its self-check,
# as a fraction of the largest reference value (at least 1): both compute in
# float32 and round the result to the dtype; the online softmax sums in
# another order than MLX does.
SELF_CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 6e-2}


def kernels_available() -> bool:
    """True when the Metal kernels may run: an Apple GPU and no
    ``MLX_MEMOSIGHT_REFERENCE=1``."""
    return not use_reference() and mx.metal.is_available()


def _chip() -> str:
    try:
        return str(mx.metal.device_info().get("device_name", "an unknown chip"))
    except Exception:  # no Metal, or an MLX without device_info
        return "an unknown chip"


def _give_up(name: str, why: str):
    _failed.add(name)
    warnings.warn(f"mlx_memosight: the Metal {name} kernel {why}, with MLX {mx.__version__} on {_chip()}; "
                  "using the pure-MLX path from now on", RuntimeWarning, stacklevel=4)


def self_check_attention(dtype, head_dim: int, group: int) -> Optional[str]:
    """Run the attention kernel and the reference on a small random problem of
    this dtype, head dimension and GQA group (keys long enough that the
    kernel splits them and merges the parts); None when they agree, else
    what went wrong."""
    B, Hkv, Q, K = 1, 2, 5, 600
    k1, k2, k3 = mx.random.split(mx.random.key(7), 3)
    q = mx.random.normal((B, Hkv * group, Q, head_dim), key=k1).astype(dtype)
    k = mx.random.normal((B, Hkv, K, head_dim), key=k2).astype(dtype)
    v = mx.random.normal((B, Hkv, K, head_dim), key=k3).astype(dtype)
    slots = mx.arange(K - Q, K, dtype=mx.int32)
    until = mx.where((mx.arange(K) >= 100) & (mx.arange(K) < 160), K - Q + 2, 2 ** 31 - 1).astype(mx.int32)
    mask = CompactMask(slots, slots + 1, until)
    scale = head_dim ** -0.5
    out = attention_kernel(q, k, v, scale, mask).astype(mx.float32)
    ref = attention_reference(q, k, v, scale, mask).astype(mx.float32)
    diff = mx.max(mx.abs(out - ref)).item()
    tol = SELF_CHECK_TOLERANCE[dtype] * max(1.0, mx.max(mx.abs(ref)).item())
    if not math.isfinite(diff) or diff > tol:
        return f"differs from the reference by {diff:.3g} (tolerance {tol:.3g}) on a {dtype} test problem " \
               f"with head dim {head_dim}"
    return None


def self_check_compact(dtype, shape) -> Optional[str]:
    """Copy tails out of a few small random layers with the compaction kernel;
    None when the copies are exact, else what went wrong."""

    class _Layer:
        def __init__(self, keys, values):
            self.keys, self.values = keys, values

    B, H, _, D = shape
    layers = []
    for i in range(3):
        kk, kv = mx.random.split(mx.random.key(11 + i))
        layers.append(_Layer(mx.random.normal((B, H, 64, D), key=kk).astype(dtype),
                             mx.random.normal((B, H, 64, D), key=kv).astype(dtype)))
    for row in (None, B - 1):
        tails = compact_tails(layers, 20, 50, row=row)
        want = [x[_rows(row), :, 20:50, :] for c in layers for x in (c.keys, c.values)]
        if not all(mx.array_equal(a, b).item() for a, b in zip(tails, want)):
            return f"copies other values than it reads on a {dtype} test problem" + (
                "" if row is None else f" (batch row {row} of {B})")
    return None


def _run_kernel(name: str, key, check, fn):
    """``fn()``, or None once the kernel has failed. The first call of each
    compiled variant first runs ``check`` (the kernel against the reference
    on a small problem of the same kind) and evaluates its own result here,
    so that a wrong kernel or a compile error is reported now, once, and the
    reference takes over."""
    if name in _failed:
        return None
    try:
        if key not in _checked:
            problem = check()
            if problem:
                _give_up(name, problem)
                return None
        out = fn()
        if key not in _checked:
            mx.eval(out)
            _checked.add(key)
        return out
    except Exception as e:  # a kernel must never take the decoder down
        _give_up(name, f"failed ({type(e).__name__}: {e})")
        return None


def attention(queries, keys, values, scale: float, mask: CompactMask) -> mx.array:
    """Attention of ``queries (B, Hq, Q, D)`` over ``keys`` / ``values``
    ``(B, Hkv, K, D)`` under a :class:`CompactMask`: the Metal kernel where
    it applies, else the reference."""
    if kernels_available() and attention_supported(queries, keys, values, mask):
        plan = AttentionPlan(queries, keys)
        D, group = queries.shape[3], queries.shape[1] // keys.shape[1]
        out = _run_kernel(
            "attention", plan.key, lambda: self_check_attention(queries.dtype, D, group),
            lambda: attention_kernel(queries, keys, values, scale, mask, plan=plan))
        if out is not None:
            return out
    return attention_reference(queries, keys, values, scale, mask)


def compact(layers, start: int, end: int, length: int, row: Optional[int] = None):
    """Remove the span ``[start, end)`` from every layer's K/V buffers, in
    every batch row or in ``row`` only."""
    if kernels_available() and compact_supported(layers):
        first = layers[0].keys
        key = ("compact", str(first.dtype), len(layers))
        tails = _run_kernel("compaction", key, lambda: self_check_compact(first.dtype, first.shape),
                            lambda: compact_tails(layers, end, length, row=row))
        if tails is not None:
            _write_tails(layers, start, tails, row)
            return
    compact_reference(layers, start, end, length, row)
