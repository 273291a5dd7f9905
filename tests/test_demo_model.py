"""The demo model shipped inside the package."""

import json
import re
import subprocess
import sys
import tomllib

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT
from mlx_memosight import demo, load
from mlx_memosight.loading import resolve_model
from mlx_memosight.config import MemoSightConfig
from mlx_memosight.scoring import eval_prompt, extract_boxed


@pytest.mark.parametrize("name", sorted(demo.PACKAGED))
def test_shipped_files_and_size(name):
    path = resolve_model(name)
    assert path == demo.PACKAGED[name]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "memosight.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) <= 10 * 1024 * 1024
    cfg = MemoSightConfig.load(path)
    assert cfg.template.name == "plain" and cfg.compression_ratio >= 8
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    # installed with the package
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package = f"mlx_memosight.{path.name}"
    assert package in pyproject["tool"]["setuptools"]["packages"]
    assert pyproject["tool"]["setuptools"]["package-data"][package] == ["*"]
    assert pyproject["project"]["scripts"]["mlx_memosight.evaluate"] == "mlx_memosight.evaluate:main"


def test_loads_with_mlx_memosight_and_mlx_lm():
    from mlx_lm import load as mlx_lm_load

    path = demo.demo_model_path()
    model, tokenizer = load(path)
    cfg = model.memosight_config
    assert cfg is not None and cfg.token_ids.eos == tokenizer.eos_token_id
    lm_model, lm_tok = mlx_lm_load(str(path))
    ids = tokenizer.encode(cfg.template.render("Mia has 12 apples."), add_special_tokens=False)
    assert lm_tok.encode(cfg.template.render("Mia has 12 apples."), add_special_tokens=False) == ids
    x = mx.array(ids)[None]
    np.testing.assert_allclose(np.array(lm_model(x)), np.array(model(x)), atol=1e-4)
    # digits are single tokens, so the arithmetic is digit by digit
    assert len(tokenizer.encode("12345", add_special_tokens=False)) >= 5


