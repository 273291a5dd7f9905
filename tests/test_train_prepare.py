"""Turning a plain base model into a MemoSight model (SPEC section 1), and the
LoRA update restricted to the MemoSight tokens' rows."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_memosight.config import SPECIAL_TOKENS, ConfigError
from mlx_memosight.errors import OutputError
from mlx_memosight.train import (
    add_token_rows,
    load_base,
    memosight_token_rows,
    prepare,
    save_model,
    setup_trainable,
)
from train_helpers import make_base_model


def spec_rows(base: np.ndarray, n_base: int, tokenizer, added) -> np.ndarray:
    """SPEC's initialisation written out: rows of the added tokens, set in
    reverse order to the mean of their description's rows; an added token not
    yet set reads the mean of the base rows."""
    fresh = base[:n_base].mean(axis=0)
    rows = np.concatenate([base[:n_base], np.tile(fresh, (len(added), 1))])
    for k in reversed(range(len(added))):
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(added[k][1]))
        rows[n_base + k] = rows[ids].mean(axis=0)
    return rows


@pytest.mark.parametrize("family, extra_rows", [("qwen2", 20), ("llama", 0)])
def test_added_rows_follow_spec(tmp_path, family, extra_rows):
    path = make_base_model(tmp_path / "base", family, extra_rows=extra_rows)
    model, tok, hf_config, cfg = load_base(path)
    assert cfg is None
    n_base = len(tok)
    embed = np.array(model.model.embed_tokens.weight)
    head = None if family == "qwen2" else np.array(model.lm_head.weight)
    cfg, added = prepare(model, tok, hf_config, cfg, compression_ratio=4)
    assert [t for t, _ in added] == [t for t, _ in SPECIAL_TOKENS]  # "\n\n" is not in this vocab
    assert len(tok) == n_base + len(SPECIAL_TOKENS)
    assert cfg.token_ids.splitter == n_base and cfg.compression_ratio == 4
    assert cfg.max_offset == (2 if family == "qwen2" else 3)
    assert hf_config["vocab_size"] == len(tok) and hf_config["max_offset"] == cfg.max_offset
    hf_tok = tok._tokenizer
    np.testing.assert_allclose(np.array(model.model.embed_tokens.weight),
                               spec_rows(embed, n_base, hf_tok, added), rtol=1e-6, atol=1e-7)
    if head is not None:
        np.testing.assert_allclose(np.array(model.lm_head.weight),
                                   spec_rows(head, n_base, hf_tok, added), rtol=1e-6, atol=1e-7)
    # "\n\n" tokenises to the added "\n\n" token, so the splitter takes its row
    nn_id = hf_tok.convert_tokens_to_ids("\n\n")
    E = np.array(model.model.embed_tokens.weight)
    np.testing.assert_array_equal(E[cfg.token_ids.splitter], E[nn_id])
    assert model.args.vocab_size == len(tok)
    # a second call adds nothing
    assert add_token_rows(model, tok) == []


def test_a_plain_hugging_face_tokenizer_works_as_the_wrapper_does(tmp_path):
    """prepare() takes a tokenizer from AutoTokenizer too (whose own
    ``_tokenizer`` is the Rust tokenizer, not a Hugging Face one)."""
    from transformers import AutoTokenizer

    path = make_base_model(tmp_path / "base", "llama")
    model, tok, hf_config, _ = load_base(path)
    ref, ref_tok, ref_config, _ = load_base(path)
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    cfg, added = prepare(model, hf_tok, hf_config)
    ref_cfg, ref_added = prepare(ref, ref_tok, ref_config)
    assert added == ref_added and cfg.token_ids == ref_cfg.token_ids and len(hf_tok) == len(ref_tok)
    np.testing.assert_array_equal(np.array(model.model.embed_tokens.weight), np.array(ref.model.embed_tokens.weight))


def test_quantized_base_gets_quantized_rows(tmp_path):
    path = make_base_model(tmp_path / "base", "llama")
    model, tok, hf_config, _ = load_base(path)
    ref, ref_tok, _, _ = load_base(path)
    add_token_rows(ref, ref_tok)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    prepare(model, tok, hf_config)
    for q, f in ((model.model.embed_tokens, ref.model.embed_tokens), (model.lm_head, ref.lm_head)):
        w = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=8)
        assert w.shape == f.weight.shape
        np.testing.assert_allclose(np.array(w), np.array(f.weight), atol=0.02)
    # QLoRA on the quantised model runs, and the token rows are adapted
    setup_trainable(model, "lora", -1, token_rows=memosight_token_rows(tok))
    names = dict(tree_flatten(model.trainable_parameters()))
    assert "model.embed_tokens.lora_a" in names and "lm_head.lora_b" in names


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_token_row_update_touches_only_memosight_rows(tmp_path, kind, family):
    path = make_base_model(tmp_path / "base", family)
    model, tok, hf_config, _ = load_base(path)
    prepare(model, tok, hf_config)
    rows = memosight_token_rows(tok)
    assert rows == list(range(300, 300 + len(SPECIAL_TOKENS)))
    setup_trainable(model, kind, -1, token_rows=rows)
    x = mx.array([[3, 4, 5, rows[0], rows[5], rows[-1]]])
    # the adapted model computes the base model's function at the start
    plain, plain_tok, plain_config, _ = load_base(path)
    prepare(plain, plain_tok, plain_config)
    np.testing.assert_allclose(np.array(model(x)), np.array(plain(x)), atol=1e-5)

    def loss(model, x):
        return (model(x) ** 2).mean()

    emb = model.model.embed_tokens
    emb.lora_b = mx.random.normal(emb.lora_b.shape)  # as after some training
    _, grads = nn.value_and_grad(model, loss)(model, x)
    grads = dict(tree_flatten(grads))
    a = np.array(grads["model.embed_tokens.lora_a"])
    base = np.ones(a.shape[0], bool)
    base[rows] = False
    assert np.all(a[base] == 0) and np.abs(a[rows]).max() > 0
    assert np.all(np.array(emb.lora_a)[base] == 0)
    if kind == "dora":
        m = np.array(grads["model.embed_tokens.m"])
        assert np.all(m[base] == 0) and np.abs(m[rows]).max() > 0
    if family == "llama":
        b = np.array(grads["lm_head.lora_b"])
        assert np.all(b[:, base] == 0) and np.abs(b[:, rows]).max() > 0


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_restricted_output_layer_computes_mlx_lms_function(tmp_path, family):
    """The output layer adds its LoRA update to the token rows' columns only;
    with the other rows' factors at zero (as training keeps them) that is
    mlx-lm's layer's function, and the gradient of the rows' factors is mlx-lm's."""
    model, tok, hf_config, _ = load_base(make_base_model(tmp_path / "base", family))
    prepare(model, tok, hf_config)
    rows = memosight_token_rows(tok)
    setup_trainable(model, "lora", -1, token_rows=rows)
    tied = family == "qwen2"
    out = model.model.embed_tokens if tied else model.lm_head
    mlx_lm_class = type(out).__bases__[1]
    for i, name in enumerate(("lora_a", "lora_b")):  # as after some training
        out[name] = mx.random.normal(out[name].shape, key=mx.random.key(i)) * out._row_masks.get(name, 1)
    x = mx.random.normal((2, 5, hf_config["hidden_size"]), key=mx.random.key(9))
    w = mx.random.normal((2, 5, out._row_masks["lora_a" if tied else "lora_b"].size), key=mx.random.key(4))

    def loss(module, restricted):
        f = type(module) if restricted else mlx_lm_class
        y = f.as_linear(module, x) if tied else f.__call__(module, x)
        return (y * w).sum()

    (got, g), (want, h) = (nn.value_and_grad(out, loss)(out, r) for r in (True, False))
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-5)
    g, h = dict(tree_flatten(g)), dict(tree_flatten(h))
    base = np.ones(out._row_masks["lora_a" if tied else "lora_b"].size, bool)
    base[rows] = False
    name = "lora_a" if tied else "lora_b"
    ours, theirs = np.array(g[name]), np.array(h[name])
    ours, theirs = (ours, theirs) if tied else (ours.T, theirs.T)
    assert np.all(ours[base] == 0) and np.abs(ours[rows]).max() > 0
    np.testing.assert_allclose(ours[rows], theirs[rows], rtol=1e-4, atol=1e-4)
    other = "lora_b" if tied else "lora_a"
    np.testing.assert_allclose(np.array(g[other]), np.array(h[other]), rtol=1e-4, atol=1e-4)


def test_memosight_model_keeps_its_configuration(tmp_path):
    path = make_base_model(tmp_path / "base", "qwen2")
    model, tok, hf_config, _ = load_base(path)
    cfg, _ = prepare(model, tok, hf_config, max_offset=1)
    saved = save_model(tmp_path / "ms", model, tok, hf_config, cfg)
    with pytest.raises(OutputError, match=r"ms: already exists \(force=True replaces it\)"):
        save_model(saved, model, tok, hf_config, cfg)
    model2, tok2, hf2, cfg2 = load_base(saved)
    assert cfg2.to_dict() == cfg.to_dict() and hf2["max_offset"] == 1 and hf2["vocab_size"] == 609
    again, added = prepare(model2, tok2, hf2, cfg2)
    assert added == [] and again.to_dict() == cfg.to_dict()
    changed, _ = prepare(model2, tok2, hf2, cfg2, compression_ratio=4)
    assert changed.compression_ratio == 4 and changed.token_ids == cfg.token_ids
    plain, _ = prepare(model2, tok2, hf2, cfg2, template="plain")
    assert plain.template.name == "plain" and plain.max_offset == 1
    assert plain.template.eos == "<|endoftext|>" and plain.token_ids.eos == 0
    with pytest.raises(ConfigError, match="compression_ratio must be an integer >= 1, not 0"):
        prepare(model2, tok2, hf2, cfg2, compression_ratio=0)
    x = mx.array([[1, 5, 300, 400]])
    np.testing.assert_array_equal(np.array(model(x)), np.array(model2(x)))
