"""The training loss (SPEC section 2) against the PyTorch reference
(convert/torch_layout.py) on the same weights and samples, with gradient
accumulation over two micro-batches, and the batch weights' normalisation."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from convert import torch_layout  # noqa: E402
from helpers import hf_model, random_steps, save_hf_model, spec_token_ids, vocab_size  # noqa: E402
from mlx_memosight.config import FAMILY_DEFAULTS, TEMPLATES, MemoSightConfig  # noqa: E402
from mlx_memosight.datasets import BatchIterator, MemoSightDataset  # noqa: E402
from mlx_memosight.layout import build_training_sample  # noqa: E402
from mlx_memosight.loading import load_model  # noqa: E402
from mlx_memosight.train import joint_loss, memosight_loss  # noqa: E402

IDS = spec_token_ids()
RATIO = 3


def family_cfg(family):
    d = FAMILY_DEFAULTS[family]
    return MemoSightConfig(
        token_ids=IDS, template=TEMPLATES["qwen"], compression_ratio=RATIO,
        max_offset=d["max_offset"], lm_loss_weight=d["lm_loss_weight"],
        mtp_loss_weight=d["mtp_loss_weight"], model_family=family,
    )


def make_examples(n, seed=0):
    """(prompt, steps, thought_lens, offset) of varied lengths and offsets."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        steps, lens = random_steps(rng, int(rng.integers(2, 5)), IDS, min_len=2, max_len=10)
        prompt = rng.integers(3, 90, size=int(rng.integers(3, 9))).tolist()
        out.append((prompt, steps, lens, i % 3))
    return out


def torch_terms(hf, ex, max_length=None):
    prompt, steps, lens, offset = ex
    ids = dict(foresight=IDS.foresight, continue_=IDS.continue_, eos=IDS.eos, memory=IDS.memory)
    ids["continue"] = ids.pop("continue_")
    lay = torch_layout.training_layout(prompt, steps, lens, ids, RATIO, offset, max_length=max_length)
    dtype = next(hf.parameters()).dtype
    out = hf(
        input_ids=lay["input_ids"][None],
        position_ids=lay["position_ids"][None],
        attention_mask=torch_layout.additive_mask(lay["mask"], dtype),
    ).logits
    return lay, torch_layout.joint_loss_terms(out[0], lay["labels"], lay["is_foresight"])


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def models(request, tmp_path_factory):
    family = request.param
    hf = hf_model(family, vocab_size())
    model, _ = load_model(save_hf_model(hf, tmp_path_factory.mktemp(family)))
    return family, hf, model


def mlx_samples(examples, max_length=None):
    return [
        build_training_sample(p, s, IDS, RATIO, o, thought_lens=tl, max_length=max_length)
        for p, s, tl, o in examples
    ]


@pytest.fixture(params=["mask", "blockwise"])
def attention(request, monkeypatch):
    """Each loss test runs with the materialised mask and the whole output
    layer, and with blockwise attention (every sequence, blocks of 16 queries)
    and the output layer and cross-entropy in checkpointed chunks of 7 rows."""
    from mlx_memosight.train import attention as blockwise

    monkeypatch.setattr(blockwise, "BLOCKWISE_FROM", 10 ** 9)  # the mask array (the CPU default is blockwise)
    if request.param == "blockwise":
        from mlx_memosight.train import loss

        monkeypatch.setattr(blockwise, "BLOCKWISE_FROM", 0)
        monkeypatch.setattr(blockwise, "QUERY_BLOCK", 16)
        monkeypatch.setattr(loss, "LOSS_CHUNK", 7)
    return request.param