def test_generate_without_model_shows_compression_and_drafts(tmp_path):
    problem = demo.problems("heldout", 1)[0]
    stats = tmp_path / "stats.json"
    r = subprocess.run(
        [sys.executable, "-m", "mlx_memosight.generate", "--prompt", eval_prompt(problem.eval_item()),
         "--max-tokens", "400", "--draft-len", "2", "--stats-json", str(stats)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr
    assert "Day 01:" in r.stdout and "\\boxed{" in r.stdout
    assert "\n\n" in r.stdout  # steps end in blank lines
    # each step decodes on its own, as it was encoded: no SentencePiece space before "Day"
    assert "\n\nDay 02:" in r.stdout and "\n Day" not in r.stdout, r.stdout
    m = re.search(r"(\d+) compress events", r.stderr)
    assert m and int(m[1]) >= demo.MIN_DAYS, r.stderr
    m = re.search(r"Drafts: (\d+)/(\d+) accepted", r.stderr)
    assert m and int(m[1]) > 0, r.stderr
    # a draft length on the command line is kept on every pass (the layout is still chosen)
    assert re.search(r"^Drafting: draft length 2, (all|last) foresight sets \(\d+% of passes\)", r.stderr, re.M), \
        r.stderr
    assert re.search(r"^Device: (gpu|cpu \(.+\))", r.stderr, re.M), r.stderr
    d = json.loads(stats.read_text())
    assert d["device"] in r.stderr
    assert d["compress_events"] == int(re.search(r"(\d+) compress events", r.stderr)[1])
    assert d["peak_kv_tokens"] < d["plain_kv_tokens"]
    # the answer is read the way the evaluation reads it (right or not: the model is tiny)
    assert extract_boxed(r.stdout).isdigit(), r.stdout


def test_pass_cost_script():
    r = subprocess.run([sys.executable, "examples/pass_cost.py", "--rounds", "2", "--tokens", "1", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[-2:]]
    assert [row[0] for row in rows] == ["1", "3"] and rows[0][2] == "1.00x"
    assert float(rows[1][1]) > 0


def test_pipeline_bench_script():
    """examples/bench_pipeline.py decodes with passes issued ahead and one by
    one (and compiled and op by op; and through the batch engine), checks the
    tokens are the same and prints a row per drafting setting."""
    r = subprocess.run([sys.executable, "examples/bench_pipeline.py", "--limit", "2", "--rounds", "1",
                        "--max-tokens", "60"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("draft 3", "policy"))]
    assert len(rows) == 3 and all(float(row.split()[-3].rstrip("x")) > 0 for row in rows), r.stdout
    assert "committed the same tokens" in r.stdout
    r = subprocess.run([sys.executable, "examples/bench_pipeline.py", "--limit", "1", "--rounds", "1",
                        "--max-tokens", "40", "--switch", "compiled"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("draft 3", "policy", "compression", "plain"))]
    assert len(rows) == 5 and "op by op" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "examples/bench_pipeline.py", "--limit", "2", "--rounds", "1",
                        "--max-tokens", "60", "--batch"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("draft 3", "policy"))]
    assert len(rows) == 3 and "batch engine" in r.stdout, r.stdout
    assert all(int(row[-2]) > 0 and float(row[-3].rstrip("x")) > 0 for row in rows), r.stdout


def test_drafting_choices_script():
    """examples/drafting_choices.py decodes the same problems with the
    acceptance kept per model, from the prior per sequence and at a fixed draft
    length, checks the tokens are the same and prints passes and dropped
    passes for each; kept acceptance never needs more passes than starting
    each sequence from the prior."""
    r = subprocess.run([sys.executable, "examples/drafting_choices.py", "--limit", "4", "--rounds", "1",
                        "--max-tokens", "120"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line[:40].strip(): line[40:].split() for line in r.stdout.splitlines()
            if line.startswith(("policy", "draft "))}
    assert len(rows) == 3 and "every mode committed the same tokens" in r.stdout, r.stdout
    kept, prior = rows["policy, acceptance kept per model"], rows["policy, each sequence from the prior"]
    assert float(kept[0]) > 0 and int(kept[1]) <= int(prior[1]), r.stdout
    assert rows["draft 3, last sets (fixed)"][3] == "-"
    r = subprocess.run([sys.executable, "examples/drafting_choices.py", "--limit", "4", "--rounds", "1",
                        "--max-tokens", "80", "--batch-size", "2"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("batch, ")]
    assert len(rows) == 2 and "every mode committed the same tokens" in r.stdout, r.stdout


def test_packaged_names_yield_to_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "long-demo").mkdir()
    assert resolve_model("long-demo").resolve() == tmp_path / "long-demo"
    assert resolve_model("demo") == demo.DEMO_DIR and resolve_model(None) == demo.DEMO_DIR


def test_long_demo_model_answers_a_long_problem(tmp_path):
    """The packaged long-reasoning model works a held-out problem of 64 and
    more turns through, one compress event per finished turn, and holds a
    fraction of the entries plain decoding holds."""
    problem = min(demo.problems("heldout", 20, task="turns"), key=lambda p: len(p.thoughts))
    stats = tmp_path / "stats.json"
    r = subprocess.run(
        [sys.executable, "-m", "mlx_memosight.generate", "--model", "long-demo", "--prompt",
         eval_prompt(problem.eval_item()), "--max-tokens", "7200", "--stats-json", str(stats)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert extract_boxed(r.stdout) == problem.eval_item()["answer"], r.stdout[-300:]
    d = json.loads(stats.read_text())
    assert d["compress_events"] >= len(problem.thoughts) - 2 >= demo.MIN_TURNS - 1
    assert d["peak_kv_tokens"] < 0.25 * d["plain_kv_tokens"]
