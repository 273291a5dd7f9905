"""examples/train_tiny_reasoner.py: stopped by Ctrl-C, each model is written as
trained so far, beside (never over) a finished one, and the run exits 130;
the long task's training mix."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from mlx_memosight import demo
from mlx_memosight.loading import load


def test_interrupted_run_writes_the_models_trained_so_far(tmp_path):
    out = tmp_path / "run"
    finished = tmp_path / "finished"  # where the MemoSight model goes when the run completes
    cmd = [sys.executable, str(ROOT / "examples" / "train_tiny_reasoner.py"), "--out", str(out),
           "--demo-dir", str(finished), "--train-examples", "400", "--heldout", "2", "--hidden-size", "32",
           "--intermediate-size", "64", "--layers", "1"]
    with open(tmp_path / "log", "w") as log:
        # SIGINT as in a terminal, even where the test runs in the background (where it is ignored,
        # and a Python program that inherits that ignores Ctrl-C)
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            logs = [out / "logs" / f"{kind}.log" for kind in ("memosight", "plain")]
            if all(p.is_file() and "Iter 20/400" in p.read_text() for p in logs):
                break
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "log").read_text()
    assert status == 130, text
    assert not finished.exists()
    for kind in ("memosight", "plain"):
        assert f"{kind}: interrupted after step " in text
        assert (out / f".{kind}-checkpoints" / "adapters.safetensors").is_file()
        model, _ = load(out / f"{kind}-partial")
        assert (model.memosight_config is None) == (kind == "plain")
    assert "interrupted: the models above were written as trained so far" in text
    # the held-out answers' lengths, as the run's tokenizer counts them
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    n = sorted(len(tokenizer.encode(p.solution, add_special_tokens=False)) for p in demo.problems("heldout", 2, 0))
    assert f"held-out reference answers: {n[0]:,} to {n[1]:,} tokens" in text


def test_turns_training_mix(tmp_path, capsys):
    """--task turns: the shares of short problems, long ones cut to their
    first steps (no end of sequence) and whole long ones; a cut problem is
    the start of a true long solution; the records read as the trainer reads them."""
    import importlib.util
    import json
    import re

    from mlx_memosight.datasets import read_jsonl

    spec = importlib.util.spec_from_file_location("train_tiny_reasoner", ROOT / "examples" / "train_tiny_reasoner.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--task", "turns", "--train-examples", "200", "--heldout", "1",
                              "--short-share", "0.5", "--prefix-share", "0.4"])
    (tmp_path / "data").mkdir()
    script.write_data(tmp_path, args)
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    cut = [r for r in rows if r.get("add_eos") is False]
    whole = [r for r in rows if "add_eos" not in r]
    turns = [int(re.search(r"after (\d+) turns", r["question"])[1]) for r in whole]
    assert len(rows) == 200 and len(cut) == 80 and sum(t >= demo.MIN_TURNS for t in turns) == 20
    assert all(len(r["thoughts_list"]) == t + 1 for r, t in zip(whole, turns))  # whole: every turn, then the closing
    fewest, most = demo.SHORT_STEPS
    assert all(fewest <= t <= most for t in turns if t < demo.MIN_TURNS)
    for r in cut:
        t = int(re.search(r"after (\d+) turns", r["question"])[1])
        steps = r["thoughts_list"]
        assert demo.MIN_TURNS <= t and fewest <= len(steps) <= most
        assert steps[0].startswith(f"{t:03d} turns to go") and steps[-1].startswith(f"{t - len(steps) + 1:03d} turns")
    assert len({len(r["thoughts_list"]) for r in cut}) > 10  # cut at many lengths
    defaults = script.parse_args(["--task", "turns"])
    assert (defaults.short_share, defaults.prefix_share) == (0.5, 0.4)
    # the long task's model is the packaged long-demo one, at its own compression ratio
    assert (defaults.demo_dir, defaults.compression_ratio) == (str(demo.LONG_DIR), 16)
    days = script.parse_args([])
    assert (days.demo_dir, days.compression_ratio) == (str(demo.DEMO_DIR), 12)
    assert script.parse_args(["--task", "turns", "--compression-ratio", "12"]).compression_ratio == 12
    assert script.parse_args(["--task", "turns", "--short-share", "0.8"]).prefix_share == pytest.approx(0.1)
    with pytest.raises(SystemExit):
        script.parse_args(["--task", "turns", "--short-share", "0.6", "--prefix-share", "0.4"])
    assert "--prefix-share must be in [0, 1 - --short-share) = [0, 0.4), got 0.4" in capsys.readouterr().err
    examples, bad = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert bad == 0 and [e.add_eos for e in examples] == ["add_eos" not in r for r in rows]
    whole_problem = demo.problems("train", 200, task="turns")
    by_question = {p.question: p for p in whole_problem}
    for r in cut[:10]:  # the cut solution is the start of the true one
        q = r["question"].removeprefix(script.PROMPT_PREFIX)
        assert by_question[q].thoughts[: len(r["thoughts_list"])] == r["thoughts_list"]
    # --model-seed leaves the problems to --seed
    reseeded = script.parse_args(["--task", "turns", "--train-examples", "200", "--heldout", "1", "--model-seed", "5"])
    assert (reseeded.seed, reseeded.model_seed, args.model_seed) == (0, 5, 0)
    (tmp_path / "again" / "data").mkdir(parents=True)
    script.write_data(tmp_path / "again", reseeded)
    assert (tmp_path / "again" / "data" / "train.jsonl").read_text() == (tmp_path / "data" / "train.jsonl").read_text()
