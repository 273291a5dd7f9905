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
from functools import partial
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import BatchKVCache, KVCache, PassLayer, PromptCache
from .config import MemoSightConfig
from .errors import GenerationError
from . import kernels
from .kernels import CompactMask
from .layout import NEVER, Pass, PassBuilder, StepState
from .model import TokenPositions, forward, lm_head
from .options import MAX_DRAFT_LEN, GenerationOptions
from .policy import DraftPolicy, PassCost, acceptance_for
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
    included (as the reference does; a pass issued ahead and dropped unread
    is not counted); ``plain_kv_tokens`` is what plain
    decoding would hold at the end (prompt plus every generated token)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose entries came from a prompt cache
    prompt_time: float = 0.0
    prefill_passes: int = 0
    generated_tokens: int = 0
    generation_time: float = 0.0
    forward_passes: int = 0
    pass_tokens: int = 0  # tokens fed to the decoder over all forward passes
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    finish_reason: Optional[str] = None
    compress_events: int = 0
    peak_kv_tokens: int = 0
    final_kv_tokens: int = 0
    plain_kv_tokens: int = 0
    peak_memory_gb: float = 0.0
    draft_policy: Optional[str] = None  # the choices of the drafting policy, when it chose
    discarded_passes: int = 0  # passes issued ahead for "every draft accepted" and dropped (not counted above)

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


COMPILED_MAX_TOKENS = 64  # wider passes (prompt chunks) are built op by op
COMPILED_KEY_STEP = 64


