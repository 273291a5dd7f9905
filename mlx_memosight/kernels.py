"""Dispatch for the two operations that have custom kernels on Apple GPUs:
MemoSight-masked attention and KV-cache compaction.

Each has a pure-MLX reference here, used on every backend without the kernel
and as the oracle in tests.
"""

import os

import mlx.core as mx

from .layout import attention_mask

FORCE_REFERENCE_ENV = "MLX_MEMOSIGHT_REFERENCE"


class CompactMask:
    """The layout's compact attention rule as MLX arrays, passed through
    mlx-lm's attention in place of a mask array.

    ``query_slot`` / ``query_limit`` are ``(Q,)`` (or ``(B, Q)``) and
    ``key_visible_until`` is ``(K,)`` (or ``(B, K)``) int32 arrays; ``K`` counts
    the cached entries plus the pass's own tokens. The boolean mask is
    materialised at most once per pass, however many layers ask for it.
    """

    def __init__(self, query_slot, query_limit, key_visible_until):
        self.query_slot = query_slot
        self.query_limit = query_limit
        self.key_visible_until = key_visible_until
        self._array = None

    @classmethod
    def from_rule(cls, rule) -> "CompactMask":
        return cls(
            mx.array(rule.query_slot, dtype=mx.int32),
            mx.array(rule.query_limit, dtype=mx.int32),
            mx.array(rule.key_visible_until, dtype=mx.int32),
        )

    @property
    def num_keys(self) -> int:
        return self.key_visible_until.shape[-1]

    @property
    def array(self) -> mx.array:
        """The boolean mask, ``(Q, K)`` or ``(B, 1, Q, K)``."""
        if self._array is None:
            m = attention_mask(self.query_slot, self.query_limit, self.key_visible_until, xp=mx)
            self._array = m[:, None] if m.ndim == 3 else m
        return self._array


def attention_reference(queries, keys, values, scale: float, mask: CompactMask) -> mx.array:
    """MemoSight-masked attention with the materialised mask."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask.array)


def attention(queries, keys, values, scale: float, mask: CompactMask) -> mx.array:
    """Attention of ``queries (B, Hq, Q, D)`` over ``keys`` / ``values``
    ``(B, Hkv, K, D)`` under a :class:`CompactMask`."""
    return attention_reference(queries, keys, values, scale, mask)


def use_reference() -> bool:
    """True when ``MLX_MEMOSIGHT_REFERENCE=1`` forces the pure-MLX paths."""
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def compact_reference(layers, start: int, end: int, length: int):
    """Move entries ``[end, length)`` of every layer down to ``start``.

    The tails are copied out and evaluated first so that the slice updates
    below write into the existing buffers instead of copying them whole.
    """
    tails = []
    for c in layers:
        tails.append(mx.contiguous(c.keys[..., end:length, :]))
        tails.append(mx.contiguous(c.values[..., end:length, :]))
    mx.eval(tails)
    n = length - end
    for i, c in enumerate(layers):
        c.keys[..., start : start + n, :] = tails[2 * i]
        c.values[..., start : start + n, :] = tails[2 * i + 1]


def compact(layers, start: int, end: int, length: int):
    """Remove the span ``[start, end)`` from every layer's K/V buffers."""
    compact_reference(layers, start, end, length)
