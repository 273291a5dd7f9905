"""Two-process data parallel training (``mlx.launch --backend ring`` on
localhost) follows the one-process loss curve on the same global batches."""

import json
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_helpers import make_base_model, make_data

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import mlx.core as mx
from mlx_memosight.datasets import MemoSightDataset, load_splits
from mlx_memosight.train import TrainingOptions, load_base, prepare, train

model, tok, hf, cfg = load_base(sys.argv[2])
cfg, _ = prepare(model, tok, hf, cfg)
splits = load_splits(sys.argv[3])
tr = MemoSightDataset.from_examples(splits["train"][0], tok, cfg, 2048, 0, "train")
va = MemoSightDataset.from_examples(splits["valid"][0], tok, cfg, 2048, 0, "valid")
opts = TrainingOptions(iters=8, batch_size=4, learning_rate=2e-3, steps_per_report=2,
                       steps_per_eval=4, val_batches=-1, grad_accumulation_steps=2)
report = train(model, tok, tr, va, opts, adapter_path=sys.argv[4], verbose=False)
group = mx.distributed.init()
if group.rank() == 0:
    with open(sys.argv[5], "w") as f:
        json.dump({"size": group.size(), "train": report.train_losses, "val": report.val_losses}, f)
"""


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        p = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    pytest.skip("no free pair of local ports for the ring backend")


def test_two_process_ring_training_matches_one_process(tmp_path):
    launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if launch is None:
        pytest.skip("mlx.launch is not installed")
    base = make_base_model(tmp_path / "base")
    data = make_data(tmp_path / "data", n_train=16, n_valid=8)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def run(cmd, out):
        proc = subprocess.run(cmd + [str(driver), str(ROOT), str(base), str(data),
                                     str(tmp_path / out), str(tmp_path / f"{out}.json")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return json.loads((tmp_path / f"{out}.json").read_text())

    one = run([sys.executable], "one")
    two = run([launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
               "--python", sys.executable], "two")
    assert (one["size"], two["size"]) == (1, 2)
    assert [i for i, _ in one["train"]] == [2, 4, 6, 8] and len(one["val"]) == 3
    for key in ("train", "val"):
        a = np.array([v for _, v in one[key]])
        b = np.array([v for _, v in two[key]])
        np.testing.assert_allclose(b, a, rtol=2e-5)
    assert one["train"][-1][1] < one["train"][0][1] - 0.5  # the curve is a training curve
