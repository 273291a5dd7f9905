"""The packaged demo model and the synthetic tasks it and the long-reasoning
model are trained on.

``days`` (the demo model's): word problems about a count that changes by the
same amount every day. The solution has one step per day (so 11 to 15 steps
separated by blank lines), each restating the count and working out the next
one, and ends with the answer in ``\\boxed{}``; a finished step can then be
compressed into a couple of memory tokens, and the templated wording is easy
to draft. The question is short and the reasoning long, which is where
MemoSight's KV savings show. Counts and days have two digits, so every step
has the same layout.

``turns`` (long reasoning): a dial of 100 positions is turned forward by the
same amount many times (64 to 240 turns, so answers of about 1,700 to 5,700
tokens), one step per turn, counting the turns still to go in three digits
and writing the dial's value in two:
``011 turns to go: it moves 7, so 95 + 7 = 02.``, down to
``000 turns to go: the dial shows \\boxed{09}.``. The question writes its
numbers the same way (``A dial shows 05.``, ``after 131 turns``, ``after 070
turns``), so the first step copies them digit for digit, and every step has
the same tokens in the same places. Each step needs only the
question and the previous step's count and value, so once a step is
compressed its memory entries must carry them; nothing else of the past is
needed, which is the situation MemoSight is built for. The answer ends at the
step whose count is zero: nothing has to be compared or copied from far back
to know where to stop (the first two forms counted up, ``Turn 011 of 131``,
and models trained on them did not learn to stop). The steps name no one
(the third form's ``Mia moves it 7`` left the name nothing to be copied by
once the previous step was evicted), the counts keep their fixed width (the
fourth form dropped it, and models trained on it no longer carried the
count), and so, since the sixth form, do the values (with one-digit values a
step was a token shorter than the one before it, and most of the fifth
form's count errors came in the step after). docs/long-reasoning/forms.md
has what models trained on each form got right.

Problems are drawn from a seeded generator; the split of a problem (train,
valid or held-out) is a hash of its question, so the splits never overlap
whatever their sizes.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from .config import ConfigError

DEMO_DIR = Path(__file__).parent / "demo_model"
LONG_DIR = Path(__file__).parent / "long_demo_model"  # trained on ``turns``
KIND = "gsm8k"  # scored as a number, like GSM8K
SPLITS = ("train", "valid", "heldout")
MIN_DAYS, MAX_DAYS = 10, 14
MIN_COUNT, MAX_COUNT = 10, 99
MIN_TURNS, MAX_TURNS = 64, 240
SHORT_STEPS = (6, 30)  # turns of the short problems the long-reasoning model also trains on
DIAL = 100  # the dial shows 0 .. 99
TASKS = ("days", "turns")

NAMES = [
    ("Mia", "she"), ("Sam", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"),
    ("Max", "he"), ("Lily", "she"), ("Ben", "he"), ("Emma", "she"), ("Noah", "he"),
    ("Ella", "she"), ("Jack", "he"), ("Ruby", "she"), ("Owen", "he"), ("Nora", "she"),
    ("Eli", "he"), ("Ivy", "she"), ("Tom", "he"), ("Lucy", "she"), ("Finn", "he"),
]
ITEMS = ["apples", "coins", "stamps", "marbles", "cards", "pens", "shells", "books",
         "stickers", "beads", "buttons", "rocks"]
# (gain verb, loss verb): a problem uses one of them every day
VERBS = [("buys", "sells"), ("finds", "loses"), ("gets", "gives"), ("wins", "loses"),
         ("collects", "uses"), ("makes", "uses")]


def demo_model_path() -> Path:
    """The folder of the demo model shipped with the package."""
    return packaged_model_path("demo")


# Models shipped with the package, by the name --model takes for them
PACKAGED = {"demo": DEMO_DIR, "long-demo": LONG_DIR}


def packaged_model_path(name: str) -> Path:
    """The folder of a model shipped with the package (:data:`PACKAGED`)."""
    path = PACKAGED[name]
    if not (path / "config.json").exists():
        raise ConfigError(f"the packaged model {name!r} is not installed ({path} is missing); give model=PATH")
    return path


@dataclass
class Problem:
    """One task problem: the question, its solution steps and the answer."""

    question: str
    thoughts: List[str]
    answer: int
    counts: List[int]  # the count at the start and after every day
    answer_text: Optional[str] = None  # the answer as the solution writes it, where not str(answer)

    def eval_item(self) -> dict:
        """The problem as an eval item (``bench --data`` / ``evaluate --data``)."""
        return {"question": self.question, "answer": self.answer_text or str(self.answer), "kind": KIND}

    def training_record(self, question: Optional[str] = None, steps: Optional[int] = None) -> dict:
        """The problem as a training record (reference format); with
        ``steps``, only the solution's first ``steps`` steps and no end of
        sequence (``add_eos``: false), which trains how a long solution
        begins at the cost of a short one."""
        record = {"question": question or self.question, "thoughts_list": list(self.thoughts)}
        if steps is not None:
            if not 0 < steps < len(self.thoughts):
                raise ValueError(f"steps must be in [1, {len(self.thoughts) - 1}], got {steps}")
            record.update(thoughts_list=self.thoughts[:steps], add_eos=False)
        return record

    @property
    def solution(self) -> str:
        return "\n\n".join(self.thoughts)


def make_problem(rng: np.random.Generator) -> Problem:
    """Draw one problem (every count along the way stays in 10..99)."""
    while True:
        name, pron = NAMES[rng.integers(len(NAMES))]
        items = ITEMS[rng.integers(len(ITEMS))]
        gaining = bool(rng.integers(2))
        verb = VERBS[rng.integers(len(VERBS))][0 if gaining else 1]
        start = int(rng.integers(MIN_COUNT, MAX_COUNT + 1))
        n = int(rng.integers(2, 10))
        days = int(rng.integers(MIN_DAYS, MAX_DAYS + 1))
        counts = [start + (n if gaining else -n) * day for day in range(days + 1)]
        if min(counts) >= MIN_COUNT and max(counts) <= MAX_COUNT:
            break
    question = (
        f"{name} has {start} {items}. Every day {pron} {verb} {n}. "
        f"How many {items} does {pron} have after {days} days?"
    )
    op = "+" if gaining else "-"
    thoughts = [
        f"Day {day:02d}: {name} {verb} {n}, so {counts[day - 1]} {op} {n} = {counts[day]}."
        for day in range(1, days + 1)
    ]
    thoughts.append(f"After {days} days {name} has \\boxed{{{counts[-1]}}} {items}.")
    return Problem(question, thoughts, counts[-1], counts)


def make_turns_problem(rng: np.random.Generator, steps_range=None) -> Problem:
    """Draw one long problem: a dial turned forward ``MIN_TURNS`` to
    ``MAX_TURNS`` times (``steps_range``: fewest, most, both ends included,
    instead), one step per turn.

    Each step counts the turns still to go (``016 turns to go: it moves 9, so
    89 + 9 = 98.``; values in two digits, ``so 95 + 7 = 02.``), down to the
    closing ``000 turns to go: the dial shows \\boxed{..}.``: a step needs
    from before it only the count and the value the previous step ended
    with (what a compressed step's memory entries carry), and the answer
    ends where the count reaches zero, read off the step being written
    rather than found by comparing numbers."""
    value = int(rng.integers(DIAL))
    n = int(rng.integers(3, 10))
    fewest, most = steps_range or (MIN_TURNS, MAX_TURNS)
    turns = int(rng.integers(fewest, most + 1))
    counts = [(value + n * t) % DIAL for t in range(turns + 1)]
    question = (
        f"A dial shows {value:02d}. Every turn it moves {n} forward, and after {DIAL - 1} it goes on from 0. "
        f"What does it show after {turns:03d} turns?"
    )
    thoughts = [f"{turns - t:03d} turns to go: it moves {n}, so {counts[t]:02d} + {n} = {counts[t + 1]:02d}."
                for t in range(turns)]
    shown = f"{counts[-1]:02d}"
    thoughts.append(f"{TURN_CLOSING}{shown}}}.")
    return Problem(question, thoughts, counts[-1], counts, shown)


# the forms make_turns_problem writes, for tools that read answers back
TURN_QUESTION = re.compile(r"A dial shows (\d+)\. Every turn it moves (\d) forward.* after (\d+) turns\?")
TURN_STEP = re.compile(r"(\d+) turns to go: it moves (\d), so (\d+) \+ (\d) = (\d+)\.")
TURN_CLOSING = "000 turns to go: the dial shows \\boxed{"


MAKERS = {"days": make_problem, "turns": make_turns_problem}


def split_of(question: str) -> str:
    """The split a question belongs to: 10% held-out, 5% valid, the rest train."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < 10 else ("valid" if bucket < 15 else "train")


def problems(split: str, n: int, seed: int = 0, task: str = "days", steps_range=None) -> List[Problem]:
    """``n`` distinct problems of one split, the same for the same ``seed``.

    Args:
        split: ``train``, ``valid`` or ``heldout``.
        n: how many.
        seed: seeds the generator (each split draws from its own stream).
        task: ``days`` (the demo model's) or ``turns`` (long reasoning).
        steps_range: for ``turns``, draw short problems instead: the fewest
            and most turns (``SHORT_STEPS`` for training), from a stream of
            their own.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if task not in MAKERS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if steps_range is not None and task != "turns":
        raise ValueError("steps_range applies to the turns task only")
    if steps_range is not None and not 1 <= steps_range[0] <= steps_range[1] <= MIN_TURNS:
        raise ValueError(f"steps_range must be (fewest, most) within 1..{MIN_TURNS}, not {steps_range}")
    stream = [seed, SPLITS.index(split)] + (list(steps_range) if steps_range is not None else [])
    rng = np.random.default_rng(stream)
    out, seen = [], set()
    while len(out) < n:
        p = MAKERS[task](rng) if steps_range is None else make_turns_problem(rng, steps_range)
        if p.question in seen or split_of(p.question) != split:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def heldout_items(n: int = 200, seed: int = 0, task: str = "days") -> List[dict]:
    """The held-out eval items (``question``, ``answer``, ``kind``)."""
    return [p.eval_item() for p in problems("heldout", n, seed, task)]


def problem_prompts(tokenizer, cfg, limit: int, data=None) -> List[List[int]]:
    """Prompt ids of the first ``limit`` problems of ``data`` (JSON lines,
    each with a ``question``) or, without it, of the held-out problems."""
    from .generation import prompt_ids

    if data:
        items = [json.loads(line) for line in open(data) if line.strip()][:limit]
    else:
        items = heldout_items(limit)
    return [prompt_ids(tokenizer, it["question"], cfg, None, False) for it in items]


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def iter_text(split_problems) -> Iterator[str]:
    """Question and solution texts (a tokenizer's training corpus)."""
    for p in split_problems:
        yield p.question
        yield p.solution


def main(argv=None):
    """``python -m mlx_memosight.demo FILE``: write the held-out problems as an
    eval file (what ``bench --data`` and ``evaluate --data`` read)."""
    import argparse

    p = argparse.ArgumentParser(prog="mlx_memosight.demo", description=main.__doc__.split(":")[0])
    p.add_argument("file", help="the JSON-lines file to write")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("-n", type=int, default=200, help="number of problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=TASKS, default="days",
                   help="days: the demo model's task; turns: the long-reasoning task")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n must be at least 1, got {args.n}")
    path = write_jsonl(args.file, [q.eval_item() for q in problems(args.split, args.n, args.seed, args.task)])
    print(f"wrote {args.n} {args.split} problems to {path}")


if __name__ == "__main__":
    main()
