"""MemoSight-masked attention for training in blocks of queries: memory linear in
the sequence length instead of quadratic.

With a mask array, ``mx.fast.scaled_dot_product_attention``'s gradient is
computed from the whole ``(heads, L, L)`` score matrix, kept for the backward
pass in every layer (on the CPU its forward does the same; mlx-lm's LoRA with a
causal mask gets a fused kernel on Apple GPUs). At 4k content tokens (about 8k
with foresight tokens) that is gigabytes per layer. Here the forward pass runs
one block of queries at a time against the keys it can see, keeping only the
output, and the backward pass recomputes each block's probabilities
(``mx.custom_function`` with its own VJP), as flash attention does: the largest
temporary is one block's ``(heads, block, L)`` scores.

Training samples are causal sequences (SPEC section 2: a token's own slot is
its index and its limit the next index), so a query block ``[i, j)`` attends to
keys ``[0, j)`` only; :func:`blockwise_attention` relies on that and
:func:`layout.check_causal` (run on every training batch) checks it.

Most of those keys are hidden from the block: the raw tokens of every step
finished before it and every foresight token. With ``key_index`` (from
:func:`visible_keys`, computed with the batch from the rule arrays), a block
gathers only the keys any of its queries can see (the prompt, earlier steps'
memory tokens, the steps it overlaps), scores those and scatters their
gradients back: on long reasoning samples a fifth or less of the work.
"""

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .. import kernels
from ..layout import attention_mask

QUERY_BLOCK = 256  # queries per block at most
BLOCK_SCORES = 1 << 20  # and at most this many scores per head and block (fewer queries past 4k keys)
# Sequences longer than BLOCKWISE_FROM tokens train with blockwise attention.
# None: past GPU_BLOCKWISE_FROM on a GPU (shorter ones make one fused attention
# call with the mask array), every sequence on the CPU, where blockwise
# attention's base-2 exponentials make it the faster of the two at any length
# (its gradient 1.44x and 1.50x as fast at 650 and 930 tokens with OpenBLAS:
# examples/bench_train_attention.py).
BLOCKWISE_FROM: Optional[int] = None
GPU_BLOCKWISE_FROM = 1024


def _blocks(length: int, block: int):
    return [(i, min(i + block, length)) for i in range(0, length, block)]


# Softmax in base 2: 2 ** (s * log2(e)) is exp(s). On MLX's CPU backend
# mx.power with a scalar base runs about 2.5x faster than mx.exp over a score
# matrix, as exact once the scores are scaled by log2(e)
# (examples/bench_train_attention.py), and the exponentials are most of the
# time a long training sample spends attending.
_LOG2E = 1.4426950408889634


def _exp2(x):
    return mx.power(2.0, x)


def _scores(q, k, scale, query_slot, query_limit, key_visible_until, i, j):
    """Masked scores of queries ``[i, j)`` over keys ``[0, j)`` in base 2
    (``-inf`` where hidden), float32, ``(B, Hkv, r, j - i, j)``."""
    mask = attention_mask(query_slot[:, i:j], query_limit[:, i:j], key_visible_until[:, :j], xp=mx)
    s = q[..., i:j, :] @ k[..., :j, :].swapaxes(-1, -2)
    return mx.where(mask[:, None, None], s.astype(mx.float32) * (scale * _LOG2E), -mx.inf)


def _gathered_scores(q, k, scale, query_slot, query_limit, key_visible_until, i, j, index):
    """Masked base-2 scores of queries ``[i, j)`` over the gathered keys
    ``index`` (``-1``: padding), float32, ``(B, Hkv, r, j - i, K)``; also
    the gathered keys' slots (padding clamped to 0)."""
    keys = mx.maximum(index, 0)
    slot, limit = query_slot[:, i:j, None], query_limit[:, i:j, None]
    until = mx.take(key_visible_until, keys, axis=1)[:, None, :]
    mask = ((keys == slot) | ((keys < limit) & (slot < until))) & (index >= 0)
    s = q[..., i:j, :] @ mx.take(k, keys, axis=3).swapaxes(-1, -2)
    return mx.where(mask[:, None, None], s.astype(mx.float32) * (scale * _LOG2E), -mx.inf), keys


