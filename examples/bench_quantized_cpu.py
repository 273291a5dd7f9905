"""Why a quantized model computes in float32 on MLX's CPU backend: one
product of a token with a weight matrix, dense and 4-bit, with the scales
(and the token) in float32, bfloat16 and float16, side by side in one run.

    python examples/bench_quantized_cpu.py [--shape 8960 1536] [--tokens 1]

The default shape is Qwen2.5-1.5B's feed-forward projection. MLX's quantised
products run in the precision of their scales, so a model whose scales are
half precision (what ``convert -q`` and ``mlx_lm.convert -q`` write from a
bfloat16 or float16 checkpoint) pays that precision's speed on the CPU;
``generate`` and the server cast such a model to float32 there
(``mlx_memosight.backend.float32_on_cpu``).
"""

import argparse

import mlx.core as mx


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[8960, 1536], metavar=("OUT", "IN"))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from mlx_memosight.backend import describe, median_seconds

    out_dim, in_dim = args.shape
    w32 = mx.random.normal((out_dim, in_dim), key=mx.random.key(0))
    x32 = mx.random.normal((args.tokens, in_dim), key=mx.random.key(1))
    products = {}
    for name in ("float32", "bfloat16", "float16"):
        dt = getattr(mx, name)
        w, x = w32.astype(dt), x32.astype(dt)
        q, s, b = mx.quantize(w, args.group_size, args.bits)
        mx.eval(w, x, q, s, b)
        products[name, "dense"] = lambda x=x, w=w: x @ w.T
        products[name, "quantized"] = lambda x=x, q=q, s=s, b=b: mx.quantized_matmul(
            x, q, s, b, transpose=True, group_size=args.group_size, bits=args.bits)
    times = median_seconds(list(products), lambda key: mx.eval(products[key]()), args.rounds, warmup=1)
    rows = [(name, times[name, "dense"], times[name, "quantized"]) for name in ("float32", "bfloat16", "float16")]
    base = rows[0][2]
    print(f"device: {describe()}; {args.tokens} token(s) x ({out_dim} x {in_dim}) weights, median of "
          f"{args.rounds}")
    print(f"{'dtype':<10}{'dense ms':>10}{f'{args.bits}-bit ms':>10}{'vs float32 scales':>19}")
    for name, dense, quant in rows:
        print(f"{name:<10}{dense * 1e3:>10.1f}{quant * 1e3:>10.1f}{quant / base:>18.1f}x")


if __name__ == "__main__":
    main()
