"""The MemoSight decoder: prefill, then accelerate / compress / verify.

The engine knows nothing about files or command lines. It asks the layout
module for each pass, runs it through the model with a :class:`KVCache`, and
commits exactly the tokens greedy decoding would commit under MemoSight's mask
and eviction rules (SPEC section 3), in fewer forward passes:

* ``schedule="fused"`` (default): one pass per iteration. The pass feeds the
  anchor and the current draft block and, after every draft prefix, an
  isolated set of foresight tokens; verification and the next block's drafts
  come from the same pass, and only the foresight set that follows the
  accepted prefix is used.
* ``schedule="two-pass"``: the reference's accelerate pass followed by a
  verification pass, for comparison.

A draft is accepted iff it equals the token the model selects at that
position (the greedy token, or with sampling the token sampled there, as
mlx-lm's speculative decoding does), so drafting never changes the output.
"""

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .cache import KVCache, PromptCache
from .config import MemoSightConfig
from .errors import GenerationError
from .kernels import CompactMask
from .layout import Pass, PassBuilder, StepState
from .model import TokenPositions, forward
from .options import MAX_DRAFT_LEN, GenerationOptions
from .policy import DraftPolicy, PassCost
from .sampling import select


@dataclass
class TokenEvent:
    """One committed token, as the engine produces it."""

    token: int
    from_draft: bool
    compress_event: bool  # a compress pass ran just before this token
    kv_entries: int
    forward_passes: int