def _attend_block(t, v):
    """Output of one block from its base-2 scores ``t`` and values ``v``, and
    the queries' base-2 log-sum-exp, from which the backward pass recomputes
    the probabilities (``2 ** (t - lse)``) without another softmax. The sum
    divides the block's output, not its probabilities."""
    m = t.max(axis=-1, keepdims=True)
    e = _exp2(t - m)
    total = e.sum(axis=-1, keepdims=True)
    out = (e.astype(v.dtype) @ v) / total
    return out.astype(v.dtype), m + mx.log2(total)


def _grouped(q, k, v):
    """``(B, H, L, D)`` queries as ``(B, Hkv, H / Hkv, L, D)`` beside ``(B, Hkv, 1, L, D)`` keys and values."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    return q.reshape(B, Hkv, H // Hkv, L, D), k[:, :, None], v[:, :, None]


def _block_gradients(p, qg, kb, vb, dog, og, scale, i, j):
    """Gradients of queries ``[i, j)`` attending with probabilities ``p`` to
    the keys ``kb`` and values ``vb`` (grouped as :func:`_grouped`), given
    the output ``og`` and its cotangent ``dog``: the queries' gradient, and
    the keys' and values' summed over the grouped heads in float32."""
    do = dog[..., i:j, :]
    dp = (do @ vb.swapaxes(-1, -2)).astype(mx.float32)
    delta = (do.astype(mx.float32) * og[..., i:j, :].astype(mx.float32)).sum(-1, keepdims=True)
    ds = (p * (dp - delta)).astype(qg.dtype)
    dq = (ds @ kb) * scale
    dk = ((ds.swapaxes(-1, -2) @ qg[..., i:j, :]) * scale).astype(mx.float32).sum(2)
    dv = (p.astype(vb.dtype).swapaxes(-1, -2) @ do).astype(mx.float32).sum(2)
    return dq, dk, dv


def _output(blocks, q):
    """The blocks' outputs and log-sum-exps as ``(B, H, L, D)`` and ``(B, H, L, 1)``."""
    B, H, L, _ = q.shape
    out = mx.concatenate([o for o, _ in blocks], axis=3).reshape(q.shape)
    lse = mx.concatenate([x for _, x in blocks], axis=3).reshape(B, H, L, 1)
    return out, lse


@lru_cache(maxsize=None)
def _attention_fn(scale: float, block: int):
    @mx.custom_function
    def attend(q, k, v, query_slot, query_limit, key_visible_until):
        qg, kg, vg = _grouped(q, k, v)
        return _output([_attend_block(_scores(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j),
                                      vg[..., :j, :])
                        for i, j in _blocks(q.shape[2], block)], q)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v, query_slot, query_limit, key_visible_until = primals
        qg, kg, vg = _grouped(q, k, v)
        dog = cotangents[0].reshape(qg.shape)
        og = outputs[0].reshape(qg.shape)
        lse = outputs[1].reshape(*qg.shape[:-1], 1)
        L = q.shape[2]
        dq, dk, dv = [], 0, 0
        for i, j in _blocks(L, block):
            t = _scores(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j)
            p = _exp2(t - lse[..., i:j, :])
            dq_b, dk_b, dv_b = _block_gradients(p, qg, kg[..., :j, :], vg[..., :j, :], dog, og, scale, i, j)
            dq.append(dq_b)
            pad = [(0, 0), (0, 0), (0, L - j), (0, 0)]  # dK, dV of keys [0, j)
            dk = dk + mx.pad(dk_b, pad)
            dv = dv + mx.pad(dv_b, pad)
        dq = mx.concatenate(dq, axis=3).reshape(q.shape)
        return (dq, dk.astype(k.dtype), dv.astype(v.dtype), mx.zeros_like(query_slot),
                mx.zeros_like(query_limit), mx.zeros_like(key_visible_until))

    return attend


def _grouped_blocks(length: int, block: int, index):
    """The blocks ``(i, j)`` with their gathered keys: row ``r`` of the
    group array ``index[g]`` for the groups in order."""
    blocks = iter(_blocks(length, block))
    return [(next(blocks), group[r]) for group in index for r in range(group.shape[0])]


