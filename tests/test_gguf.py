"""GGUF export and import: MLX -> GGUF -> MLX round trips (logits, MemoSight
decoding with compression, metadata read back with gguf-py's GGUFReader), q4_1
mapped from MLX 4-bit weights bit for bit, llama.cpp (llama-cpp-python) on
files with the real Qwen2 and Llama-3 tokenizers and a SentencePiece one, and
one-line errors that leave nothing behind."""

import io
import json
import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import shared_path
from helpers import CORPUS, mlx_model, reference_decode
from mlx_memosight import generate, load
from mlx_memosight.generate import main as generate_main
from mlx_memosight.errors import MemoSightError
from mlx_memosight.config import DOUBLE_NEWLINE, SPECIAL_TOKENS, ConfigError, add_memosight_tokens, build_config
from mlx_memosight.gguf import CHECK_TEXT, GGUFError, export_gguf, llama_unpermute, load_gguf
from mlx_memosight.layout import build_training_sample
from mlx_memosight.model import forward

T = gguf.TokenType
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def exported(reasoner, tmp_path_factory):
    """``exported(kind)``: the reasoner written as GGUF (f32, f16, q8_0,
    q4_0, or "q4_1" from an MLX 4-bit group-32 copy), made once."""
    path, _ = reasoner
    out = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(kind):
        if kind not in made:
            src = quantized_copy(path, out / "q4") if kind == "q4_1" else path
            made[kind] = out / f"{kind}.gguf"
            export_gguf(src, made[kind], None if kind == "q4_1" else kind, progress=False,
                        log=lambda *a: None)
        return made[kind]

    return get