def test_accumulated_loss_and_gradient_equal_torch(models, attention):
    family, hf, model = models
    cfg = family_cfg(family)
    examples = make_examples(4)
    samples = mlx_samples(examples)
    hf.zero_grad()
    terms = []
    for ex, s in zip(examples, samples):
        lay, t = torch_terms(hf, ex)
        np.testing.assert_array_equal(lay["input_ids"].numpy(), s.input_ids)
        np.testing.assert_array_equal(lay["position_ids"].numpy(), s.positions)
        terms.append(t)
    ref = torch_layout.joint_loss(terms, cfg.lm_loss_weight, cfg.mtp_loss_weight)
    ref.backward()
    assert ref.item() > 1.0

    # two micro-batches of two samples make one optimizer step
    dataset = MemoSightDataset(samples, cfg)
    it = BatchIterator(cfg.lm_loss_weight, cfg.mtp_loss_weight, grad_accumulation_steps=2)
    batches = it(dataset, batch_size=2, loop=True)
    value_and_grad = nn.value_and_grad(model, memosight_loss)
    losses, grad = [], None
    for _ in range(2):
        (loss, toks), g = value_and_grad(model, *next(batches))
        losses.append(loss.item())
        grad = g if grad is None else tree_map(lambda a, b: a + b, grad, g)
    # mlx-lm's trainer reports the mean of the micro-batch losses and divides
    # the summed gradient by the number of micro-batches
    step_loss = float(np.mean(losses))
    assert abs(losses[0] - losses[1]) > 1e-3  # each micro-batch holds part of the step
    np.testing.assert_allclose(step_loss, ref.item(), rtol=1e-4)
    grad = dict(tree_flatten(tree_map(lambda g: g / 2, grad)))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        tg = dict(hf.named_parameters())[name].grad.numpy()
        mg = np.array(grad[name])
        scale = np.abs(tg).max()
        assert scale > 0
        np.testing.assert_allclose(mg / scale, tg / scale, atol=2e-4, rtol=0)

    # one batch of all four samples gives the same loss
    whole = joint_loss(model, samples, cfg.lm_loss_weight, cfg.mtp_loss_weight).item()
    np.testing.assert_allclose(whole, ref.item(), rtol=1e-4)


def test_truncated_samples_equal_torch(models, attention):
    family, hf, model = models
    cfg = family_cfg(family)
    examples = make_examples(2, seed=5)
    samples = mlx_samples(examples, max_length=14)
    assert all(s.truncated for s in samples)
    with torch.no_grad():
        terms = [torch_terms(hf, ex, max_length=14)[1] for ex in examples]
    ref = torch_layout.joint_loss(terms, cfg.lm_loss_weight, cfg.mtp_loss_weight).item()
    got = joint_loss(model, samples, cfg.lm_loss_weight, cfg.mtp_loss_weight).item()
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_evaluation_weights_give_the_joint_loss(models):
    """mlx-lm's evaluate() takes sum(loss_b * tokens_b) / sum(tokens_b); the
    evaluation batches are weighted so that this is the joint loss over all of
    them, whatever the batch sizes."""
    family, hf, model = models
    cfg = family_cfg(family)
    from mlx_memosight.train import evaluate

    samples = mlx_samples(make_examples(6, seed=3))
    dataset = MemoSightDataset(samples, cfg)
    whole = joint_loss(model, samples, cfg.lm_loss_weight, cfg.mtp_loss_weight).item()
    np.testing.assert_allclose(evaluate(model, dataset, batch_size=2), whole, rtol=1e-4)
    # only the first batch: the joint loss of the two shortest samples
    order = np.argsort(dataset.lengths(), kind="stable")
    first = [samples[i] for i in order[:2]]
    part = joint_loss(model, first, cfg.lm_loss_weight, cfg.mtp_loss_weight).item()
    np.testing.assert_allclose(evaluate(model, dataset, batch_size=2, num_batches=1), part, rtol=1e-4)


def test_training_does_not_use_the_decoder_kernels(models, monkeypatch):
    """The attention kernels have no gradient: the loss must not route there."""
    from mlx_memosight import kernels

    family, _, model = models
    cfg = family_cfg(family)
    samples = mlx_samples(make_examples(2, seed=9))

    def refuse(*args, **kwargs):
        raise AssertionError("kernels.attention called during training")

    monkeypatch.setattr(kernels, "attention", refuse)
    loss, grads = nn.value_and_grad(model, lambda m: joint_loss(m, samples, cfg.lm_loss_weight,
                                                                 cfg.mtp_loss_weight))(model)
    assert loss.item() > 0 and all(np.isfinite(np.array(g)).all() for _, g in tree_flatten(grads))
