"""Generate with MemoSight: ``python -m mlx_memosight.generate --prompt ...``.

Also the Python API, shaped like mlx-lm's::

    from mlx_memosight import load, stream_generate, generate

    model, tokenizer = load("path/to/model")
    for response in stream_generate(model, tokenizer, "What is 7 * 8?"):
        print(response.text, end="", flush=True)
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as _MlxLmResponse

from .backend import describe, reference_blas_in_use
from .config import ConfigError, MemoSightConfig
from .engine import SCHEDULES, Engine, GenerationError, GenerationStats

DEFAULT_MAX_TOKENS = 512


@dataclass
class GenerationResponse(_MlxLmResponse):
    """mlx-lm's response plus what MemoSight did for this token.

    Args:
        kv_entries: KV cache entries after the token was committed.
        compress_event: a finished step was compressed just before this token.
        forward_passes: decoder forward passes so far.
        stats: the generation's statistics (final on the last response).

    ``logprobs`` is None: the engine does not compute full log-probabilities.
    """

    kv_entries: int = 0
    compress_event: bool = False
    forward_passes: int = 0
    stats: Optional[GenerationStats] = None


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    stats: GenerationStats

    def __str__(self):
        return self.text


def load(path, lazy: bool = False):
    """Load a MemoSight (or plain) model folder or GGUF file.

    Returns:
        ``(model, tokenizer)`` as mlx-lm does; the MemoSight configuration is
        ``model.memosight_config`` (None for a plain model).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if path.is_file():
        from .gguf import load_gguf

        model, tokenizer, cfg = load_gguf(path)
    else:
        from .model import load as _load

        model, tokenizer, cfg = _load(path, lazy=lazy)
    model.memosight_config = cfg
    return model, tokenizer


def _prompt_ids(tokenizer, prompt, cfg: Optional[MemoSightConfig], system=None, raw=False):
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if not prompt.strip():
        raise GenerationError("the prompt is empty")
    if raw:
        text = prompt
    elif cfg is not None:
        text = cfg.template.render(prompt, system)
    elif getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer.encode(text, add_special_tokens=False)


def _newline_id(tokenizer) -> Optional[int]:
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return ids[-1] if ids else None