def quantized_copy(src, dst, bits=4, group_size=32):
    """An MLX-quantised copy of a model folder (float16 first, as mlx-lm's
    convert does with -q on a float16 model)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    if dst.exists():
        return dst
    model, config = load_model(src)
    model.set_dtype(mx.float16)
    model, config = quantize_model(model, config, group_size, bits)
    dst.mkdir()
    save_model(dst, model)
    save_config(config, dst / "config.json")
    for f in src.iterdir():
        if f.name != "config.json" and not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    return dst


def memosight_sample(tokenizer, cfg, task):
    """A training-layout sample (memory, continue and foresight tokens, per-token
    positions and the compact mask)."""
    prompt = task.prompt(np.random.default_rng(3))
    steps = task.steps(prompt)[:3]
    s = build_training_sample(prompt, steps, cfg.token_ids, cfg.compression_ratio, 2,
                              thought_lens=[len(x) - 2 for x in steps])
    return s.input_ids, s.positions, mx.array(s.mask())


def logits(model, ids, positions, mask):
    return np.array(forward(model, ids, positions, mask)[0].astype(mx.float32))


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_round_trip_is_exact(kind, reasoner, exported):
    """f32: the same parameters and logits; f16: those of the MLX model cast
    to float16 (norms travel as float32 and come back exactly)."""
    path, task = reasoner
    original, tok = load(path)
    if kind == "f16":
        original.set_dtype(mx.float16)
    back, _ = load(exported(kind))
    a, b = dict(tree_flatten(original.parameters())), dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert mx.array_equal(a[name], b[name]).item(), name
    sample = memosight_sample(tok, original.memosight_config, task)
    x, y = logits(original, *sample), logits(back, *sample)
    assert np.abs(x).max() > 1.0
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["f16", "q4_1"])
def test_memosight_decoding_from_the_file_alone(kind, reasoner, exported):
    """Token-identical MemoSight greedy decoding (drafts and compress events)
    from the GGUF file as from the MLX folder it came from."""
    path, task = reasoner
    if kind == "q4_1":
        path = exported("q4_1").parent / "q4"
    original, tok = load(path)
    if kind == "f16":
        original.set_dtype(mx.float16)
    back, back_tok = load(exported(kind))
    cfg = back.memosight_config
    assert cfg.to_dict() == original.memosight_config.to_dict()
    compress = 0
    # one foresight layout for both: "auto" times each loaded model on its own
    # and may pick differently, which changes the draft statistics (not the tokens)
    kw = dict(max_tokens=60, draft_len=2, foresight_sets="all")
    for prompt in (task.prompt(np.random.default_rng(s)) for s in (5, 6)):
        want = generate(original, tok, prompt, **kw)
        got = generate(back, back_tok, prompt, **kw)
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert got.stats.compress_events == want.stats.compress_events
        assert got.stats.accepted_draft_tokens == want.stats.accepted_draft_tokens
        compress += got.stats.compress_events
        if kind == "f16":
            assert got.token_ids == reference_decode(back, cfg, prompt, 60)
    assert compress >= 2


def test_metadata_read_back_with_gguf_reader(reasoner, exported):
    path, _ = reasoner
    model, tok = load(path)
    args, cfg = model.args, model.memosight_config
    reader = gguf.GGUFReader(exported("f16"))
    f = {k: v.contents() for k, v in reader.fields.items()}
    arch = args.model_type
    assert f["general.architecture"] == arch
    K = gguf.Keys
    expect = {
        K.LLM.BLOCK_COUNT: args.num_hidden_layers,
        K.LLM.CONTEXT_LENGTH: args.max_position_embeddings,
        K.LLM.EMBEDDING_LENGTH: args.hidden_size,
        K.LLM.FEED_FORWARD_LENGTH: args.intermediate_size,
        K.Attention.HEAD_COUNT: args.num_attention_heads,
        K.Attention.HEAD_COUNT_KV: args.num_key_value_heads,
    }
    for key, value in expect.items():
        assert f[key.format(arch=arch)] == value, key
    assert f[K.Rope.FREQ_BASE.format(arch=arch)] == pytest.approx(args.rope_theta)
    assert f[K.Attention.LAYERNORM_RMS_EPS.format(arch=arch)] == pytest.approx(args.rms_norm_eps)
    assert f[K.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_F16

    # tokenizer: the fast tokenizer's vocabulary in id order, MemoSight markup as
    # control tokens and the "\n\n" token as user-defined text
    assert f[K.Tokenizer.MODEL] == "gpt2"
    hf = tok._tokenizer
    spec = json.loads(hf.backend_tokenizer.to_str())
    pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] if arch == "qwen2" else None
    assert f[K.Tokenizer.PRE] == ("qwen2" if pattern else "gpt-2")
    vocab = hf.get_vocab()
    tokens, types = f[K.Tokenizer.LIST], f[K.Tokenizer.TOKEN_TYPE]
    assert len(tokens) == args.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    for t, _ in SPECIAL_TOKENS:
        want = T.USER_DEFINED if t == DOUBLE_NEWLINE else T.CONTROL
        assert types[vocab[t]] == want, t
    added = hf.added_tokens_decoder
    assert all(types[i] == T.NORMAL for i in vocab.values() if i not in added)
    assert f[K.Tokenizer.MERGES][:3] == [" ".join(m) if isinstance(m, list) else m
                                         for m in spec["model"]["merges"][:3]]
    assert f[K.Tokenizer.EOS_ID] == hf.eos_token_id
    assert f[K.Tokenizer.EOT_ID] == cfg.token_ids.eos
    assert f[K.Tokenizer.ADD_BOS] is False

    # memosight.* holds every key of memosight.json
    saved = json.loads((path / "memosight.json").read_text())

    def flat(d, prefix="memosight"):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}.{k}")
            elif v is not None:
                yield f"{prefix}.{k}", v

    pairs = dict(flat(saved))
    assert set(pairs) == {k for k in f if k.startswith("memosight.")}
    for key, value in pairs.items():
        if isinstance(value, float):
            assert f[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert f[key] == value, key

    # tensor names and types as llama.cpp expects them
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     args.num_hidden_layers)
    want = {names.get_name(n, try_suffixes=(".weight", ".bias")) for n, _ in tree_flatten(model.parameters())}
    got = {t.name: t for t in reader.tensors}
    assert set(got) == want
    for name, t in got.items():
        expected = Q.F32 if (len(t.shape) == 1 or name.endswith("_norm.weight")) else Q.F16
        assert t.tensor_type == expected, name
    assert ("output.weight" in got) == (not args.tie_word_embeddings)


def test_llama_q_k_rows_are_permuted_as_llama_cpp_expects(reasoner, exported):
    """A Llama model's q / k rows, per head, are reordered from Hugging Face's
    two rotary halves to llama.cpp's interleaved pairs; Qwen2's are not."""
    path, _ = reasoner
    model, _ = load(path)
    reader = gguf.GGUFReader(exported("f32"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    args = model.args
    attn = model.layers[1].self_attn
    for proj, heads, name in ((attn.q_proj, args.num_attention_heads, "blk.1.attn_q.weight"),
                              (attn.k_proj, args.num_key_value_heads, "blk.1.attn_k.weight")):
        w = np.array(proj.weight)
        g = tensors[name]
        if args.model_type == "qwen2":
            np.testing.assert_array_equal(g, w)
            continue
        d = w.shape[0] // heads
        for h in range(heads):
            block = w[h * d:(h + 1) * d]
            interleaved = np.stack([block[: d // 2], block[d // 2:]], axis=1).reshape(block.shape)
            np.testing.assert_array_equal(g[h * d:(h + 1) * d], interleaved)
        np.testing.assert_array_equal(np.array(llama_unpermute(mx.array(g), heads)), w)


def test_q4_1_is_the_mlx_4bit_model_bit_for_bit(reasoner, exported):
    path, task = reasoner
    src = exported("q4_1").parent / "q4"
    model, tok = load(src)
    params = dict(tree_flatten(model.parameters()))
    reader = gguf.GGUFReader(exported("q4_1"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    loaded = mx.load(str(exported("q4_1")))
    heads = {"attn_q": model.args.num_attention_heads, "attn_k": model.args.num_key_value_heads}
    arch = gguf.MODEL_ARCH.QWEN2 if model.args.model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, model.args.num_hidden_layers)
    mlx_names = {names.get_name(n, try_suffixes=(".weight",)): n for n in params if n.endswith(".weight")}
    checked = 0
    for name, t in tensors.items():
        if t.tensor_type != Q.Q4_1:
            assert t.tensor_type == Q.F32 and len(t.shape) == 1, name
            continue
        prefix = mlx_names[name][: -len(".weight")]
        w, s, b = (params[f"{prefix}.{k}"] for k in ("weight", "scales", "biases"))
        # ggml's own q4_1 decoding (gguf-py) equals d * q + m with MLX's q, d, m
        q = np.array(mx.dequantize(w, mx.ones(s.shape, mx.float32), mx.zeros(b.shape, mx.float32),
                                   group_size=32, bits=4))
        expected = (np.repeat(np.array(s, np.float32), 32, axis=1) * q
                    + np.repeat(np.array(b, np.float32), 32, axis=1))
        got = gguf.quants.dequantize(t.data, Q.Q4_1)
        kind = name.split(".")[-2]
        if kind in heads and model.args.model_type == "llama":
            got = np.array(llama_unpermute(mx.array(got), heads[kind]))
        np.testing.assert_array_equal(got, expected)
        # and mx.load gives back MLX's own arrays
        base = name[: -len(".weight")]
        back = [loaded[f"{base}.{k}"] for k in ("weight", "scales", "biases")]
        if kind in heads and model.args.model_type == "llama":
            back = [llama_unpermute(x, heads[kind]) for x in back]
        for x, y in zip((w, s, b), back):
            assert x.dtype == y.dtype and mx.array_equal(x, y).item(), name
        checked += 1
    assert checked == 7 * model.args.num_hidden_layers + 1 + (not model.args.tie_word_embeddings)
    back, _ = load(exported("q4_1"))
    sample = memosight_sample(tok, model.memosight_config, task)
    np.testing.assert_array_equal(logits(model, *sample), logits(back, *sample))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_float_weights_quantised_by_gguf_py(kind, reasoner, exported):
    """q8_0 / q4_0 blocks are gguf-py's quantisation of the float weights, and
    the imported MLX weights decode to exactly what ggml decodes."""
    path, _ = reasoner
    model, _ = load(path)
    qtype = Q.Q8_0 if kind == "q8_0" else Q.Q4_0
    reader = gguf.GGUFReader(exported(kind))
    t = {x.name: x for x in reader.tensors}["blk.0.ffn_down.weight"]
    assert t.tensor_type == qtype
    w = np.array(model.layers[0].mlp.down_proj.weight.astype(mx.float32))
    np.testing.assert_array_equal(np.array(t.data), gguf.quants.quantize(w, qtype))
    back, _ = load(exported(kind))
    layer = back.layers[0].mlp.down_proj
    decoded = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                            group_size=layer.group_size, bits=layer.bits)
    np.testing.assert_array_equal(np.array(decoded), gguf.quants.dequantize(t.data, qtype))


def test_plain_gguf_runs_plain_decoding_with_a_notice(reasoner, tmp_path, capsys):
    path, task = reasoner
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    (plain / "memosight.json").unlink()
    out = tmp_path / "plain.gguf"
    export_gguf(plain, out, "f32", progress=False, log=lambda *a: None)
    assert not [k for k in gguf.GGUFReader(out).fields if k.startswith("memosight.")]
    model, tok = load(out)
    assert model.memosight_config is None
    prompt = task.prompt(np.random.default_rng(1))
    text = tok.decode(prompt)
    stats = tmp_path / "stats.json"
    generate_main(["--model", str(out), "--prompt", text, "--raw-prompt", "-m", "12",
                       "--stats-json", str(stats), "--quiet"])
    err = capsys.readouterr().err
    assert f"notice: {out} has no memosight.* metadata; running plain decoding" in err
    st = json.loads(stats.read_text())
    original, original_tok = load(plain)
    want = generate(original, original_tok, text, max_tokens=12, raw_prompt=True)
    assert st["token_ids"] == want.token_ids and st["compress_events"] == 0


def test_generate_cli_runs_memosight_from_a_gguf_file(reasoner, exported, tmp_path, capsys):
    path, task = reasoner
    prompt = task.prompt(np.random.default_rng(5))
    model, tok = load(path)
    text = tok.decode(prompt)
    stats = tmp_path / "stats.json"
    generate_main(["--model", str(exported("f32")), "--prompt", text, "--raw-prompt", "-m", "40",
                       "--stats-json", str(stats), "--quiet"])
    assert "notice" not in capsys.readouterr().err
    st = json.loads(stats.read_text())
    want = generate(model, tok, tok.encode(text, add_special_tokens=False), max_tokens=40)
    assert st["token_ids"] == want.token_ids
    assert st["compress_events"] == want.stats.compress_events >= 1


# ----------------------------------------------------------------------------
# Bad input


def run_generate(model, capsys):
    with pytest.raises(SystemExit) as e:
        generate_main(["--model", str(model), "--prompt", "hi", "-m", "2"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def write_gguf_file(path, arch, float64_key=None):
    w = gguf.GGUFWriter(path, arch)
    if float64_key:
        w.add_float64(float64_key, 1e6)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files_are_one_line_errors(exported, tmp_path, capsys):
    good = exported("f16").read_bytes()
    cases = {
        "text.gguf": (b"not a gguf file at all" * 4, "not a GGUF file"),
        "cut_data.gguf": (good[: len(good) - 1000], "truncated (tensor"),
        "cut_header.gguf": (good[:4000], "truncated"),
        "empty.gguf": (b"", "not a GGUF file"),
    }
    for name, (data, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        err = run_generate(p, capsys)
        assert str(p) in err and message in err, err
        with pytest.raises(GGUFError, match=message.split(" (")[0]):
            load_gguf(p)
    # a float64 value would crash MLX's reader
    f64 = tmp_path / "f64.gguf"
    write_gguf_file(f64, "qwen2", float64_key="qwen2.rope.freq_base")
    err = run_generate(f64, capsys)
    assert "qwen2.rope.freq_base is a float64" in err
    # an architecture this project does not run
    other = tmp_path / "gpt2.gguf"
    write_gguf_file(other, "gpt2")
    err = run_generate(other, capsys)
    assert "general.architecture 'gpt2' is not supported" in err


def test_unsupported_types_are_clear_errors_and_write_nothing(reasoner, exported, tmp_path):
    path, _ = reasoner
    q4 = exported("q4_1").parent / "q4"
    q8 = quantized_copy(path, tmp_path / "q8", bits=8, group_size=64)
    for src, kind, message in (
        (q4, "q8_0", "gguf_type=q8_0: .* holds MLX-quantised weights \\(4-bit group-32 affine\\)"),
        (q4, "f16", "gguf_type=f16: "),
        (q8, None, "gguf_type: .*8-bit group-64 affine.*map to q4_1"),
        (q8, "q4_1", "gguf_type=q4_1: "),
        (path, "q5_k", "gguf_type must be one of"),
    ):
        out = tmp_path / "out.gguf"
        with pytest.raises(MemoSightError, match=message):
            export_gguf(src, out, kind, progress=False, log=lambda *a: None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]
    other = tmp_path / "other"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'mistral' is not supported"):
        export_gguf(other, tmp_path / "out.gguf", progress=False, log=lambda *a: None)
    assert not (tmp_path / "out.gguf").exists()


# ----------------------------------------------------------------------------
# The converter's command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from convert.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", family="llama", steps=1)["path"]


def test_convert_writes_the_folder_and_the_gguf_file(checkpoint, tmp_path, capsys):
    from mlx_memosight.convert import main

    out, gg = tmp_path / "mlx", tmp_path / "model.gguf"
    main([str(checkpoint), "-o", str(out), "--gguf", str(gg), "--gguf-type", "f32"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"saved {gg}: f32,") and lines[1].startswith(f"saved {out}: llama")
    folder, tok = load(out)
    file, _ = load(gg)
    assert folder.memosight_config.to_dict() == file.memosight_config.to_dict()
    ids = tok.encode(CHECK_TEXT, add_special_tokens=False)
    np.testing.assert_array_equal(logits(folder, ids, 0, "causal"), logits(file, ids, 0, "causal"))
    # GGUF only, and from the converted folder
    main([str(checkpoint), "--gguf", str(tmp_path / "only.gguf"), "-q", "--q-group-size", "32",
          "--dtype", "float16"])
    main([str(out), "--gguf", str(tmp_path / "again.gguf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf", "mlx", "model.gguf", "only.gguf"]
    r = gguf.GGUFReader(tmp_path / "only.gguf")
    assert r.fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_Q4_1


@pytest.mark.parametrize("args, message", [
    (["-q", "--q-bits", "8"], "--gguf-type q4_1: --quantize makes 8-bit group-64 MLX weights"),
    (["-q", "--q-group-size", "32"], "add --dtype float16 to --quantize"),
    (["--gguf-type", "q4_0", "-q", "--q-group-size", "32"], "--gguf-type q4_0: --quantize makes"),
    (["-o", "OUT", "--gguf", "missing/x.gguf"], "the folder .*missing does not exist"),
])
def test_convert_refuses_before_converting(args, message, checkpoint, tmp_path, capsys):
    from mlx_memosight.convert import main

    args = [a.replace("OUT", str(tmp_path / "out")).replace("missing", str(tmp_path / "missing")) for a in args]
    if "--gguf" not in args:
        args += ["--gguf", str(tmp_path / "x.gguf")]
    with pytest.raises(SystemExit):
        main([str(checkpoint)] + args)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_failed_gguf_export_leaves_no_folder(checkpoint, tmp_path, capsys, monkeypatch):
    from mlx_memosight import gguf as gguf_mod
    from mlx_memosight.convert import main

    def broken(*args, **kwargs):
        raise GGUFError("disk full")

    monkeypatch.setattr(gguf_mod, "export_gguf", broken)
    with pytest.raises(SystemExit):
        main([str(checkpoint), "-o", str(tmp_path / "out"), "--gguf", str(tmp_path / "m.gguf")])
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# llama.cpp


@pytest.fixture
def llama_cpp_model():
    """``llama_cpp_model(path)``: llama.cpp's model of a GGUF file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the test extra)")

    def make(path, n_ctx=512):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                               n_threads=2, seed=0)

    return make