@lru_cache(maxsize=None)
def _gathered_attention_fn(scale: float, block: int):
    @mx.custom_function
    def attend(q, k, v, query_slot, query_limit, key_visible_until, *key_index):
        qg, kg, vg = _grouped(q, k, v)
        out = []
        for (i, j), index in _grouped_blocks(q.shape[2], block, key_index):
            t, keys = _gathered_scores(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j, index)
            out.append(_attend_block(t, mx.take(vg, keys, axis=3)))
        return _output(out, q)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v, query_slot, query_limit, key_visible_until, *key_index = primals
        qg, kg, vg = _grouped(q, k, v)
        dog = cotangents[0].reshape(qg.shape)
        og = outputs[0].reshape(qg.shape)
        lse = outputs[1].reshape(*qg.shape[:-1], 1)
        dq = []
        dk = mx.zeros(k.shape, mx.float32)
        dv = mx.zeros(v.shape, mx.float32)
        for (i, j), index in _grouped_blocks(q.shape[2], block, key_index):
            t, keys = _gathered_scores(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j, index)
            p = _exp2(t - lse[..., i:j, :])
            dq_b, dk_b, dv_b = _block_gradients(p, qg, mx.take(kg, keys, axis=3), mx.take(vg, keys, axis=3),
                                                dog, og, scale, i, j)
            dq.append(dq_b)
            # padding keys have zero probability, so their (clamped) slot 0 gets nothing
            dk = dk.at[:, :, keys, :].add(dk_b)
            dv = dv.at[:, :, keys, :].add(dv_b)
        dq = mx.concatenate(dq, axis=3).reshape(q.shape)
        return (dq, dk.astype(k.dtype), dv.astype(v.dtype), mx.zeros_like(query_slot),
                mx.zeros_like(query_limit), mx.zeros_like(key_visible_until),
                *(mx.zeros_like(x) for x in key_index))

    return attend


def visible_key_groups(query_slot: np.ndarray, query_limit: np.ndarray, key_visible_until: np.ndarray,
                       block: int, groups: int = 1) -> List[np.ndarray]:
    """Per block of ``block`` queries, the keys some query of the block sees
    in some row of the batch (``(B, T)`` rule arrays of a causal batch), for
    ``groups`` runs of consecutive blocks (as even as can be): per run a
    ``(blocks, K)`` int32 array, ascending, ``-1`` after the last, ``K`` the
    most any of its blocks needs rounded up as batch lengths are
    (``datasets.bucket_length``: few distinct shapes for the compiled training
    step). A MemoSight sample's early blocks see few keys and its late ones
    the memory tokens of every earlier step, so runs padded each to its own
    widest block score fewer padding keys than one array would.

    A query with slot ``s`` and limit ``l`` sees key ``k`` when ``k == s`` or
    ``k < l`` and ``s < until[k]``; the block's smallest slot and largest
    limit give a superset of its keys (the mask is applied to the gathered
    keys exactly)."""
    from ..datasets import bucket_length

    T = query_slot.shape[-1]
    keys = np.arange(T)
    sets = []
    for i, j in _blocks(T, block):
        seen = ((keys < query_limit[:, i:j].max(axis=1, keepdims=True))
                & (key_visible_until > query_slot[:, i:j].min(axis=1, keepdims=True))).any(axis=0)
        seen[query_slot[:, i:j].ravel()] = True
        sets.append(np.flatnonzero(seen))
    out = []
    for run in np.array_split(np.arange(len(sets)), min(groups, len(sets))):
        K = bucket_length(max(len(sets[b]) for b in run))
        index = np.full((len(run), K), -1, np.int32)
        for r, b in enumerate(run):
            index[r, : len(sets[b])] = sets[b]
        out.append(index)
    return out


def visible_keys(query_slot: np.ndarray, query_limit: np.ndarray, key_visible_until: np.ndarray,
                 block: int) -> np.ndarray:
    """:func:`visible_key_groups` as one ``(blocks, K)`` array."""
    return visible_key_groups(query_slot, query_limit, key_visible_until, block)[0]


# A gathered block costs its K keys' scores plus gathering them and
# scattering their gradients; blocks of plain causal attention score keys
# [0, j) in place. Gather only where it scores well under that (ordinary SFT
# samples see every earlier key, so gathering would score the block's future
# keys too: the attention gradient of a 7,000-token causal sequence 1.9x
# slower, examples/bench_train_attention.py).
GATHER_SHARE = 0.75
KEY_GROUPS = 4  # runs of blocks with their own number of gathered keys (visible_key_groups)


