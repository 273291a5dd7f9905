"""The converter on PyTorch-trained MemoSight checkpoints (convert.make_checkpoint):
logits parity with the PyTorch model under the MemoSight layout, memosight.json,
mlx-lm loading, quantised output, and one-line errors that leave nothing behind."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import ROOT, shared_path  # noqa: E402
from convert import torch_layout  # noqa: E402
from convert.make_checkpoint import make_checkpoint  # noqa: E402
from helpers import make_bpe_tokenizer  # noqa: E402
from mlx_memosight import convert as convert_mod  # noqa: E402
from mlx_memosight.config import CONFIG_FILE, MemoSightConfig, build_config  # noqa: E402
from mlx_memosight.layout import Role, build_training_sample, encode_steps  # noqa: E402
from mlx_memosight.loading import load_folder  # noqa: E402
from mlx_memosight.model import forward  # noqa: E402

F32_TOL = 1e-4


def load(path):
    """``(model, tokenizer, memosight config)`` of a converted folder."""
    folder = load_folder(path)
    return folder.model, folder.tokenizer, folder.memosight

# name -> (make_checkpoint arguments, tokenizer: "bpe" or a ../shared tokenizer)
CHECKPOINTS = {
    "qwen2_bpe_sharded": (dict(family="qwen2", max_shard_size="100KB", trainer_files=True), "bpe"),
    "llama_bpe_bin": (dict(family="llama", bin_format=True, max_shard_size="100KB",
                           transformers4_config=True), "bpe"),
    "qwen2_bpe_bf16": (dict(family="qwen2", dtype="bfloat16"), "bpe"),
    "llama_bpe_plain": (dict(family="llama", memosight=False), "bpe"),
    "qwen2_real": (dict(family="qwen2", hidden=32, steps=1), "qwen2"),
    "llama3_real_bin_bf16": (dict(family="llama", hidden=32, steps=1, bin_format=True,
                                  dtype="bfloat16"), "llama3"),
}
PARITY = [n for n in CHECKPOINTS if n != "llama_bpe_plain"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    """``checkpoint(name)``: the named checkpoint folder, made on first use."""
    made = {}

    def get(name):
        if name not in made:
            kwargs, tok = CHECKPOINTS[name]
            if tok == "bpe":
                tokenizer = make_bpe_tokenizer()
            else:
                tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", tok))
            made[name] = make_checkpoint(workdir / name, tokenizer=tokenizer, **kwargs)["path"]
        return made[name]

    return get


@pytest.fixture(scope="module")
def converted(workdir, checkpoint):
    """``converted(name, **options)``: the converted folder, converted once."""
    done = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in done:
            out = workdir / "out" / f"{name}-{len(done)}"
            convert_mod.convert(checkpoint(name), out, progress=False, log=lambda *a: None,
                                **options)
            done[key] = out
        return done[key]

    return get


def memosight_sample(tokenizer, cfg: MemoSightConfig):
    prompt = tokenizer.encode(cfg.template.render("What is 6 times 7?", system="Be brief."),
                              add_special_tokens=False)
    steps, lens = encode_steps(tokenizer, ["6 times 7 is 6 + 6 + 6 + 6 + 6 + 6 + 6.",
                                           "That is 42.", "So the answer is \\boxed{42}."])
    s = build_training_sample(prompt, steps, cfg.token_ids, cfg.compression_ratio, offset=2,
                              thought_lens=lens)
    assert {Role.FORESIGHT, Role.MEMORY, Role.CONTINUE} <= set(s.roles.tolist())
    return s.input_ids, s.positions, s.mask()


def both_logits(ckpt, out, ids, positions, mask):
    """(PyTorch float32 logits of the checkpoint, MLX logits of the converted model)."""
    ref = AutoModelForCausalLM.from_pretrained(str(ckpt)).float().eval()
    t = torch_layout.logits(ref, torch.tensor(ids).long(), torch.tensor(positions).long(),
                            torch.tensor(mask))[0].numpy()
    model, _, _ = load(out)
    m = np.array(forward(model, ids, positions, mx.array(mask))[0].astype(mx.float32))
    return t, m


@pytest.mark.parametrize("name", PARITY)
def test_float32_logits_parity(name, checkpoint, converted):
    out = converted(name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint(name)))
    cfg = MemoSightConfig.load(out)
    t, m = both_logits(checkpoint(name), out, *memosight_sample(tokenizer, cfg))
    assert np.abs(t).max() > 1.0
    np.testing.assert_allclose(m, t, atol=F32_TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_bpe_bf16", "llama3_real_bin_bf16"])
def test_bfloat16_checkpoint_keeps_its_dtype(name, checkpoint, converted):
    """By default a bfloat16 checkpoint stays bfloat16; its logits agree with
    the PyTorch float32 run within the documented bfloat16 tolerance."""
    out = converted(name)
    weights = {}
    for f in out.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    assert {a.dtype for a in weights.values()} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint(name)))
    t, m = both_logits(checkpoint(name), out, *memosight_sample(tokenizer, MemoSightConfig.load(out)))
    tol = convert_mod.TOLERANCE["bfloat16"] * max(1.0, np.abs(t).max())
    assert np.abs(m - t).max() <= tol
    assert np.abs(m - t).max() > F32_TOL  # bfloat16 arithmetic did run


@pytest.mark.parametrize("name", PARITY)
def test_memosight_json_ids_equal_the_tokenizers(name, checkpoint, converted):
    out = converted(name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint(name)))
    cfg = MemoSightConfig.load(out)
    ids = tokenizer.convert_tokens_to_ids
    assert cfg.token_ids.splitter == ids("<|splitter|>")
    assert cfg.token_ids.continue_ == ids("<|continue|>")
    assert cfg.token_ids.foresight == ids("<|register|>")
    assert cfg.token_ids.memory == [ids(f"<|o_{i}|>") for i in range(300)]
    assert cfg.token_ids.eos == ids(cfg.template.eos)
    assert cfg.to_dict() == build_config(tokenizer, cfg.model_family,
                                         hf_config=json.loads((checkpoint(name) / "config.json").read_text())).to_dict()
    hf = json.loads((checkpoint(name) / "config.json").read_text())
    assert (cfg.max_offset, cfg.mtp_loss_weight, cfg.lm_loss_weight) == (
        hf["max_offset"], hf["mtp_loss_weight"], hf["lm_loss_weight"])


def test_mlx_lm_loads_the_output(checkpoint, converted):
    import mlx_lm

    name = "llama_bpe_bin"
    out = converted(name, dtype="float32")
    model, tokenizer = mlx_lm.load(str(out))
    assert len(tokenizer._tokenizer) == len(AutoTokenizer.from_pretrained(str(checkpoint(name))))
    config = json.loads((out / "config.json").read_text())
    # the transformers-4 config's RoPE settings reach mlx-lm; untied head kept
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["tie_word_embeddings"] is False and "lm_head" in model


def test_streamed_shards_are_exact(checkpoint, converted):
    """Several output files (streamed tensor by tensor) hold exactly the
    checkpoint's tensors, readable by the safetensors library and mlx-lm."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    import mlx_lm

    ckpt = checkpoint("qwen2_bpe_sharded")
    out = converted("qwen2_bpe_sharded", max_shard_bytes=60_000)
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = {}
    for f in ckpt.glob("model*.safetensors"):
        original.update(load_file(f))
    original.pop("lm_head.weight", None)  # tied
    got = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for k in sf.keys():
                got[k] = sf.get_tensor(k)
                assert index["weight_map"][k] == f.name
    assert set(got) == set(original) == set(index["weight_map"])
    for k in original:
        np.testing.assert_array_equal(got[k], original[k])
    mlx_lm.load(str(out))


