"""Training attention on the machine at hand: what the choices in
``mlx_memosight/train/attention.py`` rest on, measured side by side.

    examples/with_openblas.sh python examples/bench_train_attention.py

1. ``mx.exp`` against ``mx.power(2, x * log2(e))`` over a score matrix:
   time, and the largest relative error against float64.
2. The gradient (forward and backward) of one layer's attention on a causal
   sequence (two query heads, one key-value head, head dim 64, the long
   task's model): the fused ``mx.fast.scaled_dot_product_attention`` with
   the mask array against blockwise attention (``BLOCKWISE_FROM``), and
   blockwise attention over keys ``[0, j)`` against gathering every visible
   key (what an ordinary SFT sample would gather: ``GATHER_SHARE``).
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight.backend import describe  # noqa: E402
from mlx_memosight.layout import attention_mask  # noqa: E402
from mlx_memosight.train import attention as blockwise  # noqa: E402


def best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return min(times)


def exponentials(n: int):
    x = mx.random.uniform(-30.0, 0.0, (n,))
    mx.eval(x)
    exact = np.exp(np.array(x).astype(np.float64))
    t_exp = best(lambda: mx.exp(x))
    t_pow = best(lambda: mx.power(2.0, x * 1.4426950408889634))
    err = [np.max(np.abs(np.array(y).astype(np.float64) - exact) / exact)
           for y in (mx.exp(x), mx.power(2.0, x * 1.4426950408889634))]
    print(f"{n / 1e6:.0f}M exponentials: mx.exp {t_exp * 1e3:.0f} ms (max rel. error {err[0]:.1e}), "
          f"mx.power(2, x log2 e) {t_pow * 1e3:.0f} ms (max rel. error {err[1]:.1e}): {t_exp / t_pow:.2f}x")


def gradient_time(L: int, how: str) -> float:
    H, Hkv, D = 2, 1, 64
    q, k, v = (mx.random.normal((1, h, L, D)) for h in (H, Hkv, Hkv))
    slot = mx.arange(L)[None]
    rule = (slot, slot + 1, mx.full((1, L), L + 1))
    index = None
    if how == "gathered":
        index = mx.array(blockwise.visible_keys(*(np.array(a) for a in rule), blockwise.query_block(L)))

    def loss(q, k, v):
        if how == "fused":
            mask = attention_mask(*rule, xp=mx)[:, None]
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask).sum()
        return blockwise.blockwise_attention(q, k, v, D ** -0.5, *rule, key_index=index).sum()

    grad = mx.value_and_grad(loss, argnums=(0, 1, 2))
    return best(lambda: grad(q, k, v))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", type=int, nargs="+", default=[256, 650, 930], help="lengths: fused vs blockwise")
    p.add_argument("--long", type=int, default=7000, help="length: keys [0, j) vs gathered")
    args = p.parse_args(argv)
    print(f"device: {describe()}")
    exponentials(1 << 25)
    for L in args.short:
        fused, blocks = gradient_time(L, "fused"), gradient_time(L, "causal")
        print(f"L={L:5d} attention gradient: fused with the mask {fused * 1e3:7.1f} ms, "
              f"blockwise {blocks * 1e3:7.1f} ms: {fused / blocks:.2f}x")
    gathered, causal = gradient_time(args.long, "gathered"), gradient_time(args.long, "causal")
    print(f"L={args.long:5d} attention gradient, causal sequence: gathering every visible key {gathered * 1e3:.0f} ms, "
          f"keys [0, j) {causal * 1e3:.0f} ms: {gathered / causal:.2f}x")


if __name__ == "__main__":
    main()
