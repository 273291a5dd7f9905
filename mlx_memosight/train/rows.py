"""LoRA / DoRA over the vocabulary restricted to the MemoSight tokens' rows.

mlx-lm's LoRA embedding and linear layers update every row of the
vocabulary; :func:`restrict_to_rows` keeps their update to chosen tokens (the
factors of the other rows start at zero and get no gradient), with mlx-lm's
parameter names and forward pass, so the adapters load with mlx-lm unchanged.
"""

from typing import Dict, Sequence

import mlx.core as mx
import numpy as np

class _TokenRows:
    """Mixin for mlx-lm's LoRA / DoRA embedding and linear layers that keeps
    their update to the rows of chosen tokens: the factors of the other rows
    (zero from the start) get no gradient. Parameter names and the forward
    pass are mlx-lm's, so the saved adapters load with mlx-lm unchanged."""

    def _masked(self, fn, *args, **kwargs):
        saved = {}
        for name, mask in self._row_masks.items():
            saved[name] = self[name]
            self[name] = mx.where(mask, saved[name], mx.stop_gradient(saved[name]))
        try:
            return fn(*args, **kwargs)
        finally:
            for name, value in saved.items():
                self[name] = value

    def __call__(self, *args, **kwargs):
        return self._masked(super().__call__, *args, **kwargs)

    def as_linear(self, *args, **kwargs):
        return self._masked(super().as_linear, *args, **kwargs)


_ROW_CLASSES: Dict[type, type] = {}


def restrict_to_rows(module, token_ids: Sequence[int]):
    """Restrict an mlx-lm LoRA / DoRA layer over the vocabulary (the
    embedding or ``lm_head``) to the rows of ``token_ids``, in place."""
    cls = type(module)
    if cls not in _ROW_CLASSES:
        _ROW_CLASSES[cls] = type(f"TokenRows{cls.__name__}", (_TokenRows, cls), {})
    vocab = module.m.shape[0] if "m" in module else None
    is_embedding = "embedding" in module
    if vocab is None:
        vocab = module.lora_a.shape[0] if is_embedding else module.lora_b.shape[1]
    rows = np.zeros(vocab, bool)
    rows[np.asarray(token_ids, np.int64)] = True
    rows = mx.array(rows)
    masks = {}
    if is_embedding:
        module.lora_a = module.lora_a * rows[:, None]
        masks["lora_a"] = rows[:, None]
    else:
        module.lora_b = module.lora_b * rows[None, :]
        masks["lora_b"] = rows[None, :]
    if "m" in module:
        masks["m"] = rows
    module.__class__ = _ROW_CLASSES[cls]
    module._row_masks = masks
    return module