def make_engine(model, tokenizer, cfg, **kwargs) -> Engine:
    exempt = list(getattr(tokenizer, "all_special_ids", []) or [])
    stop = list(getattr(tokenizer, "eos_token_ids", None) or [])
    return Engine(model, cfg, exempt_ids=exempt, stop_ids=stop, **kwargs)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    system: Optional[str] = None,
    raw_prompt: bool = False,
    memosight_config: Optional[MemoSightConfig] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream the generated text.

    Args:
        model, tokenizer: from :func:`load`.
        prompt: a question (rendered with the model's template), the full text
            with ``raw_prompt=True``, or token ids.
        max_tokens: committed output tokens at most.
        system: the system prompt (default: the template's).
        memosight_config: overrides ``model.memosight_config``.
        kwargs: :class:`mlx_memosight.engine.Engine` options (``draft_len``,
            ``foresight``, ``compress``, ``schedule``, ``foresight_sets``,
            ``temp``, ``top_p``, ``repetition_penalty``, ``prefill_step_size``).

    Yields:
        :class:`GenerationResponse` per committed token. Splitters show as a
        newline (a step ends with "\\n" + splitter, which reads as a blank
        line) and each step is decoded on its own, as it was encoded; the
        stop token adds no text.
    """
    cfg = memosight_config or getattr(model, "memosight_config", None)
    ids = _prompt_ids(tokenizer, prompt, cfg, system, raw_prompt)
    engine = make_engine(model, tokenizer, cfg, **kwargs)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    newline = _newline_id(tokenizer)
    splitter = cfg.token_ids.splitter if cfg is not None else None
    events = engine.generate(ids, max_tokens)
    prev = None
    for event in events:
        if prev is not None:
            yield prev
        t = event.token
        if t in engine.stop_ids:
            segment = ""
        elif t == splitter:
            # Steps are encoded one by one (SPEC section 1), so each is decoded
            # on its own: a SentencePiece step then does not start with the
            # space of its dummy prefix.
            if newline is not None:
                detokenizer.add_token(newline)
            detokenizer.finalize()
            segment = detokenizer.last_segment
            detokenizer.reset()
        else:
            detokenizer.add_token(t)
            segment = detokenizer.last_segment
        st = engine.stats
        prev = GenerationResponse(
            text=segment,
            token=t,
            logprobs=None,
            from_draft=event.from_draft,
            prompt_tokens=st.prompt_tokens,
            prompt_tps=st.prompt_tps,
            generation_tokens=st.generated_tokens,
            generation_tps=st.generation_tps,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=None,
            kv_entries=event.kv_entries,
            compress_event=event.compress_event,
            forward_passes=event.forward_passes,
            stats=st,
        )
    if prev is not None:
        detokenizer.finalize()
        prev.text += detokenizer.last_segment
        prev.finish_reason = engine.stats.finish_reason
        prev.generation_tps = engine.stats.generation_tps
        yield prev


def generate(model, tokenizer, prompt, max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False,
             **kwargs) -> GenerationResult:
    """Generate a whole answer.

    Returns:
        :class:`GenerationResult` with the text, the committed token ids and the
        statistics.
    """
    text, ids, stats = [], [], None
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text.append(r.text)
        ids.append(r.token)
        stats = r.stats
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return GenerationResult("".join(text), ids, stats)


def format_stats(st: GenerationStats) -> str:
    """The one-paragraph summary printed after a generation."""
    lines = [
        f"Prompt: {st.prompt_tokens} tokens, {st.prompt_tps:.1f} tokens/s",
        f"Generation: {st.generated_tokens} tokens, {st.generation_tps:.1f} tokens/s, "
        f"{st.forward_passes} forward passes ({st.tokens_per_pass:.2f} tokens/pass)",
    ]
    if st.drafted_tokens:
        rate = st.accepted_draft_tokens / st.drafted_tokens
        lines.append(f"Drafts: {st.accepted_draft_tokens}/{st.drafted_tokens} accepted ({rate:.0%})")
    kv = f"KV cache: peak {st.peak_kv_tokens} entries"
    if st.plain_kv_tokens:
        kv += f" vs {st.plain_kv_tokens} for plain decoding ({st.peak_kv_tokens / st.plain_kv_tokens:.0%})"
    kv += f", {st.compress_events} compress events"
    lines.append(kv)
    lines.append(f"Peak memory: {st.peak_memory_gb:.3f} GB")
    return "\n".join(lines)


def device_line(st: GenerationStats) -> str:
    """Where the generation ran; with MLX's reference CPU BLAS, why drafting
    saves little time there."""
    line = f"Device: {describe()}"
    if st.drafted_tokens and reference_blas_in_use():
        line += (" - every token of a pass costs compute with this BLAS, so drafting saves "
                 "passes but little time (README: Speed on Linux)")
    return line


def stats_json(result: GenerationResult) -> dict:
    st = result.stats
    d = st.to_dict()
    d.update(text=result.text, token_ids=result.token_ids, device=describe())
    return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_memosight.generate",
        description="Generate with MemoSight: foresight drafting and memory compression.",
    )
    p.add_argument("--model", help="MLX model folder (or .gguf file); default: the packaged demo model")
    p.add_argument("--prompt", "-p", required=True, help="the question ('-' reads stdin)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--raw-prompt", action="store_true", help="use --prompt as the full text, no template")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--draft-len", type=int, help="foresight tokens per draft (default: memosight.json)")
    p.add_argument("--no-foresight", action="store_true", help="do not draft")
    p.add_argument("--no-compress", action="store_true", help="do not compress finished steps")
    p.add_argument("--schedule", choices=SCHEDULES, default="fused",
                   help="fused: verify and draft in one pass; two-pass: the reference's schedule")
    p.add_argument("--foresight-sets", choices=("auto", "all", "last"), default="auto",
                   help="fused schedule: a foresight set after every draft prefix (all) or only after "
                        "the whole block (last: fewer tokens per pass, for compute-bound backends); "
                        "auto: times both pass sizes once and picks (default)")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--stats-json", help="write the statistics as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="print the statistics only")
    return p


def resolve_model(path: Optional[str]) -> Path:
    if path is None:
        from .demo import demo_model_path

        return demo_model_path()
    return Path(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        if args.max_tokens < 1:
            raise GenerationError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        model_path = resolve_model(args.model)
        model, tokenizer = load(model_path)
        cfg = model.memosight_config
        if cfg is None:
            what = "memosight.* metadata" if model_path.is_file() else "memosight.json"
            print(f"notice: {model_path} has no {what}; running plain decoding", file=sys.stderr)
        if args.seed is not None:
            mx.random.seed(args.seed)
        result = None
        text, ids = [], []
        for r in stream_generate(
            model, tokenizer, prompt, args.max_tokens, system=args.system, raw_prompt=args.raw_prompt,
            draft_len=args.draft_len, foresight=not args.no_foresight, compress=not args.no_compress,
            schedule=args.schedule, foresight_sets=args.foresight_sets, temp=args.temp, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, prefill_step_size=args.prefill_step_size,
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
    except (GenerationError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