@pytest.mark.parametrize("tensors, nbytes, ahead", [(3, 1 << 40, 3), (100, 0, 1)])
def test_conversion_runs_ahead_of_writing_within_its_bounds(checkpoint, tmp_path, monkeypatch,
                                                             tensors, nbytes, ahead):
    """Tensors are converted ahead of the one being checked and written: as
    many as AHEAD_TENSORS allows, unless AHEAD_BYTES of input stops it (0:
    one ahead); the files are the same whatever the look-ahead."""
    from safetensors.numpy import load_file

    from mlx_memosight.convert import writer

    ckpt = checkpoint("qwen2_bpe_sharded")
    reference = tmp_path / "reference"
    convert_mod.convert(ckpt, reference, progress=False, log=lambda *a: None)
    issued, ahead_at_write = [], []
    convert_tensor, write = writer._convert_tensor, writer.SafetensorsWriter.write

    def counting_convert(job, x):
        issued.append(job.name)
        return convert_tensor(job, x)

    def counting_write(self, name, array):
        if name in issued:  # the first output of its tensor (others are renamed)
            ahead_at_write.append(len(issued) - 1 - issued.index(name))
        write(self, name, array)

    monkeypatch.setattr(writer, "_convert_tensor", counting_convert)
    monkeypatch.setattr(writer.SafetensorsWriter, "write", counting_write)
    monkeypatch.setattr(writer, "AHEAD_TENSORS", tensors)
    monkeypatch.setattr(writer, "AHEAD_BYTES", nbytes)
    out = tmp_path / "out"
    convert_mod.convert(ckpt, out, progress=False, log=lambda *a: None)
    assert len(issued) > 10 and len(ahead_at_write) > 10
    assert max(ahead_at_write) == ahead  # reached, never passed
    assert ahead_at_write[-ahead - 1:] == list(range(ahead, -1, -1))  # the tail drains in order
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# per dtype: the unsigned type of its width and the bits of its largest finite value
_LARGEST = {mx.bfloat16: (mx.uint16, 0x7F7F), mx.float16: (mx.uint16, 0x7BFF), mx.float32: (mx.uint32, 0x7F7FFFFF)}


