"""LoRA / DoRA over the vocabulary restricted to the MemoSight tokens' rows.

mlx-lm's LoRA embedding and linear layers update every row of the
vocabulary; :func:`restrict_to_rows` keeps their update to chosen tokens (the
factors of the other rows start at zero and get no gradient), with mlx-lm's
parameter names and function, so the adapters load with mlx-lm unchanged.

As the output layer, mlx-lm's LoRA computes its update for the whole
vocabulary: a second ``(tokens, vocabulary)`` array beside the logits, as
large as the logits themselves (1.2 GB at 2k tokens and Qwen2's 152k
vocabulary in float32). A restricted LoRA layer adds its update to the chosen
columns only (the others' factors are zero, so the function is the same).
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

    def _add_to_rows(self, y, z):
        """``y`` with ``scale * z`` added to the chosen columns, as mlx-lm adds its update."""
        return y.at[..., self._row_ids].add((self.scale * z).astype(y.dtype))

    def __call__(self, *args, **kwargs):
        if self._row_output == "linear":  # LoRALinear as lm_head
            (x,) = args
            z = (self.dropout(x) @ self.lora_a) @ self.lora_b[:, self._row_ids]
            return self._add_to_rows(self.linear(x), z)
        return self._masked(super().__call__, *args, **kwargs)

    def as_linear(self, *args, **kwargs):
        if self._row_output == "embedding":  # a tied LoRAEmbedding as the output layer
            (x,) = args
            z = (self.dropout(x) @ self.lora_b.T) @ self.lora_a[self._row_ids].T
            return self._add_to_rows(self.embedding.as_linear(x), z)
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
    chosen = np.zeros(vocab, bool)
    chosen[np.asarray(token_ids, np.int64)] = True
    rows = mx.array(chosen)
    masks = {}
    if is_embedding:
        module.lora_a = module.lora_a * rows[:, None]
        masks["lora_a"] = rows[:, None]
    else:
        module.lora_b = module.lora_b * rows[None, :]
        masks["lora_b"] = rows[None, :]
    if "m" in module:
        masks["m"] = rows
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    module.__class__ = _ROW_CLASSES[cls]
    module._row_masks = masks
    module._row_ids = mx.array(np.flatnonzero(chosen).astype(np.int32))
    module._row_output = {LoRALinear: "linear", LoRAEmbedding: "embedding"}.get(cls)
    return module
