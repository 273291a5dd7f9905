"""End to end: ``mlx_memosight.lora`` trains a plain base model, saves and
resumes adapters, ``mlx_memosight.fuse`` writes a standalone MemoSight model,
and mlx-lm loads both; bad input gives one-line errors."""

import json
import re
import shutil

import numpy as np
import pytest

import mlx.core as mx
import mlx_lm

from mlx_memosight import lora as lora_cli
from mlx_memosight import fuse as fuse_cli
from mlx_memosight.datasets import MemoSightDataset, load_splits
from mlx_memosight.loading import load_folder
from mlx_memosight.train import TrainingOptions, evaluate, load_base, prepare, train
from train_helpers import make_base_model, make_data, record, write_jsonl

VAL = re.compile(r"Iter (\d+)/\d+: val loss ([0-9.]+)")


def run_cli(main, argv, capsys):
    """Run a command's main(); returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_base_model(root / "base")
    make_data(root / "data")
    return root


@pytest.fixture(scope="module")
def trained(workdir):
    """One CLI training run shared by the tests below."""
    argv = ["--model", workdir / "base", "--data", workdir / "data", "--train", "--iters", 12,
            "--learning-rate", 2e-3, "--steps-per-eval", 6, "--steps-per-report", 6,
            "--save-every", 6, "--val-batches", -1, "--adapter-path", workdir / "adapters",
            "--save-base", workdir / "base_ms"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lora_cli.main([str(a) for a in argv])
    return workdir, out.getvalue()


def test_training_lowers_validation_loss_and_saves_adapters(trained):
    workdir, out = trained
    vals = [float(v) for _, v in VAL.findall(out)]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0
    assert "Added 309 MemoSight tokens" in out
    assert re.search(r"Iter 12/12: train loss [0-9.]+, [0-9,]+ tok/s, peak mem [0-9.]+ GB, ETA 0:00:00", out)
    # one line per report: mlx-lm's own report lines are not shown beside these
    assert out.count("Iter 12/12: train loss") == 1 and "Train loss" not in out and "Val loss" not in out
    ad = workdir / "adapters"
    for name in ("adapters.safetensors", "0000006_adapters.safetensors", "0000012_adapters.safetensors",
                 "adapter_config.json"):
        assert (ad / name).is_file(), name
    config = json.loads((ad / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert "model.embed_tokens" in config["lora_parameters"]["keys"]
    assert config["memosight"]["compression_ratio"] == 6 and config["tokens_added"] == 309


def test_adapters_load_with_mlx_lm_and_fuse(trained, capsys):
    workdir, _ = trained
    adapted, tok = mlx_lm.load(str(workdir / "base_ms"), adapter_path=str(workdir / "adapters"))
    base, _ = mlx_lm.load(str(workdir / "base_ms"))
    fused_path = workdir / "fused"
    code, out, err = run_cli(fuse_cli.main, ["--model", workdir / "base", "--adapter-path",
                                             workdir / "adapters", "--save-path", fused_path], capsys)
    assert code == 0, err
    folder = load_folder(fused_path)
    model, tokenizer, cfg = folder.model, folder.tokenizer, folder.memosight
    assert cfg is not None and cfg.compression_ratio == 6 and cfg.template.name == "qwen"
    assert len(tokenizer) == 609 and tokenizer.convert_tokens_to_ids("<|splitter|>") == 300
    x = mx.array([[1, 40, 41, 300, 308, 309, 400, 2]])
    np.testing.assert_allclose(np.array(model(x)), np.array(adapted(x)), atol=1e-4)
    via_mlx_lm, _ = mlx_lm.load(str(fused_path))
    np.testing.assert_allclose(np.array(via_mlx_lm(x)), np.array(adapted(x)), atol=1e-4)
    assert np.abs(np.array(base(x)) - np.array(adapted(x))).max() > 0.1
    # the MemoSight rows were trained, the base vocabulary's rows were not
    E0 = np.array(base.model.embed_tokens.weight)
    E1 = np.array(model.model.embed_tokens.weight)
    assert np.array_equal(E0[:300], E1[:300]) and np.abs(E0[300:] - E1[300:]).max() > 1e-3
    config = json.loads((fused_path / "config.json").read_text())
    assert config["vocab_size"] == 609 and config["max_offset"] == 2 and 2 in config["eos_token_id"]
    # the fused model decodes with MemoSight: steps end in a splitter and are compressed
    from mlx_memosight import generate, load

    fused, fused_tok = load(fused_path)
    question = record(100)
    result = generate(fused, fused_tok, question["question"], max_tokens=80,
                      system=question["system_prompt"])
    assert result.stats.compress_events >= 1 and result.stats.generated_tokens > 10
    # an existing output folder is kept unless --force
    code, _, err = run_cli(fuse_cli.main, ["--model", workdir / "base", "--adapter-path",
                                           workdir / "adapters", "--save-path", fused_path], capsys)
    assert code == 1 and "already exists (--force replaces it)" in err and err.count("\n") == 1


def test_qwen3_trains_fuses_and_evaluates(tmp_path, capsys):
    """A Qwen3 base model (q / k norms) through lora, fuse and evaluate: the
    fused model is a qwen3 model with the family's defaults, computes what
    the adapters compute on the base, and evaluate decodes with it."""
    from conftest import shared_path
    from mlx_memosight import evaluate as evaluate_cli

    base = make_base_model(tmp_path / "base", family="qwen3")
    data = make_data(tmp_path / "data", n_train=8, n_valid=4)
    code, out, err = run_cli(lora_cli.main, [
        "--model", base, "--data", data, "--train", "--iters", 4, "--learning-rate", 2e-3,
        "--steps-per-eval", 4, "--val-batches", 1, "--adapter-path", tmp_path / "adapters",
        "--save-base", tmp_path / "base_ms"], capsys)
    assert code == 0, err
    code, _, err = run_cli(fuse_cli.main, ["--model", base, "--adapter-path", tmp_path / "adapters",
                                           "--save-path", tmp_path / "fused"], capsys)
    assert code == 0, err
    folder = load_folder(tmp_path / "fused")
    assert folder.config["model_type"] == "qwen3" and hasattr(folder.model.layers[0].self_attn, "q_norm")
    assert folder.memosight.template.name == "qwen" and folder.memosight.compression_ratio == 6
    adapted, _ = mlx_lm.load(str(tmp_path / "base_ms"), adapter_path=str(tmp_path / "adapters"))
    base_ms, _ = mlx_lm.load(str(tmp_path / "base_ms"))
    x = mx.array([[1, 40, 41, 300, 308, 309, 400, 2]])
    np.testing.assert_allclose(np.array(folder.model(x)), np.array(adapted(x)), atol=1e-4)
    assert np.abs(np.array(base_ms(x)) - np.array(adapted(x))).max() > 1e-3
    records = tmp_path / "gsm8k.jsonl"
    code, out, err = run_cli(evaluate_cli.main, ["--model", tmp_path / "fused", "--data",
                                                 shared_path("eval", "gsm8k.json"), "--limit", 2,
                                                 "--max-tokens", 24, "--out", records], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 2 and all(1 <= r["output_tokens"] <= 24 for r in rows) and "Accuracy:" in out


def test_resume_starts_from_the_saved_adapters(trained, capsys):
    workdir, _ = trained
    model, tok = mlx_lm.load(str(workdir / "base_ms"), adapter_path=str(workdir / "adapters"))
    cfg = load_base(workdir / "base_ms")[3]
    valid = MemoSightDataset.from_examples(load_splits(workdir / "data")["valid"][0], tok, cfg, 2048)
    expected = evaluate(model, valid, batch_size=4)
    code, out, err = run_cli(lora_cli.main, [
        "--model", workdir / "base", "--data", workdir / "data", "--train", "--iters", 2,
        "--val-batches", -1, "--adapter-path", workdir / "resumed",
        "--resume-adapter-file", workdir / "adapters" / "adapters.safetensors"], capsys)
    assert code == 0, err
    first = float(VAL.findall(out)[0][1])
    assert abs(first - expected) < 2e-3
    assert (workdir / "resumed" / "adapters.safetensors").is_file()


def test_resume_with_adapters_of_another_model(trained, tmp_path, capsys):
    workdir, _ = trained
    other = make_base_model(tmp_path / "other", seed=1)
    narrow = make_base_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    capsys.readouterr()
    argv = ["--model", other, "--data", workdir / "data", "--train", "--iters", 1,
            "--adapter-path", tmp_path / "out", "--resume-adapter-file",
            workdir / "adapters" / "adapters.safetensors"]
    code, _, err = run_cli(lora_cli.main, argv, capsys)
    assert code == 1 and err.count("\n") == 1
    assert "--resume-adapter-file " in err and "adapters.safetensors: adapters of another model" in err
    assert not (tmp_path / "out").exists()
    # without the config beside them, the shapes tell
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(workdir / "adapters" / "adapters.safetensors", lone)
    argv[1], argv[-1] = narrow, lone / "adapters.safetensors"
    code, _, err = run_cli(lora_cli.main, argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "has shape" in err and "(adapters of another model)" in err
    code, _, err = run_cli(fuse_cli.main, ["--model", other, "--adapter-path", workdir / "adapters",
                                           "--save-path", tmp_path / "f"], capsys)
    assert code == 1 and "adapters of another model" in err and not (tmp_path / "f").exists()


def test_bad_data_errors_name_the_line(trained, tmp_path, capsys):
    workdir, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [record(i) for i in range(4)] + ['{"question": oops}'] +
                [{"question": "Q"}] + [record(i) for i in range(4)])
    base = ["--model", workdir / "base", "--data", data, "--train", "--iters", 1,
            "--adapter-path", tmp_path / "ad"]
    code, _, err = run_cli(lora_cli.main, base, capsys)
    assert code == 1 and err.count("\n") == 1
    assert re.search(r"error: .*train.jsonl:5: not valid JSON", err)
    assert not (tmp_path / "ad").exists()
    code, out, err = run_cli(lora_cli.main, base + ["--skip-bad-lines", "--max-seq-length", 120], capsys)
    assert code == 0, err
    assert "Notice: 2 bad lines of train.jsonl skipped" in out
    assert "Notice: 8 of 8 examples of train.jsonl are longer than --max-seq-length 120" in out
    write_jsonl(data / "train.jsonl", [{"question": "Q", "thoughts_list": ["a"]}, {"question": "Q"}])
    code, _, err = run_cli(lora_cli.main, base, capsys)
    assert code == 1 and "train.jsonl:2: missing field 'thoughts_list' or 'gt_output'" in err
    write_jsonl(data / "train.jsonl", [])
    code, _, err = run_cli(lora_cli.main, base, capsys)
    assert code == 1 and "train.jsonl: no examples" in err
    write_jsonl(data / "train.jsonl", [record(0), record(1)])
    code, _, err = run_cli(lora_cli.main, base, capsys)
    assert code == 1 and "train.jsonl: 2 examples, fewer than --batch-size 4" in err
    code, _, err = run_cli(lora_cli.main, base + ["--max-seq-length", 50], capsys)
    assert code == 1 and "train.jsonl: no examples left (2 have no trained token within " \
        "--max-seq-length 50)" in err
    code, _, err = run_cli(lora_cli.main, base + ["--batch-size", 0], capsys)
    assert code == 1 and "--batch-size must be at least 1, got 0" in err
    code, _, err = run_cli(lora_cli.main, base + ["--grad-accumulation-steps", 2, "--batch-size", 2], capsys)
    assert code == 1 and "--iters 1 must be a multiple of --grad-accumulation-steps 2" in err


def api_run(workdir, adapter_path, **kw):
    model, tok, hf_config, cfg = load_base(workdir / "base")
    cfg, _ = prepare(model, tok, hf_config, cfg)
    splits = load_splits(workdir / "data")
    tr = MemoSightDataset.from_examples(splits["train"][0], tok, cfg, 2048, name="train")
    va = MemoSightDataset.from_examples(splits["valid"][0], tok, cfg, 2048, name="valid")
    opts = dict(iters=4, batch_size=4, learning_rate=2e-3, steps_per_report=1, steps_per_eval=4,
                val_batches=-1)
    callback = kw.pop("callback", None)
    opts.update(kw)
    report = train(model, tok, tr, va, TrainingOptions(**opts), adapter_path=adapter_path,
                   callback=callback, verbose=False)
    return model, report


def test_dora_and_full_fine_tuning(trained, tmp_path):
    workdir, _ = trained
    for kind in ("dora", "full"):
        model, report = api_run(workdir, tmp_path / kind, fine_tune_type=kind)
        losses = [v for _, v in report.train_losses]
        assert losses[-1] < losses[0]
        loaded, _ = mlx_lm.load(str(workdir / "base_ms"), adapter_path=str(tmp_path / kind))
        x = mx.array([[1, 40, 300, 308, 2]])
        model.eval()
        np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), atol=1e-4)
    weights = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    assert "model.embed_tokens.weight" in weights


def test_grad_checkpoint_gives_the_same_curve(trained, tmp_path):
    workdir, _ = trained
    _, plain = api_run(workdir, tmp_path / "a", iters=2, grad_accumulation_steps=2)
    _, ckpt = api_run(workdir, tmp_path / "b", iters=2, grad_accumulation_steps=2, grad_checkpoint=True)
    np.testing.assert_allclose([v for _, v in ckpt.train_losses], [v for _, v in plain.train_losses],
                               rtol=1e-5)


@pytest.mark.parametrize("fine_tune_type", ["lora", "full"])
def test_long_sequence_paths_give_the_same_curve(trained, tmp_path, monkeypatch, fine_tune_type):
    """Blockwise attention and the chunked output layer (what samples past 1024
    tokens train with) through mlx-lm's compiled trainer: the same losses as
    the whole mask and the whole output layer, token rows and grad checkpointing included."""
    from mlx_memosight.train import attention, loss

    workdir, _ = trained
    kw = dict(iters=3, grad_checkpoint=True, fine_tune_type=fine_tune_type)
    monkeypatch.setattr(attention, "BLOCKWISE_FROM", 10 ** 9)  # the whole mask (the CPU default is blockwise)
    _, whole = api_run(workdir, tmp_path / "a", **kw)
    monkeypatch.setattr(attention, "BLOCKWISE_FROM", 0)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    monkeypatch.setattr(loss, "LOSS_CHUNK", 24)
    _, blocks = api_run(workdir, tmp_path / "b", **kw)
    assert len(whole.train_losses) == 3
    np.testing.assert_allclose([v for _, v in blocks.train_losses], [v for _, v in whole.train_losses],
                               rtol=2e-5)


def test_interrupt_saves_adapters(trained, tmp_path):
    workdir, _ = trained

    class Stop:
        def on_train_loss_report(self, info):
            if info["iteration"] == 2:
                raise KeyboardInterrupt

        def on_val_loss_report(self, info):
            pass

    with pytest.raises(KeyboardInterrupt):
        api_run(workdir, tmp_path / "ad", callback=Stop())
    saved = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert "model.layers.1.self_attn.q_proj.lora_b" in saved
    assert np.abs(np.array(saved["model.layers.1.self_attn.q_proj.lora_b"])).max() > 0
