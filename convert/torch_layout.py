"""The PyTorch side of MemoSight's layout and loss: the parity oracle.

Written independently of ``mlx_memosight.layout`` and in the reference's own
style (segments tokenised with foresight tokens inserted, positions assigned
per segment, the mask built from the spans of compressed steps), so that the
two implementations check each other. Never imported by the runtime package.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def n_memory(n: int, ratio: int, cap: int = 300) -> int:
    return min(cap, max(1, math.ceil(n / ratio)))


def training_layout(
    prompt_ids: Sequence[int],
    steps: Sequence[Sequence[int]],
    thought_lens: Sequence[int],
    ids: Dict,
    ratio: int,
    offset: int,
    max_length: Optional[int] = None,
    add_eos: bool = True,
) -> Dict[str, torch.Tensor]:
    """Lay out one training example as the reference does.

    ``ids`` holds ``foresight``, ``continue``, ``eos`` and the ``memory`` list.
    Returns ``input_ids``, ``position_ids``, ``labels`` (the per-token label
    before shifting: the token itself for trained targets, the foresight target
    at foresight tokens), ``is_foresight`` and the boolean ``mask`` ``(T, T)``.
    """
    R = ids["foresight"]
    input_ids: List[int] = list(prompt_ids)
    labels: List[int] = [IGNORE] * len(prompt_ids)
    position_ids: List[int] = list(range(len(prompt_ids)))
    is_foresight: List[bool] = [False] * len(prompt_ids)
    spans = []  # (raw start, raw end, first index that must not see the raw text)
    compressed = 0  # memory tokens so far
    registers = 0  # foresight tokens so far
    for content, tl in zip(steps, thought_lens):
        L = len(content)
        m = n_memory(tl, ratio)
        base = len(input_ids) - compressed - registers
        seg = []
        for c in content:
            seg += [R, c]
        seg_labels = list(seg)
        for k in range(0, len(seg), 2):
            j = k + 1 + 2 * offset
            seg_labels[k] = seg[j] if j < len(seg) else IGNORE
        seg_pos = []
        for k in range(len(seg)):
            if k % 2 == 0:
                t = k // 2 + offset - 1
                seg_pos.append(base + (t if t < L else L - 1))
            else:
                seg_pos.append(base + k // 2)
        start = len(input_ids)
        input_ids += seg
        labels += seg_labels
        position_ids += seg_pos
        is_foresight += [k % 2 == 0 for k in range(len(seg))]
        registers += L
        width = L / m
        input_ids += list(ids["memory"][:m]) + [ids["continue"]]
        labels += [IGNORE] * (m + 1)
        position_ids += [base + int(k * width + width / 2) for k in range(m)] + [base + L]
        is_foresight += [False] * (m + 1)
        spans.append((start, start + 2 * L, start + 2 * L + m))
        compressed += m
    if add_eos:
        input_ids.append(ids["eos"])
        labels.append(ids["eos"])
        position_ids.append(len(input_ids) - 1 - compressed - registers)
        is_foresight.append(False)

    if max_length is not None:
        # the reference stops before any token once max_length real tokens are in
        kept, real = 0, 0
        for f in is_foresight:
            if real >= max_length:
                break
            kept += 1
            real += not f
        input_ids, labels = input_ids[:kept], labels[:kept]
        position_ids, is_foresight = position_ids[:kept], is_foresight[:kept]

    T = len(input_ids)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    fs = torch.tensor(is_foresight, dtype=torch.bool)
    mask[:, fs] = False
    mask[torch.arange(T), torch.arange(T)] = True
    for start, end, hide_from in spans:
        if hide_from < T:
            mask[hide_from:, start:end] = False
    return dict(
        input_ids=torch.tensor(input_ids),
        position_ids=torch.tensor(position_ids),
        labels=torch.tensor(labels),
        is_foresight=fs,
        mask=mask,
    )


def additive_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A boolean ``(.., Q, K)`` mask as the additive 4-D float mask that every
    transformers attention implementation accepts."""
    m = mask
    while m.dim() < 4:
        m = m[None]
    out = torch.zeros(m.shape, dtype=dtype)
    out.masked_fill_(~m, torch.finfo(dtype).min)
    return out


@torch.no_grad()
def logits(model, input_ids, position_ids, mask) -> torch.Tensor:
    """Logits of a Hugging Face causal LM under explicit positions and mask."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    dtype = next(model.parameters()).dtype
    return model(input_ids=ids, position_ids=pos, attention_mask=additive_mask(mask, dtype)).logits


def joint_loss_terms(logits: torch.Tensor, labels: torch.Tensor, is_foresight: torch.Tensor):
    """Sums and counts of the two cross-entropy streams of one example.

    LM: over the non-foresight tokens in order, the logit at each against the
    label of the next one. MTP: the logit at each foresight token against its
    own label, unshifted.
    """
    lg = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1)
    fs = is_foresight.reshape(-1)
    real = torch.nonzero(~fs).reshape(-1)
    lm_logits = lg[real[:-1]]
    lm_labels = lab[real[1:]]
    lm_sum = F.cross_entropy(lm_logits, lm_labels, ignore_index=IGNORE, reduction="sum")
    lm_n = int((lm_labels != IGNORE).sum())
    reg = torch.nonzero(fs).reshape(-1)
    if len(reg):
        mtp_sum = F.cross_entropy(lg[reg], lab[reg], ignore_index=IGNORE, reduction="sum")
        mtp_n = int((lab[reg] != IGNORE).sum())
    else:
        mtp_sum, mtp_n = lg.sum() * 0, 0
    return lm_sum, lm_n, mtp_sum, mtp_n


def joint_loss(terms: Sequence, lm_weight: float, mtp_weight: float) -> torch.Tensor:
    """``lm_w * CE_LM + mtp_w * CE_MTP``, each normalised by its own count of
    valid targets over all the given micro-batch terms."""
    lm_sum = sum(t[0] for t in terms)
    lm_n = sum(t[1] for t in terms)
    mtp_sum = sum(t[2] for t in terms)
    mtp_n = sum(t[3] for t in terms)
    loss = lm_weight * lm_sum / max(lm_n, 1)
    if mtp_n:
        loss = loss + mtp_weight * mtp_sum / mtp_n
    return loss
