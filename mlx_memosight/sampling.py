"""Choosing tokens from logits, with mlx-lm's sampler and logits-processor
protocols (``sampler(logprobs) -> tokens``, ``processor(tokens, logits) ->
logits``).

A MemoSight pass yields logits at several rows whose histories differ (the
rows after each draft prefix): :func:`select` applies the processors to each
group of rows with that group's history, then samples every row.
"""

from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

Processor = Callable[[mx.array, mx.array], mx.array]


def make_repetition_penalty(penalty: float, exempt_ids: Sequence[int] = ()) -> Processor:
    """The reference evaluation's repetition penalty as a logits processor.

    Every distinct token of the history except ``exempt_ids`` (the
    tokenizer's special ids) is penalised once, whatever its count: positive
    logits are divided by ``penalty``, negative ones multiplied. Unlike
    mlx-lm's processor it looks at the whole history, not a window.
    """
    if not penalty > 0:
        raise ValueError(f"penalty must be positive, got {penalty}")
    exempt = sorted({int(i) for i in exempt_ids})
    eligible = {}  # vocabulary size -> mask of the tokens that may be penalised

    def mask(V: int) -> mx.array:
        if V not in eligible:
            m = np.ones(V, bool)
            m[[i for i in exempt if 0 <= i < V]] = False
            eligible[V] = mx.array(m)
        return eligible[V]

    def repetition_penalty(tokens: mx.array, logits: mx.array) -> mx.array:
        V = logits.shape[-1]
        seen = mx.zeros((V,), mx.bool_)
        if tokens.size:
            seen[tokens.reshape(-1)] = True
        seen = seen & mask(V)
        return mx.where(seen, mx.where(logits > 0, logits / penalty, logits * penalty), logits)

    return repetition_penalty


def select(logits: mx.array, sampler=None, processors: Sequence[Processor] = (),
           histories: Optional[List[mx.array]] = None, groups: Optional[List[int]] = None) -> mx.array:
    """Tokens ``(R,)`` for logits ``(R, V)``.

    Args:
        sampler: mlx-lm's sampler (takes log-probabilities); None: greedy.
        processors: logits processors, applied in order.
        histories: the token histories the processors see; with ``groups``
            (``len(groups) == R``) row ``r`` uses ``histories[groups[r]]``,
            without it ``histories[0]`` serves every row.
    """
    logits = logits.astype(mx.float32)
    if processors:
        if groups is None:
            logits = _process(logits, histories[0], processors)
        else:
            parts, start = [], 0
            while start < len(groups):
                end = start
                while end < len(groups) and groups[end] == groups[start]:
                    end += 1
                parts.append(_process(logits[start:end], histories[groups[start]], processors))
                start = end
            logits = mx.concatenate(parts)
    if sampler is None:
        return mx.argmax(logits, axis=-1)
    return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def _process(logits, history, processors):
    for p in processors:
        logits = p(history, logits)
    return logits