def compiled_keys(entries: int) -> int:
    """The key slots a compiled pass attends over when the cache holds
    ``entries`` with the pass's own: rounded up to a multiple of
    ``COMPILED_KEY_STEP``, or of an eighth to a quarter of ``entries`` when
    that is more, so that a generation of thousands of tokens needs a few
    dozen compiled graphs per pass width, not one per 64 entries, for at most
    a quarter more keys (hidden by the mask)."""
    step = max(COMPILED_KEY_STEP, 1 << max(0, entries.bit_length() - 3))
    return -(-entries // step) * step


class _TracedPass:
    __slots__ = ("offset", "mask", "start", "num_keys")

    def __init__(self, offset, mask, start, num_keys):
        self.offset, self.mask, self.start, self.num_keys = offset, mask, start, num_keys


class _TracedLayer(PassLayer):
    """One layer's cache inside a compiled pass (mlx-lm's cache protocol):
    the pass's entries go into the whole buffer at the traced slot
    ``start``; attention reads the first ``num_keys`` slots."""

    def __init__(self, current: _TracedPass, keys: mx.array, values: mx.array):
        self._pass, self.keys, self.values = current, keys, values

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = mx.slice_update(self.keys, keys, self._pass.start, axes=(2,))
        self.values = mx.slice_update(self.values, values, self._pass.start, axes=(2,))
        n = self._pass.num_keys
        return self.keys[..., :n, :], self.values[..., :n, :]


def _compiled_pass(model, tokens, positions, start, query_slot, query_limit, until, rows, *buffers):
    """The function :meth:`Engine._run_compiled` compiles: logits at
    ``rows`` and the updated buffers."""
    current = _TracedPass(TokenPositions(positions), CompactMask(query_slot, query_limit, until), start,
                          until.shape[0])
    layers = [_TracedLayer(current, buffers[2 * i], buffers[2 * i + 1]) for i in range(len(buffers) // 2)]
    logits = forward(model, tokens, None, cache=layers, rows=rows)
    return (logits,) + tuple(a for c in layers for a in (c.keys, c.values))


class _TracedBatchLayer(_TracedLayer):
    """A batch's layer cache inside a compiled pass: row ``b``'s block goes
    to its own slots (``index``, ``(B, 1, N, 1)``)."""

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        index = self._pass.start
        self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, index, values, axis=2)
        n = self._pass.num_keys
        return self.keys[..., :n, :], self.values[..., :n, :]


def _compiled_batch_pass(model, tokens, positions, index, query_slot, query_limit, until, rows, *buffers):
    """The batched pass compiled (:meth:`BatchEngine._issue`): logits at
    each row's ``rows`` and the updated buffers."""
    current = _TracedPass(TokenPositions(positions), CompactMask(query_slot, query_limit, until), index,
                          until.shape[-1])
    layers = [_TracedBatchLayer(current, buffers[2 * i], buffers[2 * i + 1]) for i in range(len(buffers) // 2)]
    h = forward(model, tokens, None, cache=layers, hidden=True)
    logits = lm_head(model, mx.take_along_axis(h, rows[..., None], axis=1))
    return (logits,) + tuple(a for c in layers for a in (c.keys, c.values))


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

    pipeline = True  # issue the next pass before reading the current one where it can be foreseen
    # a sequence's drafting policy starts from the acceptance earlier sequences
    # of the model saw (policy.Acceptance); the batch engine's rows start from
    # the prior (README, Batched decoding: sharing it there took no fewer
    # iterations or tokens and measured no gain: examples/drafting_choices.py)
    shares_acceptance = True
    # Run decoding passes (up to COMPILED_MAX_TOKENS tokens) as one compiled
    # MLX function (see _run_compiled); off: each pass's graph is built op by op.
    compiled = True

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
        self._policy_args = None  # DraftPolicy's arguments; each sequence gets its own policy
        if foresight and schedule == "fused" and (draft_len is None or foresight_sets == "auto"):
            if draft_len is None:
                # drafts up to one position past the trained foresight offsets
                self.draft_len = min(MAX_DRAFT_LEN, max(cfg.draft_len, cfg.max_offset + 2))
            self._policy_args = (PassCost.for_model(model), self.draft_len, cfg.max_offset,
                                 draft_len, None if foresight_sets == "auto" else foresight_sets)
        self.policy: Optional[DraftPolicy] = self.new_policy()  # the last generation's
        self.compress = compress
        self.builder = PassBuilder(cfg)
        self.sampler = sampler
        self.processors = list(logits_processors or ())
        self.stop_ids = set(int(i) for i in stop_ids)
        if cfg is not None:
            self.stop_ids.add(cfg.token_ids.eos)
        self.splitter = cfg.token_ids.splitter if cfg is not None else None
        self.prefill_step_size = prefill_step_size
        self.max_position = max_position or getattr(model.args, "max_position_embeddings", None)
        self.stats = GenerationStats()
        self.cache: Optional[KVCache] = None
        self._compiled_fns: dict = {}  # traced function -> compiled (_compiled_function)

    def new_policy(self) -> Optional[DraftPolicy]:
        """A drafting policy for one sequence (None where nothing is chosen),
        starting from the acceptance seen with this model so far (where
        :attr:`shares_acceptance`; else from the prior)."""
        if self._policy_args is None:
            return None
        seen = acceptance_for(self.model, self.draft_len) if self.shares_acceptance else None
        return DraftPolicy(*self._policy_args, seen=seen)

    # -- passes --------------------------------------------------------------
    def _run(self, seq: "Decoding", p: Pass, rows: np.ndarray, tokens: Optional[mx.array] = None) -> mx.array:
        """Run one pass of one sequence over its cache; logits at ``rows``."""
        if self.compiled:
            logits = self._run_compiled(seq, p, rows, tokens)
            if logits is not None:
                return logits
        cache = seq.cache
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
        seq.stats.peak_kv_tokens = max(seq.stats.peak_kv_tokens, cache.length)
        return logits[0]

    def _run_compiled(self, seq: "Decoding", p: Pass, rows: np.ndarray, tokens: Optional[mx.array] = None):
        """:meth:`_run` as one compiled function (:meth:`_call_compiled`);
        None where that does not apply."""
        x = tokens if tokens is not None else mx.array(p.tokens)
        r = p.rule
        return self._call_compiled(seq, x, p.positions, r.query_slot, r.query_limit, r.key_visible_until, rows)

    def _call_compiled(self, seq: "Decoding", x: mx.array, positions, query_slot, query_limit,
                       visible: Optional[np.ndarray], rows) -> Optional[mx.array]:
        """One pass of ``seq`` as one compiled function (``mx.compile``) of
        the pass's arrays and the cache's whole buffers, which it returns with
        the pass's entries written in (in place: the cache lets go of them
        during the pass); logits at ``rows``. ``visible``: the rule's
        ``key_visible_until`` over the cache and the pass (None: every key
        stays visible). Positions and the mask always go in as arrays, and
        the keys attended are the cache's slots rounded up
        (:func:`compiled_keys`; the mask hides the slots past the pass), so
        passes of the same width reuse one compiled graph across cache
        lengths: MLX builds it once instead of op by op in every pass, and
        fuses its elementwise work. None where it does not apply (a pass
        wider than ``COMPILED_MAX_TOKENS``, an empty cache, the Metal kernels
        in use)."""
        cache, n = seq.cache, len(positions)
        start = cache.length
        if n > COMPILED_MAX_TOKENS or cache.layers[0].keys is None or kernels.kernels_available():
            return None
        keys = compiled_keys(start + n)
        for c in cache.layers:
            c.reserve(keys)
        until = np.full(keys, NEVER, np.int32)
        if visible is not None:
            until[: start + n] = visible
        fn = self._compiled_function()
        out = fn(x.reshape(1, n), mx.array(positions, mx.int32)[None], mx.array([start], mx.int32),
                 mx.array(query_slot, mx.int32), mx.array(query_limit, mx.int32), mx.array(until),
                 mx.array(rows, mx.int32), *cache.take_buffers())
        cache.put_buffers(out[1:], start + n)
        seq.stats.peak_kv_tokens = max(seq.stats.peak_kv_tokens, cache.length)
        return out[0][0]

    def _compiled_function(self, traced=_compiled_pass):
        """``traced`` compiled for this model: once per model, so that every
        engine of a process reuses the graphs already built, unless its
        weights were replaced since (a compiled graph holds the arrays it was
        built with)."""
        fn = self._compiled_fns.get(traced)
        if fn is None:
            weights = tuple(id(a) for _, a in tree_flatten(self.model.parameters()))
            name = f"_memosight{traced.__name__}"
            held = self.model.__dict__.get(name)
            if held is None or held[0] != weights:
                held = self.model.__dict__[name] = (weights, mx.compile(partial(traced, self.model)))
            fn = self._compiled_fns[traced] = held[1]
        return fn

    def _prefill(self, seq: "Decoding", prompt: List[int], start: int = 0) -> mx.array:
        """Prefill the prompt from token ``start`` (the cache holds the
        entries before it); returns the logits at its last token.

        All but the last token go in chunks of which only the KV entries are
        evaluated (as mlx-lm does: the last layer's attention output and MLP
        never run for them), then the last token alone gives the logits."""
        n = len(prompt)
        cache = seq.cache
        while n - start > 1:
            chunk = prompt[start : min(start + self.prefill_step_size, n - 1)]
            self._run(seq, self.builder.prefill(chunk, start, cache.length), np.array([len(chunk) - 1]))
            seq.stats.prefill_passes += 1
            mx.eval(cache.state_arrays())
            start += len(chunk)
        seq.stats.prefill_passes += 1
        return self._run(seq, self.builder.prefill(prompt[start:], start, cache.length), np.array([0]))

    def start(self, prompt: Sequence[int], max_tokens: int, prompt_cache: Optional[PromptCache] = None,
              **selection) -> "Decoding":
        """Check the prompt, prefill it into a cache of its own and choose
        the first token: a :class:`Decoding` whose first event is pending.
        ``selection``: the sequence's own ``sampler``, ``logits_processors``
        and ``seed`` (see :class:`Decoding`)."""
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
        seq = Decoding(self, cache if cache is not None else KVCache.for_model(self.model), prompt, max_tokens,
                       **selection)
        seq.stats.cached_prompt_tokens = reused
        tic = time.perf_counter()
        logits = self._prefill(seq, prompt, reused)
        if prompt_cache is not None:
            prompt_cache.store(prompt, seq.cache)
        if not mx.all(mx.isfinite(logits)).item():
            raise GenerationError("the model computed NaN or infinite logits from the prompt: its "
                                  "weights hold NaN or inf, or its activations overflow this dtype")
        seq.begin(int(seq.select(logits, at=len(prompt))[0].item()))
        seq.stats.prompt_time = time.perf_counter() - tic
        return seq

    # -- the loop ------------------------------------------------------------
    def generate(self, prompt: Sequence[int], max_tokens: int,
                 prompt_cache: Optional[PromptCache] = None, **selection) -> Iterator[TokenEvent]:
        """Yield the committed tokens one by one.

        Args:
            prompt: the prompt's token ids.
            max_tokens: committed output tokens at most (content tokens,
                splitters and EOS; memory and continue tokens are not output).
            prompt_cache: reuse the entries of a kept prompt that starts the
                same way, and keep this prompt's (``stats.cached_prompt_tokens``
                says how many were reused).
            selection: this sequence's ``sampler``, ``logits_processors``
                or ``seed`` instead of the engine's (see :class:`Decoding`).
        """
        seq = self.start(prompt, max_tokens, prompt_cache, **selection)
        self.cache, self.stats, self.policy = seq.cache, seq.stats, seq.policy
        tic = time.perf_counter()
        for event in self._loop(seq):
            seq.stats.generation_time = time.perf_counter() - tic
            yield event
        seq.stats.generation_time = time.perf_counter() - tic
        seq.finish()

    def _loop(self, seq: "Decoding") -> Iterator[TokenEvent]:
        yield from seq.take_events()
        lookahead = None  # plain decoding: the pass feeding the anchor is already issued
        ahead = None  # drafting: the next fused pass, issued before the last one was read: (plan, tokens)
        compress_after_lookahead = False
        while True:
            done = seq.done()
            if done:
                if lookahead is not None:
                    seq.cache.trim(1)
                seq.stats.finish_reason = done
                return
            if lookahead is not None and seq.must_compress():
                # the splitter was fed as a plain token ahead of time: its
                # entry is the compress pass's first row, so the pass starts
                # after it; it drafts nothing, as the plain steps before it
                lookahead = None
                compress_after_lookahead = True
            chosen = None
            if ahead is not None:
                (plan, chosen), ahead = ahead, None
            elif lookahead is None:
                plan = seq.plan(drafting=not compress_after_lookahead, splitter_cached=compress_after_lookahead)
            compress_after_lookahead = False
            if lookahead is not None or plan.kind == "decode":
                lookahead = self._plain_step(seq, lookahead, speculate=seq.committed + 1 < seq.max_tokens)
            elif plan.kind == "fused" and self.pipeline and seq.greedy:
                ahead = self._fused_step(seq, plan, chosen)
            else:
                logits = self._run(seq, plan.p, plan.rows)
                seq.apply(plan, seq.select(logits, plan).tolist())
            yield from seq.take_events()

    def _fused_step(self, seq: "Decoding", plan: "Plan", chosen: Optional[mx.array]):
        """Run a fused pass (greedy), pipelined: while it computes, the next
        fused pass is built and issued as it will be if every draft is
        accepted (its anchor and drafts fed lazily from this pass's tokens,
        the cache already trimmed to the accepted block). Then this pass is
        read and applied; the pass issued ahead is returned to be taken next
        when every draft was accepted and decoding goes on with drafting,
        and dropped otherwise (its entries trimmed, the policy's choice for
        it undone). Either way the tokens are those of the unpipelined loop.
        ``chosen``: this pass's tokens when it was itself issued ahead."""
        if chosen is None:
            chosen = seq.select(self._run(seq, plan.p, plan.rows), plan)
            mx.async_eval(chosen)
        nxt = self._issue_after(seq, plan, chosen)
        tokens = chosen.tolist()
        if nxt is None:
            seq.apply(plan, tokens)
            return None
        after, lazy, source, saved = nxt
        return (after, lazy) if self._take_after(seq, plan, tokens, after, source, saved) else None

    def _issue_after(self, seq: "Decoding", plan: "Plan", chosen: mx.array):
        """Issue the fused pass that follows ``plan`` if all its drafts are
        accepted (see :meth:`_fused_step`); returns ``(its plan, its tokens
        (lazy), where its drafts are among this pass's tokens, the policy
        state and counts to go back to)``, or None where that pass cannot be
        foreseen (the cache is then as it was)."""
        planned = self._plan_after(seq, plan)
        if planned is None:
            return None
        after, source, saved = planned
        x = self._after_tokens(plan, after, source, chosen)
        lazy = seq.select(self._run(seq, after.p, after.rows, tokens=x[None]), after)
        mx.async_eval(lazy)
        return after, lazy, source, saved

    @staticmethod
    def _after_tokens(plan: "Plan", after: "Plan", source: int, chosen: mx.array) -> mx.array:
        """The tokens of the pass :meth:`_plan_after` planned after ``plan``:
        its anchor and drafts as ``plan``'s pass selects them (``chosen``,
        not yet computed), then its foresight tokens."""
        n, k = len(after.drafts), len(plan.drafts)
        return mx.concatenate([chosen[k : k + 1], chosen[source : source + n],
                               mx.array(after.p.tokens[1 + n :])]).astype(mx.int32)

    def _plan_after(self, seq: "Decoding", plan: "Plan"):
        """The fused pass that follows ``plan`` (run, not yet read) if all its
        drafts are accepted: ``(its plan, where its drafts are among the
        tokens ``plan`` selects, the policy state and counts to go back to)``,
        with the cache trimmed to ``plan``'s anchor and drafts; its anchor and
        drafts are placeholders until :meth:`_take_after`. None where that
        pass cannot be foreseen (nothing changed)."""
        s, p = seq.state, plan.p
        k, g = len(plan.drafts), plan.g
        committed, position = seq.committed + k + 1, s.position + k + 1
        if (not g or k not in p.foresight_prefixes or committed >= seq.max_tokens
                or not all(seq._acceptable(d) for d in plan.drafts)
                or (self.max_position is not None and position + 1 >= self.max_position)):
            return None
        policy = seq.policy
        # what to go back to when the pass is dropped: the policy's choices and the counts before it
        saved = (policy.choices() if policy is not None else None, seq.stats.accepted_draft_tokens,
                 seq.stats.peak_kv_tokens)
        g2, layout = seq._choice()
        n = min(g, max(0, seq.max_tokens - committed - 1))
        if not g2:
            if policy is not None:
                policy.undo_choices(saved[0])
            return None
        seq.cache.trim(len(p) - (1 + k))
        p2 = self.builder.decode(0, position, seq.cache.length, [0] * n, g2, [n] if layout == "last" else None)
        source = k + 1 + p.foresight_prefixes.index(k) * g
        rows_read = np.concatenate([p2.exact_rows] + p2.foresight_rows)
        groups = list(range(n + 1)) + [j for j in p2.foresight_prefixes for _ in range(g2)]
        return Plan("fused", p2, rows_read, [0] * n, g2, groups, None), source, saved

    def _take_after(self, seq: "Decoding", plan: "Plan", tokens: List[int], after: "Plan", source: int,
                    saved) -> bool:
        """Apply ``plan`` (its tokens read) while the pass :meth:`_plan_after`
        planned after it is in the cache too; True when that pass stands
        (every draft accepted, decoding goes on with drafting: its anchor and
        drafts are filled in), else it is dropped (its entries trimmed, the
        policy's choice for it undone) and False."""
        choices, accepted, peak = saved
        k, width = len(plan.drafts), len(after.p)
        seq.cache.trim(width)
        seq.apply(plan, tokens, held=1 + k)
        s = seq.state
        n = len(after.drafts)
        if (seq.stats.accepted_draft_tokens - accepted == k and seq.done() is None and not seq.must_compress()
                and len(s.drafts) >= n):
            seq.cache.restore(width)
            drafts = [int(t) for t in tokens[source : source + n]]
            after.drafts[:] = drafts
            after.p.tokens[: n + 1] = [s.anchor] + drafts
            after.prefixes = [after.p.tokens[1 : i + 1] for i in range(n + 1)]
            return True
        if seq.policy is not None:
            seq.policy.undo_choices(choices)
        seq.stats.peak_kv_tokens = max(peak, seq.cache.length)
        seq.stats.discarded_passes += 1
        return False

    def _decode_lazy(self, seq: "Decoding", token: mx.array, position: int) -> mx.array:
        """Issue a one-token pass feeding ``token`` (possibly not yet
        computed) at ``position``; returns the next token, lazily.

        This is the layout's plain decode pass (one token, causal, nothing
        hidden), which needs neither a mask nor per-token positions; building
        it directly keeps per-token overhead at mlx-lm's level."""
        n = seq.cache.length
        logits = self._call_compiled(seq, token, [position], [n], [n + 1], None, [0]) if self.compiled else None
        if logits is None:
            seq.cache.begin_pass(position, None)
            logits = forward(self.model, token.reshape(1, 1), None, cache=seq.cache)[0]
        seq.stats.forward_passes += 1
        seq.stats.pass_tokens += 1
        seq.stats.peak_kv_tokens = max(seq.stats.peak_kv_tokens, seq.cache.length)
        return seq.select(logits, at=position + 1)

    def _plain_step(self, seq: "Decoding", lookahead, speculate: bool):
        """Plain decoding, pipelined as mlx-lm does: the pass feeding the next
        token is issued before that token is read back, so the device never
        waits for Python. Returns the pass already issued for the new anchor."""
        s = seq.state
        y = lookahead if lookahead is not None else self._decode_lazy(seq, mx.array([s.anchor]), s.position)
        seq.commit(y)
        ahead = None
        if speculate:
            ahead = self._decode_lazy(seq, y, s.position + 1)
            mx.async_eval(ahead)
        s.anchor = int(y.item())
        s.position += 1
        seq.emit(s.anchor)
        return ahead


@dataclass
class BatchResult:
    """What one :meth:`BatchEngine.step` did for one sequence."""

    uid: int
    events: List[TokenEvent]
    stats: GenerationStats
    finished: bool = False


class BatchEngine(Engine):
    """Decodes many sequences together, one forward pass per iteration for
    all of them (continuous batching).

    Each sequence keeps its own schedule: in the same pass one row may verify
    drafts and draft the next block while another compresses its finished
    step, and each accepts and evicts on its own. Rows are padded to the
    longest block; the compact attention rule of each row hides the padding
    and every cache slot past that row's own entries, so every sequence
    commits exactly the tokens it commits alone.

    Sequences join with :meth:`add` (prefilled on their own, then copied
    into the batch) and leave as soon as they finish (or with
    :meth:`cancel`). Settings as :class:`Engine`'s; they apply to every
    sequence.
    """

    min_chunk: Optional[int] = None  # a fixed chunk width for compress blocks (None: chunk_width decides)
    pipeline = True  # issue the next pass before reading the current one where every row can go on
    shares_acceptance = False

    def __init__(self, model, cfg: Optional[MemoSightConfig], **options):
        super().__init__(model, cfg, **options)
        self.batch = BatchKVCache(len(model.layers))
        self.sequences: List["Decoding"] = []  # in the batch's row order
        self._next_uid = 0
        self._started: dict = {}  # uid -> time of the first token
        self._pending: dict = {}  # uid -> (compress plan, tokens of it fed so far)
        self._pass_cost: Optional[PassCost] = None
        # a pass issued before the previous one was read: (feeds, its tokens, per drafting row whether
        # its block stands (None for a decoding row), per row its link to the pass before (None: decoding))
        self._ahead = None

    def __len__(self):
        return len(self.sequences)

    def add(self, prompt: Sequence[int], max_tokens: int, prompt_cache: Optional[PromptCache] = None,
            **selection) -> int:
        """Prefill a prompt and add its sequence to the batch; returns its id.
        Its first token comes with the next :meth:`step`. ``selection``: the
        sequence's own ``sampler``, ``logits_processors`` and ``seed`` (by
        default the engine's, and no seed)."""
        seq = self.start(prompt, max_tokens, prompt_cache, **selection)
        seq.cache = self.batch.add(seq.cache)
        seq.uid = self._next_uid
        self._next_uid += 1
        self.sequences.append(seq)
        self._started[seq.uid] = time.perf_counter()
        return seq.uid

    def cancel(self, uid: int) -> Optional[GenerationStats]:
        """Drop a sequence now (its client left, or a stop string ended its
        text); returns its statistics (None for an unknown id)."""
        for seq in self.sequences:
            if seq.uid == uid:
                self._retire(seq, "cancelled")
                return seq.stats
        return None

    def _retire(self, seq: "Decoding", reason: str):
        self._pending.pop(seq.uid, None)
        self._drop_ahead(seq)
        seq.stats.finish_reason = reason
        seq.stats.generation_time = time.perf_counter() - self._started.pop(seq.uid)
        seq.finish()
        self.batch.remove(seq.cache)
        self.sequences.remove(seq)

    def step(self) -> List[BatchResult]:
        """One iteration: a pass for every sequence that goes on; returns
        each sequence's new tokens, and the sequences that finished (they
        have left the batch).

        A compress block (memory tokens, ``<|continue|>``), whose logits are
        read only at its end, either widens the pass (the other rows then
        draft in that width at no extra cost) or is fed in chunks no wider
        than the other rows' blocks over several iterations, whichever the
        pass cost model finds cheaper (:meth:`chunk_width`)."""
        out, active = {}, []
        for seq in list(self.sequences):
            out[seq.uid] = BatchResult(seq.uid, seq.take_events(), seq.stats)
            reason = None if seq.uid in self._pending else seq.done()
            if reason:
                self._retire(seq, reason)
                out[seq.uid].finished = True
            else:
                active.append(seq)
        if self._ahead is not None:
            taken = self._step_ahead(out)
            if taken is not None:
                return taken
        if not active:
            return list(out.values())
        plans = {}
        for seq in active:  # compress blocks first: their width is what the others may use
            if seq.uid in self._pending:
                plans[seq.uid] = self._pending.pop(seq.uid)
            elif seq.must_compress():
                plans[seq.uid] = (seq.plan(rows=len(active)), 0)
        chunk = self.chunk_width(len(active)) if plans else None
        free = 1 if chunk is not None else max([len(p.p) - fed for p, fed in plans.values()] + [1])
        for seq in active:
            if seq.uid not in plans:
                plans[seq.uid] = (seq.plan(rows=len(active), free=free), 0)
        widths = [len(p.p) for p, _ in plans.values() if p.kind != "compress"]
        width = max(widths + [chunk]) if (widths and chunk is not None) else None
        feeds = []
        for seq in active:
            plan, fed = plans[seq.uid]
            end = len(plan.p)
            if plan.kind == "compress" and width is not None and end - fed > width and fed < int(plan.rows[0]):
                end = min(fed + width, int(plan.rows[0]))  # logits are read from rows[0] on
            feeds.append((seq, plan, fed, end))
        chosen = self._issue(feeds)
        ahead = self._issue_ahead(feeds, chosen)
        self._commit(out, feeds, self._read(feeds, chosen), ahead)
        return list(out.values())

    def _commit(self, out, feeds, tokens, ahead, go_on=None):
        """Commit each row's tokens of a pass that was read (a row whose
        compress block goes on in later passes commits nothing yet; rows not
        in ``go_on`` were dropped from it). ``ahead``: the pass issued after
        it (:meth:`_issue_ahead`), which a drafting row keeps only when every
        draft was accepted (:meth:`Engine._take_after`)."""
        now = time.perf_counter()
        kept = [None] * len(feeds)  # per drafting row of the pass ahead: whether it stands
        for b, ((seq, plan, fed, end), toks) in enumerate(zip(feeds, tokens)):
            if go_on is not None and not go_on[b]:
                continue
            if end < len(plan.p):
                self._pending[seq.uid] = (plan, end)
                seq.stats.forward_passes += 1
            elif ahead is not None and ahead[2][b] is not None:
                kept[b] = self._take_after(seq, plan, toks, ahead[0][b][1], *ahead[2][b])
            else:
                seq.apply(plan, toks)
            out[seq.uid].events += seq.take_events()
            seq.stats.generation_time = now - self._started[seq.uid]
        if ahead is not None and any(k is not False for k in kept):
            self._ahead = (ahead[0], ahead[1], kept, ahead[2])

    def chunk_width(self, rows: int) -> Optional[int]:
        """The widest chunk of a compress block in a pass of ``rows`` rows
        (None: the whole block at once). Widening a pass of ``rows`` rows by
        ``w - 1`` tokens costs ``per_token * rows * (w - 1)``; feeding the
        block a token at a time instead keeps its row idle for ``w - 1``
        more passes, a token each at ``(1 + per_token * (rows - 1)) / rows``.
        The second is cheaper when ``1 - per_token < per_token * rows *
        (rows - 1)``: with more than a few rows, unless a pass token is
        nearly free."""
        if self.min_chunk is not None:
            return self.min_chunk
        if rows < 2:
            return None
        if self._pass_cost is None:
            self._pass_cost = self._policy_args[0] if self._policy_args else PassCost.for_model(self.model)
        p = self._pass_cost.per_token
        return 1 if 1 - p < p * rows * (rows - 1) else None

    @staticmethod
    def _read(feeds, chosen) -> List[Optional[List[int]]]:
        chosen = chosen.tolist()
        return [row[: len(plan.rows)] if end == len(plan.p) else None
                for row, (_, plan, _, end) in zip(chosen, feeds)]

    def _issue(self, feeds, lazy_tokens: Optional[mx.array] = None) -> mx.array:
        """Build and start the pass; its selected tokens ``(B, R)``, lazily.
        ``lazy_tokens`` (``(B, 1)``): the one-token blocks' tokens, not yet
        computed (the plans hold placeholders)."""
        B = len(feeds)
        N = max(end - fed for _, _, fed, end in feeds)
        final = [end == len(plan.p) for _, plan, _, end in feeds]
        R = max([len(plan.rows) for (_, plan, _, _), f in zip(feeds, final) if f] + [1])
        starts = [seq.cache.length for seq, _, _, _ in feeds]
        K = max(starts) + N
        compiled = (self.compiled and N <= COMPILED_MAX_TOKENS and self.batch.layers[0].keys is not None
                    and not kernels.kernels_available())
        if compiled:
            K = compiled_keys(K)
        tokens = np.zeros((B, N), np.int32)
        positions = np.zeros((B, N), np.int32)
        q_slot = np.zeros((B, N), np.int32)
        q_limit = np.zeros((B, N), np.int32)
        until = np.full((B, K), NEVER, np.int32)
        rows = np.zeros((B, R), np.int32)
        for b, ((seq, plan, fed, end), start) in enumerate(zip(feeds, starts)):
            p, n = plan.p, end - fed
            tokens[b, :n], tokens[b, n:] = p.tokens[fed:end], p.tokens[end - 1]
            positions[b, :n], positions[b, n:] = p.positions[fed:end], p.positions[end - 1]
            # a padding query sees the keys before it: harmless, and never read
            pad = np.arange(start + n, start + N, dtype=np.int32)
            q_slot[b, :n], q_slot[b, n:] = p.rule.query_slot[fed:end], pad
            q_limit[b, :n], q_limit[b, n:] = p.rule.query_limit[fed:end], pad + 1
            until[b, : start + n] = p.rule.key_visible_until[: start + n]
            if final[b]:
                rows[b, : len(plan.rows)] = plan.rows - fed
            seq.stats.peak_kv_tokens = max(seq.stats.peak_kv_tokens, start + n)
        widths = [end - fed for _, _, fed, end in feeds]
        x = mx.array(tokens) if lazy_tokens is None else lazy_tokens.astype(mx.int32)
        if compiled:  # as Engine._call_compiled, for the whole batch
            index = (np.array(starts, np.int32)[:, None] + np.arange(N, dtype=np.int32))[:, None, :, None]
            for layer in self.batch.layers:
                layer.grow(K)
            fn = self._compiled_function(_compiled_batch_pass)
            out = fn(x, mx.array(positions), mx.array(index), mx.array(q_slot), mx.array(q_limit), mx.array(until),
                     mx.array(rows), *self.batch.take_buffers())
            self.batch.put_buffers(out[1:])
            for r, w in zip(self.batch.rows, widths):
                r.length += w
            logits = out[0]
        else:
            mask = CompactMask(mx.array(q_slot), mx.array(q_limit), mx.array(until))
            self.batch.begin_pass(TokenPositions(mx.array(positions)), mask, widths)
            h = forward(self.model, x, None, cache=self.batch, hidden=True)
            h = mx.take_along_axis(h, mx.array(rows)[..., None], axis=1)
            logits = lm_head(self.model, h)
        chosen = mx.argmax(logits, axis=-1)
        if not all(seq.greedy for seq, _, _, _ in feeds):
            chosen = mx.stack([
                mx.pad(seq.select(logits[b, : len(plan.rows)], plan).astype(chosen.dtype),
                       [(0, R - len(plan.rows))]) if final[b] and not seq.greedy else chosen[b]
                for b, (seq, plan, _, _) in enumerate(feeds)
            ])
        mx.async_eval(chosen)
        return chosen

    # -- pipelining -------------------------------------------------------------
    def _issue_ahead(self, feeds, chosen):
        """Issue the next pass before this one (``feeds``, selecting
        ``chosen``, lazily) is read, as it will be if every row goes on: a
        row decoding one token decodes the token being computed; a sequence
        alone in the batch that verifies drafts feeds its next fused block
        as if every draft is accepted (:meth:`Engine._plan_after`: its
        anchor and drafts are this pass's tokens, fed before they are
        read), as :class:`Engine` does. Returns ``(its feeds, its tokens
        (lazy), per row the link to this pass's plan or None)``, or None,
        with nothing changed, where the pipeline is off, a sequence joined
        or left since this pass was planned, or some row cannot be foreseen
        (its block ends the row, compresses, samples, drafts beside other
        rows, or its compress block goes on)."""
        # a drafting row goes ahead only alone: a row whose drafts are not all accepted drops its block
        # of the pass ahead, a pass slot lost, and the batch goes on ahead only while every row does
        kinds = ("decode", "fused") if len(feeds) == 1 else ("decode",)
        if not (self.pipeline and len(feeds) == len(self.sequences)
                and all(plan.kind in kinds and end == len(plan.p) and seq.greedy
                        and seq.committed + 1 < seq.max_tokens for seq, plan, _, end in feeds)):
            return None
        planned = []  # per row: (the plan ahead, link to this pass's plan: (source, saved) or None)
        for seq, plan, fed, end in feeds:
            if plan.kind == "decode":
                # the token is not known yet: the plan holds a placeholder
                planned.append((Plan.decode(self.builder, 0, seq.state.position + 1, seq.cache.length), None))
            else:  # a drafting sequence, alone
                after = self._plan_after(seq, plan)
                if after is None:
                    return None
                planned.append((after[0], after[1:]))
        ahead = [(seq, after, 0, len(after.p)) for (seq, _, _, _), (after, _) in zip(feeds, planned)]
        links = [link for _, link in planned]
        if not any(links):  # every row decodes the token it selects
            tokens = chosen[:, :1]
        else:  # a drafting sequence, alone
            ((_, plan, _, _),), ((after, link),) = feeds, planned
            tokens = self._after_tokens(plan, after, link[0], chosen[0])[None]
        return ahead, self._issue(ahead, tokens), links

    def _step_ahead(self, out) -> Optional[List[BatchResult]]:
        """Take the pass issued ahead: keep the rows that went on as it
        assumed (a decoding row whose previous token neither ended it nor
        started a compress block; a drafting row all of whose drafts were
        accepted) and drop the entries of the others; issue the next pass
        ahead again while every row goes on. None where no row goes on (the
        pass is not read; the iteration plans afresh)."""
        feeds, chosen, kept, _ = self._ahead
        self._ahead = None
        go_on = []
        for (seq, _, _, _), k in zip(feeds, kept):
            if seq not in self.sequences:
                go_on.append(False)
            elif k is None:  # a decoding row: its entry of this pass goes with it
                go_on.append(seq.done() is None and not seq.must_compress())
                if not go_on[-1]:
                    seq.cache.trim(1)
            else:  # a drafting row: its entries went when its drafts were read
                go_on.append(k)
        if not any(go_on):
            return None
        ahead = self._issue_ahead(feeds, chosen) if all(go_on) else None
        self._commit(out, feeds, self._read(feeds, chosen), ahead, go_on)
        return list(out.values())

    def _drop_ahead(self, seq: "Decoding"):
        """A sequence leaves while a pass issued ahead holds a block of it:
        take that block out of its cache and statistics (as a dropped pass)."""
        if self._ahead is None:
            return
        feeds, _, kept, links = self._ahead
        for b, (s, plan, _, _) in enumerate(feeds):
            if s is not seq or kept[b] is False:
                continue  # another row, or a block dropped already
            seq.cache.trim(len(plan.p))
            if links[b] is not None:
                choices, _, peak = links[b][1]
                if seq.policy is not None:
                    seq.policy.undo_choices(choices)
                seq.stats.peak_kv_tokens = peak
                seq.stats.discarded_passes += 1
            kept[b] = False

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int,
            batch_size: int) -> Iterator[List[Tuple[int, BatchResult]]]:
        """Decode the prompts with at most ``batch_size`` of them in the batch,
        a waiting prompt joining as soon as a sequence leaves; yields, per
        iteration, ``(prompt index, result)`` of every sequence in it."""
        waiting = list(range(len(prompts)))
        index = {}
        while waiting or self.sequences:
            while waiting and len(self.sequences) < batch_size:
                i = waiting.pop(0)
                index[self.add(prompts[i], max_tokens)] = i
            yield [(index[r.uid], r) for r in self.step()]

    def generate_all(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> List[List[int]]:
        """Decode every prompt in one batch; each sequence's tokens."""
        tokens = [[] for _ in prompts]
        for results in self.run(prompts, max_tokens, len(prompts)):
            for i, r in results:
                tokens[i] += [e.token for e in r.events]
        return tokens


ENGINE_DEFAULT = object()  # a sequence's sampler and processors: the engine's


@dataclass
class Plan:
    """One pass a sequence asks for, and what its results mean."""

    kind: str  # "compress", "fused", "decode" (one token), "accelerate" or "verify" (two-pass)
    p: Pass
    rows: np.ndarray  # the rows of the pass whose logits are read
    drafts: List[int] = field(default_factory=list)  # the drafts it verifies
    g: int = 0  # foresight tokens per set
    groups: Optional[List[int]] = None  # per logits row, the draft prefix it follows
    prefixes: Optional[List[np.ndarray]] = None  # the histories of those prefixes

    @classmethod
    def decode(cls, builder: PassBuilder, anchor: int, position: int, cache_len: int) -> "Plan":
        """Plain decoding: feed the anchor, read the next token."""
        p = builder.decode(anchor, position, cache_len)
        return cls("decode", p, p.exact_rows, groups=[0], prefixes=[p.tokens[:0]])


class Decoding:
    """One sequence being decoded: its position, step and drafts, its cache
    (a :class:`KVCache`, or a row of a batched cache), statistics and
    drafting policy.

    A pass goes ``plan()`` -> the engine runs ``plan.p`` (alone or batched
    with other sequences' passes) -> ``select()`` -> ``apply()``, which
    commits tokens, trims and evicts; committed tokens wait in
    :meth:`take_events`.
    """

    def __init__(self, engine: Engine, cache, prompt: List[int], max_tokens: int, *,
                 sampler=ENGINE_DEFAULT, logits_processors=ENGINE_DEFAULT, seed: Optional[int] = None):
        self.engine = engine
        self.sampler = engine.sampler if sampler is ENGINE_DEFAULT else sampler
        self.processors = engine.processors if logits_processors is ENGINE_DEFAULT else list(logits_processors or ())
        self.seed = seed
        self.cache = cache
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.policy = engine.new_policy()
        self.committed = 0
        self.state: Optional[_State] = None
        self.uid = 0  # its id in a batch
        self._compressed = False  # a compress pass ran since the last emitted token
        self._events: List[TokenEvent] = []
        # prompt + committed tokens, for the logits processors
        self._history = mx.array(prompt, mx.int32) if self.processors else None

    # -- tokens --------------------------------------------------------------
    def begin(self, anchor: int):
        """The first token, chosen from the prompt's logits."""
        P = len(self.prompt)
        self.state = _State(anchor=anchor, position=P, step=StepState(self.cache.length, P),
                            drafts=None if self.engine.schedule == "two-pass" else [])
        self.commit([anchor])
        self.emit(anchor)

    def commit(self, tokens):
        """Add committed tokens (ints, or a lazy token array) to the history
        the logits processors see."""
        if self._history is not None:
            t = tokens if isinstance(tokens, mx.array) else mx.array(tokens, mx.int32)
            self._history = mx.concatenate([self._history, t.reshape(-1).astype(mx.int32)])

    def emit(self, token: int, from_draft: bool = False):
        self.committed += 1
        self.stats.generated_tokens += 1
        self._events.append(TokenEvent(int(token), from_draft, self._compressed, self.cache.length,
                                       self.stats.forward_passes))
        self._compressed = False

    def take_events(self) -> List[TokenEvent]:
        out, self._events = self._events, []
        return out

    @property
    def greedy(self) -> bool:
        return self.sampler is None and not self.processors

    def select(self, logits: mx.array, plan: Optional[Plan] = None, at: Optional[int] = None) -> mx.array:
        """Tokens for logits rows ``(R, V)`` (lazily): the rows of ``plan``,
        or one row choosing the token at position ``at``. Without processors
        only the sampler matters; with them, rows of group ``j`` see the
        committed history followed by ``plan.prefixes[j]``.

        With a seed, the token at position ``t`` is sampled from a random
        state of its own (seed and ``t``): the same tokens whatever the
        drafting does and whatever runs beside the sequence in a batch."""
        if self.seed is not None and self.sampler is not None:
            if plan is None:
                targets = [at]
            else:
                exact = len(plan.p.exact_rows)
                targets = [int(plan.p.positions[r]) + 1 + (i >= exact) * (1 << 24) for i, r in enumerate(plan.rows)]
            groups = plan.groups if plan is not None else None
            # the process's random state goes on from where it was, for the unseeded
            after = int(mx.random.randint(0, 2**31 - 1, (1,)).item())
            picks = []
            for i, t in enumerate(targets):
                mx.random.seed((self.seed * 1_000_003 + t) % 2**32)
                picks.append(self._select(logits[i : i + 1], plan, None if groups is None else groups[i : i + 1]))
            mx.random.seed(after)
            return mx.concatenate(picks)
        return self._select(logits, plan, None if plan is None else plan.groups)

    def _select(self, logits, plan, groups):
        if not self.processors:
            return select(logits, self.sampler)
        if plan is None or groups is None:
            return select(logits, self.sampler, self.processors, [self._history])
        histories = [mx.concatenate([self._history, mx.array(x, mx.int32)]) for x in plan.prefixes]
        return select(logits, self.sampler, self.processors, histories, groups)

    # -- passes --------------------------------------------------------------
    def done(self) -> Optional[str]:
        """Why generation ends before the next pass (``"stop"``,
        ``"length"``), or None."""
        s, e = self.state, self.engine
        if s.anchor in e.stop_ids:
            return "stop"
        if self.committed >= self.max_tokens or (e.max_position is not None and s.position + 1 >= e.max_position):
            return "length"
        return None

    def must_compress(self) -> bool:
        return self.engine.compress and self.state.anchor == self.engine.splitter

    def _choice(self, rows: int = 1, free: int = 1):
        """``(draft length, foresight layout)`` for the next pass."""
        if self.policy is None:
            return self.engine.draft_len, self.engine.foresight_sets
        return self.policy.choose(rows, free)

    def plan(self, drafting: bool = True, rows: int = 1, free: int = 1, splitter_cached: bool = False) -> Plan:
        """The next pass (call only when :meth:`done` is None); without
        ``drafting`` the policy is not asked and nothing is drafted. In a
        batch of ``rows`` sequences whose pass is at least ``free`` tokens
        wide, the policy weighs drafting at the batch's costs.
        ``splitter_cached``: the cache already holds the splitter that ends
        the step (fed by plain decoding), so a compress pass starts after it."""
        e, s = self.engine, self.state
        g, layout = self._choice(rows, free) if drafting else (0, "last")
        if self.must_compress():
            p = e.builder.compress(s.step, self.cache.length - splitter_cached, draft_len=g)
            if splitter_cached:
                p = p.after_first()
            rows = np.concatenate([p.exact_rows] + p.foresight_rows) if g else p.exact_rows
            return Plan("compress", p, rows, g=g)
        if not g:
            if s.drafts is not None:
                s.drafts = []
            return Plan.decode(e.builder, s.anchor, s.position, self.cache.length)
        if e.schedule == "two-pass":
            if s.drafts is None:
                p = e.builder.decode(s.anchor, s.position, self.cache.length, (), e.draft_len)
                return Plan("accelerate", p, np.concatenate([p.exact_rows] + p.foresight_rows), g=e.draft_len)
            g = 0
        # one pass over [a, d_1..d_k] plus, when g > 0, a foresight set of g
        # tokens after every prefix (or after the whole block only): verifies
        # the drafts and drafts the next block
        drafts = s.drafts[: max(0, self.max_tokens - self.committed - 1)]
        k = len(drafts)
        p = e.builder.decode(s.anchor, s.position, self.cache.length, drafts, g,
                             [k] if layout == "last" else None)
        rows = np.concatenate([p.exact_rows] + p.foresight_rows) if g else p.exact_rows
        # row i of the verified block follows the anchor and drafts[:i]; a
        # foresight set follows the prefix it was placed after. The anchor is
        # committed already, so a row's history adds drafts[:i] to it
        groups = list(range(k + 1)) + [j for j in p.foresight_prefixes for _ in range(g)]
        kind = "verify" if e.schedule == "two-pass" else "fused"
        return Plan(kind, p, rows, drafts, g, groups, [p.tokens[1 : i + 1] for i in range(k + 1)])

    def apply(self, plan: Plan, tokens: List[int], held: Optional[int] = None):
        """Take the pass's tokens: commit, trim the cache, evict. ``held``:
        the pass's entries the cache holds, when not all of them (a fused
        pass whose successor was issued ahead)."""
        self.stats.forward_passes += 1
        self.stats.pass_tokens += len(plan.p)
        if plan.kind == "compress":
            self._apply_compress(plan, tokens)
        elif plan.kind == "accelerate":
            s = self.state
            self.cache.trim(plan.g)
            s.anchor, s.position, s.drafts = int(tokens[0]), s.position + 1, [int(t) for t in tokens[1:]]
            self.commit([s.anchor])
            self.emit(s.anchor)
        else:
            none = self.state.drafts is None
            self._apply_verify(plan, tokens, held)
            if plan.kind == "verify" or none:
                self.state.drafts = None

    def _apply_compress(self, plan: Plan, tokens: List[int]):
        """The compress pass ended the step whose splitter was the anchor."""
        s, p = self.state, plan.p
        self.stats.compress_events += 1
        start_len = self.cache.length - len(p) - p.cached
        self.cache.trim(len(p) - p.keep)
        self.cache.evict(*p.evict)
        L = start_len - s.step.start_slot + 1
        begin = s.step.begin + L + 1
        s.step = StepState(self.cache.length, begin)
        s.anchor = int(tokens[0])
        s.position = begin
        s.drafts = [int(t) for t in tokens[1:]]
        self.commit([s.anchor])
        self._compressed = True
        self.emit(s.anchor)

    def _acceptable(self, draft: int) -> bool:
        e = self.engine
        return draft not in e.stop_ids and not (e.compress and draft == e.splitter)

    def _apply_verify(self, plan: Plan, tokens: List[int], held: Optional[int] = None):
        s, p, drafts = self.state, plan.p, plan.drafts
        k, g = len(drafts), plan.g
        self.stats.drafted_tokens += k
        right = 0
        while right < k and drafts[right] == tokens[right]:
            right += 1
        n = 0
        while n < right and self._acceptable(drafts[n]):
            n += 1
        if self.policy is not None and k:
            self.policy.observe(k, right)
        self.stats.accepted_draft_tokens += n
        self.cache.trim((len(p) if held is None else held) - (1 + n))
        accepted = drafts[:n]
        s.anchor = int(tokens[n])
        s.position += n + 1
        s.drafts = []
        if n in p.foresight_prefixes:
            start = k + 1 + p.foresight_prefixes.index(n) * g
            s.drafts = [int(t) for t in tokens[start : start + g]]
        self.commit(accepted + [s.anchor])
        for t in accepted:
            self.emit(t, from_draft=True)
        self.emit(s.anchor)

    def finish(self):
        """Final statistics."""
        st = self.stats
        if self.policy is not None:
            st.draft_policy = self.policy.summary()
        st.final_kv_tokens = self.cache.length
        st.plain_kv_tokens = st.prompt_tokens + st.generated_tokens
        st.peak_memory_gb = mx.get_peak_memory() / 1e9


@dataclass
class _State:
    anchor: int
    position: int
    step: StepState
    drafts: Optional[List[int]] = field(default_factory=list)


def decoding_pass_costs(model, sizes: Sequence[int], cached: int = 64, rounds: int = 7,
                        warmup: int = 2) -> dict:
    """Seconds of a decoding pass of each size in ``sizes`` (the fastest of
    ``rounds``; see :data:`mlx_memosight.policy.MEASURED_ON`) as this
    engine runs it: one compiled function over the cache's buffers where it
    compiles passes (:meth:`Engine._call_compiled`), else mlx-lm's model call
    built op by op (:func:`mlx_memosight.backend.pass_costs`), over a cache
    of ``cached`` entries, logits at every token of the pass (as in a
    verification pass); the sizes interleaved, ``warmup`` untimed rounds
    first. A compiled pass skips the host work of building its graph, which
    an op-by-op pass pays once per pass whatever its size: timing the other
    path would make tokens of a pass look cheaper than they are here. Kept on
    the model, each (cache, size) measured once per loaded model."""
    from .backend import median_seconds, pass_costs

    context = getattr(model.args, "max_position_embeddings", None) or float("inf")
    if (not Engine.compiled or kernels.kernels_available() or cached < 1 or max(sizes) > COMPILED_MAX_TOKENS
            or cached + max(sizes) >= context):
        # the engine builds these passes op by op (or the model's context is too short to time them
        # this way): mlx-lm's model call is the same work
        return pass_costs(model, sizes, cached=cached, rounds=rounds, warmup=warmup, statistic=min)
    memo = model.__dict__.setdefault("_memosight_decoding_pass_costs", {})
    todo = [T for T in sizes if (cached, T) not in memo]
    if todo:
        engine = Engine(model, None)
        vocab = model.args.vocab_size
        seq = engine.start([i % vocab for i in range(cached)], 1)
        cache = seq.cache
        start = cache.length
        passes = {}
        for T in todo:
            slots = np.arange(start, start + T)
            passes[T] = (mx.array([(7 * i + 3) % vocab for i in range(T)], mx.int32), slots, np.arange(T))

        def run(T):
            x, slots, rows = passes[T]
            logits = engine._call_compiled(seq, x, slots, slots, slots, None, rows)
            if logits is None:
                raise RuntimeError(f"a {T}-token pass over {start} entries did not run compiled")
            mx.eval(logits, cache.state_arrays())

        times = median_seconds(todo, run, rounds, warmup, reset=lambda T: cache.trim(cache.length - start),
                               statistic=min)
        memo.update({(cached, T): t for T, t in times.items()})
    return {T: memo[cached, T] for T in sizes}
