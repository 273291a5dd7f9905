"""Reasoning data for MemoSight training: records, samples and batches.

Records are JSON lines in the reference's format (``question``,
``system_prompt``, ``thoughts_list`` or ``gt_output``, optional ``add_eos``)
or chat records (``{"messages": [...]}``, the assistant message being the
reasoning). Each record becomes one training sample laid out by
:mod:`mlx_memosight.layout`; batches follow mlx-lm's ``iterate_batches``
protocol so that mlx-lm's trainer can run them.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .config import SPLITTER, MemoSightConfig
from .errors import DataError
from .layout import (
    IGNORE_INDEX,
    NEVER,
    AttentionRule,
    check_causal,
    Role,
    Sample,
    build_training_sample,
    collate,
    draw_offsets,
    encode_steps,
)

STEP_BOUNDARY = re.compile(r"\n\s*\n")
SPLITS = ("train", "valid", "test")




@dataclass
class Example:
    """One reasoning example: the question, the system prompt (None for the
    template's default) and the reasoning split into steps."""

    question: str
    thoughts: List[str]
    system: Optional[str] = None
    add_eos: bool = True


def split_steps(text: str) -> List[str]:
    """Steps of a reasoning text: split on blank lines (the regex
    ``\\n\\s*\\n``), each stripped; empty parts are dropped."""
    return [p.strip() for p in STEP_BOUNDARY.split(text) if p.strip()]


# Markers that open or close a thinking block or a solution (R1's <think>,
# Bespoke-Stratos's markup). On a line of their own they would be steps of
# their own; in chat records they join the step they open or close instead.
OPENING_MARKERS = ("<think>", "<|begin_of_thought|>", "<|begin_of_solution|>")
CLOSING_MARKERS = ("</think>", "<|end_of_thought|>", "<|end_of_solution|>")


def split_reasoning(text: str) -> List[str]:
    """Steps of an assistant message (chat records): :func:`split_steps`,
    with a marker that stands alone joined to the step it opens or closes.

    ``"<think>\n\nA\n\nB\n\n</think>\n\nC"`` gives
    ``["<think>\nA", "B\n</think>", "C"]``: the thinking block's steps, then
    the answer's, each compressed when it is finished; the markers are
    generated where they stand."""
    steps: List[str] = []
    pending = ""
    for part in split_steps(text):
        if part in OPENING_MARKERS:
            pending += part + "\n"
        elif part in CLOSING_MARKERS and steps and not pending:
            steps[-1] += "\n" + part
        else:
            steps.append(pending + part)
            pending = ""
    if pending:
        steps.append(pending.rstrip("\n"))
    return steps


def _string(record: dict, key: str, where: str, required: bool = True) -> Optional[str]:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, not {type(value).__name__}")
    return value


def _chat_example(messages, where: str) -> Example:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: field 'messages' must be a list of objects")
    roles = [m.get("role") for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise DataError(
            f"{where}: field 'messages' must hold an optional system message, one user "
            f"message and one assistant message (found roles {roles})"
        )
    parts = {}
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}] has no string 'content'")
        parts[m["role"]] = content
    thoughts = split_reasoning(parts["assistant"])
    if not thoughts:
        raise DataError(f"{where}: the assistant message is empty")
    return Example(question=parts["user"], thoughts=thoughts, system=parts.get("system"))


SHAREGPT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                  "gpt": "assistant"}


def _sharegpt_messages(record: dict, where: str) -> list:
    """The ShareGPT shape (Bespoke-Stratos-17k, OpenThoughts): ``system`` and
    ``conversations`` of ``{"from", "value"}``, as chat messages."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: field 'conversations' must be a list of objects")
    messages = []
    system = _string(record, "system", where, required=False)
    if system is not None:
        messages.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from must be one of "
                            f"{', '.join(SHAREGPT_ROLES)}"[:200])
        messages.append({"role": role, "content": t.get("value")})
    return messages


def parse_record(record, where: str) -> Example:
    """One JSON record as an :class:`Example`.

    Raises:
        DataError: naming ``where`` and the field at fault.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"], where)
    if "conversations" in record:
        return _chat_example(_sharegpt_messages(record, where), where)
    question = _string(record, "question", where)
    system = _string(record, "system_prompt", where, required=False)
    add_eos = record.get("add_eos", True)
    if not isinstance(add_eos, bool):
        raise DataError(f"{where}: field 'add_eos' must be true or false")
    thoughts = record.get("thoughts_list")
    if thoughts is not None:
        if not isinstance(thoughts, list) or not all(isinstance(t, str) for t in thoughts):
            raise DataError(f"{where}: field 'thoughts_list' must be a list of strings")
    if not thoughts:
        if record.get("gt_output") is None:
            raise DataError(
                f"{where}: missing field 'thoughts_list' or 'gt_output' (or use 'messages')"
            )
        thoughts = split_steps(_string(record, "gt_output", where))
        if not thoughts:
            raise DataError(f"{where}: field 'gt_output' is empty")
    return Example(question=question, thoughts=list(thoughts), system=system, add_eos=add_eos)


