"""How the cost of one forward pass grows with the tokens it carries, on this machine.

    python examples/pass_cost.py [--model PATH] [--cache 100] [--tokens 1 2 3 5 9]

Drafting commits several tokens per pass; it pays only where a pass of a few
tokens costs about what a 1-token pass costs (memory-bound decoding, as on an
Apple GPU, or a CPU whose BLAS is fast for small matrices). With the reference
BLAS of MLX's Linux wheel the cost grows with the tokens and drafting cannot win
(compare with ``examples/with_openblas.sh python examples/pass_cost.py``).
This times mlx-lm's own model call over a KV cache of ``--cache`` entries for
each pass size, interleaved, and prints the median cost relative to a 1-token
pass. Default model: the packaged demo model. ``--save`` also measures the cost
of a pass token for the drafting policy (passes of 1 and 9 tokens) and keeps it
in the per-user cache that ``generate`` reads (``mlx_memosight.policy``); that
figure is timed on the engine's decoding passes (one compiled function each
where the engine compiles them), so it can differ from the table's, whose
op-by-op model calls carry a fixed host cost that makes extra tokens look
cheaper.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight import load_for_decoding  # noqa: E402
from mlx_memosight.backend import describe, pass_costs  # noqa: E402
from mlx_memosight.demo import demo_model_path  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the packaged demo model)")
    p.add_argument("--cache", type=int, default=100, help="KV entries already cached")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 5, 9], help="pass sizes")
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--save", action="store_true",
                   help="measure a pass token's cost for the drafting policy and keep it")
    args = p.parse_args(argv)
    if args.cache < 1 or min(args.tokens) < 1 or args.rounds < 1:
        p.error("--cache, --tokens and --rounds must be at least 1")
    model, _ = load_for_decoding(str(args.model or demo_model_path()))
    median = pass_costs(model, args.tokens, cached=args.cache, rounds=args.rounds, warmup=5)
    base = median[args.tokens[0]]
    print(f"device: {describe()}, cache: {args.cache} entries, median of {args.rounds} passes")
    print(f"{'tokens':>6}{'ms / pass':>12}{'vs ' + str(args.tokens[0]):>10}")
    for T in args.tokens:
        print(f"{T:>6}{median[T] * 1e3:>12.3f}{median[T] / base:>9.2f}x")
    if args.save:
        from mlx_memosight.policy import calibrate

        cost = calibrate(model, force=True)
        print(f"saved for the drafting policy: a pass token costs {cost.per_token:.2f} of a one-token pass")


if __name__ == "__main__":
    main()
