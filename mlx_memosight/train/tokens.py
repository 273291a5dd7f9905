"""MemoSight tokens in a plain model: added to the tokenizer, with embedding
(and untied ``lm_head``) rows initialised as SPEC section 1 says, and the
MemoSight configuration of a model about to be trained."""

from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import (CHECKPOINT_EXTRA_KEYS, DOUBLE_NEWLINE, SPECIAL_TOKENS, MemoSightConfig,
                      _token_id, add_memosight_tokens, description_ids, with_overrides)
from ..errors import TrainError
from ..loading import unwrap_tokenizer
from ..model import attach_token_rope

def _is_tied(model) -> bool:
    return bool(getattr(model.args, "tie_word_embeddings", False)) or "lm_head" not in model


def _output_modules(model) -> List[nn.Module]:
    """The modules holding one row per token: the embedding and, when
    untied, ``lm_head``."""
    mods = [model.model.embed_tokens]
    if not _is_tied(model):
        mods.append(model.lm_head)
    return mods


def _rows(module, ids) -> mx.array:
    """Rows ``ids`` of an (optionally quantised) embedding or linear layer, in float32."""
    ids = mx.array(ids)
    if isinstance(module, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        biases = module.get("biases")
        return mx.dequantize(
            module.weight[ids], module.scales[ids], None if biases is None else biases[ids],
            group_size=module.group_size, bits=module.bits, mode=module.mode,
        ).astype(mx.float32)
    return module.weight[ids].astype(mx.float32)


def _mean_row(module, n: int, chunk: int = 8192) -> mx.array:
    total = None
    for start in range(0, n, chunk):
        part = _rows(module, mx.arange(start, min(n, start + chunk))).sum(axis=0)
        total = part if total is None else total + part
    return total / n


def _resize_rows(module, keep: int, new_rows: mx.array):
    """Keep the first ``keep`` rows of ``module`` and append ``new_rows``."""
    if isinstance(module, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        q = mx.quantize(new_rows.astype(module.scales.dtype), group_size=module.group_size,
                        bits=module.bits, mode=module.mode)
        module.weight = mx.concatenate([module.weight[:keep], q[0]])
        module.scales = mx.concatenate([module.scales[:keep], q[1]])
        if module.get("biases") is not None:
            module.biases = mx.concatenate([module.biases[:keep], q[2]])
    else:
        w = module.weight
        module.weight = mx.concatenate([w[:keep], new_rows.astype(w.dtype)])


def add_token_rows(model, tokenizer) -> List[tuple]:
    """Add the MemoSight tokens a tokenizer lacks, and the model's rows for them.

    The embedding (and untied ``lm_head``) are resized to ``len(tokenizer)``
    and each added token's row is set to the mean of the rows of its
    description's tokens, tokenised after all tokens were added, in reverse
    order (SPEC section 1). A description token that is itself added and not
    yet set (the reference reads its freshly resized row there) reads the
    mean of the base rows. Quantised layers get quantised rows.

    Args:
        model: an mlx-lm Qwen2 / Llama model.
        tokenizer: its tokenizer (Hugging Face or mlx-lm's wrapper); changed
            in place.

    Returns:
        The ``(token, description)`` pairs added (empty when none were).
    """
    tok = unwrap_tokenizer(tokenizer)
    n_base = len(tok)
    n_rows = model.model.embed_tokens.weight.shape[0]
    if n_rows < n_base:
        raise TrainError(f"the model has {n_rows} embedding rows for a tokenizer of {n_base} tokens")
    added = add_memosight_tokens(tok)
    if not added:
        return []
    descriptions = [description_ids(tok, d) for _, d in added]
    for module in _output_modules(model):
        fresh = _mean_row(module, n_base)
        new: Dict[int, mx.array] = {}
        for k in reversed(range(len(added))):
            ids = descriptions[k]
            parts = []
            base = [i for i in ids if i < n_base]
            base_rows = _rows(module, base) if base else None
            for i in ids:
                if i < n_base:
                    parts.append(base_rows[base.index(i)])
                else:
                    parts.append(new.get(i, fresh))
            new[n_base + k] = mx.stack(parts).mean(axis=0) if parts else fresh
        _resize_rows(module, n_base, mx.stack([new[n_base + k] for k in range(len(added))]))
    vocab = len(tok)
    model.args.vocab_size = vocab
    if hasattr(model.model, "vocab_size"):
        model.model.vocab_size = vocab
    mx.eval(model.parameters())
    return added


def memosight_token_rows(tokenizer) -> List[int]:
    """Ids of the MemoSight tokens whose rows are trained under LoRA: every
    MemoSight token, and ``"\\n\\n"`` only when it is an added token."""
    tok = unwrap_tokenizer(tokenizer)
    added_vocab = tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}
    ids = []
    for t, _ in SPECIAL_TOKENS:
        if t == DOUBLE_NEWLINE and t not in added_vocab:
            continue
        tid = _token_id(tok, t)
        if tid is not None:
            ids.append(tid)
    return sorted(set(ids))


def prepare(model, tokenizer, hf_config: dict, cfg: Optional[MemoSightConfig] = None,
            template=None, **overrides):
    """Make a loaded model MemoSight-ready for training, in place.

    Adds the MemoSight tokens and rows when the tokenizer lacks them, and
    returns the configuration: ``cfg`` (the model's ``memosight.json``) when
    given, else built from the family defaults and the checkpoint's extra
    ``config.json`` keys; ``template`` (a name or a :class:`config.Template`)
    and ``overrides`` (compression_ratio,
    max_offset, lm_loss_weight, mtp_loss_weight; None leaves a value) win.

    Returns:
        ``(cfg, added)`` where ``added`` lists the tokens that were added.
    """
    attach_token_rope(model)
    added = add_token_rows(model, tokenizer)
    cfg = with_overrides(None if added else cfg, unwrap_tokenizer(tokenizer), hf_config.get("model_type"),
                         hf_config, template, **overrides)
    hf_config["vocab_size"] = embedding_rows(model)
    for key in CHECKPOINT_EXTRA_KEYS:
        hf_config[key] = getattr(cfg, key)
    return cfg, added


def embedding_rows(model) -> int:
    """Rows of the model's (possibly LoRA-wrapped) embedding."""
    emb = model.model.embed_tokens
    emb = emb.get("embedding", emb)
    return int(emb.weight.shape[0])