def read_jsonl(path, skip_bad_lines: bool = False) -> Tuple[List[Example], int]:
    """Read a JSON-lines file of records.

    Args:
        path: the file.
        skip_bad_lines: skip (and count) lines that are not valid JSON or not
            valid records instead of stopping at the first.

    Returns:
        ``(examples, skipped)``.

    Raises:
        DataError: on the first bad line (naming file and line), when the
            file is missing, or when it holds no example.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples, skipped = [], 0
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})")
    for lineno, data in enumerate(raw.splitlines(), start=1):
        if not data.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            examples.append(parse_record(_json_line(data, where, lineno == 1), where))
        except DataError:
            if not skip_bad_lines:
                raise
            skipped += 1
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({bad_lines(skipped)} skipped)" if skipped else ""))
    return examples, skipped


def bad_lines(n: int) -> str:
    return f"{n} bad line{'' if n == 1 else 's'}"


def _json_line(data: bytes, where: str, first: bool):
    """One line of a JSON-lines file, decoded."""
    try:
        text = data.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
    except RecursionError:
        raise DataError(f"{where}: nested too deeply")


def load_splits(data, skip_bad_lines: bool = False, required=("train",)) -> Dict[str, Tuple[List[Example], int]]:
    """Read ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl`` from a folder
    (like mlx-lm), or a single ``.jsonl`` file as the training split.

    Returns:
        ``{split: (examples, skipped)}`` for the splits present.
    """
    data = Path(data)
    if data.is_file():
        return {"train": read_jsonl(data, skip_bad_lines)}
    if not data.is_dir():
        raise DataError(f"data={data}: no such file or folder", "data")
    out = {}
    for split in SPLITS:
        path = data / f"{split}.jsonl"
        if path.exists():
            out[split] = read_jsonl(path, skip_bad_lines)
        elif split in required:
            raise DataError(f"{path}: file not found (data={data} needs {split}.jsonl)")
    return out


# ----------------------------------------------------------------------------
# Samples


def bucket_length(n: int) -> int:
    """The padded length of a batch whose longest sample has ``n`` tokens.

    Multiples of 32 up to 256, then eight lengths per octave (at most 12.5%
    padding), so that compiled training steps see few distinct shapes.
    """
    if n <= 256:
        return 32 * max(1, math.ceil(n / 32))
    g = 2 ** (int(math.log2(n)) - 3)
    return g * math.ceil(n / g)


def plain_sample(prompt_ids: Sequence[int], answer_ids: Sequence[int], eos: Optional[int],
                 max_length: Optional[int] = None) -> Sample:
    """An ordinary supervised fine-tuning sample: ``prompt, answer, EOS``
    with causal attention and next-token targets on the answer and EOS only
    (no memory or foresight tokens). The baseline MemoSight is compared with.
    """
    ids = list(prompt_ids) + list(answer_ids) + ([eos] if eos is not None else [])
    P = len(prompt_ids)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    T = len(ids)
    roles = np.full(T, Role.CONTENT, np.int8)
    roles[: min(P, T)] = Role.PROMPT
    if eos is not None and not truncated:
        roles[-1] = Role.EOS
    lm = np.full(T, IGNORE_INDEX, np.int32)
    if T > P:
        lm[max(P - 1, 0) : T - 1] = ids[max(P, 1) :]
    slots = np.arange(T, dtype=np.int32)
    return Sample(
        input_ids=np.array(ids, np.int32),
        positions=slots.copy(),
        roles=roles,
        lm_targets=lm,
        mtp_targets=np.full(T, IGNORE_INDEX, np.int32),
        rule=AttentionRule(slots, slots + 1, np.full(T, NEVER, np.int32)),
        offset=0,
        truncated=bool(truncated),
    )


class MemoSightDataset:
    """The training samples of one split, laid out once.

    Every example gets one foresight offset drawn from ``seed`` when the data
    set is built (SPEC section 2), fixed across epochs. With ``plain=True``
    the samples are ordinary SFT samples instead (:func:`plain_sample`: the
    steps joined by blank lines, no MemoSight tokens), so that a baseline can
    be trained by the same trainer on the same data.

    Attributes:
        samples: the :class:`layout.Sample` objects.
        truncated: how many examples were cut to ``max_seq_length``.
        dropped: examples left without any trained target after truncation.
    """

    def __init__(self, samples: Sequence[Sample], cfg: MemoSightConfig, truncated: int = 0,
                 dropped: int = 0, name: str = "data"):
        self.samples = list(samples)
        self.cfg = cfg
        self.truncated = truncated
        self.dropped = dropped
        self.name = name

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[Example],
        tokenizer,
        cfg: MemoSightConfig,
        max_seq_length: Optional[int] = None,
        seed: int = 0,
        name: str = "data",
        plain: bool = False,
    ) -> "MemoSightDataset":
        """Tokenise and lay out examples.

        Args:
            examples: the :class:`Example` records.
            tokenizer: a Hugging Face tokenizer (or mlx-lm's wrapper) with the
                MemoSight tokens.
            cfg: the model's MemoSight configuration (template, ratio,
                ``max_offset``, token ids).
            max_seq_length: truncate to this many non-foresight tokens.
            seed: seeds the foresight offsets.
            plain: lay out ordinary SFT samples (only ``cfg.template`` and
                ``cfg.token_ids.eos`` are used).
        """
        offsets = draw_offsets(len(examples), cfg.max_offset, seed)
        samples, truncated, dropped = [], 0, 0
        for ex, offset in zip(examples, offsets):
            prompt = tokenizer.encode(
                cfg.template.render(ex.question, ex.system), add_special_tokens=False
            )
            if plain:
                answer = tokenizer.encode("\n\n".join(ex.thoughts), add_special_tokens=False)
                s = plain_sample(prompt, answer, cfg.token_ids.eos if ex.add_eos else None,
                                 max_seq_length)
            else:
                steps, thought_lens = encode_steps(tokenizer, ex.thoughts, SPLITTER)
                s = build_training_sample(
                    prompt, steps, cfg.token_ids, cfg.compression_ratio, int(offset),
                    thought_lens=thought_lens, add_eos=ex.add_eos, max_length=max_seq_length,
                    max_memory_tokens=cfg.max_memory_tokens,
                )
            truncated += s.truncated
            if num_targets(s) == (0, 0):
                dropped += 1
                continue
            samples.append(s)
        return cls(samples, cfg, truncated, dropped, name)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> Sample:
        return self.samples[i]

    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.samples])

    @property
    def num_real_tokens(self) -> int:
        return sum(s.num_real_tokens for s in self.samples)


def num_targets(sample: Sample) -> Tuple[int, int]:
    """``(LM targets, MTP targets)`` of a sample."""
    return (
        int(np.sum(sample.lm_targets != IGNORE_INDEX)),
        int(np.sum(sample.mtp_targets != IGNORE_INDEX)),
    )


# ----------------------------------------------------------------------------
# Batches


def loss_rows(samples: Sequence[Sample]):
    """The rows whose logits the loss scores, per sample: their indices, their
    targets and whether each is a foresight (MTP) row."""
    out = []
    for s in samples:
        fs = s.roles == Role.FORESIGHT
        target = np.where(fs, s.mtp_targets, s.lm_targets)
        rows = np.nonzero(target != IGNORE_INDEX)[0]
        out.append((rows.astype(np.int32), target[rows].astype(np.int32), fs[rows]))
    return out


def batch_arrays(samples: Sequence[Sample], lm_scale: float, mtp_scale: float, pad_id: int = 0):
    """One micro-batch as the tuple of arrays :func:`train.memosight_loss` takes.

    ``weights`` holds, per scored row, ``lm_scale`` (LM rows) or ``mtp_scale``
    (foresight rows); padding rows weigh 0.

    Returns:
        ``(inputs, positions, query_slot, query_limit, key_visible_until,
        rows, targets, weights, real_tokens)``, and for batches long enough
        to attend blockwise the keys each block of queries can see where
        gathering them pays (:func:`train.attention.batch_key_index`).
    """
    from .train.attention import batch_key_index, query_block, uses_blockwise

    T = bucket_length(max(len(s) for s in samples))
    b = collate(samples, T, pad_id=pad_id)
    check_causal(b.query_slot, b.query_limit)
    scored = loss_rows(samples)
    R = bucket_length(max(len(r) for r, _, _ in scored))
    rows = np.zeros((len(samples), R), np.int32)
    targets = np.zeros((len(samples), R), np.int32)
    weights = np.zeros((len(samples), R), np.float32)
    for i, (r, t, fs) in enumerate(scored):
        rows[i, : len(r)] = r
        targets[i, : len(r)] = t
        weights[i, : len(r)] = np.where(fs, mtp_scale, lm_scale)
    real = sum(s.num_real_tokens for s in samples)
    extra = ()
    if uses_blockwise(T):
        index = batch_key_index(b.query_slot, b.query_limit, b.key_visible_until, query_block(T))
        extra = tuple(mx.array(x) for x in index)
    return (
        mx.array(b.input_ids),
        mx.array(b.positions),
        mx.array(b.query_slot),
        mx.array(b.query_limit),
        mx.array(b.key_visible_until),
        mx.array(rows),
        mx.array(targets),
        mx.array(weights),
        mx.array(real, dtype=mx.int32),
        *extra,
    )


def check_batch_size(dataset, batch_size: int, world_size: int = 1):
    """A global batch must split evenly over the processes and fit the data set."""
    if batch_size < 1 or batch_size % world_size:
        raise DataError(f"batch_size={batch_size} must be a positive multiple of the number of "
                        f"processes ({world_size})", "batch_size")
    if dataset is not None and len(dataset) < batch_size:
        raise DataError(f"{dataset.name}: {len(dataset)} examples, fewer than batch_size={batch_size}")


class BatchIterator:
    """mlx-lm's ``iterate_batches`` for MemoSight data sets.

    Global batches are made as mlx-lm makes them (samples sorted by length,
    cut into ``batch_size`` groups, process ``r`` of ``n`` taking every n-th
    sample from ``r``), so a global batch is the same whatever the number of
    processes.

    The joint loss normalises each stream by its count of valid targets over
    a whole optimizer step. Those counts depend on the data only, so they are
    computed here, over all micro-batches of the step and all processes, and
    folded into per-row weights. mlx-lm's trainer divides the accumulated
    gradient by the number of micro-batches and averages it over processes,
    so training rows carry that product as a factor; evaluation weights rows
    so that mlx-lm's token-weighted mean of batch losses is the joint loss
    over the evaluated batches.

    Args:
        lm_loss_weight, mtp_loss_weight: the loss weights.
        grad_accumulation_steps: micro-batches per optimizer step.
        eval_batches: how many batches an evaluation consumes (-1: all).
        seed: seeds the order of training batches.
        pad_id: token id used for padding.
    """

    def __init__(self, lm_loss_weight: float, mtp_loss_weight: float,
                 grad_accumulation_steps: int = 1, eval_batches: int = -1, seed: int = 0,
                 pad_id: int = 0):
        self.lm_loss_weight = lm_loss_weight
        self.mtp_loss_weight = mtp_loss_weight
        self.grad_accumulation_steps = grad_accumulation_steps
        self.eval_batches = eval_batches
        self.seed = seed
        self.pad_id = pad_id

    @staticmethod
    def global_batches(dataset, batch_size: int, world_size: int = 1) -> List[np.ndarray]:
        check_batch_size(dataset, batch_size, world_size)
        idx = np.argsort(dataset.lengths(), kind="stable")
        return [idx[i : i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]

    @staticmethod
    def _counts(dataset, group):
        n_lm = n_mtp = 0
        for batch in group:
            for j in batch:
                a, b = num_targets(dataset[j])
                n_lm += a
                n_mtp += b
        return n_lm, n_mtp

    def _scales(self, counts, factor):
        n_lm, n_mtp = counts
        lm = self.lm_loss_weight * factor / n_lm if n_lm else 0.0
        mtp = self.mtp_loss_weight * factor / n_mtp if n_mtp else 0.0
        return lm, mtp

    def __call__(self, dataset, batch_size, max_seq_length=None, loop=False, seed=None,
                 comm_group=None):
        rank = comm_group.rank() if comm_group is not None else 0
        world = comm_group.size() if comm_group is not None else 1
        batches = self.global_batches(dataset, batch_size, world)

        def local(batch):
            return [dataset[j] for j in batch[rank::world]]

        if not loop:
            if self.eval_batches > 0:
                batches = batches[: self.eval_batches]
            counts = self._counts(dataset, batches)
            total = sum(dataset[j].num_real_tokens for b in batches for j in b)
            for batch in batches:
                samples = local(batch)
                real = sum(s.num_real_tokens for s in samples)
                # evaluate() returns sum(loss_b * real_b) / total: weight by total / real_b
                lm, mtp = self._scales(counts, total / real)
                yield batch_arrays(samples, lm, mtp, self.pad_id)
            return

        rng = np.random.default_rng(self.seed if seed is None else seed)
        K = self.grad_accumulation_steps

        def stream():
            while True:
                for i in rng.permutation(len(batches)):
                    yield batches[i]

        it = stream()
        while True:
            group = [next(it) for _ in range(K)]
            lm, mtp = self._scales(self._counts(dataset, group), K * world)
            for batch in group:
                yield batch_arrays(local(batch), lm, mtp, self.pad_id)
