"""The reference's prompt and scoring on its answer formats."""

import json

import pytest

from conftest import shared_path
from mlx_memosight.errors import DataError
from mlx_memosight.scoring import eval_prompt, extract_boxed, gold_answer, load_items, score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{18}.", "18"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a{b}c} and \\boxed{unbalanced", "a{b}c"),
        ("no box here", "error"),
        ("\\boxed{", "error"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_gsm8k():
    item = {"question": "q", "answer": "Janet sells ... \n#### 1,200", "kind": "gsm8k"}
    assert gold_answer(item) == "1,200"
    assert score("The answer is \\boxed{1200}", item)
    assert score("\\boxed{1,200}", item)
    assert not score("\\boxed{120}", item)
    assert not score("1200", item)  # no box: "error"


def test_multiple_choice():
    item = {"question": "q", "answer": "D", "choices_list": ["2", "8", "120", "24"], "kind": "mmlu"}
    assert score("\\boxed{D}", item)
    assert score("\\boxed{(D)}", item)
    assert score("\\boxed{D. 24}", item)
    assert not score("\\boxed{C}", item)
    assert not score("\\boxed{24 }x", item)
    gpqa = dict(item, kind="gpqa", answer="B", choices_list=["10^-8 eV", "10^-4 eV"])
    assert score("\\boxed{B. 10^-4 eV}", gpqa) and not score("\\boxed{A}", gpqa)


def test_bbh():
    assert score("\\boxed{true}", {"question": "q", "answer": "True", "kind": "bbh"})
    assert score("\\boxed{(C)}", {"question": "q", "answer": "(C)", "kind": "bbh"})
    assert score("\\boxed{C}", {"question": "q", "answer": "(C)", "kind": "bbh"})
    assert not score("\\boxed{No}", {"question": "q", "answer": "Yes", "kind": "bbh"})


def test_prompt():
    assert eval_prompt({"question": "2+2?"}) == "Return your final response within \\boxed{}. 2+2?"


@pytest.mark.parametrize("name, kind, n", [("gsm8k.json", "gsm8k", 1319), ("mmlu.json", "mmlu", 1027),
                                           ("gpqa.json", "gpqa", 198), ("bbh.json", "bbh", 495)])
def test_shared_eval_files(name, kind, n):
    items = load_items(shared_path("eval", name))
    assert len(items) == n and all(it["kind"] == kind for it in items)
    # a boxed gold answer scores as correct for every item of the set
    for it in items[:50]:
        ans = gold_answer(it)
        assert score(f"\\boxed{{{ans}}}", it), it


def test_json_lines_and_bad_files(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": "x"}\n')
    items = load_items(f)
    assert [it["question"] for it in items] == ["a", "b"] and items[0]["kind"] == "exact"
    assert len(load_items(f, limit=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_items(bad)
    noq = tmp_path / "noq.json"
    noq.write_text(json.dumps({"s": [{"answer": "1"}]}))
    with pytest.raises(DataError, match="'question' must be a non-empty string"):
        load_items(noq)
    with pytest.raises(DataError, match="not found"):
        load_items(tmp_path / "missing.json")