@pytest.mark.parametrize("dtype", list(_LARGEST))
def test_finite_check_finds_every_bad_value_within_a_bounded_memory(monkeypatch, dtype):
    """The NaN / inf check reads the raw bits a slice at a time: it sees every
    value (the largest finite ones pass), and needs little memory beside the
    tensor, in MLX or in NumPy."""
    import tracemalloc

    from mlx_memosight.convert import writer

    uint, bits = _LARGEST[dtype]
    largest = mx.array([bits], uint).view(dtype)
    x = mx.random.normal((1024, 4096)).astype(dtype)
    x[3, 7] = largest[0]
    x[5, 9] = -largest[0]
    mx.eval(x)
    monkeypatch.setattr(writer, "CHECK_ELEMENTS", x.size // 16)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tracemalloc.start()
    assert writer._all_finite(x)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert numpy_peak < 0.3 * x.nbytes, numpy_peak  # slices, no copy of the tensor
    assert mx.get_peak_memory() - base < 0.1 * x.nbytes
    monkeypatch.setattr(writer, "CHECK_ELEMENTS", 1000)
    for flat_index, bad in ((0, float("nan")), (x.size - 1, float("inf")), (1500, -float("inf")), (999, -float("nan"))):
        y = mx.array(x).reshape(-1)
        y[flat_index] = bad
        assert not writer._all_finite(y.reshape(x.shape)), (flat_index, bad)
    assert writer._all_finite(x) and writer._all_finite(mx.array(1.0, dtype))


class _Touch:
    """Unpickling this creates a file: a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trainer_files_are_never_unpickled(checkpoint, tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint("qwen2_bpe_sharded"), ckpt)
    marker = tmp_path / "marker"
    for f in ("optimizer.pt", "training_args.bin", "rng_state.pth"):
        assert (ckpt / f).exists()
        torch.save(_Touch(marker), ckpt / f)
    convert_mod.convert(ckpt, tmp_path / "out", progress=False, log=lambda *a: None)
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "config.json", "generation_config.json", CONFIG_FILE, "model.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


def test_quantized_output_loads_and_generates(checkpoint, converted):
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.generate import stream_generate

    out = converted("qwen2_bpe_sharded", quantize=True, q_group_size=32, q_bits=4, verify=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    model, tokenizer = mlx_lm.load(str(out))
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    ms_model, ms_tokenizer, cfg = load(out)
    assert cfg is not None
    prompt = ms_tokenizer.encode(cfg.template.render("What is 12 times 5?"), add_special_tokens=False)
    theirs = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8)]
    ours, tokens = [], list(prompt)
    for _ in range(8):
        nxt = int(mx.argmax(forward(ms_model, tokens, 0, "causal")[0, -1]))
        ours.append(nxt)
        tokens.append(nxt)
    assert len(theirs) >= 1
    assert ours[: len(theirs)] == theirs


def test_plain_checkpoint_converts_with_a_notice(checkpoint, tmp_path, capsys):
    ckpt = checkpoint("llama_bpe_plain")
    capsys.readouterr()
    out = tmp_path / "plain"
    convert_mod.main([str(ckpt), "-o", str(out), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith("notice:")] == [
        f"notice: {ckpt} has no MemoSight tokens; converting it as a plain llama model "
        f"(no {CONFIG_FILE})"]
    assert not (out / CONFIG_FILE).exists()
    model, tokenizer, cfg = load(out)
    assert cfg is None
    ids = np.array(tokenizer.encode("Tom has 3 apples and buys 4 more."), np.int32)
    T = len(ids)
    mask = np.tril(np.ones((T, T), bool))
    t, m = both_logits(ckpt, out, ids, np.arange(T), mask)
    np.testing.assert_allclose(m, t, atol=F32_TOL, rtol=0)


def test_force_replaces_and_refuses_without_it(checkpoint, tmp_path, capsys):
    ckpt = checkpoint("qwen2_bpe_bf16")
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        convert_mod.main([str(ckpt), "-o", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlx_memosight.convert: error: {out}: already exists (--force replaces it)"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_mod.main([str(ckpt), "-o", str(out), "--force"])
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _break_config(**changes):
    def apply(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return apply


def _truncate_shard(ckpt):
    shard = sorted(ckpt.glob("model-*-of-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)


def _pickle_in_bin(ckpt):
    torch.save(_Touch(ckpt.parent / "marker"), sorted(ckpt.glob("pytorch_model*.bin"))[0])


BAD_INPUTS = {
    "missing config.json": ("qwen2_bpe_sharded", lambda c: (c / "config.json").unlink(),
                            ["config.json: file not found"]),
    "unsupported model_type": ("qwen2_bpe_sharded", _break_config(model_type="mistral"),
                               ["config.json: model_type 'mistral' is not supported",
                                "supported: qwen2, llama"]),
    "truncated safetensors": ("qwen2_bpe_sharded", _truncate_shard,
                              ["model-00002-of-", "not a complete safetensors file"]),
    "shape disagrees with config": ("qwen2_bpe_sharded", _break_config(intermediate_size=96),
                                    ["mlp.", "has shape", "intermediate_size", "implies"]),
    "vocab_size below tokenizer": ("qwen2_bpe_sharded", _break_config(vocab_size=500),
                                   ["config.json: vocab_size 500 is smaller than the tokenizer's 609 tokens"]),
    "pickle in a .bin": ("llama_bpe_bin", _pickle_in_bin,
                         ["pytorch_model-00001-of-", "refusing to run its pickle"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_nothing(case, checkpoint, tmp_path, capsys):
    name, breaker, expected = BAD_INPUTS[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint(name), ckpt)
    breaker(ckpt)
    capsys.readouterr()
    out = tmp_path / "models" / "out"
    with pytest.raises(SystemExit) as e:
        convert_mod.main([str(ckpt), "-o", str(out)])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_memosight.convert: error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # not even models/
    assert not (tmp_path / "marker").exists()


def test_unwritable_out(checkpoint, tmp_path, capsys):
    ckpt = checkpoint("qwen2_bpe_bf16")
    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    with pytest.raises(SystemExit) as e:
        convert_mod.main([str(ckpt), "-o", str(out)])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"mlx_memosight.convert: error: {out}: cannot create the output folder "
                     "(Not a directory)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failed_verify_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    from mlx_memosight.convert import verify

    monkeypatch.setattr(verify, "TOLERANCE", {k: -1.0 for k in verify.TOLERANCE})
    ckpt = checkpoint("qwen2_bpe_bf16")
    capsys.readouterr()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        convert_mod.main([str(ckpt), "-o", str(out), "--verify"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "verify: max |logit difference|" in captured.out
    assert captured.err.strip().splitlines()[-1].startswith(
        "mlx_memosight.convert: error: --verify: max |logit difference|")
    assert list(tmp_path.iterdir()) == []


def _run(code_or_args, **kw):
    return subprocess.run([sys.executable] + code_or_args, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def test_bin_without_torch_is_a_clear_error(checkpoint, tmp_path):
    ckpt, out = checkpoint("llama_bpe_bin"), tmp_path / "out"
    code = ("import sys; sys.modules['torch'] = None\n"
            "from mlx_memosight.convert import main\n"
            f"main([{str(ckpt)!r}, '-o', {str(out)!r}])")
    r = _run(["-c", code])
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.startswith("mlx_memosight.convert")]
    assert len(lines) == 1
    assert "pytorch_model-00001-of-" in lines[0] and "needs PyTorch" in lines[0]
    assert "pip install torch" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_command_line_verify(checkpoint, tmp_path):
    """``python -m mlx_memosight convert`` end to end, with --verify (real
    Qwen2 tokenizer when ../shared is present)."""
    ckpt = checkpoint("qwen2_real")
    r = _run(["-m", "mlx_memosight", "convert", str(ckpt), "-o", str(tmp_path / "out"),
              "--verify"])
    assert r.returncode == 0, r.stderr
    verify = [l for l in r.stdout.splitlines() if l.startswith("verify:")]
    assert len(verify) == 1 and "MemoSight training sample" in verify[0]
    assert float(verify[0].split("difference| ")[1].split()[0]) <= F32_TOL
    assert "converting" in r.stderr  # the progress bar
    assert f"saved {tmp_path / 'out'}: qwen2, float32" in r.stdout
    r = _run(["-m", "mlx_memosight.convert", "--help"])
    assert r.returncode == 0
    for flag in ("--dtype", "--quantize", "--q-bits", "--q-group-size", "--force", "--verify"):
        assert flag in r.stdout


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mlx_memosight.convert"] == "mlx_memosight.convert:main"


def test_unsupported_quantization_flags(checkpoint, tmp_path, capsys):
    ckpt = checkpoint("qwen2_bpe_bf16")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert_mod.main([str(ckpt), "-o", str(tmp_path / "out"), "-q",
                          "--q-bits", "7"])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--q-bits 7 with --q-group-size 64" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_tokens_are_added_and_initialised_as_the_reference_does():
    from convert.make_checkpoint import add_tokens_as_reference, base_model
    from mlx_memosight.config import SPECIAL_TOKENS, description_ids

    tok = make_bpe_tokenizer()
    base = len(tok)
    model = base_model("llama", base, 32, 1, 2, 1, 64, False, 0, tok)
    before = model.get_output_embeddings().weight[:base].detach().clone()
    added = add_tokens_as_reference(model, tok)
    assert [t for t, _ in added] == [t for t, _ in SPECIAL_TOKENS]
    assert model.config.vocab_size == len(tok) == base + len(SPECIAL_TOKENS)
    embed = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert torch.equal(head[:base], before)  # untied head, base rows untouched
    ids = tok.convert_tokens_to_ids
    # "\n\n" (added after the splitter) is set first, so the splitter copies its row
    assert torch.equal(embed[ids("<|splitter|>")], embed[ids("\n\n")])
    for token, description in [("<|o_5|>", "compress output 5"), ("<|register|>", "predict the future token")]:
        d = description_ids(tok, description)
        assert all(i < base for i in d)
        torch.testing.assert_close(embed[ids(token)], embed[d].mean(0), rtol=0, atol=0)
        torch.testing.assert_close(head[ids(token)], head[d].mean(0), rtol=0, atol=0)


def test_out_may_not_replace_the_checkpoint(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_bpe_bf16"), ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    capsys.readouterr()
    for out in (ckpt, tmp_path):
        with pytest.raises(SystemExit):
            convert_mod.main([str(ckpt), "-o", str(out), "--force"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"mlx_memosight.convert: error: {out}: must not be the checkpoint "
                         "folder or one that holds it"]
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_converted_model_decodes_with_memosight(converted):
    """The decode engine runs a converted PyTorch-trained model: drafting with
    foresight tokens commits exactly the plain greedy tokens."""
    import mlx_memosight

    out = converted("qwen2_bpe_sharded", dtype="float32")
    model, tokenizer = mlx_memosight.load(out)
    assert model.memosight_config is not None
    question = "Anna reads 15 pages a day. How many pages does she read in 4 days?"
    drafted = mlx_memosight.generate(model, tokenizer, question, max_tokens=24)
    plain = mlx_memosight.generate(model, tokenizer, question, max_tokens=24, foresight=False)
    assert drafted.token_ids == plain.token_ids and len(plain.token_ids) > 0
    assert drafted.stats.drafted_tokens > 0
