"""Blockwise training attention (train/attention.py) against
``mx.fast.scaled_dot_product_attention`` with the materialised mask: values
and gradients, grouped-query heads, padding rows, under ``mx.compile`` as
mlx-lm's trainer runs it."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_memosight.layout import NEVER, attention_mask, check_causal
from mlx_memosight.train import attention as blockwise


def causal_rule(B, L, seed=0):
    """Causal training rules with hidden keys (finished steps, foresight keys)
    and right padding that copies the last real query, as collate() does."""
    rng = np.random.default_rng(seed)
    slot = np.tile(np.arange(L, dtype=np.int32), (B, 1))
    limit = slot + 1
    until = np.full((B, L), NEVER, np.int32)
    for b in range(B):
        for _ in range(6):
            a = int(rng.integers(0, L - 10))
            until[b, a: a + int(rng.integers(1, 8))] = a + int(rng.integers(8, 30))
        for f in rng.choice(L, size=L // 8, replace=False):
            until[b, f] = f + 1  # a foresight key: visible to itself only
    if B > 1:  # the second row is padded
        n = L - 9
        slot[1, n:] = n - 1
        limit[1, n:] = n
        until[1, n:] = 0
    return tuple(mx.array(a) for a in (slot, limit, until))


def qkv(B, H, Hkv, L, D, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)
                 for s in ((B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, D)))


def reference(q, k, v, scale, rule):
    mask = attention_mask(*rule, xp=mx)[:, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


GATHERED = [False, True, "groups"]
GATHERED_IDS = ["all-keys", "visible-keys", "key-groups"]


def key_index(rule, block, gathered):
    """The batch's visible keys per block (the gathered path): one array, or
    the arrays of three runs of blocks (``"groups"``); None for all keys."""
    rule = tuple(np.array(a) for a in rule)
    if gathered == "groups":
        return [mx.array(x) for x in blockwise.visible_key_groups(*rule, block, groups=3)]
    return mx.array(blockwise.visible_keys(*rule, block)) if gathered else None


def losses(rule, block, weight, gathered=False):
    index = key_index(rule, block, gathered)

    def ref(q, k, v):
        return (reference(q, k, v, 0.3, rule).astype(mx.float32) * weight).sum()

    def new(q, k, v):
        out = blockwise.blockwise_attention(q, k, v, 0.3, *rule, block=block, key_index=index)
        return (out.astype(mx.float32) * weight).sum()

    return ref, new


@pytest.mark.parametrize("gathered", GATHERED, ids=GATHERED_IDS)
@pytest.mark.parametrize("block", [7, 32, 64, 200])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (7, 1)])
def test_values_and_gradients_equal_the_masked_reference(block, heads, gathered):
    B, L, D = 2, 97, 16
    rule = causal_rule(B, L)
    check_causal(np.array(rule[0]), np.array(rule[1]))
    q, k, v = qkv(B, heads[0], heads[1], L, D, mx.float32)
    weight = mx.random.normal(q.shape, key=mx.random.key(3))
    ref, new = losses(rule, block, weight, gathered)
    out = blockwise.blockwise_attention(q, k, v, 0.3, *rule, block=block,
                                        key_index=key_index(rule, block, gathered))
    np.testing.assert_allclose(np.array(out), np.array(reference(q, k, v, 0.3, rule)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(new(q, k, v).item(), ref(q, k, v).item(), rtol=1e-5)
    for a, b in zip(mx.grad(ref, argnums=(0, 1, 2))(q, k, v), mx.grad(new, argnums=(0, 1, 2))(q, k, v)):
        scale = np.abs(np.array(a)).max()
        assert scale > 0
        np.testing.assert_allclose(np.array(b) / scale, np.array(a) / scale, atol=2e-6, rtol=0)


@pytest.mark.parametrize("gathered", GATHERED, ids=GATHERED_IDS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_stays_within_rounding(dtype, gathered):
    B, L, D = 2, 80, 32
    rule = causal_rule(B, L, seed=4)
    q, k, v = qkv(B, 4, 2, L, D, dtype)
    weight = mx.random.normal(q.shape, key=mx.random.key(5))
    ref, new = losses(rule, 16, weight, gathered)
    for a, b in zip(mx.grad(ref, argnums=(0, 1, 2))(q, k, v), mx.grad(new, argnums=(0, 1, 2))(q, k, v)):
        a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        assert b.dtype == a.dtype
        np.testing.assert_allclose(b / np.abs(a).max(), a / np.abs(a).max(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("gathered", GATHERED, ids=GATHERED_IDS)
def test_compiled_value_and_grad_equals_the_reference(gathered):
    """mlx-lm's trainer compiles its step: the block structure depends on
    shapes only (the visible keys are an input array), so the compiled
    function traces and matches, also for a second batch of other keys."""
    B, L, D = 2, 64, 16
    q, k, v = qkv(B, 6, 3, L, D, mx.float32, seed=7)
    weight = mx.random.normal(q.shape, key=mx.random.key(8))

    def attend(q, k, v, slot, limit, until, *index):
        out = blockwise.blockwise_attention(q, k, v, 0.3, slot, limit, until, block=24, key_index=index or None)
        return (out.astype(mx.float32) * weight).sum()

    step = mx.compile(mx.value_and_grad(attend, argnums=(0, 1, 2)))
    for seed in (6, 9):
        rule = causal_rule(B, L, seed=seed)
        index = key_index(rule, 24, gathered)
        ref, _ = losses(rule, 24, weight)
        want = mx.value_and_grad(ref, argnums=(0, 1, 2))(q, k, v)
        index = [] if index is None else [index] if isinstance(index, mx.array) else index
        got = step(q, k, v, *rule, *index)
        np.testing.assert_allclose(got[0].item(), want[0].item(), rtol=1e-5)
        for a, b in zip(want[1], got[1]):
            np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5, rtol=0)


def test_visible_keys_of_a_reasoning_sample():
    """On a laid-out sample of many steps, each block's gathered keys hold
    every key the block's queries see, and far fewer than all keys before
    the block."""
    from helpers import random_steps, spec_token_ids
    from mlx_memosight.layout import build_training_sample, collate

    ids = spec_token_ids()
    rng = np.random.default_rng(0)
    steps, lens = random_steps(rng, 120, ids, min_len=15, max_len=30)
    s = build_training_sample(list(range(3, 40)), steps, ids, 12, 2, thought_lens=lens)
    b = collate([s], len(s))
    rule = (b.query_slot, b.query_limit, b.key_visible_until)
    T, block = len(s), 128
    index = blockwise.visible_keys(*rule, block)
    from mlx_memosight.datasets import bucket_length

    assert index.shape[1] == bucket_length(index.shape[1])
    mask = attention_mask(*rule)[0]
    scored = 0
    for n, (i, j) in enumerate(blockwise._blocks(T, block)):
        keys = index[n][index[n] >= 0]
        assert np.all(np.diff(keys) > 0)
        assert set(np.flatnonzero(mask[i:j].any(axis=0))) <= set(keys)
        scored += len(keys)
    assert T > 4000 and scored < 0.25 * sum(j for _, j in blockwise._blocks(T, block))
    groups = blockwise.visible_key_groups(*rule, block, groups=4)
    rows = [row for g in groups for row in g]
    assert len(rows) == len(index)
    assert all(np.array_equal(a[a >= 0], b[b >= 0]) for a, b in zip(rows, index))
    widths = [g.shape[1] for g in groups]
    assert widths == sorted(widths) and sum(g.size for g in groups) < 0.8 * index.size  # less padding
    q = k = v = mx.zeros((1, 2, T, 8))
    with pytest.raises(ValueError, match="blocks of 64 need"):
        blockwise.blockwise_attention(q, k, v, 1.0, *(mx.array(a) for a in rule), block=64,
                                      key_index=mx.array(index))


def test_batches_gather_keys_only_where_it_pays():
    """A long MemoSight sample's batch carries the keys each block sees (a
    fraction of the keys before it); an ordinary SFT sample of the same
    length sees every earlier key, so its batch attends to keys [0, j)
    without gathering."""
    from helpers import random_steps, spec_token_ids
    from mlx_memosight.datasets import batch_arrays, plain_sample
    from mlx_memosight.layout import build_training_sample

    ids = spec_token_ids()
    steps, lens = random_steps(np.random.default_rng(0), 60, ids, min_len=15, max_len=30)
    memo = build_training_sample(list(range(3, 40)), steps, ids, 12, 2, thought_lens=lens)
    answer = [t for step in steps for t in step][: len(memo) - 40]
    plain = plain_sample(list(range(3, 40)), answer, eos=None)
    assert blockwise.uses_blockwise(len(memo)) and blockwise.uses_blockwise(len(plain))
    memo_batch, plain_batch = batch_arrays([memo], 1.0, 1.0), batch_arrays([plain], 1.0, 1.0)
    assert len(plain_batch) == 9
    index = [np.array(x) for x in memo_batch[9:]]  # the key groups
    assert len(index) == blockwise.KEY_GROUPS
    blocks = blockwise._blocks(memo_batch[0].shape[1], blockwise.query_block(memo_batch[0].shape[1]))
    assert sum(x.shape[0] for x in index) == len(blocks)
    assert sum(x.size for x in index) <= blockwise.GATHER_SHARE * sum(j for _, j in blocks)


def test_long_sequences_train_blockwise(monkeypatch):
    """Past GPU_BLOCKWISE_FROM tokens on a GPU, every sequence on the CPU."""
    n = blockwise.GPU_BLOCKWISE_FROM
    short, long = causal_rule(1, n), causal_rule(2, n + 1)
    assert mx.default_device() == mx.cpu or not blockwise.uses_blockwise(n)
    assert blockwise.uses_blockwise(n + 1)
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert blockwise.uses_blockwise(8)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert not blockwise.uses_blockwise(n) and blockwise.uses_blockwise(n + 1)
    monkeypatch.setattr(blockwise, "BLOCKWISE_FROM", n)
    assert isinstance(blockwise.training_mask(*short), mx.array)
    mask = blockwise.training_mask(*long)
    assert isinstance(mask, blockwise.BlockwiseMask)
    assert blockwise.query_block(4096) == 256 and blockwise.query_block(16384) == 64


def test_a_batch_that_is_not_causal_is_refused():
    slot = np.arange(6)[None]
    check_causal(slot, slot + 1)
    with pytest.raises(ValueError, match="causal"):
        check_causal(slot, slot + 2)  # each query would see the next token
    with pytest.raises(ValueError, match="causal"):
        check_causal(slot[:, ::-1].copy(), slot + 1)