def batch_key_index(query_slot: np.ndarray, query_limit: np.ndarray, key_visible_until: np.ndarray,
                    block: int) -> Tuple[np.ndarray, ...]:
    """:func:`visible_key_groups` (:data:`KEY_GROUPS` runs) where gathering
    them saves work over attending to keys ``[0, j)`` block by block, else
    ``()``."""
    index = visible_key_groups(query_slot, query_limit, key_visible_until, block, KEY_GROUPS)
    causal = sum(j for _, j in _blocks(query_slot.shape[-1], block))
    return tuple(index) if sum(x.size for x in index) <= GATHER_SHARE * causal else ()


def query_block(length: int) -> int:
    """Queries per block for a sequence of ``length``: 256, down to 64 for long sequences."""
    return min(QUERY_BLOCK, max(64, BLOCK_SCORES // max(length, 1)))


KeyIndex = Union[mx.array, Sequence[mx.array]]


def blockwise_attention(queries, keys, values, scale: float, query_slot, query_limit, key_visible_until,
                        block: Optional[int] = None, key_index: Optional[KeyIndex] = None) -> mx.array:
    """MemoSight-masked attention of a causal training sequence, ``block``
    queries at a time, differentiable with memory linear in the length.

    ``queries`` ``(B, H, L, D)``, ``keys`` / ``values`` ``(B, Hkv, L, D)``
    (grouped-query attention when ``Hkv < H``); the rule arrays are ``(B, L)``.
    With ``key_index`` (:func:`visible_keys`, or the arrays of
    :func:`visible_key_groups`, of the rule at the same ``block``), each block
    scores only the keys it can see.
    """
    block = block or query_block(queries.shape[2])
    if key_index is not None and len(key_index):
        index = (key_index,) if isinstance(key_index, mx.array) else tuple(key_index)
        blocks = len(_blocks(queries.shape[2], block))
        shapes = [tuple(x.shape) for x in index]
        if any(len(x) != 2 for x in shapes) or sum(x[0] for x in shapes) != blocks:
            raise ValueError(f"key_index has shapes {shapes}, but {queries.shape[2]} queries in blocks of {block} "
                             f"need {blocks} rows of keys in all: build it with visible_keys at this block size")
        return _gathered_attention_fn(float(scale), int(block))(
            queries, keys, values, query_slot, query_limit, key_visible_until, *index)[0]
    return _attention_fn(float(scale), int(block))(
        queries, keys, values, query_slot, query_limit, key_visible_until)[0]


class BlockwiseMask(kernels.CompactMask):
    """The training rule passed through mlx-lm's attention: attention with it
    runs :func:`blockwise_attention` instead of a mask array."""

    def __init__(self, query_slot, query_limit, key_visible_until, block: Optional[int] = None,
                 key_index: Optional[KeyIndex] = None):
        super().__init__(query_slot, query_limit, key_visible_until)
        self.block = block
        self.key_index = key_index

    def attend(self, queries, keys, values, scale):
        return blockwise_attention(queries, keys, values, scale, self.query_slot, self.query_limit,
                                   self.key_visible_until, self.block, self.key_index)


def uses_blockwise(length: int) -> bool:
    """Whether a training batch of this (padded) length attends blockwise
    (:data:`BLOCKWISE_FROM`)."""
    limit = BLOCKWISE_FROM
    if limit is None:
        limit = GPU_BLOCKWISE_FROM if mx.default_device() == mx.gpu else 0
    return length > limit


def training_mask(query_slot, query_limit, key_visible_until, key_index: Optional[KeyIndex] = None):
    """The mask one training micro-batch runs with: a boolean array for short
    sequences (one fused attention call), else blockwise attention
    (:func:`uses_blockwise`; over the gathered visible keys with ``key_index``,
    :func:`visible_key_groups` at :func:`query_block` of the length)."""
    if uses_blockwise(query_slot.shape[-1]):
        return BlockwiseMask(query_slot, query_limit, key_visible_until, key_index=key_index)
    return attention_mask(query_slot, query_limit, key_visible_until, xp=mx)
