"""What the drafting policy's memory of acceptance is worth: the same problems
decoded by the policy with the acceptance kept per model (every sequence
starts from what the ones before it saw: the engine's default), with each
sequence starting from the prior, and with a fixed draft length for scale.

    python examples/drafting_choices.py [--model PATH] [--data JSONL] [--limit 30] [--rounds 3]
        [--draft-len 3] [--foresight-sets last] [--batch-size N]

Each round decodes every problem in each mode, one after another (the
acceptance forgotten at the start of each round, so that rounds are alike);
the fastest round of each mode is kept. Prints tokens/s, forward passes,
passes issued ahead and dropped (a draft was wrong), and the policy's
choices, and checks that every mode committed the same tokens. Default
model: the packaged demo model on its held-out problems.

With ``--batch-size N`` (more than 1) the batch engine decodes the problems,
N at a time (continuous batching), with its rows' policies sharing the
model's acceptance and starting each from the prior (its default:
``BatchEngine.shares_acceptance``); it prints tokens/s, iterations and the
tokens the rows fed (padding not counted).
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight import demo, load_for_decoding  # noqa: E402
from mlx_memosight.backend import describe  # noqa: E402
from mlx_memosight.engine import BatchEngine, Engine  # noqa: E402
from mlx_memosight.policy import forget_acceptance  # noqa: E402


def decode(model, cfg, prompts, max_tokens, kw, per_sequence):
    """``(tokens of every prompt, seconds, passes, passes dropped, choices)``."""
    out, seconds, passes, dropped, choices = [], 0.0, 0, 0, Counter()
    forget_acceptance(model)
    for ids in prompts:
        if per_sequence:
            forget_acceptance(model)
        engine = Engine(model, cfg, **kw)
        tic = time.perf_counter()
        out.append([e.token for e in engine.generate(ids, max_tokens)])
        seconds += time.perf_counter() - tic
        passes += engine.stats.forward_passes
        dropped += engine.stats.discarded_passes
        if engine.policy is not None:
            choices.update(engine.policy.chosen)
    return out, seconds, passes, dropped, choices


def decode_batched(model, cfg, prompts, max_tokens, batch_size, shared):
    """``(tokens of every prompt, seconds, iterations, tokens fed)``."""
    forget_acceptance(model)
    engine = BatchEngine(model, cfg)
    engine.shares_acceptance = shared
    out, steps, fed = [[] for _ in prompts], 0, 0
    tic = time.perf_counter()
    for results in engine.run(prompts, max_tokens, batch_size):
        steps += 1
        for i, r in results:
            out[i] += [e.token for e in r.events]
            if r.finished:
                fed += r.stats.pass_tokens
    return out, time.perf_counter() - tic, steps, fed


def batched(args, model, cfg, prompts):
    modes = [("batch, acceptance kept per model", True), ("batch, each sequence from the prior", False)]
    best, tokens = {}, None
    for _ in range(args.rounds):
        for name, shared in modes:
            toks, seconds, steps, fed = decode_batched(model, cfg, prompts, args.max_tokens,
                                                                args.batch_size, shared)
            if tokens is not None and toks != tokens:
                sys.exit(f"{name}: committed other tokens than the first mode")
            tokens = toks
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, steps, fed)
    n = sum(len(t) for t in tokens)
    print(f"device: {describe()}, {len(prompts)} problems, batch size {args.batch_size}, {n} tokens, "
          f"fastest of {args.rounds} rounds")
    print(f"{'drafting':<40}{'tok/s':>9}{'iterations':>11}{'fed':>9}")
    for name, (seconds, steps, fed) in best.items():
        print(f"{name:<40}{n / seconds:>9.1f}{steps:>11}{fed:>9}")
    print("every mode committed the same tokens")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the packaged demo model)")
    p.add_argument("--data", help="JSONL of problems with a question (default: the demo task's held-out problems)")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--draft-len", type=int, default=3, help="the fixed draft length shown for scale")
    p.add_argument("--foresight-sets", choices=["all", "last"], default="last",
                   help="the fixed row's foresight layout")
    p.add_argument("--batch-size", type=int, default=1, help="compare in the batch engine, N problems at a time")
    args = p.parse_args(argv)
    if min(args.limit, args.rounds, args.max_tokens, args.draft_len, args.batch_size) < 1:
        p.error("--limit, --rounds, --max-tokens, --draft-len and --batch-size must be at least 1")
    model, tokenizer = load_for_decoding(str(args.model or demo.demo_model_path()))
    cfg = model.memosight_config
    if cfg is None:
        p.error(f"{args.model} is not a MemoSight model (no memosight.json)")
    prompts = demo.problem_prompts(tokenizer, cfg, args.limit, args.data)
    if args.batch_size > 1:
        return batched(args, model, cfg, prompts)
    modes = [("policy, acceptance kept per model", dict(), False),
             ("policy, each sequence from the prior", dict(), True),
             (f"draft {args.draft_len}, {args.foresight_sets} sets (fixed)",
              dict(draft_len=args.draft_len, foresight_sets=args.foresight_sets), False)]
    best, tokens = {}, None
    for _ in range(args.rounds):
        for name, kw, per_sequence in modes:
            toks, seconds, passes, dropped, choices = decode(model, cfg, prompts, args.max_tokens, kw, per_sequence)
            if tokens is not None and toks != tokens:
                sys.exit(f"{name}: committed other tokens than the first mode")
            tokens = toks
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, passes, dropped, choices)
    n = sum(len(t) for t in tokens)
    print(f"device: {describe()}, {len(prompts)} problems, {n} tokens, fastest of {args.rounds} rounds")
    print(f"{'drafting':<40}{'tok/s':>9}{'passes':>9}{'dropped':>9}  choices")
    for name, (seconds, passes, dropped, choices) in best.items():
        total = sum(choices.values()) or 1
        chosen = ", ".join(f"{c} {k / total:.0%}" for c, k in choices.most_common()) or "-"
        print(f"{name:<40}{n / seconds:>9.1f}{passes:>9}{dropped:>9}  {chosen}")
    print("every mode committed the same tokens")


if __name__ == "__main__":
    main()
