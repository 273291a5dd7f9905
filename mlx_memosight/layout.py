"""MemoSight's sequence rules (SPEC sections 2-3), in one place.

Training samples and every inference pass are built here: token ids, position
ids, token roles, labels, and the attention rule. The rule is kept compact:

* per query: ``query_slot`` (the key slot holding its own entry) and
  ``query_limit`` (keys with a slot below it are candidates: the end of its
  visible prefix);
* per key: ``key_visible_until`` (queries whose slot is at or past this value
  do not see the key).

A query sees a key iff ``key == query_slot`` or
``key < query_limit and query_slot < key_visible_until[key]``. This covers
SPEC's three rules: causality is the limit, a foresight key is visible only to
itself (``visible_until = slot + 1``), and a finished step's raw text is
invisible from its ``<|continue|>`` on (``visible_until = continue slot``).
The fused pass needs nothing more: a foresight set after a draft prefix has the
prefix end as its limit. :func:`attention_mask` is the one function that turns
the compact form into a boolean mask; the Metal kernel reads the compact form.
"""

from dataclasses import dataclass, field
from enum import IntEnum
from typing import List, Optional, Sequence

import numpy as np

from .config import MemoSightConfig, TokenIds, memory_count

IGNORE_INDEX = -100
NEVER = np.iinfo(np.int32).max  # key_visible_until of a key every later query sees


class Role(IntEnum):
    PROMPT = 0
    CONTENT = 1  # reasoning text of a step, its splitter included
    FORESIGHT = 2
    MEMORY = 3
    CONTINUE = 4
    EOS = 5
    PAD = 6


def attention_mask(query_slot, query_limit, key_visible_until, xp=np):
    """Materialise the compact attention rule as a boolean ``(..., Q, K)`` mask.

    Works with numpy arrays (``xp=np``) and MLX arrays (``xp=mlx.core``);
    leading batch dimensions broadcast.
    """
    K = key_visible_until.shape[-1]
    keys = xp.arange(K)
    slot = query_slot[..., :, None]
    limit = query_limit[..., :, None]
    until = key_visible_until[..., None, :]
    return (keys == slot) | ((keys < limit) & (slot < until))


def check_causal(query_slot: np.ndarray, query_limit: np.ndarray):
    """Raise unless no query sees a key past its own index (``(..., T)`` arrays),
    as in every training sample; blockwise training attention relies on it."""
    idx = np.arange(query_slot.shape[-1])
    if np.any(query_slot > idx) or np.any(query_limit > idx + 1):
        raise ValueError("a training batch must be causal: a query sees a key past its own index")


@dataclass
class AttentionRule:
    """The compact attention rule of Q queries over K key slots."""

    query_slot: np.ndarray
    query_limit: np.ndarray
    key_visible_until: np.ndarray

    def mask(self) -> np.ndarray:
        return attention_mask(self.query_slot, self.query_limit, self.key_visible_until)

    @property
    def num_keys(self) -> int:
        return int(self.key_visible_until.shape[-1])

    def is_causal(self) -> bool:
        """True when the rule is plain causal attention over the keys."""
        Q = self.query_slot.shape[-1]
        K = self.num_keys
        slots = np.arange(K - Q, K)
        return bool(
            np.array_equal(self.query_slot, slots)
            and np.array_equal(self.query_limit, slots + 1)
            and np.all(self.key_visible_until > slots[-1])
        )


def memory_positions(begin: int, length: int, count: int) -> List[int]:
    """Positions of a step's memory tokens: the centre of each of ``count``
    equal slices of the step's ``length`` tokens starting at ``begin``.

    Computed in floating point exactly as the reference does
    (``int(k * step + step / 2)``), so checkpoints trained with it see the same
    positions; this equals SPEC's ``floor(k L / m + L / 2m)``.
    """
    step = length / count
    return [begin + int(k * step + step / 2) for k in range(count)]


# ----------------------------------------------------------------------------
# Training samples