@dataclass
class GenerationStats:
    """What a generation cost and what it saved. ``peak_kv_tokens`` counts the
    cache right after each pass, temporary foresight and draft entries
    included (as the reference does); ``plain_kv_tokens`` is what plain
    decoding would hold at the end (prompt plus every generated token)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose entries came from a prompt cache
    prompt_time: float = 0.0
    prefill_passes: int = 0
    generated_tokens: int = 0
    generation_time: float = 0.0
    forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    finish_reason: Optional[str] = None
    compress_events: int = 0
    peak_kv_tokens: int = 0
    final_kv_tokens: int = 0
    plain_kv_tokens: int = 0
    peak_memory_gb: float = 0.0
    draft_policy: Optional[str] = None  # the choices of the drafting policy, when it chose

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_time if self.generation_time else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.generated_tokens / self.forward_passes if self.forward_passes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            prompt_tps=self.prompt_tps,
            generation_tps=self.generation_tps,
            tokens_per_pass=self.tokens_per_pass,
        )
        return d


class Engine:
    """Decodes with MemoSight drafting and compression over one KV cache.

    Args:
        model: an mlx-lm Qwen2 / Llama model made ready by
            :func:`mlx_memosight.model.attach_token_rope`.
        cfg: the model's MemoSight configuration; ``None`` for a plain model
            (plain decoding only).
        draft_len: foresight tokens per set (``g``); None: chosen before each
            pass by :class:`mlx_memosight.policy.DraftPolicy` (the two-pass
            schedule takes ``cfg.draft_len``).
        foresight: draft with foresight tokens.
        compress: compress finished steps into memory tokens and evict them.
        schedule: ``"fused"`` or ``"two-pass"``.
        foresight_sets: in the fused pass, a foresight set after every draft
            prefix (``"all"``: drafts survive any rejection; best where extra
            tokens in a pass cost little: GPUs, CPUs with a fast BLAS) or
            only after the whole block (``"last"``: fewer tokens per pass;
            after a rejection the next pass drafts afresh; best where every
            token in a pass costs compute, as with MLX's Linux wheel and its
            reference BLAS); ``"auto"``: chosen before each pass by the
            policy.
        prefill_step_size: prompt chunk size.
        sampler: mlx-lm's sampler (``sampler(logprobs) -> tokens``); None
            decodes greedily.
        logits_processors: mlx-lm's logits processors
            (``processor(tokens, logits) -> logits``); each row of a pass is
            processed with its own history (prompt, committed tokens and the
            draft prefix before it), which starts afresh with each generation.
        stop_ids: ids that end generation (the template's EOS is always one).
        max_position: the model's context; generation stops before it.

    The MemoSight settings are checked against
    :class:`mlx_memosight.options.GenerationOptions` (the error names the
    parameter).
    """

    def __init__(self, model, cfg: Optional[MemoSightConfig], *, draft_len: Optional[int] = None,
                 foresight: bool = True, compress: bool = True, schedule: str = "fused",
                 foresight_sets: str = "auto", prefill_step_size: int = 2048,
                 sampler: Optional[Callable] = None, logits_processors: Sequence[Callable] = (),
                 stop_ids: Sequence[int] = (), max_position: Optional[int] = None):
        for name, value in (("draft_len", draft_len), ("foresight", foresight), ("compress", compress),
                            ("schedule", schedule), ("foresight_sets", foresight_sets),
                            ("prefill_step_size", prefill_step_size)):
            GenerationOptions.check(name, value)
        self.model = model
        self.cfg = cfg
        self.schedule = schedule
        if cfg is None:
            foresight = compress = False
        g = cfg.draft_len if (cfg is not None and draft_len is None) else (draft_len or 0)
        self.draft_len = g if foresight else 0
        self.foresight_sets = foresight_sets
        self.policy: Optional[DraftPolicy] = None
        if foresight and schedule == "fused" and (draft_len is None or foresight_sets == "auto"):
            if draft_len is None:
                # drafts up to one position past the trained foresight offsets
                self.draft_len = min(MAX_DRAFT_LEN, max(cfg.draft_len, cfg.max_offset + 2))
            self.policy = DraftPolicy(PassCost.for_model(model), self.draft_len, cfg.max_offset,
                                      draft_len, None if foresight_sets == "auto" else foresight_sets)
        self.compress = compress
        self.builder = PassBuilder(cfg)
        self.sampler = sampler
        self.processors = list(logits_processors or ())
        self._tokens: Optional[mx.array] = None  # prompt + committed tokens, for the processors
        self.stop_ids = set(int(i) for i in stop_ids)
        if cfg is not None:
            self.stop_ids.add(cfg.token_ids.eos)
        self.splitter = cfg.token_ids.splitter if cfg is not None else None
        self.prefill_step_size = prefill_step_size
        self.max_position = max_position or getattr(model.args, "max_position_embeddings", None)
        self.stats = GenerationStats()
        self.cache: Optional[KVCache] = None

    # -- passes --------------------------------------------------------------
    def _run(self, p: Pass, rows: np.ndarray, tokens: Optional[mx.array] = None) -> mx.array:
        """Run one pass over the cache; logits at ``rows``."""
        cache = self.cache
        n = len(p)
        pos = p.positions
        if n == 1 or np.array_equal(pos, np.arange(pos[0], pos[0] + n)):
            positions = int(pos[0])
        else:
            positions = TokenPositions(mx.array(pos)[None])
        if p.rule.is_causal():
            mask = None if n == 1 else "causal"
        else:
            mask = CompactMask.from_rule(p.rule)
        cache.begin_pass(positions, mask)
        x = tokens if tokens is not None else mx.array(p.tokens)
        logits = forward(self.model, x, None, cache=cache, rows=mx.array(rows))
        self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, cache.length)
        return logits[0]

    def _prefill(self, prompt: List[int], start: int = 0) -> mx.array:
        """Prefill the prompt from token ``start`` (the cache holds the
        entries before it); returns the logits at its last token.

        All but the last token go in chunks of which only the KV entries are
        evaluated (as mlx-lm does: the last layer's attention output and MLP
        never run for them), then the last token alone gives the logits."""
        n = len(prompt)
        while n - start > 1:
            chunk = prompt[start : min(start + self.prefill_step_size, n - 1)]
            self._run(self.builder.prefill(chunk, start, self.cache.length), np.array([len(chunk) - 1]))
            self.stats.prefill_passes += 1
            mx.eval([x for c in self.cache.layers for x in (c.keys, c.values)])
            start += len(chunk)
        self.stats.prefill_passes += 1
        return self._run(self.builder.prefill(prompt[start:], start, self.cache.length), np.array([0]))

    # -- selection -----------------------------------------------------------
    def _commit(self, tokens):
        """Add committed tokens (ints, or a lazy token array) to the history
        the logits processors see."""
        if self.processors:
            t = tokens if isinstance(tokens, mx.array) else mx.array(tokens, mx.int32)
            self._tokens = mx.concatenate([self._tokens, t.reshape(-1).astype(mx.int32)])

    def _select(self, logits: mx.array, prefixes=None, groups=None) -> mx.array:
        """Tokens for logits rows ``(R, V)``. Without processors only the
        sampler matters; with them, rows of group ``j`` see the committed
        history followed by ``prefixes[j]``."""
        if not self.processors:
            return select(logits, self.sampler)
        if prefixes is None:
            histories = [self._tokens]
        else:
            histories = [mx.concatenate([self._tokens, mx.array(x, mx.int32)]) for x in prefixes]
        return select(logits, self.sampler, self.processors, histories, groups)

    # -- the loop ------------------------------------------------------------
    def generate(self, prompt: Sequence[int], max_tokens: int,
                 prompt_cache: Optional[PromptCache] = None) -> Iterator[TokenEvent]:
        """Yield the committed tokens one by one.

        Args:
            prompt: the prompt's token ids.
            max_tokens: committed output tokens at most (content tokens,
                splitters and EOS; memory and continue tokens are not output).
            prompt_cache: reuse the entries of a kept prompt that starts the
                same way, and keep this prompt's (``stats.cached_prompt_tokens``
                says how many were reused).
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError("the prompt is empty")
        GenerationOptions.check("max_tokens", max_tokens)
        if self.max_position is not None and len(prompt) >= self.max_position:
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens but the model's context is "
                f"{self.max_position} (max_position_embeddings)"
            )
        reused, cache = (0, None) if prompt_cache is None else prompt_cache.fetch(prompt, len(self.model.layers))
        self.cache = cache if cache is not None else KVCache.for_model(self.model)
        self.stats = GenerationStats(prompt_tokens=len(prompt), cached_prompt_tokens=reused)
        if self.policy is not None:
            self.policy.reset()
        tic = time.perf_counter()
        logits = self._prefill(prompt, reused)
        if prompt_cache is not None:
            prompt_cache.store(prompt, self.cache)
        if not mx.all(mx.isfinite(logits)).item():
            raise GenerationError("the model computed NaN or infinite logits from the prompt: its "
                                  "weights hold NaN or inf, or its activations overflow this dtype")
        self._tokens = mx.array(prompt, mx.int32) if self.processors else None
        anchor = int(self._select(logits)[0].item())
        self.stats.prompt_time = time.perf_counter() - tic
        tic = time.perf_counter()
        P = len(prompt)
        state = _State(anchor=anchor, position=P, step=StepState(self.cache.length, P),
                       drafts=None if self.schedule == "two-pass" else [])
        for event in self._loop(state, max_tokens):
            self.stats.generated_tokens += 1
            self.stats.generation_time = time.perf_counter() - tic
            yield event
        self.stats.generation_time = time.perf_counter() - tic
        if self.policy is not None:
            self.stats.draft_policy = self.policy.summary()
        self.stats.final_kv_tokens = self.cache.length
        self.stats.plain_kv_tokens = P + self.stats.generated_tokens
        self.stats.peak_memory_gb = mx.get_peak_memory() / 1e9

    def _event(self, token, from_draft=False, compressed=False) -> TokenEvent:
        return TokenEvent(int(token), from_draft, compressed, self.cache.length, self.stats.forward_passes)

    def _loop(self, s: "_State", max_tokens: int) -> Iterator[TokenEvent]:
        committed = 1
        compressed = False
        self._commit([s.anchor])
        yield self._event(s.anchor)
        lookahead = None  # plain decoding: the pass feeding the anchor is already issued
        while True:
            done = None
            if s.anchor in self.stop_ids:
                done = "stop"
            elif committed >= max_tokens or (
                self.max_position is not None and s.position + 1 >= self.max_position
            ):
                done = "length"
            if done:
                if lookahead is not None:
                    self.cache.trim(1)
                self.stats.finish_reason = done
                return
            g, layout = self._choice() if lookahead is None else (0, "last")
            if self.compress and s.anchor == self.splitter:
                if lookahead is not None:
                    # the splitter was fed as a plain token ahead of time
                    self.cache.trim(1)
                    lookahead = None
                self._compress(s, g)
                compressed = True
                accepted, new = [], [s.anchor]
            elif not g:
                s.drafts = [] if s.drafts is not None else None
                lookahead = self._plain_step(s, lookahead, speculate=committed + 1 < max_tokens)
                accepted, new = [], [s.anchor]
            elif self.schedule == "fused":
                accepted, new = self._fused(s, max_tokens - committed, g, layout)
            else:
                accepted, new = self._two_pass(s, max_tokens - committed)
            for t in accepted:
                committed += 1
                yield self._event(t, from_draft=True, compressed=compressed)
                compressed = False
            for t in new:
                committed += 1
                yield self._event(t, compressed=compressed)
                compressed = False

    def _decode_lazy(self, token: mx.array, position: int) -> mx.array:
        """Issue a one-token pass feeding ``token`` (possibly not yet
        computed) at ``position``; returns the next token, lazily.

        This is the layout's plain decode pass (one token, causal, nothing
        hidden), which needs neither a mask nor per-token positions; building
        it directly keeps per-token overhead at mlx-lm's level."""
        self.cache.begin_pass(position, None)
        logits = forward(self.model, token.reshape(1, 1), None, cache=self.cache)
        self.stats.forward_passes += 1
        self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, self.cache.length)
        return self._select(logits[0])

    def _plain_step(self, s: "_State", lookahead, speculate: bool):
        """Plain decoding, pipelined as mlx-lm does: the pass feeding the next
        token is issued before that token is read back, so the device never
        waits for Python. Returns the pass already issued for the new anchor."""
        y = lookahead if lookahead is not None else self._decode_lazy(mx.array([s.anchor]), s.position)
        self._commit(y)
        ahead = None
        if speculate:
            ahead = self._decode_lazy(y, s.position + 1)
            mx.async_eval(ahead)
        s.anchor = int(y.item())
        s.position += 1
        return ahead

    def _choice(self):
        """``(draft length, foresight layout)`` for the next pass."""
        if self.policy is None:
            return self.draft_len, self.foresight_sets
        return self.policy.choose()

    def _compress(self, s: "_State", g: int):
        """The compress pass: ends the step whose splitter is the anchor."""
        start_len = self.cache.length
        p = self.builder.compress(s.step, start_len, draft_len=g)
        rows = np.concatenate([p.exact_rows] + p.foresight_rows) if g else p.exact_rows
        logits = self._run(p, rows)
        self.stats.forward_passes += 1
        self.stats.compress_events += 1
        tokens = self._select(logits).tolist()
        self.cache.trim(len(p) - p.keep)
        self.cache.evict(*p.evict)
        L = start_len - s.step.start_slot + 1
        begin = s.step.begin + L + 1
        s.step = StepState(self.cache.length, begin)
        s.anchor = int(tokens[0])
        s.position = begin
        s.drafts = [int(t) for t in tokens[1:]]
        self._commit([s.anchor])

    def _acceptable(self, draft: int) -> bool:
        return draft not in self.stop_ids and not (self.compress and draft == self.splitter)

    def _fused(self, s: "_State", budget: int, g: int, layout: str = "all"):
        """One pass over ``[a, d_1..d_k]`` plus, when ``g > 0``, a foresight set
        of ``g`` tokens after every prefix: verifies the drafts and drafts the
        next block. With ``g == 0`` it is the reference's verification pass (or
        plain decoding when there are no drafts)."""
        drafts = s.drafts[: max(0, budget - 1)]
        k = len(drafts)
        prefixes = [k] if layout == "last" else None
        p = self.builder.decode(s.anchor, s.position, self.cache.length, drafts, g, prefixes)
        rows = np.concatenate([p.exact_rows] + p.foresight_rows) if g else p.exact_rows
        logits = self._run(p, rows)
        self.stats.forward_passes += 1
        self.stats.drafted_tokens += k
        # row i of the verified block follows the anchor and drafts[:i]; a
        # foresight set follows the prefix it was placed after
        groups = list(range(k + 1)) + [j for j in p.foresight_prefixes for _ in range(g)]
        tokens = self._select(logits, [p.tokens[: i + 1] for i in range(k + 1)], groups).tolist()
        right = 0
        while right < k and drafts[right] == tokens[right]:
            right += 1
        n = 0
        while n < right and self._acceptable(drafts[n]):
            n += 1
        if self.policy is not None and k:
            self.policy.observe(k, right)
        self.stats.accepted_draft_tokens += n
        self.cache.trim(len(p) - (1 + n))
        accepted = drafts[:n]
        s.anchor = int(tokens[n])
        s.position += n + 1
        s.drafts = []
        if n in p.foresight_prefixes:
            start = k + 1 + p.foresight_prefixes.index(n) * g
            s.drafts = [int(t) for t in tokens[start : start + g]]
        self._commit(accepted + [s.anchor])
        return accepted, [s.anchor]

    def _two_pass(self, s: "_State", budget: int):
        """The reference's schedule: an accelerate pass ``[a, R x g]`` commits
        the next token and drafts after it; the following iteration verifies
        ``[d_0 .. d_g]`` in a pass of its own. After a compress pass the drafts
        come from the compress pass and verification follows directly."""
        if s.drafts is None:
            p = self.builder.decode(s.anchor, s.position, self.cache.length, (), self.draft_len)
            logits = self._run(p, np.concatenate([p.exact_rows] + p.foresight_rows))
            self.stats.forward_passes += 1
            tokens = self._select(logits).tolist()
            self.cache.trim(self.draft_len)
            s.anchor = int(tokens[0])
            s.position += 1
            s.drafts = [int(t) for t in tokens[1:]]
            self._commit([s.anchor])
            return [], [s.anchor]
        accepted, new = self._fused(s, budget, 0)
        s.drafts = None
        return accepted, new


@dataclass
class _State:
    anchor: int
    position: int
    step: StepState
    drafts: Optional[List[int]] = field(default_factory=list)
