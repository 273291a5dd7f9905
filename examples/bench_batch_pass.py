"""What one batched pass costs against mlx-lm's own decoding step.

    python examples/bench_batch_pass.py [--model M] [--batch-sizes 1 4 8] [--cache 150]

For each batch size, a one-token step of every row over ``--cache`` cached
entries: mlx-lm's model on its own ``KVCache`` (one shared offset), and this
project's batched path (``BatchKVCache``: per-row lengths, per-token positions,
the compact mask, one scatter per layer, the logits row gathered per row).
Prints milliseconds per step, median of a few hundred, measured side by side
in one run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(f, n=200) -> float:
    for _ in range(10):
        f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the demo model)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--cache", type=int, default=150, help="cached entries per row")
    args = p.parse_args()

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache as MlxLmCache

    from mlx_memosight import load_for_decoding
    from mlx_memosight.backend import describe
    from mlx_memosight.cache import BatchKVCache, KVCache
    from mlx_memosight.demo import demo_model_path
    from mlx_memosight.kernels import CompactMask
    from mlx_memosight.layout import NEVER
    from mlx_memosight.model import TokenPositions, forward, lm_head

    model, _ = load_for_decoding(args.model or str(demo_model_path()))
    a = model.args
    kv_heads = getattr(a, "num_key_value_heads", None) or a.num_attention_heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    K = args.cache
    print(f"device: {describe()}, {K} cached entries per row, one-token step, ms (median)")
    print(f"{'batch':>5}{'mlx_lm':>10}{'batched':>10}{'ratio':>8}")
    for B in args.batch_sizes:
        x = mx.random.randint(0, a.vocab_size, (B, 1))
        lm_cache = [MlxLmCache() for _ in model.layers]
        for c in lm_cache:
            k = mx.random.normal((B, kv_heads, K, head_dim))
            c.update_and_fetch(k, k)
        batch = BatchKVCache(len(model.layers))
        for _ in range(B):
            single = KVCache(len(model.layers))
            for layer in single.layers:
                k = mx.random.normal((1, kv_heads, K, head_dim))
                layer.update_and_fetch(k, k)
            batch.add(single)

        def mlx_lm_step():
            out = model(x, cache=lm_cache)
            for c in lm_cache:
                c.trim(1)
            mx.argmax(out[:, -1], axis=-1).tolist()

        def batched_step():
            slot = mx.full((B, 1), K, mx.int32)
            mask = CompactMask(slot, slot + 1, mx.full((B, K + 1), NEVER, mx.int32))
            batch.begin_pass(TokenPositions(mx.full((B, 1), K, mx.int32)), mask, [1] * B)
            h = forward(model, x, None, cache=batch, hidden=True)
            h = mx.take_along_axis(h, mx.zeros((B, 1, 1), mx.int32), axis=1)
            mx.argmax(lm_head(model, h), axis=-1).tolist()
            for r in batch.rows:
                r.trim(1)

        lm, ours = timed(mlx_lm_step), timed(batched_step)
        print(f"{B:>5}{lm:>10.2f}{ours:>10.2f}{ours / lm:>7.2f}x")


if __name__ == "__main__":
    main()
