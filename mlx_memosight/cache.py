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

from typing import List, Optional, Sequence

import mlx.core as mx

from . import kernels


class _Pass:
    __slots__ = ("offset", "mask")

    def __init__(self):
        self.offset = 0
        self.mask = None


class PassLayer:
    """mlx-lm's cache protocol for one layer, read off the pass in flight
    (``self._pass``): the RoPE offset, the mask (a compact mask that
    attention reads), and truthiness (an empty cache is still a cache)."""

    _pass: _Pass

    @property
    def offset(self):
        return self._pass.offset

    def make_mask(self, *args, **kwargs):
        return self._pass.mask

    def __bool__(self):
        return True


class LayerCache(PassLayer):
    """One layer's keys and values."""

    step = 256

    def __init__(self, current: _Pass):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.length = 0
        self._pass = current

    # -- mlx-lm's protocol (PassLayer) and update_and_fetch -----------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        prev = self.length
        self.reserve(prev + n, keys, values)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.length = prev + n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def reserve(self, total: int, keys: Optional[mx.array] = None, values: Optional[mx.array] = None):
        """Grow the buffers (in steps of ``step`` slots) so that they hold
        ``total`` entries; ``keys`` / ``values`` give the shape and dtype of
        an empty cache's buffers."""
        if self.keys is not None and total <= self.keys.shape[2]:
            return
        like_k, like_v = (keys, values) if self.keys is None else (self.keys, self.values)
        B, H, _, Dk = like_k.shape
        Dv = like_v.shape[3]
        prev = self.length
        grow = ((total - prev + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, grow, Dk), like_k.dtype)
        new_v = mx.zeros((B, H, grow, Dv), like_v.dtype)
        if self.keys is not None:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        else:
            self.keys, self.values = new_k, new_v

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


class _Layers:
    """What every cache of a whole model offers mlx-lm and the engine: its
    per-layer caches (``layers``) as a sequence, and their buffers."""

    layers: list

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def capacity_nbytes(self) -> int:
        return sum(c.capacity_nbytes for c in self.layers)

    def state_arrays(self):
        return [x for c in self.layers for x in (c.keys, c.values) if x is not None]

    def take_buffers(self) -> List[mx.array]:
        """Hand the whole buffers (keys and values of every layer, with room
        for at least one more entry) to a pass that returns them updated
        (:meth:`put_buffers`); the cache keeps no reference meanwhile, so
        that the pass writes into them in place."""
        out = []
        for c in self.layers:
            out += [c.keys, c.values]
            c.keys = c.values = None
        return out

    def put_buffers(self, buffers: Sequence[mx.array], length: Optional[int] = None):
        """Take back the buffers of :meth:`take_buffers`, now holding
        ``length`` entries (None: the lengths stay as they are)."""
        for i, c in enumerate(self.layers):
            c.keys, c.values = buffers[2 * i], buffers[2 * i + 1]
            if length is not None:
                c.length = length


class KVCache(_Layers):
    """The per-layer caches of one model and the pass they are serving."""

    def __init__(self, num_layers: int):
        self._pass = _Pass()
        self.layers: List[LayerCache] = [LayerCache(self._pass) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model) -> "KVCache":
        return cls(len(model.layers))

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

    def restore(self, n: int):
        """Take back the last ``n`` entries dropped by :meth:`trim`, when
        nothing was written since (their data is still in the buffers)."""
        if n < 0 or self.length + n > (self.layers[0].keys.shape[2] if self.layers[0].keys is not None else 0):
            raise ValueError(f"cannot restore {n} entries after {self.length}")
        for c in self.layers:
            c.length += n

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



