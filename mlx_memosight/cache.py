"""A KV cache whose slot index is separate from the logical position.

Entries live in preallocated per-layer buffers ``(B, n_kv_heads, capacity,
head_dim)``; slot ``i`` is simply the i-th entry, whatever its position id. On
top of mlx-lm's append the decoder needs two more edits:

* ``trim(n)``: drop the last ``n`` entries (rejected drafts, foresight tokens);
* ``evict(start, end)``: remove the span ``[start, end)`` from the middle (the
  raw text of a finished step) and move the tail down.

Each layer's cache follows mlx-lm's cache protocol (``update_and_fetch``,
``offset``, ``make_mask``, ``trim``, ``is_trimmable``, ``state``, ``nbytes``)
so that mlx-lm's attention layers use it unchanged. ``offset`` and
``make_mask`` answer from the pass being run (its positions and mask), which the
decoder sets once for all layers with :meth:`KVCache.begin_pass`.
"""

from typing import List, Optional

import mlx.core as mx

from . import kernels


class _Pass:
    __slots__ = ("offset", "mask")

    def __init__(self):
        self.offset = 0
        self.mask = None


class LayerCache:
    """One layer's keys and values."""

    step = 256

    def __init__(self, current: _Pass):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.length = 0
        self._pass = current

    # -- mlx-lm's protocol -------------------------------------------------
    @property
    def offset(self):
        return self._pass.offset

    def make_mask(self, *args, **kwargs):
        return self._pass.mask

    def __bool__(self):
        return True

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        prev = self.length
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            Dv = values.shape[3]
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, Dv), values.dtype)
            if self.keys is not None:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.length = prev + n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        n = min(self.length, n)
        self.length -= n
        return n

    def empty(self):
        return self.keys is None

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    @property
    def nbytes(self) -> int:
        """Bytes held by the valid entries."""
        if self.keys is None:
            return 0
        per_entry = (self.keys.nbytes + self.values.nbytes) // self.keys.shape[2]
        return per_entry * self.length

    @property
    def capacity_nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCache:
    """The per-layer caches of one model and the pass they are serving."""

    def __init__(self, num_layers: int):
        self._pass = _Pass()
        self.layers: List[LayerCache] = [LayerCache(self._pass) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model) -> "KVCache":
        return cls(len(model.layers))

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def length(self) -> int:
        """Number of entries (the same in every layer)."""
        return self.layers[0].length

    def begin_pass(self, positions, mask):
        """Positions (an int for contiguous positions, or ``TokenPositions``)
        and mask (None, ``"causal"`` or a boolean ``(Q, K)`` array) of the next
        pass; ``K`` counts the cached entries plus the pass's tokens."""
        self._pass.offset = positions
        self._pass.mask = mask

    def trim(self, n: int):
        """Drop the last ``n`` entries."""
        if n < 0 or n > self.length:
            raise ValueError(f"cannot trim {n} of {self.length} entries")
        for c in self.layers:
            c.trim(n)

    def evict(self, start: int, end: int):
        """Remove entries ``[start, end)`` and move the later entries down."""
        length = self.length
        if not 0 <= start <= end <= length:
            raise ValueError(f"cannot evict [{start}, {end}) of {length} entries")
        if start == end:
            return
        if end < length:
            kernels.compact(self.layers, start, end, length)
        for c in self.layers:
            c.length = length - (end - start)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    @property
    def capacity_nbytes(self) -> int:
        return sum(c.capacity_nbytes for c in self.layers)

    def state_arrays(self):
        return [x for c in self.layers for x in (c.keys, c.values) if x is not None]
