"""Run mlx-lm's own Qwen2 / Llama modules with MemoSight positions and masks.

mlx-lm's attention layers call ``rope(x, offset=cache.offset)``,
``cache.update_and_fetch(k, v)`` and take their mask from
``cache.make_mask(...)``. This module plugs into exactly those hooks:

* each layer's RoPE is wrapped by :class:`TokenRoPE`, which rotates every token
  by its own position when the offset it receives is a :class:`TokenPositions`
  (and defers to the wrapped RoPE otherwise, so the model still works with
  mlx-lm's own caches and generation);
* a per-pass context object stands in for the cache: its ``offset`` is the
  pass's positions and ``make_mask`` returns the pass's mask. A KV cache that
  stores entries (``mlx_memosight.cache``) does the same;
* the module-level attention function of the model's file is wrapped so that
  a mask given in the layout's compact form (:class:`kernels.CompactMask`)
  goes to the kernel dispatcher (all other calls pass through unchanged).

No mlx-lm model file is copied or edited, weights keep mlx-lm's names, and
``mlx_lm.load`` / quantisation / LoRA keep working on the same objects.
"""

import sys
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .layout import attention_mask


class TokenPositions:
    """Per-token position ids ``(B, L)`` carried through mlx-lm's ``offset``."""

    __slots__ = ("array",)

    def __init__(self, array: mx.array):
        self.array = array


class TokenRoPE(nn.Module):
    """Wraps an mlx-lm RoPE module so that each token can have its own position.

    ``mx.fast.rope`` takes one offset per batch element; treating every token
    as a batch element of length one applies an arbitrary position per token
    with the wrapped module's own frequencies and scaling.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def __call__(self, x: mx.array, offset: Union[int, mx.array, TokenPositions] = 0):
        if not isinstance(offset, TokenPositions):
            return self.base(x, offset=offset)
        B, H, L, D = x.shape
        pos = offset.array
        y = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
        y = self.base(y, offset=pos.reshape(-1))
        return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def _install_attention_hook(module):
    """Route attention with a :class:`kernels.CompactMask` to the kernel
    dispatcher; every other call goes to mlx-lm's own function unchanged."""
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None or getattr(original, "memosight_hook", False):
        return

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, *args, **kwargs):
        if isinstance(mask, kernels.CompactMask):
            return mask.attend(queries, keys, values, scale)
        return original(queries, keys, values, cache, scale, mask, *args, **kwargs)

    scaled_dot_product_attention.memosight_hook = True
    module.scaled_dot_product_attention = scaled_dot_product_attention


def attach_token_rope(model: nn.Module) -> nn.Module:
    """Make an mlx-lm model MemoSight-ready, in place (idempotent): wrap every
    attention layer's RoPE and hook its module's attention function."""
    for layer in model.layers:
        attn = layer.self_attn
        if not isinstance(attn.rope, TokenRoPE):
            attn.rope = TokenRoPE(attn.rope)
        _install_attention_hook(sys.modules[type(attn).__module__])
    return model


class PassContext:
    """Stands in for every layer's cache during one uncached pass: it supplies
    positions and the mask and hands keys and values straight back."""

    def __init__(self, positions, mask):
        self.offset = positions
        self.mask = mask

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, *args, **kwargs):
        return self.mask

    def __bool__(self):
        return True


def _as_positions(positions, batch: int, length: int):
    if isinstance(positions, int):
        return positions
    pos = mx.array(positions) if not isinstance(positions, mx.array) else positions
    if pos.ndim == 1:
        pos = pos[None]
    if pos.shape != (batch, length):
        pos = mx.broadcast_to(pos, (batch, length))
    return TokenPositions(pos.astype(mx.int32))


def _as_mask(mask, batch: int):
    if mask is None or isinstance(mask, (str, kernels.CompactMask)):
        return mask
    m = mx.array(mask) if not isinstance(mask, mx.array) else mask
    if m.ndim == 2:
        return m
    if m.ndim == 3:  # (B, Q, K) -> (B, 1, Q, K), broadcast over heads
        return m[:, None]
    return m


def lm_head(model: nn.Module, hidden: mx.array) -> mx.array:
    """Logits from the final hidden states (tied or untied head)."""
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


def forward(
    model: nn.Module,
    tokens,
    positions,
    mask=None,
    cache: Optional[Sequence[Any]] = None,
    rows=None,
    hidden: bool = False,
) -> mx.array:
    """One MemoSight forward pass through an mlx-lm Qwen2 / Llama model.

    Args:
        model: an mlx-lm model with :func:`attach_token_rope` applied.
        tokens: ``(L,)`` or ``(B, L)`` token ids.
        positions: per-token position ids (``(L,)`` or ``(B, L)``), or an int
            for contiguous positions starting there.
        mask: boolean ``(Q, K)`` / ``(B, Q, K)`` mask, ``"causal"`` or None.
        cache: per-layer cache objects (``mlx_memosight.cache``); when given,
            they must already hold this pass's positions and mask.
        rows: only compute logits at these rows (indices along L).
        hidden: return the final hidden states instead of logits.

    Returns:
        ``(B, L, V)`` logits (or ``(B, len(rows), V)``).
    """
    x = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
    if x.ndim == 1:
        x = x[None]
    B, L = x.shape
    if cache is None:
        ctx = PassContext(_as_positions(positions, B, L), _as_mask(mask, B))
        cache = [ctx] * len(model.layers)
    h = model.model(x, cache)
    if rows is not None:
        h = h[:, rows]
    if hidden:
        return h
    return lm_head(model, h)


def rule_mask(query_slot, query_limit, key_visible_until) -> mx.array:
    """The compact rule's boolean mask as an MLX array."""
    return attention_mask(
        mx.array(query_slot), mx.array(query_limit), mx.array(key_visible_until), xp=mx
    )
