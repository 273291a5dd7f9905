"""Drafting passes issued ahead against passes issued one after another, side by side.

    python examples/bench_pipeline.py [--model PATH] [--data JSONL] [--limit 40] [--rounds 3]

While a fused pass computes, the engine builds and issues the next one as it
will be if every draft is accepted (``Engine.pipeline``), and drops it when
that does not happen. This decodes the same problems with that on and off,
interleaved (``--rounds`` times each, the fastest kept), checks that both
commit the same tokens, and prints tokens/s, the ratio and how many passes
issued ahead were dropped, for each foresight layout (``last`` and ``all``)
at a fixed draft length and for the policy's own choice. Default model: the
packaged demo model on its held-out problems.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight import demo, load  # noqa: E402
from mlx_memosight.backend import describe  # noqa: E402
from mlx_memosight.engine import Engine  # noqa: E402
from mlx_memosight.generation import prompt_ids  # noqa: E402


def decode(engine, prompts, max_tokens):
    """``(tokens of every prompt, seconds, passes, passes dropped)``."""
    out, seconds, passes, dropped = [], 0.0, 0, 0
    for ids in prompts:
        tic = time.perf_counter()
        out.append([e.token for e in engine.generate(ids, max_tokens)])
        seconds += time.perf_counter() - tic
        passes += engine.stats.forward_passes
        dropped += engine.stats.discarded_passes
    return out, seconds, passes, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the packaged demo model)")
    p.add_argument("--data", help="JSONL of problems with a question (default: the demo task's held-out problems)")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.limit < 1 or args.rounds < 1 or args.max_tokens < 1:
        p.error("--limit, --rounds and --max-tokens must be at least 1")
    model, tokenizer = load(str(args.model or demo.demo_model_path()))
    cfg = model.memosight_config
    if cfg is None:
        p.error(f"{args.model} is not a MemoSight model (no memosight.json)")
    if args.data:
        items = [json.loads(line) for line in open(args.data) if line.strip()][: args.limit]
    else:
        items = demo.heldout_items(args.limit)
    prompts = [prompt_ids(tokenizer, it["question"], cfg, None, False) for it in items]
    print(f"device: {describe()}, {len(prompts)} problems, fastest of {args.rounds} rounds")
    print(f"{'drafting':<26}{'one by one':>12}{'ahead':>10}{'ratio':>8}{'passes':>9}{'dropped':>9}")
    for name, kw in (("draft 3, last sets", dict(draft_len=3, foresight_sets="last")),
                     ("draft 3, all sets", dict(draft_len=3, foresight_sets="all")),
                     ("policy (auto)", dict())):
        best, tokens = {}, {}
        for _ in range(args.rounds):
            for pipeline in (False, True):
                engine = Engine(model, cfg, **kw)
                engine.pipeline = pipeline
                toks, seconds, passes, dropped = decode(engine, prompts, args.max_tokens)
                if pipeline in tokens and tokens[pipeline] != toks:
                    sys.exit(f"{name}: two rounds committed different tokens")
                tokens[pipeline] = toks
                if pipeline not in best or seconds < best[pipeline][0]:
                    best[pipeline] = (seconds, passes, dropped)
        if tokens[True] != tokens[False]:
            sys.exit(f"{name}: issuing passes ahead changed the tokens")
        n = sum(len(t) for t in tokens[True])
        off, on = n / best[False][0], n / best[True][0]
        print(f"{name:<26}{off:>12.1f}{on:>10.1f}{on / off:>7.2f}x{best[True][1]:>9}{best[True][2]:>9}")
    print("tokens/s; every configuration committed the same tokens both ways")


if __name__ == "__main__":
    main()
