"""The ``evaluate`` command: format, scoring, resuming and bad input, with the
packaged demo model."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path
from helpers import run_command
from mlx_memosight import demo, evaluate
from mlx_memosight.demo import demo_model_path
from mlx_memosight.scoring import extract_boxed, score

RECORD_KEYS = {"id", "question", "answer", "prediction", "correct", "output_tokens", "peak_kv_tokens",
               "compress_events", "drafted_tokens", "accepted_draft_tokens", "wall_time", "output"}


class Result:
    def __init__(self, code, stdout, stderr):
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


@pytest.fixture
def cli(capsys):
    """Run ``mlx_memosight.evaluate`` in this process."""
    return lambda *args: Result(*run_command(evaluate.main, args, capsys))


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    demo.write_jsonl(path, demo.heldout_items(4))
    return path


def test_gsm8k_end_to_end(tmp_path, cli):
    data = shared_path("eval", "gsm8k.json")
    out = tmp_path / "gsm8k.jsonl"
    r = cli("--data", data, "--limit", 5, "--max-tokens", 200, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Accuracy:" in r.stdout and "Compress events:" in r.stdout and "Drafts accepted:" in r.stdout
    # the progress bar counts answers (no accuracy shown before any item is done)
    assert re.search(r"\b[0-5]/5 correct", r.stderr) and "accuracy=" not in r.stderr
    recs = lines(out)
    assert [x["id"] for x in recs] == ["math/0", "math/1", "math/2", "math/3", "math/4"]
    gold = json.loads(data.read_text())["math"][:5]
    for rec, item in zip(recs, gold):
        assert RECORD_KEYS <= set(rec)
        assert rec["question"] == item["question"] and rec["answer"] == item["answer"]
        # the record's verdict is the reference scoring of its own output
        assert rec["correct"] == score(rec["output"], dict(item, kind="gsm8k"))
        assert 1 <= rec["output_tokens"] <= 200
    s = evaluate.summarize(recs)
    assert f"{s['accuracy']:.1%}" in r.stdout


def test_demo_model_on_heldout_problems(heldout, tmp_path, cli):
    out = tmp_path / "r.jsonl"
    r = cli("--data", heldout, "--out", out, "--max-tokens", 400, "--draft-len", 2)
    assert r.returncode == 0, r.stderr
    recs = lines(out)
    assert len(recs) == 4
    for x in recs:
        # one compress event per finished day, drafts accepted, a fraction of plain decoding's KV
        assert x["compress_events"] >= demo.MIN_DAYS and x["accepted_draft_tokens"] > 0
        assert x["peak_kv_tokens"] < 0.5 * x["plain_kv_tokens"]
        assert x["prediction"] == extract_boxed(x["output"]) != "error"
        assert x["correct"] == score(x["output"], {"answer": x["answer"], "kind": "gsm8k"})
        # plain decoding of the same text holds no splitters (one per
        # compressed step), nor the pieces a step boundary adds
        assert x["compress_events"] <= x["plain_kv_tokens"] - x["text_kv_tokens"] <= 2 * x["compress_events"] + 2
    shares = [x["peak_kv_tokens"] / x["plain_kv_tokens"] for x in recs]
    assert f"of plain decoding's (largest {max(shares):.1%})" in r.stdout
    text = [x["peak_kv_tokens"] / x["text_kv_tokens"] for x in recs]
    assert f"of plain decoding of the same text (largest {max(text):.1%})" in r.stdout


def test_batch_size_gives_the_same_records(tmp_path, cli):
    """Items decoded together in a batch get the outputs they get one by one (repetition penalty on, as the reference evaluates);
    records come in finishing order and the file resumes the same way."""
    data = tmp_path / "items.jsonl"
    demo.write_jsonl(data, demo.heldout_items(7))
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    args = ("--data", data, "--max-tokens", 300, "--repetition-penalty", 1.1)
    assert cli(*args, "--out", one).returncode == 0
    r = cli(*args, "--out", many, "--batch-size", 4, "--limit", 5)
    assert r.returncode == 0, r.stderr
    r = cli(*args, "--out", many, "--batch-size", 4)
    assert r.returncode == 0 and "5 of 7 items already evaluated" in r.stderr
    # (the drafting policy weighs drafts at the batch's costs, so what was
    # drafted, and the temporary entries of drafts, may differ)
    keep = ("id", "output", "correct", "output_tokens", "compress_events")
    by_id = {x["id"]: x for x in lines(many)}
    assert len(by_id) == 7
    for x in lines(one):
        assert {k: x[k] for k in keep} == {k: by_id[x["id"]][k] for k in keep}
    assert "Accuracy:" in r.stdout
    bad = cli(*args, "--batch-size", 0)
    assert bad.returncode == 1 and "--batch-size" in bad.stderr


def test_resume_skips_done_items(heldout, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = ["--data", str(heldout), "--out", str(out), "--max-tokens", "20"]
    evaluate.main(args + ["--limit", "2"])
    first = lines(out)
    assert [x["id"] for x in first] == ["0", "1"]
    capsys.readouterr()
    evaluate.main(args + ["--limit", "3"])
    err = capsys.readouterr().err
    assert "2 of 3 items already evaluated" in err
    recs = lines(out)
    assert [x["id"] for x in recs] == ["0", "1", "2"]
    assert recs[:2] == first  # untouched
    # other settings into the same file are refused, naming it
    with pytest.raises(SystemExit) as e:
        evaluate.main(args[:-1] + ["30"])
    assert e.value.code == 1
    assert str(out) in capsys.readouterr().err


def test_interrupt_leaves_a_valid_file(heldout, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.jsonl"
    real = evaluate.evaluate_item
    calls = []

    def flaky(model, tokenizer, item, settings):
        calls.append(item["index"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, tokenizer, item, settings)

    monkeypatch.setattr(evaluate, "evaluate_item", flaky)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", str(heldout), "--out", str(out), "--max-tokens", "10"])
    assert e.value.code == 130
    assert "--out" in capsys.readouterr().err
    assert [x["id"] for x in lines(out)] == ["0"]
    # a line cut short by a killed run is dropped; the run continues after the complete ones
    with open(out, "a") as f:
        f.write('{"id": "1", "quest')
    monkeypatch.setattr(evaluate, "evaluate_item", real)
    evaluate.main(["--data", str(heldout), "--out", str(out), "--max-tokens", "10"])
    assert "incomplete last line" in capsys.readouterr().err
    assert [x["id"] for x in lines(out)] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("case", ["missing", "bad-json", "limit", "bad-results", "model"])
def test_bad_input(case, heldout, tmp_path, cli):
    data, extra = heldout, []
    if case == "missing":
        data = tmp_path / "nope.jsonl"
        expect = "nope.jsonl: file not found"
    elif case == "bad-json":
        data = tmp_path / "bad.jsonl"
        data.write_text(heldout.read_text().splitlines()[0] + "\n{oops\n")
        expect = "bad.jsonl:2: not valid JSON"
    elif case == "limit":
        extra = ["--limit", "0"]
        expect = "--limit must be at least 1"
    elif case == "bad-results":
        out = tmp_path / "r.jsonl"
        out.write_text("not json\n{}\n")
        extra = ["--out", str(out)]
        expect = "r.jsonl:1: not a result line"
    else:
        extra = ["--model", str(tmp_path / "no-model")]
        expect = "no-model"
    r = cli("--data", data, *extra)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and expect in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_dispatcher_runs_evaluate(heldout):
    r = subprocess.run([sys.executable, "-m", "mlx_memosight", "evaluate", "--data", str(heldout),
                        "--limit", "1", "--max-tokens", "10", "--no-foresight"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Accuracy:" in r.stdout and "Drafts accepted: -" in r.stdout
    assert demo_model_path().is_dir()
