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

import mlx.core as mx  # noqa: E402

from conftest import shared_path  # noqa: E402
from convert import torch_layout  # noqa: E402
from mlx_memosight.config import MemoSightConfig  # noqa: E402
from mlx_memosight.convert import convert  # noqa: E402
from mlx_memosight.layout import PassBuilder, StepState, build_training_sample, encode_steps  # noqa: E402
from mlx_memosight.loading import load_folder  # noqa: E402
from mlx_memosight.model import forward  # noqa: E402

TOL = 1e-4
SHAPES = ["qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "qwen3-0.6b"]
SYSTEM = "Think step by step."  # short: the default system prompt is 200 tokens
QUESTION = "Anna reads 15 pages a day. How many pages does she read in 4 days?"
THOUGHTS = ["Each day she reads 15 pages.", "In 4 days that is 15 * 4 = 60 pages.", "The answer is \\boxed{60}."]


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


def both(hf, model, ids, positions, mask, rows):
    """Final hidden states at every position and logits at ``rows``, from
    transformers and from MLX (the vocabulary projection at every position
    would dominate the test's time)."""
    from mlx_memosight.model import lm_head

    with torch.no_grad():
        out = hf(input_ids=torch.tensor([list(ids)]), position_ids=torch.tensor([list(positions)]),
                 attention_mask=torch_layout.additive_mask(torch.tensor(np.asarray(mask))),
                 output_hidden_states=True, logits_to_keep=torch.tensor(rows))
    h = forward(model, ids, positions, mx.array(mask), hidden=True)
    logits = lm_head(model, h[:, mx.array(rows)])
    return (out.hidden_states[-1][0].detach().numpy(), np.array(h[0]),
            out.logits[0].detach().numpy(), np.array(logits[0]))


def check(t_hidden, m_hidden, t_logits, m_logits):
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
    tok = folder.hf_tokenizer
    prompt = tok.encode(cfg.template.render(QUESTION, SYSTEM), add_special_tokens=False)
    steps, lens = encode_steps(tok, THOUGHTS)
    s = build_training_sample(prompt, steps, cfg.token_ids, cfg.compression_ratio, 2, thought_lens=lens)
    assert {2, 3, 4} <= set(s.roles.tolist())
    # logits at a foresight, a memory, the continue token and the last token
    rows = [int(np.argmax(s.roles == r)) for r in (2, 3, 4)] + [len(s) - 1]
    check(*both(hf, folder.model, s.input_ids.tolist(), s.positions.tolist(), s.mask(), rows))


@pytest.mark.parametrize("kind", ["prefill", "accelerate", "verify", "fused", "compress"])
def test_inference_pass_parity(shape, kind):
    """Each pass after a causal prefix of the prompt and a step's text."""
    name, hf, folder, cfg, _ = shape
    tok = folder.hf_tokenizer
    prefix = tok.encode(cfg.template.render(QUESTION, SYSTEM) + THOUGHTS[0] + "\n", add_special_tokens=False)
    prefix = prefix + [cfg.token_ids.splitter]
    cache_len = len(prefix) - 1  # the splitter is fed by the pass
    step = StepState(cache_len - 8, cache_len - 8)
    b = PassBuilder(cfg)
    words = tok.encode(" In 4 days", add_special_tokens=False)
    p = {"prefill": b.prefill(words, cache_len, cache_len),
         "accelerate": b.decode(words[0], cache_len, cache_len, draft_len=3),
         "verify": b.verify(words, cache_len, cache_len),
         "fused": b.decode(words[0], cache_len, cache_len, drafts=words[1:], draft_len=2),
         "compress": b.compress(step, cache_len, draft_len=2)}[kind]
    n = len(p)
    mask = np.zeros((cache_len + n, cache_len + n), bool)
    mask[:cache_len, :cache_len] = np.tril(np.ones((cache_len, cache_len), bool))
    mask[cache_len:] = p.rule.mask()
    ids = prefix[:cache_len] + p.tokens.tolist()
    positions = list(range(cache_len)) + p.positions.tolist()
    th, mh, tl, ml = both(hf, folder.model, ids, positions, mask, list(range(cache_len, cache_len + n)))
    check(th[cache_len:], mh[cache_len:], tl, ml)


def test_memosight_decoding_runs_at_the_shape(shape):
    """Drafting and compression on the real vocabulary and head layout commit
    exactly the tokens of decoding without drafts (random weights: whatever
    they say, they say it losslessly)."""
    from mlx_memosight.engine import Engine

    name, hf, folder, cfg, _ = shape
    ids = folder.hf_tokenizer.encode(cfg.template.render(QUESTION, SYSTEM), add_special_tokens=False)
    plain = [e.token for e in Engine(folder.model, cfg, foresight=False).generate(ids, 10)]
    drafted = [e.token for e in Engine(folder.model, cfg, draft_len=2, foresight_sets="all").generate(ids, 10)]
    assert drafted == plain and len(plain) == 10
