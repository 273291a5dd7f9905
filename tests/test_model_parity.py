"""mlx-lm's Qwen2 / Llama modules under MemoSight positions and masks equal the
PyTorch models given the same position ids and 4-D mask."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402

from convert import torch_layout  # noqa: E402
from helpers import hf_model, random_steps, save_hf_model, spec_token_ids, vocab_size  # noqa: E402
from mlx_memosight.config import TEMPLATES, MemoSightConfig  # noqa: E402
from mlx_memosight.layout import (  # noqa: E402
    PassBuilder,
    StepState,
    build_training_sample,
    collate,
)
from mlx_memosight.loading import load_model, normalize_hf_config  # noqa: E402
from mlx_memosight.model import TokenRoPE, forward  # noqa: E402

TOL = 1e-4
IDS = spec_token_ids()
FAMILIES = ["qwen2", "llama", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory):
    family = request.param
    hf = hf_model(family, vocab_size())
    path = save_hf_model(hf, tmp_path_factory.mktemp(family))
    mlx_model, config = load_model(path)
    return family, hf, mlx_model, config


def torch_logits(hf, ids, positions, mask):
    return torch_layout.logits(
        hf, torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(positions)), torch.tensor(np.asarray(mask))
    )[0].numpy()


def mlx_logits(model, ids, positions, mask):
    return np.array(forward(model, ids, positions, mx.array(mask))[0])


def test_transformers5_config_is_read(models):
    family, hf, mlx_model, config = models
    assert "rope_parameters" in hf.config.to_dict()
    rope = mlx_model.layers[0].self_attn.rope
    assert isinstance(rope, TokenRoPE)
    if family == "qwen2":
        assert config["rope_theta"] == 12345.0
        assert rope.base.base == 12345.0
    elif family == "qwen3":
        # q / k norms before RoPE, over a head dimension wider than hidden / heads
        attn = mlx_model.layers[0].self_attn
        assert attn.q_norm.weight.shape == (32,) and attn.rope.base.dims == 32
    else:
        assert config["rope_scaling"]["rope_type"] == "llama3"
        assert type(rope.base).__name__ == "Llama3RoPE"


def test_normalize_hf_config_variants():
    t5 = {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    assert normalize_hf_config(t5) == {**t5, "rope_theta": 1e4}
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}
    out = normalize_hf_config(scaled)
    assert out["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    t4 = {"rope_theta": 3.0, "rope_scaling": None}
    assert normalize_hf_config(t4) == t4


def test_training_sample_parity(models):
    family, hf, mlx_model, _ = models
    rng = np.random.default_rng(1)
    steps, thought_lens = random_steps(rng, 4, IDS, min_len=3, max_len=12)
    prompt = rng.integers(3, 90, size=7).tolist()
    for offset in range(3):
        s = build_training_sample(prompt, steps, IDS, 3, offset, thought_lens=thought_lens)
        assert {2, 3, 4} <= set(s.roles.tolist())  # foresight, memory, continue
        t = torch_logits(hf, s.input_ids, s.positions, s.mask())
        m = mlx_logits(mlx_model, s.input_ids, s.positions, s.mask())
        assert np.abs(t).max() > 1.0  # the comparison is not between near-zeros
        np.testing.assert_allclose(m, t, atol=TOL, rtol=0)


def test_padded_batch_matches_single_samples(models):
    _, _, mlx_model, _ = models
    rng = np.random.default_rng(2)
    samples = []
    for n in (2, 4):
        steps, tl = random_steps(rng, n, IDS)
        samples.append(build_training_sample([5, 6, 7], steps, IDS, 2, 1, thought_lens=tl))
    batch = collate(samples)
    out = np.array(forward(mlx_model, batch.input_ids, batch.positions, mx.array(batch.mask())))
    for i, s in enumerate(samples):
        single = mlx_logits(mlx_model, s.input_ids, s.positions, s.mask())
        np.testing.assert_allclose(out[i, : len(s)], single, atol=TOL, rtol=0)


def inference_passes(cache_len, step_start):
    cfg = MemoSightConfig(token_ids=IDS, template=TEMPLATES["qwen"], compression_ratio=3)
    b = PassBuilder(cfg)
    p = cache_len  # the anchor's position when positions are contiguous
    return {
        "prefill": b.prefill([11, 12, 13, 14], cache_len, cache_len),
        "decode": b.decode(20, p, cache_len),
        "accelerate": b.decode(20, p, cache_len, draft_len=3),
        "verify": b.verify([21, 22, 23], p, cache_len),
        "fused": b.decode(20, p, cache_len, drafts=[21, 22, 23], draft_len=2),
        "compress": b.compress(StepState(step_start, step_start), cache_len, draft_len=2),
        "compress_plain": b.compress(StepState(step_start, step_start), cache_len),
    }


@pytest.mark.parametrize("kind", list(inference_passes(10, 4)))
def test_inference_pass_parity(models, kind):
    """Each pass appended to a causal prefix; the whole sequence runs at once in
    both frameworks with the pass's positions and mask."""
    _, hf, mlx_model, _ = models
    rng = np.random.default_rng(3)
    cache_len, step_start = 10, 4
    prefix = rng.integers(3, 90, size=cache_len).tolist()
    p = inference_passes(cache_len, step_start)[kind]
    n = len(p)
    mask = np.zeros((cache_len + n, cache_len + n), bool)
    mask[:cache_len, :cache_len] = np.tril(np.ones((cache_len, cache_len), bool))
    mask[cache_len:] = p.rule.mask()
    ids = prefix + p.tokens.tolist()
    positions = list(range(cache_len)) + p.positions.tolist()
    t = torch_logits(hf, ids, positions, mask)
    m = mlx_logits(mlx_model, ids, positions, mask)
    np.testing.assert_allclose(m[cache_len:], t[cache_len:], atol=TOL, rtol=0)


def test_rows_and_contiguous_offsets(models):
    """Logits for selected rows only, and an int offset (mlx-lm's own path)
    agree with per-token positions."""
    _, _, mlx_model, _ = models
    ids = list(range(3, 15))
    causal = np.tril(np.ones((12, 12), bool))
    full = mlx_logits(mlx_model, ids, list(range(5, 17)), causal)
    part = np.array(forward(mlx_model, ids, 5, "causal", rows=[3, 11])[0])
    np.testing.assert_allclose(part, full[[3, 11]], atol=1e-5, rtol=0)


def test_compact_mask_route_equals_bool_mask(models):
    """A mask in the layout's compact form goes through the attention hook and
    gives the same logits as the materialised mask."""
    from mlx_memosight.kernels import CompactMask

    _, _, mlx_model, _ = models
    rng = np.random.default_rng(4)
    steps, tl = random_steps(rng, 3, IDS)
    s = build_training_sample([5, 6, 7], steps, IDS, 2, 1, thought_lens=tl)
    a = np.array(forward(mlx_model, s.input_ids, s.positions, CompactMask.from_rule(s.rule)))
    b = np.array(forward(mlx_model, s.input_ids, s.positions, mx.array(s.mask())))
    np.testing.assert_array_equal(a, b)
