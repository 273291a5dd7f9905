"""examples/train_tiny_reasoner.py stopped by Ctrl-C: each model is written as
trained so far, beside (never over) a finished one, and the run exits 130."""

import os
import signal
import subprocess
import sys
import time

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
