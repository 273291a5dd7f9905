"""The real models' shapes at two layers: real widths, head layouts (7:1 GQA,
head dims 64 and 128, q / k norms), vocabularies of 128k-152k plus the
MemoSight tokens, Llama-3 rope scaling, tied and untied heads. A random-weight
PyTorch checkpoint of each shape (``convert.real_shapes``, the family's real
tokenizer) is converted, and the MLX model's logits equal transformers' in
float32 on a training sample and on every inference pass."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import shared_path  # noqa: E402
from convert import parity  # noqa: E402
from mlx_memosight.config import MemoSightConfig  # noqa: E402
from mlx_memosight.convert import convert  # noqa: E402
from mlx_memosight.loading import load_folder  # noqa: E402

TOL = 1e-4
SHAPES = ["qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "qwen3-0.6b"]


@pytest.fixture(scope="module", params=SHAPES)
def shape(request, tmp_path_factory):
    """``(name, transformers model, MLX folder, MemoSight config, tokenizer)``."""
    from transformers import AutoModelForCausalLM

    from convert.real_shapes import make_real_checkpoint

    name = request.param
    root = tmp_path_factory.mktemp(name)
    info = make_real_checkpoint(root / "ckpt", name, layers=2, dtype="float32", max_shard_size="400MB",
                                shared=shared_path())
    convert(info["path"], root / "mlx", progress=False, log=lambda *a: None)
    folder = load_folder(root / "mlx")
    hf = AutoModelForCausalLM.from_pretrained(str(info["path"]), dtype=torch.float32).eval()
    return name, hf, folder, MemoSightConfig.load(root / "mlx"), info


def check(hf, folder, case):
    t_hidden, m_hidden, t_logits, m_logits = parity.both(hf, folder.model, case)
    assert np.abs(t_logits).max() > 0.1  # not a comparison of near-zeros
    np.testing.assert_allclose(m_hidden, t_hidden, atol=TOL * max(1.0, np.abs(t_hidden).max()), rtol=0)
    np.testing.assert_allclose(m_logits, t_logits, atol=TOL, rtol=0)


def test_the_checkpoint_has_the_published_shape(shape):
    from convert.real_shapes import shape_config

    name, hf, folder, cfg, info = shape
    published = shape_config(name)
    args = folder.model.args
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(args, key) == published[key], key
    assert args.num_hidden_layers == 2 and args.vocab_size == info["vocab_size"] >= published["vocab_size"]
    assert len(cfg.token_ids.memory) == 300 and cfg.token_ids.memory[-1] < args.vocab_size
    attn = folder.model.layers[0].self_attn
    assert attn.n_heads // attn.n_kv_heads == published["num_attention_heads"] // published["num_key_value_heads"]
    if name.startswith("llama"):
        assert json.loads((info["path"] / "config.json").read_text())["rope_parameters"]["factor"] == 32.0


def test_training_sample_parity(shape):
    name, hf, folder, cfg, _ = shape
    case = parity.training_case(folder.hf_tokenizer, cfg)
    assert len(case.rows) == 4 and len(set(case.rows)) == 4
    check(hf, folder, case)


@pytest.mark.parametrize("kind", parity.PASS_KINDS)
def test_inference_pass_parity(shape, kind):
    """Each pass after a causal prefix of the prompt and a step's text."""
    name, hf, folder, cfg, _ = shape
    case = parity.pass_case(folder.hf_tokenizer, cfg, kind)
    assert case.rows == list(range(case.start, len(case.ids)))
    check(hf, folder, case)


def test_memosight_decoding_runs_at_the_shape(shape):
    """Drafting and compression on the real vocabulary and head layout commit
    exactly the tokens of decoding without drafts (random weights: whatever
    they say, they say it losslessly)."""
    from mlx_memosight.engine import Engine

    name, hf, folder, cfg, _ = shape
    prompt = cfg.template.render(parity.QUESTION, parity.SYSTEM)
    ids = folder.hf_tokenizer.encode(prompt, add_special_tokens=False)
    plain = [e.token for e in Engine(folder.model, cfg, foresight=False).generate(ids, 10)]
    drafted = [e.token for e in Engine(folder.model, cfg, draft_len=2, foresight_sets="all").generate(ids, 10)]
    assert drafted == plain and len(plain) == 10


def test_full_depth_script(tmp_path):
    """examples/check_real_shape.py (here at one layer): every input within
    the tolerance, and with --gguf llama.cpp's tokens, logits and greedy
    tokens as MLX's; it fails, exit 1, when the MLX model differs from the
    checkpoint."""
    import importlib.util
    import subprocess
    import sys

    import mlx.core as mx

    from conftest import ROOT

    def run(*extra):
        return subprocess.run([sys.executable, str(ROOT / "examples" / "check_real_shape.py"), "qwen3-0.6b",
                               "--layers", "1", "--work", str(tmp_path), "--shared", str(shared_path()), *extra],
                              capture_output=True, text=True, timeout=600)

    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()}
    for kind in ("training",) + parity.PASS_KINDS:
        assert rows[kind][-1] == "yes" and float(rows[kind][3]) <= TOL, rows[kind]
    assert r.stdout.rstrip().endswith("all within tolerance")
    if importlib.util.find_spec("llama_cpp") is not None:  # the test extra installs it
        r = run("--gguf", "--tokens", "4")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "as transformers: yes" in r.stdout and "(within 0.002: yes)" in r.stdout
        assert "greedy tokens equal: 4 of 4" in r.stdout

    weights = tmp_path / "mlx-float32" / "model.safetensors"
    w = mx.load(str(weights))
    w["model.norm.weight"] = w["model.norm.weight"] * 1.01
    mx.eval(w)  # read before the file is written over
    mx.save_safetensors(str(weights), w, metadata={"format": "mlx"})
    r = run()
    assert r.returncode == 1 and "DIFFERENCES over the tolerance" in r.stdout, r.stdout + r.stderr
