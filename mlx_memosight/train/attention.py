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
from typing import Optional

import mlx.core as mx
import numpy as np

from .. import kernels
from ..layout import attention_mask

QUERY_BLOCK = 256  # queries per block at most
BLOCK_SCORES = 1 << 20  # and at most this many scores per head and block (fewer queries past 4k keys)
BLOCKWISE_FROM = 1024  # sequences longer than this train with blockwise attention


def _blocks(length: int, block: int):
    return [(i, min(i + block, length)) for i in range(0, length, block)]


def _probabilities(q, k, scale, query_slot, query_limit, key_visible_until, i, j):
    """Softmax over keys ``[0, j)`` of queries ``[i, j)``, float32, ``(B, Hkv, r, j - i, j)``."""
    mask = attention_mask(query_slot[:, i:j], query_limit[:, i:j], key_visible_until[:, :j], xp=mx)
    s = (q[..., i:j, :] * scale) @ k[..., :j, :].swapaxes(-1, -2)
    s = mx.where(mask[:, None, None], s.astype(mx.float32), -mx.inf)
    return mx.softmax(s, axis=-1)


def _gathered_probabilities(q, k, scale, query_slot, query_limit, key_visible_until, i, j, index):
    """Softmax over the gathered keys ``index`` (``-1``: padding) of queries
    ``[i, j)``, float32, ``(B, Hkv, r, j - i, K)``; also the gathered keys'
    slots (padding clamped to 0)."""
    keys = mx.maximum(index, 0)
    slot, limit = query_slot[:, i:j, None], query_limit[:, i:j, None]
    until = mx.take(key_visible_until, keys, axis=1)[:, None, :]
    mask = ((keys == slot) | ((keys < limit) & (slot < until))) & (index >= 0)
    s = (q[..., i:j, :] * scale) @ mx.take(k, keys, axis=3).swapaxes(-1, -2)
    s = mx.where(mask[:, None, None], s.astype(mx.float32), -mx.inf)
    return mx.softmax(s, axis=-1), keys


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


@lru_cache(maxsize=None)
def _attention_fn(scale: float, block: int):
    @mx.custom_function
    def attend(q, k, v, query_slot, query_limit, key_visible_until):
        qg, kg, vg = _grouped(q, k, v)
        out = []
        for i, j in _blocks(q.shape[2], block):
            p = _probabilities(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j)
            out.append(p.astype(v.dtype) @ vg[..., :j, :])
        return mx.concatenate(out, axis=3).reshape(q.shape)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        q, k, v, query_slot, query_limit, key_visible_until = primals
        qg, kg, vg = _grouped(q, k, v)
        dog = cotangent.reshape(qg.shape)
        og = output.reshape(qg.shape)
        L = q.shape[2]
        dq, dk, dv = [], 0, 0
        for i, j in _blocks(L, block):
            p = _probabilities(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j)
            dq_b, dk_b, dv_b = _block_gradients(p, qg, kg[..., :j, :], vg[..., :j, :], dog, og, scale, i, j)
            dq.append(dq_b)
            pad = [(0, 0), (0, 0), (0, L - j), (0, 0)]  # dK, dV of keys [0, j)
            dk = dk + mx.pad(dk_b, pad)
            dv = dv + mx.pad(dv_b, pad)
        dq = mx.concatenate(dq, axis=3).reshape(q.shape)
        return (dq, dk.astype(k.dtype), dv.astype(v.dtype), mx.zeros_like(query_slot),
                mx.zeros_like(query_limit), mx.zeros_like(key_visible_until))

    return attend


@lru_cache(maxsize=None)
def _gathered_attention_fn(scale: float, block: int):
    @mx.custom_function
    def attend(q, k, v, query_slot, query_limit, key_visible_until, key_index):
        qg, kg, vg = _grouped(q, k, v)
        out = []
        for b, (i, j) in enumerate(_blocks(q.shape[2], block)):
            p, keys = _gathered_probabilities(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j,
                                              key_index[b])
            out.append(p.astype(v.dtype) @ mx.take(vg, keys, axis=3))
        return mx.concatenate(out, axis=3).reshape(q.shape)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        q, k, v, query_slot, query_limit, key_visible_until, key_index = primals
        qg, kg, vg = _grouped(q, k, v)
        dog = cotangent.reshape(qg.shape)
        og = output.reshape(qg.shape)
        dq = []
        dk = mx.zeros(k.shape, mx.float32)
        dv = mx.zeros(v.shape, mx.float32)
        for b, (i, j) in enumerate(_blocks(q.shape[2], block)):
            p, keys = _gathered_probabilities(qg, kg, scale, query_slot, query_limit, key_visible_until, i, j,
                                              key_index[b])
            dq_b, dk_b, dv_b = _block_gradients(p, qg, mx.take(kg, keys, axis=3), mx.take(vg, keys, axis=3),
                                                dog, og, scale, i, j)
            dq.append(dq_b)
            # padding keys have zero probability, so their (clamped) slot 0 gets nothing
            dk = dk.at[:, :, keys, :].add(dk_b)
            dv = dv.at[:, :, keys, :].add(dv_b)
        dq = mx.concatenate(dq, axis=3).reshape(q.shape)
        return (dq, dk.astype(k.dtype), dv.astype(v.dtype), mx.zeros_like(query_slot),
                mx.zeros_like(query_limit), mx.zeros_like(key_visible_until), mx.zeros_like(key_index))

    return attend


