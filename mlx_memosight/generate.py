"""``python -m mlx_memosight.generate --prompt ...``: generate with MemoSight.

The Python API (``load``, ``generate``, ``stream_generate``) lives in
:mod:`mlx_memosight.generation` and :mod:`mlx_memosight.loading`.
"""

import sys

from . import cli
from .options import GenerationOptions, add_arguments


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.generate",
        description="Generate with MemoSight: foresight drafting and memory compression.",
    )
    p.add_argument("--model", help="MLX model folder (or .gguf file); default: the packaged demo model")
    p.add_argument("--prompt", "-p", required=True, help="the question ('-' reads stdin)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--raw-prompt", action="store_true", help="use --prompt as the full text, no template")
    add_arguments(p, GenerationOptions)
    p.add_argument("--stats-json", help="write the statistics as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="print the statistics only")
    return p


def _generate(args):
    import json

    import mlx.core as mx

    from .generation import GenerationResult, device_line, format_stats, special_ids, stats_json
    from .generation import stream_generate
    from .loading import load, memosight_notice, resolve_model

    options = GenerationOptions.from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model_path = resolve_model(args.model)
    model, tokenizer = load(model_path)
    if model.memosight_config is None:
        print(memosight_notice(model_path), file=sys.stderr)
    if options.seed is not None:
        mx.random.seed(options.seed)
    result = None
    text, ids = [], []
    for r in stream_generate(
        model, tokenizer, prompt, options.max_tokens, system=args.system, raw_prompt=args.raw_prompt,
        sampler=options.sampler(), logits_processors=options.logits_processors(special_ids(tokenizer)),
        **options.engine_options(),
    ):
        if not args.quiet:
            print(r.text, end="", flush=True)
        text.append(r.text)
        ids.append(r.token)
        result = r
    if not args.quiet:
        print()
    st = result.stats
    print("=" * 10, file=sys.stderr)
    print(format_stats(st), file=sys.stderr)
    print(device_line(st), file=sys.stderr)
    if args.stats_json:
        out = GenerationResult("".join(text), ids, st)
        with open(args.stats_json, "w") as f:
            json.dump(stats_json(out), f, indent=2)


def main(argv=None):
    cli.run(build_parser(), _generate, argv)


if __name__ == "__main__":
    main()
