"""SPEC's joint loss, ``lm_loss_weight * CE_LM + mtp_loss_weight * CE_MTP``, in
the shape mlx-lm's trainer calls (``loss(model, *batch) -> (loss, tokens)``)."""

import mlx.core as mx
import mlx.nn as nn

from ..datasets import batch_arrays, num_targets
from ..model import forward, lm_head
from .attention import training_mask
from .tokens import _is_tied

LOSS_CHUNK = 1024  # scored rows per chunk of the output layer and cross-entropy


def _rows_loss(model, h, targets, weights):
    ce = nn.losses.cross_entropy(lm_head(model, h), targets)
    return (ce.astype(mx.float32) * weights).sum()


def scored_loss(model, h, targets, weights):
    """The weighted cross-entropy of the scored rows' hidden states ``h``.

    Past :data:`LOSS_CHUNK` rows the output layer and the
    cross-entropy run a chunk of rows at a time under gradient checkpointing:
    only one chunk's ``(rows, vocabulary)`` logits exist at once, in the
    forward and the backward pass (at 152k tokens of vocabulary, 8k rows of
    float32 logits are 4.9 GB, and their gradient as much again).
    """
    chunk = LOSS_CHUNK
    R = h.shape[1]
    if R <= chunk:
        return _rows_loss(model, h, targets, weights)
    out = model.model.embed_tokens if _is_tied(model) else model.lm_head  # the output layer's parameters
    total = 0.0
    for i in range(0, R, chunk):
        t, w = targets[:, i:i + chunk], weights[:, i:i + chunk]  # constants of the chunk: no gradient
        fn = nn.utils.checkpoint(out, lambda h, t=t, w=w: _rows_loss(model, h, t, w))
        total = total + fn(h[:, i:i + chunk])
    return total


def memosight_loss(model, inputs, positions, query_slot, query_limit, key_visible_until,
                   rows, targets, weights, real_tokens, *key_index):
    """SPEC's joint loss of one micro-batch, as mlx-lm's trainer calls it.

    The arrays are :func:`datasets.batch_arrays`' tuple. Logits are computed
    only at the scored rows, in chunks for long samples (:func:`scored_loss`);
    each row's cross-entropy is weighted by ``weights`` (its stream's loss
    weight over its stream's target count, with the factors the trainer
    expects, see :class:`BatchIterator`).

    Short sequences on a GPU attend with the materialised mask (one
    ``mx.fast.scaled_dot_product_attention`` call); longer ones, and every
    one on the CPU, with :func:`attention.blockwise_attention`, whose memory
    grows linearly with the length (:func:`attention.training_mask`), over the keys each block can
    see when the batch gives them (``key_index``: the arrays of
    :func:`attention.visible_key_groups`).

    Returns:
        ``(loss, real_tokens)``.
    """
    mask = training_mask(query_slot, query_limit, key_visible_until, key_index)
    h = forward(model, inputs, positions, mask, hidden=True)
    h = mx.take_along_axis(h, rows[..., None], axis=1)
    return scored_loss(model, h, targets, weights), real_tokens


def joint_loss(model, samples, lm_loss_weight: float, mtp_loss_weight: float) -> mx.array:
    """The joint loss of ``samples`` taken as one batch (no accumulation)."""
    n_lm = sum(num_targets(s)[0] for s in samples)
    n_mtp = sum(num_targets(s)[1] for s in samples)
    lm = lm_loss_weight / n_lm if n_lm else 0.0
    mtp = mtp_loss_weight / n_mtp if n_mtp else 0.0
    return memosight_loss(model, *batch_arrays(samples, lm, mtp))[0]
