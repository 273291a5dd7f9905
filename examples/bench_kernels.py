"""Metal kernels against the pure-MLX references, side by side on the Apple GPU.

Usage:
    python examples/bench_kernels.py [--cache 4096] [--layers 28] [--heads 28 4]
        [--head-dim 128] [--dtype float16] [--iters 20]

Attention: one decoder pass over every layer's cache (``--cache`` valid
entries in buffers with room for more, as the KV cache holds them), for each
pass the decoder runs: plain decode, accelerate, the fused verify-and-draft
pass, a compress pass and a long compress pass (300 memory tokens, when the
cache holds its 1800-token step). The
reference materialises the pass's mask once and calls
``mx.fast.scaled_dot_product_attention``; the kernel reads the compact rule.
Compaction: evicting a finished step from every layer. Prints the median time
of each and the ratio reference / kernel (goal: >= 1.2x for attention at 4096
cached entries). Runs only where MLX has Metal; elsewhere it exits with
status 2.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

try:
    import mlx_memosight  # noqa: F401
except ImportError:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight import kernels  # noqa: E402
from mlx_memosight.config import MemoSightConfig, TEMPLATES, TokenIds  # noqa: E402
from mlx_memosight.layout import PassBuilder, StepState  # noqa: E402

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _builder() -> PassBuilder:
    ids = TokenIds(splitter=1, continue_=2, foresight=3, memory=list(range(10, 310)), eos=0)
    return PassBuilder(MemoSightConfig(token_ids=ids, template=TEMPLATES["qwen"], compression_ratio=6))


def attention_passes(cache_len: int):
    """The decoder's passes over a cache of ``cache_len`` entries: name -> rule.
    The compress passes end a step of 61 tokens (11 memory tokens) and, when
    the cache holds it, one of 1800 tokens (300 memory tokens)."""
    b = _builder()
    p = cache_len
    passes = {
        "decode": b.decode(5, p, cache_len).rule,
        "accelerate g=2": b.decode(5, p, cache_len, draft_len=2).rule,
        "fused k=2 g=2": b.decode(5, p, cache_len, drafts=[6, 7], draft_len=2).rule,
    }
    for length, m in ((61, 11), (1800, 300)):
        if length <= cache_len:
            step = StepState(start_slot=cache_len - length + 1, begin=cache_len - length + 1)
            passes[f"compress m={m}"] = b.compress(step, cache_len, draft_len=2).rule
    return passes


def attention_inputs(rule, layers, heads, kv_heads, head_dim, dtype, seed=0):
    """Per layer: queries and key / value views of longer cache buffers."""
    rng = np.random.default_rng(seed)
    Q, K = rule.query_slot.shape[-1], rule.num_keys
    out = []
    for _ in range(layers):
        q = mx.array(rng.standard_normal((1, Q, heads, head_dim)), dtype).transpose(0, 2, 1, 3)
        cap = K + 256
        k = mx.array(rng.standard_normal((1, kv_heads, cap, head_dim)), dtype)[..., :K, :]
        v = mx.array(rng.standard_normal((1, kv_heads, cap, head_dim)), dtype)[..., :K, :]
        out.append((q, k, v))
    mx.eval(out)
    return out


def _median_ms(fn, iters: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_attention(rule, layer_inputs, scale, iters):
    def reference():
        mask = kernels.CompactMask.from_rule(rule)  # materialised once per pass
        return [kernels.attention_reference(q, k, v, scale, mask) for q, k, v in layer_inputs]

    def kernel():
        mask = kernels.CompactMask.from_rule(rule)
        return [kernels.attention_kernel(q, k, v, scale, mask) for q, k, v in layer_inputs]

    q, k, v = layer_inputs[0]
    mask = kernels.CompactMask.from_rule(rule)
    diff = mx.abs(kernels.attention_kernel(q, k, v, scale, mask).astype(mx.float32)
                  - kernels.attention_reference(q, k, v, scale, mask).astype(mx.float32)).max().item()
    return _median_ms(reference, iters), _median_ms(kernel, iters), diff


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


def bench_compaction(layers, kv_heads, cache_len, head_dim, dtype, iters):
    """Evict a 60-entry step followed by 11 memory tokens and a continue
    (``cache_len`` >= 72)."""
    cache = [
        _Layer(mx.random.normal((1, kv_heads, cache_len + 256, head_dim)).astype(dtype),
               mx.random.normal((1, kv_heads, cache_len + 256, head_dim)).astype(dtype))
        for _ in range(layers)
    ]
    mx.eval([(c.keys, c.values) for c in cache])
    start, end, length = cache_len - 72, cache_len - 12, cache_len

    def reference():
        kernels.compact_reference(cache, start, end, length)
        return [x for c in cache for x in (c.keys, c.values)]

    def kernel():
        kernels.compact_kernel(cache, start, end, length)
        return [x for c in cache for x in (c.keys, c.values)]

    return _median_ms(reference, iters), _median_ms(kernel, iters)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Metal kernels vs the pure-MLX references on the Apple GPU.")
    parser.add_argument("--cache", type=int, default=4096, help="cached entries (default 4096)")
    parser.add_argument("--layers", type=int, default=28, help="layers per pass (default 28)")
    parser.add_argument("--heads", type=int, nargs=2, default=(28, 4), metavar=("Q_HEADS", "KV_HEADS"),
                        help="query and KV heads (default 28 4, as Qwen2.5-7B)")
    parser.add_argument("--head-dim", type=int, default=128, choices=kernels.SUPPORTED_HEAD_DIMS)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not mx.metal.is_available():
        print("bench_kernels: no Metal device (mx.metal.is_available() is False on this machine); "
              "the kernels run only on Apple silicon, so Metal figures come only from Macs", file=sys.stderr)
        return 2
    if args.cache < 72:
        parser.error("--cache: at least 72 entries (a compressed step is 72)")
    heads, kv_heads = args.heads
    if heads % kv_heads:
        parser.error(f"--heads: {heads} query heads are not a multiple of {kv_heads} KV heads")
    dtype = DTYPES[args.dtype]
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        device = info.get("device_name", "?")
    except Exception:
        device = "?"
    print(f"device: {device}  mlx {mx.__version__}  {args.dtype}  "
          f"heads {heads}/{kv_heads}  head dim {args.head_dim}  layers {args.layers}  cache {args.cache}")
    print(f"{'pass':<16}{'queries':>8}{'keys':>7}{'reference ms':>14}{'kernel ms':>11}{'ratio':>8}{'max diff':>10}")
    scale = args.head_dim**-0.5
    for name, rule in attention_passes(args.cache).items():
        inputs = attention_inputs(rule, args.layers, heads, kv_heads, args.head_dim, dtype)
        ref, ker, diff = bench_attention(rule, inputs, scale, args.iters)
        print(f"{name:<16}{rule.query_slot.shape[-1]:>8}{rule.num_keys:>7}{ref:>14.3f}{ker:>11.3f}"
              f"{ref / ker:>7.2f}x{diff:>10.2e}")
        del inputs
    ref, ker = bench_compaction(args.layers, kv_heads, args.cache, args.head_dim, dtype, args.iters)
    print(f"{'compaction':<16}{'':>8}{args.cache:>7}{ref:>14.3f}{ker:>11.3f}{ref / ker:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
