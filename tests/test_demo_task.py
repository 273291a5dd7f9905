"""The demo model's synthetic task: deterministic, disjoint splits, right answers."""

import json
import re

import pytest

from conftest import ROOT
from mlx_memosight import demo
from mlx_memosight.datasets import split_steps
from mlx_memosight.scoring import extract_boxed, load_items, score

QUESTION = re.compile(
    r"(\w+) has (\d+) (\w+)\. Every day (he|she) (\w+) (\d+)\. "
    r"How many \3 does \4 have after (\d+) days\?"
)
STEP = re.compile(r"Day (\d\d): (\w+) (\w+) (\d+), so (\d+) ([+-]) (\d+) = (\d+)\.")


def solve(question: str) -> int:
    """The answer worked out from the question text alone."""
    m = QUESTION.fullmatch(question)
    assert m, question
    start, verb, n, days = int(m[2]), m[5], int(m[6]), int(m[7])
    gains = {g for g, _ in demo.VERBS}
    losses = {l for _, l in demo.VERBS}
    assert verb in gains | losses
    count = start
    for _ in range(days):
        count += n if verb in gains else -n
        assert demo.MIN_COUNT <= count <= demo.MAX_COUNT
    return count


def test_generator_is_deterministic():
    a = demo.problems("train", 30, seed=3)
    b = demo.problems("train", 30, seed=3)
    c = demo.problems("train", 30, seed=4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.thoughts for p in a] == [p.thoughts for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert demo.heldout_items(5) == demo.heldout_items(5)


def test_splits_never_overlap():
    qs = {s: [p.question for p in demo.problems(s, n)] for s, n in
          (("train", 3000), ("valid", 200), ("heldout", 200))}
    for split, questions in qs.items():
        assert len(set(questions)) == len(questions)
        assert all(demo.split_of(q) == split for q in questions)
    assert not set(qs["train"]) & set(qs["heldout"])
    assert not set(qs["train"]) & set(qs["valid"])
    assert not set(qs["valid"]) & set(qs["heldout"])
    # other seeds draw other problems but keep to the same split
    assert all(demo.split_of(p.question) == "heldout" for p in demo.problems("heldout", 50, seed=9))


def test_answers_and_steps_are_right():
    for p in demo.problems("heldout", 200):
        answer = solve(p.question)
        assert p.answer == answer
        days = int(QUESTION.fullmatch(p.question)[7])
        assert demo.MIN_DAYS <= days <= demo.MAX_DAYS
        assert len(p.thoughts) == days + 1
        count = int(QUESTION.fullmatch(p.question)[2])
        for day, step in enumerate(p.thoughts[:-1], 1):
            m = STEP.fullmatch(step)
            assert m, step
            assert int(m[1]) == day and int(m[5]) == count
            x, n, y = int(m[5]), int(m[7]), int(m[8])
            assert y == (x + n if m[6] == "+" else x - n)
            count = y
        assert extract_boxed(p.thoughts[-1]) == str(answer) == str(count)
        # the solution reads back as these steps, and the reference scoring accepts it
        assert split_steps(p.solution) == p.thoughts
        assert score(p.solution, p.eval_item())


def test_heldout_file_for_bench_and_evaluate(tmp_path):
    path = tmp_path / "heldout.jsonl"
    demo.main([str(path), "-n", "7"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == demo.heldout_items(7)
    assert all(set(r) == {"question", "answer", "kind"} for r in rows)
    items = load_items(path)
    assert len(items) == 7 and items[0]["kind"] == "gsm8k"
    with pytest.raises(SystemExit):
        demo.main([str(tmp_path / "x.jsonl"), "-n", "0"])


TURNS_QUESTION = re.compile(
    r"A dial shows (\d{2})\. Every turn it moves (\d) forward, and after 99 it goes on from 0\. "
    r"What does it show after (\d{3}) turns\?"
)
TURN = re.compile(r"(\d{3}) turns to go: it moves (\d), so (\d{2}) \+ (\d) = (\d{2})\.")


def check_turns_problem(p):
    """The question's form, every step's count and addition, the closing step; the number of turns."""
    m = TURNS_QUESTION.fullmatch(p.question)
    assert m, p.question
    value, n, turns = int(m[1]), int(m[2]), int(m[3])
    assert len(p.thoughts) == turns + 1
    for t, step in enumerate(p.thoughts[:-1]):
        s = TURN.fullmatch(step)
        assert s, step
        assert int(s[1]) == turns - t and int(s[2]) == int(s[4]) == n
        assert int(s[3]) == value and int(s[5]) == (value + n) % 100
        value = int(s[5])
    assert p.answer == value and extract_boxed(p.thoughts[-1]) == f"{value:02d}"
    assert p.thoughts[-1] == f"000 turns to go: the dial shows \\boxed{{{value:02d}}}."
    assert p.thoughts[-1].startswith(demo.TURN_CLOSING)
    assert split_steps(p.solution) == p.thoughts
    assert score(p.solution, p.eval_item())
    return turns


def test_long_task_answers_and_steps_are_right():
    """The long-reasoning task: one step per turn of a 100-position dial,
    counting down the turns to go."""
    ps = demo.problems("heldout", 100, task="turns")
    assert ps != demo.problems("heldout", 100)
    assert all(demo.split_of(p.question) == "heldout" for p in ps)
    turn_counts = [check_turns_problem(p) for p in ps]
    assert demo.MIN_TURNS <= min(turn_counts) < 100 and 200 < max(turn_counts) <= demo.MAX_TURNS
    with pytest.raises(ValueError, match="task must be one of days, turns"):
        demo.problems("heldout", 1, task="weeks")


def test_long_task_heldout_file(tmp_path):
    path = tmp_path / "long.jsonl"
    demo.main([str(path), "-n", "3", "--task", "turns"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == demo.heldout_items(3, task="turns") and "dial" in rows[0]["question"]


def test_short_turns_problems_for_training():
    """Short problems: the same steps, fewer of them."""
    short = demo.problems("train", 40, task="turns", steps_range=demo.SHORT_STEPS)
    steps = [check_turns_problem(p) for p in short]
    assert min(steps) >= demo.SHORT_STEPS[0] and max(steps) <= demo.SHORT_STEPS[1] and len(set(steps)) > 10
    assert short == demo.problems("train", 40, task="turns", steps_range=demo.SHORT_STEPS)
    cut = short[0].training_record(steps=3)
    assert cut == {"question": short[0].question, "thoughts_list": short[0].thoughts[:3], "add_eos": False}
    for bad in (0, len(short[0].thoughts)):
        with pytest.raises(ValueError, match="steps must be in"):
            short[0].training_record(steps=bad)
    with pytest.raises(ValueError, match="turns task only"):
        demo.problems("train", 1, steps_range=(8, 9))
    with pytest.raises(ValueError, match="steps_range must be"):
        demo.problems("train", 1, task="turns", steps_range=(8, 90))


def test_turn_steps_diagnosis():
    """examples/turn_steps.py: every check holds on a true solution; a step
    that took a wrong value, one that wrote a wrong count and one that named
    a wrong amount are counted as such; the end of an answer: reaching the last turn, on the right value,
    closing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("turn_steps", ROOT / "examples" / "turn_steps.py")
    turn_steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(turn_steps)
    p = demo.problems("heldout", 1, task="turns")[0]
    turns = len(p.thoughts) - 1
    counts = turn_steps.check_answer(p.question, p.solution)
    assert counts == dict.fromkeys(("steps",) + turn_steps.CHECKS, turns)
    steps = list(p.thoughts)
    a, b = p.counts[4], (p.counts[4] + 1) % 100
    steps[4] = steps[4].replace(f"so {a:02d} + ", f"so {b:02d} + ")  # step 5 starts from a wrong value
    steps[9] = steps[9].replace(f"{turns - 9:03d} turns", f"{turns - 8:03d} turns")  # and step 10 from a wrong count
    n = int(turn_steps.STEP.fullmatch(steps[14])[2])
    steps[14] = steps[14].replace(f"it moves {n},", f"it moves {n % 9 + 1},")  # step 15 names a wrong amount
    counts = turn_steps.check_answer(p.question, "\n\n".join(steps))
    assert counts["carried"] == counts["addition"] == turns - 1  # step 5 took a wrong value; its sum is not of what it took
    assert counts["count"] == turns - 2  # step 10, and step 11 after it
    assert counts["amount"] == turns - 1 and counts["steps"] == turns
    ends = ("reached", "right_there", "closed")
    assert turn_steps.answer_end(p.question, p.solution) == dict.fromkeys(ends, True)
    on = p.thoughts[:-1] + [p.thoughts[-2].replace("001 turns", "000 turns")]
    assert turn_steps.answer_end(p.question, "\n\n".join(on)) == dict(reached=True, right_there=True, closed=False)
    off = p.thoughts[:-2] + [p.thoughts[-2].replace(f"= {p.answer:02d}.", f"= {(p.answer + 1) % 100:02d}.")]
    assert turn_steps.answer_end(p.question, "\n\n".join(off)) == dict(reached=True, right_there=False, closed=False)
    assert turn_steps.answer_end(p.question, "\n\n".join(p.thoughts[:-2])) == dict.fromkeys(ends, False)
    assert turn_steps.answer_start(p.question, p.solution) and turn_steps.answer_start(p.question, steps[0])
    assert not turn_steps.answer_start(p.question, p.solution.replace(f"{turns:03d} turns", f"{turns % 100:03d} turns", 1))
    assert not turn_steps.answer_start(p.question, "\n\n".join(steps[4:]))  # starts at a later step
    assert not turn_steps.answer_start(p.question, p.solution.replace(f"{turns:03d} turns", f"0{turns:03d} turns", 1))
    assert not turn_steps.answer_start(p.question, "Let me see.\n\n" + p.solution)
    q = next(q for q in demo.problems("heldout", 100, task="turns") if q.counts[0] < 10)
    assert turn_steps.answer_start(q.question, q.solution)
    unpadded = q.solution.replace(f"so 0{q.counts[0]} + ", f"so {q.counts[0]} + ", 1)
    assert not turn_steps.answer_start(q.question, unpadded)  # the value in two digits, as the question has it
