"""Per-step diagnosis of answers to the long-reasoning task (``turns``).

    python examples/turn_steps.py RESULTS.jsonl [...]

RESULTS is what ``python -m mlx_memosight.evaluate --out RESULTS`` wrote for
``tiny-reasoner-long/heldout.jsonl``. For every step written as the task's
steps are (``Turn 011 of 131: Mia moves it 7, so 95 + 7 = 2.``) it checks
what the step had to get right: the turn after the previous step's, the
number of turns and the name from the question, the value the previous step
ended with (which, once that step is compressed, only its memory entries
carry), and the addition. Prints the share of steps right on each, and how
many answers reach the last turn, how many of those on the right value, and
how many then close with the task's final step (``At turn 131 the dial shows \\boxed{..}.``).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_memosight.demo import TURN_QUESTION as QUESTION, TURN_STEP as STEP  # noqa: E402

CHECKS = ("turn", "total", "name", "carried", "addition")


def check_answer(question: str, output: str) -> dict:
    """Counts of steps in the task's form and of those right on each check."""
    q = QUESTION.search(question)
    if q is None:
        raise ValueError(f"not a question of the turns task: {question[:80]!r}")
    name, value, turn, turns = q[1], int(q[2]), int(q[3]), int(q[5])
    counts = dict.fromkeys(("steps",) + CHECKS, 0)
    for text in output.split("\n\n"):
        m = STEP.fullmatch(text.strip())
        if m is None:
            continue
        t, total, who, x, n, y = int(m[1]), int(m[2]), m[3], int(m[5]), int(m[6]), int(m[7])
        counts["steps"] += 1
        counts["turn"] += t == turn + 1
        counts["total"] += total == turns
        counts["name"] += who == name
        counts["carried"] += x == value
        counts["addition"] += y == (x + n) % 100
        turn, value = t, y
    return counts


def answer_end(question: str, output: str) -> dict:
    """Whether the answer has a step of the last turn (``reached``), whether
    the first such step ends on the right value (``right_there``), and whether
    the closing step comes right after it (``closed``)."""
    q = QUESTION.search(question)
    value, first, n, turns = int(q[2]), int(q[3]), int(q[4]), int(q[5])
    steps = [text.strip() for text in output.split("\n\n")]
    last = [(i, m) for i, text in enumerate(steps) if (m := STEP.fullmatch(text)) and int(m[1]) == turns]
    if not last:
        return {"reached": False, "right_there": False, "closed": False}
    i, m = last[0]
    closing = f"At turn {turns:03d} the dial shows \\boxed{{"
    return {"reached": True, "right_there": int(m[7]) == (value + n * (turns - first)) % 100,
            "closed": i + 1 < len(steps) and steps[i + 1].startswith(closing)}


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:]) or sys.exit(__doc__)
    for path in paths:
        rows = [json.loads(line) for line in open(path)]
        total = dict.fromkeys(("steps",) + CHECKS + ("reached", "right_there", "closed"), 0)
        for r in rows:
            counts = check_answer(r["question"], r["output"]) | answer_end(r["question"], r["output"])
            for k, v in counts.items():
                total[k] += v
        right = sum(bool(r["correct"]) for r in rows)
        shares = ", ".join(f"{k} {total[k] / max(total['steps'], 1):.1%}" for k in CHECKS)
        print(f"{path}: {right}/{len(rows)} answers right; {total['steps']} steps in the task's form, right on: {shares}; "
              f"{total['reached']} answers reach the last turn, {total['right_there']} on the right value, "
              f"{total['closed']} then close")


if __name__ == "__main__":
    main()
