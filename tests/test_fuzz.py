"""Fuzzing of the readers of untrusted files (``tests/fuzz_readers.py``):
random and mutated GGUF files, safetensors headers, training records,
memosight.json, adapter configs and eval files raise only the project's own
errors, never crash the interpreter and never allocate without bound."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from helpers import mlx_model, shipped_reasoner
from train_helpers import chat, record

EXAMPLES = 2000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One valid input of each kind, for the fuzzer to mutate."""
    import gguf
    from mlx_lm.utils import save_config, save_model
    from safetensors.numpy import save_file

    from mlx_memosight.gguf import export_gguf

    root = tmp_path_factory.mktemp("seeds")
    reasoner, _ = shipped_reasoner("qwen2")
    memosight = json.loads((reasoner / "memosight.json").read_text())
    # a one-layer model with the reasoner's tokenizer, as a small GGUF file
    tiny = root / "tiny"
    tiny.mkdir()
    model, args = mlx_model("qwen2", json.loads((reasoner / "config.json").read_text())["vocab_size"],
                            hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                            num_attention_heads=2, num_key_value_heads=1)
    save_model(tiny, model)
    save_config(dict(args), tiny / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "memosight.json"):
        (tiny / f).write_bytes((reasoner / f).read_bytes())
    export_gguf(tiny, root / "tiny.gguf", "f16", progress=False, log=lambda *a: None)
    (root / "tiny.gguf.header").write_text(str(gguf.GGUFReader(root / "tiny.gguf").data_offset))
    # a small weight file and a config
    save_file({"model.norm.weight": np.ones(16, np.float32), "lm_head.weight": np.zeros((4, 16), np.float16),
               "ids": np.arange(6, dtype=np.int32)}, str(root / "model.safetensors"), metadata={"format": "mlx"})
    (root / "config.json").write_text((reasoner / "config.json").read_text())
    (root / "records.json").write_text(json.dumps([record(1), chat(2), {
        "question": "Q", "system_prompt": "S", "thoughts_list": ["a", "b"], "add_eos": False}]))
    (root / "memosight.json").write_text(json.dumps(memosight))
    (root / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        "memosight": memosight, "base_fingerprint": "0123456789abcdef"}))
    save_file({"model.layers.1.self_attn.q_proj.lora_a": np.zeros((16, 8), np.float32)},
              str(root / "adapters.safetensors"))
    (root / "eval.json").write_text(json.dumps({"math": [
        {"question": "2 + 2?", "answer": "#### 4"}, {"question": "3 * 3?", "answer": "9", "kind": "gsm8k"}],
        "mmlu": [{"question": "Pick", "answer": "B", "choices_list": ["x", "y"], "kind": "mmlu"}]}))
    return root


@pytest.mark.parametrize("reader", ["gguf", "safetensors", "jsonl", "memosight", "adapters", "eval"])
def test_reader_raises_only_the_projects_errors(reader, seeds):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_readers.py"), reader, str(seeds),
                        str(EXAMPLES)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{reader}: {EXAMPLES} inputs"), summary
