"""Two ways of running the engine's passes, side by side: drafting passes issued
ahead or one after another (``--switch pipeline``), or passes run as one
compiled function or built op by op (``--switch compiled``).

    python examples/bench_pipeline.py [--switch pipeline|compiled] [--batch] [--model PATH] [--data JSONL]
        [--limit 40] [--rounds 3]

``pipeline``: while a fused pass computes, the engine builds and issues the
next one as it will be if every draft is accepted (``Engine.pipeline``), and
drops it when that does not happen. ``compiled``: each decoding pass is one
``mx.compile`` function of the pass's arrays and the cache's buffers
(``Engine.compiled``), instead of a graph built op by op in every pass.

This decodes the same problems with the switch on and off, interleaved
(``--rounds`` times each, the fastest kept), checks that both commit the same
tokens, and prints tokens/s, the ratio and how many passes issued ahead were
dropped, for each foresight layout (``last`` and ``all``) at a fixed draft
length and for the policy's own choice (and, for ``compiled``, compression
without drafting and plain decoding). With ``--batch``, the same through the
batch engine (``BatchEngine``, what the server, ``evaluate --batch-size`` and
``bench --batch-size`` run), one problem at a time in the batch: there
``pipeline`` also switches the plain-decoding passes issued ahead. Default
model: the packaged demo model on its held-out problems.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight import demo, load_for_decoding  # noqa: E402
from mlx_memosight.backend import describe  # noqa: E402
from mlx_memosight.engine import BatchEngine, Engine  # noqa: E402
from mlx_memosight.policy import forget_acceptance  # noqa: E402


def decode(engine, prompts, max_tokens):
    """``(tokens of every prompt, seconds, passes, passes dropped)``, one
    prompt after another."""
    out, seconds, passes, dropped = [], 0.0, 0, 0
    for ids in prompts:
        tic = time.perf_counter()
        if isinstance(engine, BatchEngine):
            tokens, stats = [], None
            for results in engine.run([ids], max_tokens, 1):
                for _, r in results:
                    tokens += [e.token for e in r.events]
                    stats = r.stats
        else:
            tokens = [e.token for e in engine.generate(ids, max_tokens)]
            stats = engine.stats
        seconds += time.perf_counter() - tic
        out.append(tokens)
        passes += stats.forward_passes
        dropped += stats.discarded_passes
    return out, seconds, passes, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the packaged demo model)")
    p.add_argument("--data", help="JSONL of problems with a question (default: the demo task's held-out problems)")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--switch", choices=["pipeline", "compiled"], default="pipeline")
    p.add_argument("--batch", action="store_true", help="through the batch engine, one problem at a time")
    args = p.parse_args(argv)
    if args.limit < 1 or args.rounds < 1 or args.max_tokens < 1:
        p.error("--limit, --rounds and --max-tokens must be at least 1")
    model, tokenizer = load_for_decoding(str(args.model or demo.demo_model_path()))
    cfg = model.memosight_config
    if cfg is None:
        p.error(f"{args.model} is not a MemoSight model (no memosight.json)")
    prompts = demo.problem_prompts(tokenizer, cfg, args.limit, args.data)
    off, on = ("one by one", "ahead") if args.switch == "pipeline" else ("op by op", "compiled")
    print(f"device: {describe()}, {len(prompts)} problems, fastest of {args.rounds} rounds, "
          f"switch: {args.switch}" + (", batch engine" if args.batch else ""))
    print(f"{'drafting':<26}{off:>12}{on:>10}{'ratio':>8}{'passes':>9}{'dropped':>9}")
    configs = [("draft 3, last sets", dict(draft_len=3, foresight_sets="last")),
               ("draft 3, all sets", dict(draft_len=3, foresight_sets="all")),
               ("policy (auto)", dict())]
    if args.switch == "compiled":
        configs += [("compression only", dict(foresight=False)), ("plain", dict(foresight=False, compress=False))]
    for name, kw in configs:
        best, tokens = {}, {}
        for _ in range(args.rounds):
            for switched in (False, True):
                forget_acceptance(model)  # the policy's rows start alike (not from the runs before)
                engine = (BatchEngine if args.batch else Engine)(model, cfg, **kw)
                setattr(engine, args.switch, switched)
                toks, seconds, passes, dropped = decode(engine, prompts, args.max_tokens)
                if switched in tokens and tokens[switched] != toks:
                    sys.exit(f"{name}: two rounds committed different tokens")
                tokens[switched] = toks
                if switched not in best or seconds < best[switched][0]:
                    best[switched] = (seconds, passes, dropped)
        if tokens[True] != tokens[False]:
            sys.exit(f"{name}: the switch {args.switch} changed the tokens")
        n = sum(len(t) for t in tokens[True])
        slow, fast = n / best[False][0], n / best[True][0]
        print(f"{name:<26}{slow:>12.1f}{fast:>10.1f}{fast / slow:>7.2f}x{best[True][1]:>9}{best[True][2]:>9}")
    print("tokens/s; every configuration committed the same tokens both ways")


if __name__ == "__main__":
    main()