@pytest.mark.parametrize("family, tokenizer, pre", [("qwen2", "qwen2", "qwen2"),
                                                    ("llama", "llama3", "llama-bpe"),
                                                    ("qwen3", "qwen2", "qwen2")])
def test_llama_cpp_runs_the_exported_f16_file(family, tokenizer, pre, tmp_path, llama_cpp_model):
    """llama.cpp loads the f16 file of a real-tokenizer model, tokenizes like the
    Hugging Face tokenizer, computes the same logits within float16 rounding
    and continues greedily token for token like MLX."""
    from transformers import AutoTokenizer

    from convert.make_checkpoint import make_checkpoint
    from mlx_memosight.convert import convert

    tok_path = shared_path("tokenizers", tokenizer)
    ckpt = make_checkpoint(tmp_path / "ckpt", family=family, tokenizer=tok_path, hidden=32, steps=1)["path"]
    out = tmp_path / "model.gguf"
    convert(ckpt, None, gguf=out, gguf_type="f16", progress=False, log=lambda *a: None)
    # (GGUFReader takes seconds over a 150k-token vocabulary; mx.load reads the keys at once)
    fields = mx.load(str(out), return_metadata=True)[1]
    assert fields[gguf.Keys.Tokenizer.PRE] == pre
    llm = llama_cpp_model(out)
    model, tok = load(out)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    if hf.chat_template:
        assert fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE] == hf.chat_template == tok.chat_template
    assert tok.eos_token_ids == {hf.eos_token_id, model.memosight_config.token_ids.eos}
    cfg = model.memosight_config
    prompt = cfg.template.render("Tom has 3 apples and buys 4 more. How many apples does he have?",
                                 system="Think step by step.")
    for text in (prompt, CHECK_TEXT, CHECK_TEXT + "<|splitter|><|o_0|><|continue|>" + DOUBLE_NEWLINE):
        ids = hf.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert tok.encode(text, add_special_tokens=False) == ids
    ids = hf.encode(prompt, add_special_tokens=False)
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)])
    mine = logits(model, ids, 0, "causal")
    assert np.abs(ref - mine).max() <= 2e-2 * max(1.0, np.abs(mine).max())
    n = 20
    mlx_tokens = generate(model, tok, ids, max_tokens=n, foresight=False, compress=False).token_ids
    llm.reset()
    cpp_tokens = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        cpp_tokens.append(t)
        if len(cpp_tokens) == len(mlx_tokens):
            break
    assert len(mlx_tokens) == n or mlx_tokens[-1] in tok.eos_token_ids
    assert cpp_tokens == mlx_tokens