def _round_up(n: int, step: int) -> int:
    return max(step, ((n + step - 1) // step) * step)


class _BatchPass(_Pass):
    __slots__ = ("index", "num_keys")

    def __init__(self):
        super().__init__()
        self.index = None  # (B, 1, N, 1) slots each row's block is written to
        self.num_keys = 0


class BatchLayerCache(LayerCache):
    """One layer's keys and values for a batch of sequences: ``(B, H, capacity,
    D)`` buffers in which row ``b`` holds its own entries at slots ``0 ..
    length_b``; what lies past a row's length is stale and masked."""

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        K = self._pass.num_keys
        if self.keys.shape[2] < K:
            self.grow(K)
        index = self._pass.index
        self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, index, values, axis=2)
        return self.keys[..., :K, :], self.values[..., :K, :]

    def grow(self, n: int):
        """Make room for ``n`` slots per row."""
        B, H, cap, Dk = self.keys.shape
        new = _round_up(n, self.step)
        if new <= cap:
            return
        self.keys = mx.concatenate([self.keys, mx.zeros((B, H, new - cap, Dk), self.keys.dtype)], axis=2)
        Dv = self.values.shape[3]
        self.values = mx.concatenate([self.values, mx.zeros((B, H, new - cap, Dv), self.values.dtype)], axis=2)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError("a batched layer has one length per row: ask BatchKVCache.nbytes")


class BatchRow:
    """One sequence's view of a :class:`BatchKVCache`: what the decoder of
    one sequence asks of a cache (``length``, ``trim``, ``restore``,
    ``evict``)."""

    def __init__(self, batch: "BatchKVCache", length: int):
        self.batch = batch
        self.length = length

    @property
    def index(self) -> int:
        return self.batch.rows.index(self)

    def trim(self, n: int):
        if n < 0 or n > self.length:
            raise ValueError(f"cannot trim {n} of {self.length} entries")
        self.length -= n

    def restore(self, n: int):
        """Take back the last ``n`` entries dropped by :meth:`trim`, when
        nothing was written to this row since (its slots still hold them)."""
        layer = self.batch.layers[0]
        if n < 0 or self.length + n > (layer.keys.shape[2] if layer.keys is not None else 0):
            raise ValueError(f"cannot restore {n} entries after {self.length}")
        self.length += n

    def evict(self, start: int, end: int):
        self.batch.evict(self, start, end)


class BatchKVCache(_Layers):
    """The KV cache of a batch of sequences, each with its own length,
    positions and evictions; sequences join (:meth:`add`) and leave
    (:meth:`remove`) between passes.

    Rows share per-layer buffers ``(B, H, capacity, D)``: a pass writes each
    row's block at that row's own length (one scatter per layer), and attends
    over ``max length + block`` keys under a per-row mask that hides every
    slot past a row's own entries. A row's eviction moves its own tail down.
    """

    def __init__(self, num_layers: int):
        self._pass = _BatchPass()
        self.layers: List[BatchLayerCache] = [BatchLayerCache(self._pass) for _ in range(num_layers)]
        self.rows: List[BatchRow] = []

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def add(self, cache: KVCache) -> BatchRow:
        """A new last row holding ``cache``'s entries (a prefilled prompt)."""
        n = cache.length
        cap = _round_up(n, LayerCache.step)
        for layer, src in zip(self.layers, cache.layers):
            k, v = src.keys[..., :n, :], src.values[..., :n, :]
            if layer.keys is not None:
                layer.grow(n)
                cap = layer.keys.shape[2]
            pad = [(0, 0), (0, 0), (0, cap - n), (0, 0)]
            k, v = mx.pad(k, pad), mx.pad(v, pad)
            if layer.keys is None:
                layer.keys, layer.values = k, v
            else:
                layer.keys = mx.concatenate([layer.keys, k])
                layer.values = mx.concatenate([layer.values, v])
        mx.eval(self.state_arrays())
        row = BatchRow(self, n)
        self.rows.append(row)
        return row

    def remove(self, row: BatchRow):
        """Drop a row (its sequence has finished or was cancelled); the
        buffers shrink to what the longest remaining row needs."""
        b = row.index
        self.rows.pop(b)
        cap = _round_up(max(self.lengths, default=0), LayerCache.step)
        for layer in self.layers:
            if not self.rows:
                layer.keys = layer.values = None
            else:
                layer.keys = mx.concatenate([layer.keys[:b, :, :cap], layer.keys[b + 1 :, :, :cap]])
                layer.values = mx.concatenate([layer.values[:b, :, :cap], layer.values[b + 1 :, :, :cap]])
        if self.rows:
            mx.eval(self.state_arrays())

    def begin_pass(self, positions, mask, widths):
        """Positions (``TokenPositions`` ``(B, N)``) and mask (a
        ``CompactMask`` over ``max length + N`` keys) of the next pass, in
        which row ``b`` appends ``widths[b]`` real entries (its block padded
        to ``N``). Row lengths count the new entries from here on."""
        N = positions.array.shape[1]
        starts = [r.length for r in self.rows]
        index = mx.array(starts, mx.int32)[:, None] + mx.arange(N, dtype=mx.int32)
        self._pass.offset = positions
        self._pass.mask = mask
        self._pass.index = index[:, None, :, None]
        self._pass.num_keys = max(starts) + N
        for r, w in zip(self.rows, widths):
            r.length += w

    def evict(self, row: BatchRow, start: int, end: int):
        """Remove ``[start, end)`` from one row and move its later entries down."""
        length = row.length
        if not 0 <= start <= end <= length:
            raise ValueError(f"cannot evict [{start}, {end}) of {length} entries")
        if start == end:
            return
        if end < length:
            kernels.compact(self.layers, start, end, length, row=row.index)
        row.length = length - (end - start)

    @property
    def lengths(self) -> List[int]:
        return [r.length for r in self.rows]

    @property
    def nbytes(self) -> int:
        """Bytes held by the rows' valid entries."""
        if not self.rows:
            return 0
        per_entry = sum((c.keys.nbytes + c.values.nbytes) // (c.keys.shape[0] * c.keys.shape[2])
                        for c in self.layers)
        return per_entry * sum(self.lengths)



class PromptCache:
    """The KV entries of recent prompts, for prompts that start the same way.

    A prompt's entries are kept as they stand right after its prefill, before
    any generated token: a causal prefill makes entry ``i`` depend on tokens
    ``0..i`` only, so the first ``c`` entries of a kept prompt serve any later
    prompt whose first ``c`` tokens are the same (the next turn of a
    conversation, a shared system prompt). What a generation adds is never
    kept: its finished steps are compressed into memory entries and evicted,
    so an answer's raw tokens have no entries to reuse, and the next turn
    prefills the answer text again.

    Least recently used prompts go first once the entries held pass
    ``max_bytes``; a prompt that another kept prompt extends is dropped.
    Not thread-safe: one engine thread uses it.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.entries: List[tuple] = []  # (token ids, KVCache), most recent last

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, c in self.entries)

    @staticmethod
    def _common(a, b) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def fetch(self, prompt: List[int], num_layers: int):
        """``(c, cache)``: a cache holding the entries of the first ``c``
        tokens of ``prompt`` (``c`` < len(prompt): the last token is always
        run, for its logits), or ``(0, None)``."""
        best, best_c = None, 0
        for i, (ids, _) in enumerate(self.entries):
            c = min(self._common(ids, prompt), len(prompt) - 1)
            if c > best_c:
                best, best_c = i, c
        if best is None:
            return 0, None
        ids, kept = self.entries.pop(best)
        self.entries.append((ids, kept))
        cache = KVCache(num_layers)
        for layer, src in zip(cache.layers, kept.layers):
            layer.keys, layer.values = src.keys[..., :best_c, :], src.values[..., :best_c, :]
            layer.length = best_c
        return best_c, cache

    def store(self, prompt: List[int], cache: "KVCache"):
        """Keep the first ``len(prompt)`` entries of ``cache`` (just prefilled)."""
        n = len(prompt)
        kept = KVCache(len(cache.layers))
        for layer, src in zip(kept.layers, cache.layers):
            layer.keys = mx.contiguous(src.keys[..., :n, :])
            layer.values = mx.contiguous(src.values[..., :n, :])
            layer.length = n
        mx.eval(kept.state_arrays())
        if kept.nbytes > self.max_bytes:
            return
        ids = list(prompt)
        # a kept prompt that this one extends (or repeats) is covered by it
        self.entries = [(k, c) for k, c in self.entries if not (len(k) <= n and ids[:len(k)] == k)]
        self.entries.append((ids, kept))
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            self.entries.pop(0)
