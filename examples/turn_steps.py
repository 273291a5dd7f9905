"""Per-step diagnosis of answers to the long-reasoning task (``turns``).

    python examples/turn_steps.py RESULTS.jsonl [...]

RESULTS is what ``python -m mlx_memosight.evaluate --out RESULTS`` wrote for
``tiny-reasoner-long/heldout.jsonl``. For every step written as the task's
steps are (``011 turns to go: it moves 7, so 95 + 7 = 02.``; numbers are
compared as numbers, so answers of earlier forms, whose values had no
leading zero, read the same) it checks
what the step had to get right: the count, one less than the previous step's
(the question's number of turns for the first step), the amount from the
question, the value the previous step ended with (the count and the value
are what, once that step is compressed, only its memory entries carry), and
the addition. Prints how many answers start right (their first step is
the task's first step), the share of steps right on each check, how many answers
reach the last turn (``001 turns to go``), how many of those on the right
value, and how many then close with the task's final step
(``000 turns to go: the dial shows \\boxed{..}.``).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight.demo import TURN_CLOSING as CLOSING, TURN_QUESTION as QUESTION, TURN_STEP as STEP  # noqa: E402

CHECKS = ("count", "amount", "carried", "addition")
ENDS = ("reached", "right_there", "closed")


def _question(question: str):
    q = QUESTION.search(question)
    if q is None:
        raise ValueError(f"not a question of the turns task: {question[:80]!r}")
    return int(q[1]), int(q[2]), int(q[3])  # value, n, turns


def _steps(output: str):
    """The answer's steps (split at blank lines, stripped), each with its
    match of the task's step form or None."""
    steps = [text.strip() for text in output.split("\n\n")]
    return steps, [STEP.fullmatch(text) for text in steps]


def check_answer(question: str, output: str) -> dict:
    """Counts of steps in the task's form and of those right on each check."""
    value, amount, count = _question(question)
    counts = dict.fromkeys(("steps",) + CHECKS, 0)
    for m in _steps(output)[1]:
        if m is None:
            continue
        c, moved, x, n, y = (int(g) for g in m.groups())
        counts["steps"] += 1
        counts["count"] += c == count
        counts["amount"] += moved == amount
        counts["carried"] += x == value
        counts["addition"] += y == (x + n) % 100
        count, value = c - 1, y
    return counts


def answer_end(question: str, output: str) -> dict:
    """Whether the answer has a step of the last turn (``001 turns to go``:
    ``reached``), whether the first such step ends on the right value
    (``right_there``), and whether the closing step comes right after it
    (``closed``)."""
    value, n, turns = _question(question)
    steps, matches = _steps(output)
    last = [(i, m) for i, m in enumerate(matches) if m and int(m[1]) == 1]
    if not last:
        return dict.fromkeys(ENDS, False)
    i, m = last[0]
    return {"reached": True, "right_there": int(m[5]) == (value + n * turns) % 100,
            "closed": i + 1 < len(steps) and steps[i + 1].startswith(CLOSING)}


def answer_start(question: str, output: str) -> bool:
    """Whether the answer's first step is the task's first step: the
    question's number of turns (three digits), its amount and its value (two
    digits), added right."""
    value, n, turns = _question(question)
    m = _steps(output)[1][0]
    return m is not None and m[1] == f"{turns:03d}" and m[3] == f"{value:02d}" and tuple(
        int(g) for g in m.groups()[1:]) == (n, value, n, (value + n) % 100)


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:]) or sys.exit(__doc__)
    for path in paths:
        rows = [json.loads(line) for line in open(path)]
        total = dict.fromkeys(("steps",) + CHECKS + ENDS, 0)
        started = 0
        for r in rows:
            counts = check_answer(r["question"], r["output"]) | answer_end(r["question"], r["output"])
            started += answer_start(r["question"], r["output"])
            for k, v in counts.items():
                total[k] += v
        right = sum(bool(r["correct"]) for r in rows)
        shares = ", ".join(f"{k} {total[k] / max(total['steps'], 1):.1%}" for k in CHECKS)
        print(f"{path}: {right}/{len(rows)} answers right, {started} start right; {total['steps']} steps in the task's "
              f"form, right on: {shares}; "
              f"{total['reached']} answers reach the last turn, {total['right_there']} on the right value, "
              f"{total['closed']} then close")


if __name__ == "__main__":
    main()