def test_sentencepiece_tokenizer_exports_as_llama(tmp_path, llama_cpp_model):
    """A SentencePiece (byte-fallback BPE) tokenizer becomes a ``llama``
    tokenizer with scores and byte tokens; the rebuilt tokenizer matches the
    original everywhere and llama.cpp matches it on text (llama.cpp inserts a
    "▁" after special tokens, the legacy SentencePiece behaviour)."""
    import sentencepiece as spm
    from mlx_lm.utils import save_config, save_model
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = tmp_path / "spm"
    folder.mkdir()
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 8), model_writer=proto, vocab_size=360,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(folder))
    (folder / "tokenizer.model").unlink()
    add_memosight_tokens(tok)
    cfg = build_config(tok, "llama", compression_ratio=3)
    model, args = mlx_model("llama", len(tok))
    save_model(folder, model)
    save_config(dict(args), folder / "config.json")
    tok.save_pretrained(folder)
    cfg.save(folder)
    out = tmp_path / "spm.gguf"
    export_gguf(folder, out, "f32", progress=False, log=lambda *a: None)

    reader = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f[gguf.Keys.Tokenizer.MODEL] == "llama" and f[gguf.Keys.Tokenizer.ADD_PREFIX] is True
    hf = AutoTokenizer.from_pretrained(str(folder))
    vocab = hf.get_vocab()
    types, scores = f[gguf.Keys.Tokenizer.TOKEN_TYPE], f[gguf.Keys.Tokenizer.SCORES]
    assert types[vocab["<0x0A>"]] == T.BYTE and types[vocab["<unk>"]] == T.UNKNOWN
    assert types[vocab["<|splitter|>"]] == T.CONTROL and types[vocab[DOUBLE_NEWLINE]] == T.USER_DEFINED
    assert len(scores) == len(types) == args["vocab_size"]

    back, back_tok = load(out)
    text = cfg.template.render("Tom has 3 apples?") + "First, 3 + 4 = 7.\n\nSo Tom has 7 apples.<|splitter|>  x"
    for t in (text, CHECK_TEXT):
        assert back_tok.encode(t) == hf.encode(t)
        assert back_tok.decode(hf.encode(t)) == hf.decode(hf.encode(t))
    llm = llama_cpp_model(out)
    plain = "Tom has 3 apples and buys 4 more.\nHow many apples does he have? Speed is 60 / 2 = 30."
    ids = hf.encode(plain, add_special_tokens=False)
    assert llm.tokenize(plain.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)])
    np.testing.assert_allclose(ref, logits(back, ids, 0, "causal"), atol=1e-3 * max(1.0, np.abs(ref).max()))
