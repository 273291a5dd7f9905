"""``python -m mlx_memosight.generate --prompt ...``: generate with MemoSight.

The Python API (``load``, ``generate``, ``stream_generate``) lives in
:mod:`mlx_memosight.generation` and :mod:`mlx_memosight.loading`. Flags that
mean what they mean in ``mlx_lm.generate`` carry its names too
(``--system-prompt``, ``--ignore-chat-template``, ``--adapter-path``,
``--verbose``).
"""

import argparse
import sys

from . import cli
from .options import GenerationOptions, add_arguments


def _bool(text: str) -> bool:
    if text.lower() in ("true", "t", "1", "yes"):
        return True
    if text.lower() in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not True or False")


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.generate",
        description="Generate with MemoSight: foresight drafting and memory compression.",
    )
    p.add_argument("--model", help=cli.MODEL_HELP)
    p.add_argument("--adapter-path", help="MemoSight adapters (mlx_memosight.lora) to load into --model")
    p.add_argument("--prompt", "-p", required=True, help="the question ('-' reads stdin)")
    p.add_argument("--system", "--system-prompt", dest="system",
                   help="system prompt (default: the template's)")
    p.add_argument("--raw-prompt", "--ignore-chat-template", dest="raw_prompt", action="store_true",
                   help="use --prompt as the full text, without the model's template")
    add_arguments(p, GenerationOptions)
    p.add_argument("--stats-json", metavar="FILE", help="also write the statistics as JSON to this file")
    p.add_argument("--verbose", type=_bool, default=True, metavar="{True,False}",
                   help="False prints only the generated text, as mlx_lm.generate (default: True)")
    p.add_argument("--quiet", action="store_true", help="print the statistics only, not the text")
    return p


class _Printer:
    """Streams text to stdout, holding back trailing newlines: the last step
    ends with a blank line, and the answer is printed with exactly one."""

    def __init__(self, show: bool):
        self.show = show
        self.pending = ""

    def write(self, text: str):
        if not self.show:
            return
        text = self.pending + text
        body = text.rstrip("\n")
        self.pending = text[len(body):]
        if body:
            print(body, end="", flush=True)

    def close(self):
        if self.show:
            print()


def _generate(args):
    import json

    import mlx.core as mx

    from .generation import (GenerationResult, device_line, format_stats, prompt_ids, special_ids,
                             stats_json, stream_generate)
    from .loading import load_for_decoding, memosight_notice, resolve_model
    from .outputs import check_writable

    options = GenerationOptions.from_args(args)
    if args.stats_json:
        check_writable(args.stats_json, "stats_json")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model_path = resolve_model(args.model)
    model, tokenizer = load_for_decoding(model_path, adapter_path=args.adapter_path)
    cfg = model.memosight_config
    if cfg is None:
        print(memosight_notice(model_path), file=sys.stderr)
    ids = prompt_ids(tokenizer, prompt, cfg, args.system, args.raw_prompt)
    context = getattr(model.args, "max_position_embeddings", None)
    if context and len(ids) + options.max_tokens > context:
        print(f"notice: the prompt has {len(ids)} tokens, so the model's context of {context} "
              f"leaves room for {max(0, context - len(ids) - 1)} of the --max-tokens "
              f"{options.max_tokens}", file=sys.stderr)
    if options.seed is not None:
        mx.random.seed(options.seed)
    printer = _Printer(show=not args.quiet)
    text, tokens, result = [], [], None
    for r in stream_generate(
        model, tokenizer, ids, options.max_tokens, sampler=options.sampler(),
        logits_processors=options.logits_processors(special_ids(tokenizer)), **options.engine_options(),
    ):
        printer.write(r.text)
        text.append(r.text)
        tokens.append(r.token)
        result = r
    printer.close()
    st = result.stats
    if args.verbose:
        print("=" * 10, file=sys.stderr)
        print(format_stats(st), file=sys.stderr)
        print(device_line(st), file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats_json(GenerationResult("".join(text), tokens, st)), f, indent=2)


def main(argv=None):
    cli.run(build_parser(), _generate, argv)


if __name__ == "__main__":
    main()
