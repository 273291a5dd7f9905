"""What a user of mlx-lm expects of the commands: its flag names, a model folder
that says how to run it, settings kept through conversion, config files, and
output without repeats or stray lines."""

import json
import re

import pytest

from helpers import run_command
from mlx_memosight import generate, load
from mlx_memosight.bench import main as bench_main
from mlx_memosight.convert import main as convert_main
from mlx_memosight.demo import demo_model_path
from mlx_memosight.generate import main as generate_main
from mlx_memosight.lora import main as lora_main
from train_helpers import make_base_model, make_data

QUESTION = "Mia has 25 apples. Every day she buys 3. How many apples does she have after 12 days?"


def test_convert_keeps_the_memosight_configuration_of_an_mlx_folder(tmp_path, capsys):
    """The demo model folder converted again (once to float16 too) keeps its
    memosight.json exactly and decodes the same tokens."""
    src = demo_model_path()
    code, _, err = run_command(convert_main, [src, "-o", tmp_path / "same"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "same" / "memosight.json").read_text()) == \
        json.loads((src / "memosight.json").read_text())
    a, tok = load(src)
    b, _ = load(tmp_path / "same")
    assert b.memosight_config.compression_ratio == 12
    kw = dict(max_tokens=120, foresight_sets="all")
    assert generate(a, tok, QUESTION, **kw).token_ids == generate(b, tok, QUESTION, **kw).token_ids
    # mlx-lm's names for the input and output folders, and a setting changed on purpose
    code, _, err = run_command(convert_main, ["--hf-path", src, "--mlx-path", tmp_path / "r6",
                                              "--compression-ratio", 6, "--default-draft-len", 3], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "r6" / "memosight.json").read_text())
    assert cfg["compression_ratio"] == 6 and cfg["draft_len"] == 3


def test_converted_folder_has_a_model_card(tmp_path, capsys):
    code, _, err = run_command(convert_main, [demo_model_path(), "-o", tmp_path / "m"], capsys)
    assert code == 0, err
    card = (tmp_path / "m" / "README.md").read_text()
    assert "python -m mlx_memosight.generate --model m" in card
    assert "mlx_lm.generate" in card and "degrades" in card and "compression ratio 12" in card


def test_generate_takes_mlx_lm_flag_names(capsys):
    args = ["--prompt", QUESTION, "--max-tokens", 400]
    code, plain, err = run_command(generate_main, args, capsys)
    assert code == 0, err
    # --system-prompt is --system; the demo template's own system text is the default
    code, same, _ = run_command(generate_main, args + ["--system-prompt", "Solve the problem step by step."],
                                capsys)
    assert code == 0 and same == plain
    # --verbose False prints only the text; --quiet only the statistics
    code, text, err = run_command(generate_main, args + ["--verbose", "False"], capsys)
    assert code == 0 and text == plain and "Generation:" not in err
    code, text, err = run_command(generate_main, args + ["--quiet"], capsys)
    assert code == 0 and text == "" and "Generation:" in err
    # --ignore-chat-template is --raw-prompt: the prompt goes in as written
    code, raw, err = run_command(generate_main, ["--prompt", "Day 01:", "--max-tokens", 8,
                                                 "--ignore-chat-template"], capsys)
    assert code == 0, err
    # sampling flags as mlx-lm's; a seed reproduces a sampled answer
    sampled = [run_command(generate_main, args + ["--temp", 0.8, "--top-k", 5, "--min-p", 0.05, "--seed", 3],
                           capsys)[1] for _ in range(2)]
    assert sampled[0] == sampled[1]
    # the answer ends with one newline, not the last step's blank line
    assert plain.endswith("apples.\n") and not plain.endswith("\n\n")


def test_generate_with_adapters_equals_the_fused_model(tmp_path, capsys):
    from mlx_memosight.fuse import main as fuse_main

    base = make_base_model(tmp_path / "base")
    data = make_data(tmp_path / "data", n_train=4, n_valid=2)
    code, _, err = run_command(lora_main, ["--model", base, "--data", data, "--train", "--iters", 2,
                                           "--batch-size", 2, "--learning-rate", 1e-2,
                                           "--adapter-path", tmp_path / "ad"], capsys)
    assert code == 0, err
    code, _, err = run_command(fuse_main, ["--model", base, "--adapter-path", tmp_path / "ad",
                                           "--save-path", tmp_path / "fused"], capsys)
    assert code == 0, err
    args = ["--prompt", "Tom has 3 apples and buys 4 more.", "--max-tokens", 12, "--verbose", "False"]
    code, with_adapters, err = run_command(generate_main, ["--model", base, "--adapter-path", tmp_path / "ad"]
                                           + args, capsys)
    assert code == 0, err
    code, fused, err = run_command(generate_main, ["--model", tmp_path / "fused"] + args, capsys)
    assert code == 0, err
    assert with_adapters == fused and with_adapters.strip()


def test_lora_config_file_with_mlx_lm_keys(tmp_path, capsys):
    base = make_base_model(tmp_path / "base")
    data = make_data(tmp_path / "data", n_train=4, n_valid=2)
    config = tmp_path / "lora.yaml"
    config.write_text(f"model: {base}\ndata: {data}\ntrain: true\niters: 4\nbatch_size: 2\n"
                      "learning_rate: 2e-3\nsteps_per_report: 2\nlora_parameters:\n  rank: 4\n  scale: 10.0\n"
                      "optimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: 0.01\nmask_prompt: true\n")
    code, out, err = run_command(lora_main, ["-c", config, "--iters", 2, "--adapter-path", tmp_path / "ad"],
                                 capsys)
    assert code == 0, err
    assert "mask_prompt is ignored" in err
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["iters"] == 2  # the command line wins over the file
    assert saved["learning_rate"] == 2e-3 and saved["lora_rank"] == 4 and saved["lora_scale"] == 10.0
    assert saved["optimizer"] == "adamw" and saved["optimizer_config"] == {"weight_decay": 0.01}
    assert saved["lora_parameters"]["rank"] == 4
    assert out.count("Iter 2/2: train loss") == 1


def test_bench_defaults_to_the_demo_model_and_names_the_blas_once(tmp_path, capsys):
    code, out, err = run_command(bench_main, ["--prompt", QUESTION, "--max-tokens", 20], capsys)
    assert code == 0, err
    assert out.count("device: cpu") + out.count("device: gpu") == 1
    assert "note:" not in err
    assert re.search(r"^memosight\s+20\s", out, re.M)


def test_matplotlib_is_installed_with_the_package():
    tomllib = pytest.importorskip("tomllib")
    from conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("matplotlib") for d in deps)