def visible_keys(query_slot: np.ndarray, query_limit: np.ndarray, key_visible_until: np.ndarray,
                 block: int) -> np.ndarray:
    """Per block of ``block`` queries, the keys some query of the block sees
    in some row of the batch (``(B, T)`` rule arrays of a causal batch):
    ``(blocks, K)`` int32, ascending, ``-1`` after the last, ``K`` the most any
    block needs rounded up as batch lengths are (``datasets.bucket_length``:
    few distinct shapes for the compiled training step).

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
    K = bucket_length(max(len(x) for x in sets))
    out = np.full((len(sets), K), -1, np.int32)
    for b, x in enumerate(sets):
        out[b, : len(x)] = x
    return out


def query_block(length: int) -> int:
    """Queries per block for a sequence of ``length``: 256, down to 64 for long sequences."""
    return min(QUERY_BLOCK, max(64, BLOCK_SCORES // max(length, 1)))


def blockwise_attention(queries, keys, values, scale: float, query_slot, query_limit, key_visible_until,
                        block: Optional[int] = None, key_index: Optional[mx.array] = None) -> mx.array:
    """MemoSight-masked attention of a causal training sequence, ``block``
    queries at a time, differentiable with memory linear in the length.

    ``queries`` ``(B, H, L, D)``, ``keys`` / ``values`` ``(B, Hkv, L, D)``
    (grouped-query attention when ``Hkv < H``); the rule arrays are ``(B, L)``.
    With ``key_index`` (:func:`visible_keys` of the rule at the same
    ``block``), each block scores only the keys it can see.
    """
    block = block or query_block(queries.shape[2])
    if key_index is not None:
        blocks = len(_blocks(queries.shape[2], block))
        if key_index.ndim != 2 or key_index.shape[0] != blocks:
            raise ValueError(f"key_index has shape {tuple(key_index.shape)}, but {queries.shape[2]} queries in "
                             f"blocks of {block} need ({blocks}, K): build it with visible_keys at this block size")
        return _gathered_attention_fn(float(scale), int(block))(
            queries, keys, values, query_slot, query_limit, key_visible_until, key_index)
    return _attention_fn(float(scale), int(block))(
        queries, keys, values, query_slot, query_limit, key_visible_until)


class BlockwiseMask(kernels.CompactMask):
    """The training rule passed through mlx-lm's attention: attention with it
    runs :func:`blockwise_attention` instead of a mask array."""

    def __init__(self, query_slot, query_limit, key_visible_until, block: Optional[int] = None,
                 key_index: Optional[mx.array] = None):
        super().__init__(query_slot, query_limit, key_visible_until)
        self.block = block
        self.key_index = key_index

    def attend(self, queries, keys, values, scale):
        return blockwise_attention(queries, keys, values, scale, self.query_slot, self.query_limit,
                                   self.key_visible_until, self.block, self.key_index)


def uses_blockwise(length: int) -> bool:
    """Whether a training batch of this (padded) length attends blockwise."""
    return length > BLOCKWISE_FROM


def training_mask(query_slot, query_limit, key_visible_until, key_index: Optional[mx.array] = None):
    """The mask one training micro-batch runs with: a boolean array for short
    sequences (one fused attention call), blockwise attention past
    :data:`BLOCKWISE_FROM` tokens (over the gathered visible keys with
    ``key_index``, :func:`visible_keys` at :func:`query_block` of the length)."""
    if uses_blockwise(query_slot.shape[-1]):
        return BlockwiseMask(query_slot, query_limit, key_visible_until, key_index=key_index)
    return attention_mask(query_slot, query_limit, key_visible_until, xp=mx)