@dataclass
class Sample:
    """One training example laid out physically (SPEC section 2).

    ``lm_targets[t]`` is the LM target of the logit at token ``t`` (already
    shifted to the next non-foresight token), ``mtp_targets[t]`` the foresight
    target of the logit at a foresight token; both use ``IGNORE_INDEX``.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    roles: np.ndarray
    lm_targets: np.ndarray
    mtp_targets: np.ndarray
    rule: AttentionRule
    offset: int
    truncated: bool = False

    def __len__(self):
        return int(self.input_ids.shape[0])

    @property
    def num_real_tokens(self) -> int:
        """Tokens other than foresight tokens (what truncation counts)."""
        return int(np.sum(self.roles != Role.FORESIGHT))

    def mask(self) -> np.ndarray:
        return self.rule.mask()


def encode_steps(tokenizer, thoughts: Sequence[str], splitter: str = "<|splitter|>"):
    """Token ids of each step's content (``thought + "\\n" + splitter``) and of
    each thought alone (which sets the training memory count)."""
    steps, thought_lens = [], []
    for t in thoughts:
        steps.append(tokenizer.encode(t + "\n" + splitter, add_special_tokens=False))
        thought_lens.append(len(tokenizer.encode(t, add_special_tokens=False)))
    return steps, thought_lens


def draw_offsets(n: int, max_offset: int, seed: int) -> np.ndarray:
    """One foresight offset per example, uniform on ``0..max_offset``."""
    return np.random.default_rng(seed).integers(0, max_offset + 1, size=n)


def build_training_sample(
    prompt_ids: Sequence[int],
    steps: Sequence[Sequence[int]],
    token_ids: TokenIds,
    compression_ratio: int,
    offset: int,
    memory_counts: Optional[Sequence[int]] = None,
    thought_lens: Optional[Sequence[int]] = None,
    add_eos: bool = True,
    max_length: Optional[int] = None,
    max_memory_tokens: int = 300,
    foresight: bool = True,
    open_step: Sequence[int] = (),
) -> Sample:
    """Lay out one example: ``prompt, step_0 .. step_{S-1}, EOS``.

    Args:
        prompt_ids: the rendered prompt's ids.
        steps: each step's content ids (thought, "\\n", splitter).
        token_ids: the MemoSight token ids.
        compression_ratio: ``r``.
        offset: the example's foresight offset ``o``.
        memory_counts: ``m_s`` per step; by default from ``thought_lens``
            (training's rule) or else from the step lengths (inference's rule).
        add_eos: append the final EOS.
        max_length: truncate to this many non-foresight tokens.
        foresight: interleave foresight tokens (False lays out the sequence an
            uncompressed-drafting decoder sees).
        open_step: content of an unfinished step after the last one (no memory
            tokens, no ``<|continue|>`` yet); only without ``add_eos``.
    """
    if open_step and add_eos:
        raise ValueError("an open step cannot be followed by EOS")
    if memory_counts is None:
        lens = thought_lens if thought_lens is not None else [len(s) for s in steps]
        memory_counts = [memory_count(n, compression_ratio, max_memory_tokens) for n in lens]
    if len(memory_counts) != len(steps):
        raise ValueError("one memory count per step is needed")
    ids, pos, roles, labels, mtp, until = [], [], [], [], [], []

    def put(tok, p, role, label=IGNORE_INDEX, mtp_label=IGNORE_INDEX, vis=NEVER):
        ids.append(tok)
        pos.append(p)
        roles.append(role)
        labels.append(label)
        mtp.append(mtp_label)
        until.append(vis)

    for p, tok in enumerate(prompt_ids):
        put(tok, p, Role.PROMPT)
    b = len(prompt_ids)
    for content, m in zip(steps, memory_counts):
        L = len(content)
        if L == 0:
            raise ValueError("a step has no tokens")
        if m > len(token_ids.memory):
            raise ValueError(f"a step needs {m} memory tokens, the tokenizer has {len(token_ids.memory)}")
        start = len(ids)
        for j, tok in enumerate(content):
            if foresight:
                target = content[j + offset] if j + offset < L else IGNORE_INDEX
                put(token_ids.foresight, min(b + j + offset - 1, b + L - 1), Role.FORESIGHT,
                    mtp_label=target, vis=len(ids) + 1)
            put(tok, b + j, Role.CONTENT, label=tok)
        end = len(ids)
        continue_index = end + m
        for k in range(start, end):
            until[k] = min(until[k], continue_index)
        for k, p in enumerate(memory_positions(b, L, m)):
            put(token_ids.memory[k], p, Role.MEMORY)
        put(token_ids.continue_, b + L, Role.CONTINUE)
        b += L + 1
    for j, tok in enumerate(open_step):
        put(tok, b + j, Role.CONTENT, label=tok)
    if add_eos:
        put(token_ids.eos, b, Role.EOS, label=token_ids.eos)

    roles_a = np.array(roles, dtype=np.int8)
    T = len(ids)
    truncated = False
    if max_length is not None:
        real = np.cumsum(roles_a != Role.FORESIGHT)
        if real[-1] > max_length:
            T = int(np.searchsorted(real, max_length) + 1)
            truncated = True
    roles_a = roles_a[:T]
    labels_a = np.array(labels[:T], dtype=np.int32)
    lm = np.full(T, IGNORE_INDEX, dtype=np.int32)
    real_idx = np.nonzero(roles_a != Role.FORESIGHT)[0]
    lm[real_idx[:-1]] = labels_a[real_idx[1:]]
    until_a = np.minimum(np.array(until[:T], dtype=np.int64), NEVER).astype(np.int32)
    slots = np.arange(T, dtype=np.int32)
    return Sample(
        input_ids=np.array(ids[:T], dtype=np.int32),
        positions=np.array(pos[:T], dtype=np.int32),
        roles=roles_a,
        lm_targets=lm,
        mtp_targets=np.array(mtp[:T], dtype=np.int32),
        rule=AttentionRule(slots, slots + 1, until_a),
        offset=int(offset),
        truncated=truncated,
    )


@dataclass
class Batch:
    """Samples padded to one length. Arrays are ``(B, T)`` numpy arrays."""

    input_ids: np.ndarray
    positions: np.ndarray
    lm_targets: np.ndarray
    mtp_targets: np.ndarray
    query_slot: np.ndarray
    query_limit: np.ndarray
    key_visible_until: np.ndarray
    lengths: np.ndarray

    def mask(self) -> np.ndarray:
        return attention_mask(self.query_slot, self.query_limit, self.key_visible_until)


def collate(samples: Sequence[Sample], length: Optional[int] = None, pad_id: int = 0) -> Batch:
    """Right-pad samples to ``length`` (default: the longest). A padding query
    copies the last real query's row (SPEC section 2); padding keys are seen by
    no query and padding targets are ignored."""
    T = length or max(len(s) for s in samples)
    B = len(samples)
    out = dict(
        input_ids=np.full((B, T), pad_id, np.int32),
        positions=np.zeros((B, T), np.int32),
        lm_targets=np.full((B, T), IGNORE_INDEX, np.int32),
        mtp_targets=np.full((B, T), IGNORE_INDEX, np.int32),
        query_slot=np.zeros((B, T), np.int32),
        query_limit=np.zeros((B, T), np.int32),
        key_visible_until=np.zeros((B, T), np.int32),
    )
    for i, s in enumerate(samples):
        n = len(s)
        if n > T:
            raise ValueError(f"sample of {n} tokens does not fit a batch of length {T}")
        out["input_ids"][i, :n] = s.input_ids
        out["positions"][i, :n] = s.positions
        out["positions"][i, n:] = s.positions[-1]
        out["lm_targets"][i, :n] = s.lm_targets
        out["mtp_targets"][i, :n] = s.mtp_targets
        out["query_slot"][i, :n] = s.rule.query_slot
        out["query_slot"][i, n:] = s.rule.query_slot[-1]
        out["query_limit"][i, :n] = s.rule.query_limit
        out["query_limit"][i, n:] = s.rule.query_limit[-1]
        out["key_visible_until"][i, :n] = s.rule.key_visible_until
    return Batch(lengths=np.array([len(s) for s in samples], np.int32), **out)


# ----------------------------------------------------------------------------
# Inference passes


@dataclass
class Pass:
    """One forward pass of the decoder over a block appended to the cache.

    ``exact_rows`` are the rows whose logits give true next tokens (the anchor
    or the verified tokens); ``foresight_rows[i]`` are the rows of the i-th
    foresight set, which follows the draft prefix of length
    ``foresight_prefixes[i]`` (drafts for the positions after it). ``evict``
    is the cache span ``[start, end)`` to remove after a compress pass.
    """

    kind: str
    tokens: np.ndarray
    positions: np.ndarray
    roles: np.ndarray
    rule: AttentionRule
    exact_rows: np.ndarray
    foresight_rows: List[np.ndarray] = field(default_factory=list)
    foresight_prefixes: List[int] = field(default_factory=list)
    keep: int = 0
    evict: Optional[tuple] = None
    cached: int = 0  # rows before the first, already in the cache (see after_first)

    def __len__(self):
        return int(self.tokens.shape[0])

    def after_first(self) -> "Pass":
        """This pass without its first row, whose KV entry the cache already
        holds: an earlier pass fed the same token at the same position as a
        causal row seeing every cached entry (plain decoding fed the
        splitter before the compress pass that starts with it). The rule
        keeps its slots: the keys are the same, the first query is gone."""
        r = self.rule
        slot = int(r.query_slot[0])
        if r.query_limit[0] != slot + 1 or self.keep < 1 or np.any(r.key_visible_until[:slot] <= slot):
            raise ValueError("only a pass whose first row is an ordinary causal row can start after it")
        return Pass(
            kind=self.kind, tokens=self.tokens[1:], positions=self.positions[1:], roles=self.roles[1:],
            rule=AttentionRule(r.query_slot[1:], r.query_limit[1:], r.key_visible_until),
            exact_rows=self.exact_rows - 1, foresight_rows=[x - 1 for x in self.foresight_rows],
            foresight_prefixes=list(self.foresight_prefixes), keep=self.keep - 1, evict=self.evict,
            cached=self.cached + 1)


@dataclass
class StepState:
    """Where the current reasoning step lies: its first content token's cache
    slot and position."""

    start_slot: int
    begin: int


class _Rows:
    """The rows of a pass being built: causal rows first (each sees the keys
    before it and itself), then foresight sets."""

    def __init__(self, tokens: List[int], positions: List[int], roles: List[int]):
        n = len(tokens)
        self.tokens, self.positions, self.roles = list(tokens), list(positions), list(roles)
        self.slots_limits = [(i, i + 1) for i in range(n)]
        self.until = [NEVER] * n

    def foresight_set(self, foresight_id: int, base_position: int, prefix_limit: int, g: int) -> np.ndarray:
        """Append ``g`` foresight tokens at positions ``base+1..base+g``, each
        seeing the keys below ``prefix_limit`` and itself; returns their rows."""
        rows = np.arange(len(self.tokens), len(self.tokens) + g)
        self.tokens += [foresight_id] * g
        self.positions += [base_position + i for i in range(1, g + 1)]
        self.roles += [Role.FORESIGHT] * g
        self.slots_limits += [(int(r), prefix_limit) for r in rows]
        self.until += [int(r) + 1 for r in rows]
        return rows

    def arrays(self) -> dict:
        return dict(tokens=np.array(self.tokens, np.int32), positions=np.array(self.positions, np.int32),
                    roles=np.array(self.roles, np.int8))


class PassBuilder:
    """Builds the decoder's passes for one configuration."""

    def __init__(self, cfg: Optional[MemoSightConfig]):
        """``cfg=None`` builds the passes of plain decoding only."""
        self.cfg = cfg
        self.ids = cfg.token_ids if cfg is not None else None

    @staticmethod
    def _rule(cache_len, slots_limits, key_until_new, hidden=None):
        slots = np.array([s for s, _ in slots_limits], np.int32) + cache_len
        limits = np.array([lim for _, lim in slots_limits], np.int32) + cache_len
        until = np.full(cache_len + len(key_until_new), NEVER, np.int32)
        new = np.array(key_until_new, np.int64)
        until[cache_len:] = np.where(new == NEVER, NEVER, new + cache_len)
        if hidden is not None:
            start, end, from_slot = hidden
            until[start:end] = from_slot
        return AttentionRule(slots, limits, until)

    def prefill(self, tokens: Sequence[int], start_position: int = 0, cache_len: int = 0) -> Pass:
        """A causal pass over prompt tokens (one chunk of the prompt)."""
        n = len(tokens)
        rule = self._rule(cache_len, [(i, i + 1) for i in range(n)], [NEVER] * n)
        return Pass(
            kind="prefill",
            tokens=np.array(tokens, np.int32),
            positions=np.arange(start_position, start_position + n, dtype=np.int32),
            roles=np.full(n, Role.PROMPT, np.int8),
            rule=rule,
            exact_rows=np.array([n - 1]),
            keep=n,
        )

    def decode(self, anchor: int, position: int, cache_len: int, drafts: Sequence[int] = (),
               draft_len: int = 0, prefixes: Optional[Sequence[int]] = None) -> Pass:
        """The fused pass: ``[a, d_1..d_k, F_0, .., F_k]``.

        The anchor ``a`` at ``position`` is the next committed token, the
        ``d_i`` are guesses for the positions after it, and ``F_j`` is a set of
        ``draft_len`` foresight tokens placed after the prefix
        ``a, d_1..d_j``. ``prefixes`` limits the sets to those prefix lengths
        (default: every ``j`` in ``0..k``). With no drafts this is the
        reference's accelerate pass ``[a, R x g]``; with ``draft_len = 0`` as
        well, plain decoding.
        """
        k = len(drafts)
        g = draft_len
        prefixes = list(range(k + 1)) if prefixes is None else sorted(set(prefixes))
        if any(not 0 <= j <= k for j in prefixes):
            raise ValueError(f"foresight prefixes {prefixes} outside 0..{k}")
        rows = _Rows([anchor] + list(drafts), [position + i for i in range(k + 1)],
                     [Role.CONTENT] * (k + 1))
        sets = [rows.foresight_set(self.ids.foresight, position + j, j + 1, g) for j in prefixes] if g else []
        kind = "fused" if k else ("accelerate" if g else "decode")
        return Pass(
            kind=kind,
            **rows.arrays(),
            rule=self._rule(cache_len, rows.slots_limits, rows.until),
            exact_rows=np.arange(k + 1),
            foresight_rows=sets,
            foresight_prefixes=prefixes if g else [],
            keep=k + 1,
        )

    def verify(self, drafts: Sequence[int], position: int, cache_len: int) -> Pass:
        """The reference's verification pass over ``[d_0..d_g]`` at
        ``position+1 ..``, causal."""
        n = len(drafts)
        return Pass(
            kind="verify",
            tokens=np.array(drafts, np.int32),
            positions=np.arange(position + 1, position + 1 + n, dtype=np.int32),
            roles=np.full(n, Role.CONTENT, np.int8),
            rule=self._rule(cache_len, [(i, i + 1) for i in range(n)], [NEVER] * n),
            exact_rows=np.arange(n),
            keep=n,
        )

    def compress(self, step: StepState, cache_len: int, draft_len: int = 0) -> Pass:
        """``[<|splitter|>, M_0..M_{m-1}, <|continue|>, R x g]`` ending the
        current step (SPEC section 3). The step's raw text (in the cache from
        ``step.start_slot`` plus the splitter) is invisible from
        ``<|continue|>`` on, and is evicted after the pass."""
        L = cache_len - step.start_slot + 1  # the step's tokens, splitter included
        if L < 1:
            raise ValueError("compress pass outside a step")
        m = self.cfg.memory_count(L)
        b = step.begin
        rows = _Rows([self.ids.splitter] + self.ids.memory[:m] + [self.ids.continue_],
                     [b + L - 1] + memory_positions(b, L, m) + [b + L],
                     [Role.CONTENT] + [Role.MEMORY] * m + [Role.CONTINUE])
        cont = m + 1
        sets = [rows.foresight_set(self.ids.foresight, b + L, cont + 1, draft_len)] if draft_len else []
        hidden = (step.start_slot, cache_len + 1, cache_len + cont)
        return Pass(
            kind="compress",
            **rows.arrays(),
            rule=self._rule(cache_len, rows.slots_limits, rows.until, hidden),
            exact_rows=np.array([cont]),
            foresight_rows=sets,
            keep=m + 2,
            evict=(step.start_slot, cache_len + 1),
        )
