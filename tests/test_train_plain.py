"""Plain SFT samples (the baseline the demo model is compared with) and plain
model folders."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_memosight.datasets import Example, MemoSightDataset, num_targets, plain_sample
from mlx_memosight.layout import IGNORE_INDEX, Role
from mlx_memosight.model import attach_token_rope
from mlx_memosight.train import joint_loss, load_base, prepare, save_model
from train_helpers import make_base_model, record


def examples(n):
    return [Example(r["question"], r["gt_output"].split("\n\n"), system=r["system_prompt"])
            for r in map(record, range(n))]


def test_plain_sample_layout():
    s = plain_sample([5, 6, 7], [10, 11, 12], eos=2)
    np.testing.assert_array_equal(s.input_ids, [5, 6, 7, 10, 11, 12, 2])
    np.testing.assert_array_equal(s.positions, np.arange(7))
    np.testing.assert_array_equal(s.lm_targets, [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12, 2, IGNORE_INDEX])
    assert (s.mtp_targets == IGNORE_INDEX).all()
    assert list(s.roles) == [Role.PROMPT] * 3 + [Role.CONTENT] * 3 + [Role.EOS]
    np.testing.assert_array_equal(s.mask(), np.tril(np.ones((7, 7), bool)))
    assert num_targets(s) == (4, 0) and s.num_real_tokens == 7
    cut = plain_sample([5, 6, 7], [10, 11, 12], eos=2, max_length=5)
    np.testing.assert_array_equal(cut.input_ids, [5, 6, 7, 10, 11])
    np.testing.assert_array_equal(cut.lm_targets, [IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX])
    assert cut.truncated


def test_plain_dataset_loss_is_ordinary_cross_entropy(tmp_path):
    model, tok, hf_config, _ = load_base(make_base_model(tmp_path / "base", "llama"))
    cfg, _ = prepare(model, tok, hf_config)
    exs = examples(3)
    ds = MemoSightDataset.from_examples(exs, tok, cfg, plain=True)
    memo = MemoSightDataset.from_examples(exs, tok, cfg)
    special = set(cfg.token_ids.memory) | {cfg.token_ids.foresight, cfg.token_ids.splitter,
                                           cfg.token_ids.continue_}
    ce_sum, n = 0.0, 0
    for ex, s, m in zip(exs, ds.samples, memo.samples):
        prompt = tok.encode(cfg.template.render(ex.question, ex.system), add_special_tokens=False)
        answer = tok.encode("\n\n".join(ex.thoughts), add_special_tokens=False)
        assert s.input_ids.tolist() == prompt + answer + [cfg.token_ids.eos]
        assert not special & set(s.input_ids.tolist())
        assert len(s) < len(m)  # no foresight or memory tokens
        # mlx-lm's own forward pass of the unchanged model, causal
        logits = model(mx.array(s.input_ids)[None])[0]
        ce = nn.losses.cross_entropy(logits[len(prompt) - 1 : -1], mx.array(s.input_ids[len(prompt):]))
        ce_sum += float(ce.sum())
        n += len(answer) + 1
    attach_token_rope(model)
    loss = joint_loss(model, ds.samples, cfg.lm_loss_weight, cfg.mtp_loss_weight)
    np.testing.assert_allclose(float(loss), cfg.lm_loss_weight * ce_sum / n, rtol=1e-4)


def test_plain_model_folder(tmp_path):
    from mlx_lm import load as mlx_lm_load

    from mlx_memosight import load

    model, tok, hf_config, _ = load_base(make_base_model(tmp_path / "base", "qwen2"))
    cfg, _ = prepare(model, tok, hf_config)
    out = save_model(tmp_path / "plain", model, tok, hf_config, None)
    assert not (out / "memosight.json").exists()
    assert "lm_loss_weight" not in json.loads((out / "config.json").read_text())
    plain, _ = load(out)
    assert plain.memosight_config is None
    lm_model, _ = mlx_lm_load(str(out))
    x = mx.array([[3, 4, 5]])
    np.testing.assert_allclose(np.array(lm_model(x)), np.array(model(x)), atol=1e-5)
