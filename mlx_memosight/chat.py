"""``python -m mlx_memosight.chat``: a terminal chat with a MemoSight model, as
``mlx_lm.chat``: the reasoning and the answer stream as they are committed,
each turn ends with a statistics line, the conversation carries on across
turns (earlier answers, not their reasoning, are part of the next prompt).

``/reset`` starts a new conversation, ``/quit`` (or Ctrl-D) leaves; Ctrl-C
stops the answer being written and keeps the session.
"""

import sys

from . import cli
from .options import GenerationOptions, add_arguments

HELP = "/reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops an answer"


def build_parser():
    p = cli.ArgumentParser(prog="mlx_memosight.chat", description="Chat with a MemoSight model in the terminal.")
    p.add_argument("--model", help=cli.MODEL_HELP)
    p.add_argument("--adapter-path", help="MemoSight adapters (mlx_memosight.lora) to load into --model")
    p.add_argument("--system", "--system-prompt", dest="system", help="system prompt (default: the template's)")
    add_arguments(p, GenerationOptions)
    return p


def _chat(args):
    import mlx.core as mx

    from .errors import MemoSightError
    from .generation import special_ids, stream_generate
    from .loading import load_for_decoding, resolve_model
    from .serving import AnswerSplitter, Message, conversation_ids

    options = GenerationOptions.from_args(args)
    path = resolve_model(args.model)
    model, tokenizer = load_for_decoding(path, adapter_path=args.adapter_path)
    cfg = model.memosight_config
    if options.seed is not None:
        mx.random.seed(options.seed)
    step_id = cfg.token_ids.splitter if cfg is not None else None
    history = [Message("system", args.system)] if args.system else []
    print(f"[{path.name}] {HELP}", flush=True)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            return
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(a new conversation)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}: {HELP}", flush=True)
            continue
        turn = history + [Message("user", text)]
        try:
            ids = conversation_ids(tokenizer, turn, cfg)
        except MemoSightError as e:  # a conversation the template cannot hold: say so, keep the session
            print(f"error: {e}", flush=True)
            continue
        splitter = AnswerSplitter()
        answer, last, stopped = [], None, False
        try:
            for r in stream_generate(model, tokenizer, ids, options.max_tokens, sampler=options.sampler(),
                                     logits_processors=options.logits_processors(special_ids(tokenizer)),
                                     **options.engine_options()):
                print(r.text, end="", flush=True)
                answer += [d.text for d in splitter.feed(r.text, r.token == step_id) if d.kind == "answer"]
                last = r
        except KeyboardInterrupt:
            stopped = True
        answer += [d.text for d in splitter.finish() if d.kind == "answer"]
        print()
        if last is not None:
            st = last.stats
            note = "stopped; " if stopped else ""
            kv = f"KV {st.peak_kv_tokens} entries at peak vs {st.plain_kv_tokens} plain" if st.plain_kv_tokens \
                else f"KV {st.peak_kv_tokens} entries at peak"
            print(f"[{note}{st.generated_tokens} tokens, {st.generation_tps:.1f} tokens/s, "
                  f"{st.tokens_per_pass:.2f} tokens/pass, {st.compress_events} compress events, {kv}]",
                  file=sys.stderr, flush=True)
        history = turn + [Message("assistant", "".join(answer))]


def main(argv=None):
    cli.run(build_parser(), _chat, argv)


if __name__ == "__main__":
    main()
