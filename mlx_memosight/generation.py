"""Generation API, shaped like mlx-lm's::

    from mlx_memosight import load, stream_generate, generate

    model, tokenizer = load("path/to/model")
    for response in stream_generate(model, tokenizer, "What is 7 * 8?"):
        print(response.text, end="", flush=True)

Sampling goes through mlx-lm's ``sampler`` and ``logits_processors`` objects
(:class:`mlx_memosight.options.GenerationOptions` makes them from settings);
the MemoSight settings are the engine's keyword arguments.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as _MlxLmResponse

from .backend import describe, reference_blas_in_use
from .cache import PromptCache
from .config import MemoSightConfig
from .engine import BatchEngine, Engine, GenerationError, GenerationStats
from .options import DEFAULT_MAX_TOKENS


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


def prompt_ids(tokenizer, prompt, cfg: Optional[MemoSightConfig], system=None, raw=False) -> List[int]:
    """The prompt's token ids: token ids as given; text rendered with the
    MemoSight template (or the tokenizer's chat template for a plain model),
    or as is with ``raw``."""
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


def stop_ids(tokenizer) -> List[int]:
    """The tokenizer's EOS ids (the engine adds the template's EOS)."""
    return list(getattr(tokenizer, "eos_token_ids", None) or [])


def special_ids(tokenizer) -> List[int]:
    """The tokenizer's special ids (the repetition penalty leaves them alone,
    as the reference evaluation does)."""
    return list(getattr(tokenizer, "all_special_ids", []) or [])


def make_engine(model, tokenizer, cfg: Optional[MemoSightConfig] = None, *,
                sampler: Optional[Callable] = None, logits_processors: Sequence[Callable] = (),
                batch: bool = False, **engine_options) -> Engine:
    """An :class:`Engine` (with ``batch``, a :class:`BatchEngine`) for a
    loaded model (stop ids from the tokenizer)."""
    cfg = cfg if cfg is not None else getattr(model, "memosight_config", None)
    return (BatchEngine if batch else Engine)(model, cfg, sampler=sampler, logits_processors=logits_processors,
                                              stop_ids=stop_ids(tokenizer), **engine_options)


def _newline_id(tokenizer) -> Optional[int]:
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return ids[-1] if ids else None


class TextStream:
    """Committed tokens to :class:`GenerationResponse` objects with text, for
    one generation: splitters show as a newline (a step ends with "\\n" +
    splitter, which reads as a blank line) and each step is decoded on its
    own, as it was encoded (a SentencePiece step then does not start with the
    space of its dummy prefix); a stop token adds no text. A response is held
    back until the next token (or :meth:`finish`) so that the last one carries
    the detokenizer's final text."""

    def __init__(self, tokenizer, cfg: Optional[MemoSightConfig], stop: Sequence[int]):
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.newline = _newline_id(tokenizer)
        self.splitter = cfg.token_ids.splitter if cfg is not None else None
        self.stop = set(stop)
        self.held: Optional[GenerationResponse] = None

    def text_of(self, t: int) -> str:
        """The text this token adds (part of it may come with later ones)."""
        d = self.detokenizer
        if t in self.stop:
            return ""
        if t == self.splitter:
            if self.newline is not None:
                d.add_token(self.newline)
            d.finalize()
            segment = d.last_segment
            d.reset()
            return segment
        d.add_token(t)
        return d.last_segment

    def feed(self, event, st: GenerationStats) -> Optional[GenerationResponse]:
        """The response before this token's, now complete (None at first)."""
        t = event.token
        segment = self.text_of(t)
        out, self.held = self.held, GenerationResponse(
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
        return out

    def finish(self, st: GenerationStats) -> Optional[GenerationResponse]:
        """The last response, with the final text and the finish reason."""
        last, self.held = self.held, None
        if last is not None:
            self.detokenizer.finalize()
            last.text += self.detokenizer.last_segment
            last.finish_reason = st.finish_reason
            last.generation_tps = st.generation_tps
        return last


def decode_text(tokenizer, tokens: Sequence[int], cfg: Optional[MemoSightConfig], stop: Sequence[int]) -> str:
    """The text generation shows for committed ``tokens`` (:class:`TextStream`'s)."""
    stream = TextStream(tokenizer, cfg, stop)
    text = "".join(stream.text_of(t) for t in tokens)
    stream.detokenizer.finalize()
    return text + stream.detokenizer.last_segment


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    system: Optional[str] = None,
    raw_prompt: bool = False,
    memosight_config: Optional[MemoSightConfig] = None,
    sampler: Optional[Callable] = None,
    logits_processors: Sequence[Callable] = (),
    prompt_cache: Optional[PromptCache] = None,
    **engine_options,
) -> Iterator[GenerationResponse]:
    """Stream the generated text.

    Args:
        model, tokenizer: from :func:`mlx_memosight.load`.
        prompt: a question (rendered with the model's template), the full text
            with ``raw_prompt=True``, or token ids.
        max_tokens: committed output tokens at most.
        system: the system prompt (default: the template's).
        memosight_config: overrides ``model.memosight_config``.
        sampler, logits_processors: as mlx-lm's (greedy without a sampler).
        prompt_cache: a :class:`mlx_memosight.cache.PromptCache`: the prompt
            reuses the KV entries of a kept prompt that starts the same way,
            and is kept itself.
        engine_options: :class:`mlx_memosight.engine.Engine` settings
            (``draft_len``, ``foresight``, ``compress``, ``schedule``,
            ``foresight_sets``, ``prefill_step_size``).

    Yields:
        :class:`GenerationResponse` per committed token (text as
        :class:`TextStream` makes it).
    """
    cfg = memosight_config or getattr(model, "memosight_config", None)
    ids = prompt_ids(tokenizer, prompt, cfg, system, raw_prompt)
    engine = make_engine(model, tokenizer, cfg, sampler=sampler, logits_processors=logits_processors,
                         **engine_options)
    text = TextStream(tokenizer, cfg, engine.stop_ids)
    for event in engine.generate(ids, max_tokens, prompt_cache):
        r = text.feed(event, engine.stats)
        if r is not None:
            yield r
    last = text.finish(engine.stats)
    if last is not None:
        yield last


def generate(model, tokenizer, prompt, max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False,
             **kwargs) -> GenerationResult:
    """Generate a whole answer (``kwargs`` as :func:`stream_generate`).

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
    if st.draft_policy:
        lines.append(f"Drafting: {st.draft_policy}")
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
    """The ``--stats-json`` object."""
    d = result.stats.to_dict()
    d.update(text=result.text, token_ids=result.token_ids, device=describe())
    return d
