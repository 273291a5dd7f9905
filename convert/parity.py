"""Logits parity of a converted model with transformers on MemoSight's inputs:
a training sample and each inference pass (prefill, accelerate, verify, fused
verify-and-draft, compress) after a causal prefix, with the layout's own
positions and masks. Used by ``tests/test_real_shapes.py`` at two layers and
by ``examples/check_real_shape.py`` at full depth; never imported by the
runtime package."""

from typing import List, NamedTuple, Sequence

import mlx.core as mx
import numpy as np
import torch

from mlx_memosight.layout import PassBuilder, Role, StepState, build_training_sample, encode_steps

from . import torch_layout

SYSTEM = "Think step by step."  # short: the default system prompt is 200 tokens
QUESTION = "Anna reads 15 pages a day. How many pages does she read in 4 days?"
THOUGHTS = ["Each day she reads 15 pages.", "In 4 days that is 15 * 4 = 60 pages.", "The answer is \\boxed{60}."]
PASS_KINDS = ("prefill", "accelerate", "verify", "fused", "compress")


class Case(NamedTuple):
    """One input: ``ids``, ``positions`` and ``mask`` of the whole sequence;
    logits compared at ``rows``, hidden states from ``start`` on."""

    ids: List[int]
    positions: List[int]
    mask: np.ndarray
    rows: List[int]
    start: int


def training_case(tok, cfg) -> Case:
    """A training sample of three steps; logits at a foresight token, a
    memory token, the continue token and the last token."""
    prompt = tok.encode(cfg.template.render(QUESTION, SYSTEM), add_special_tokens=False)
    steps, lens = encode_steps(tok, THOUGHTS)
    s = build_training_sample(prompt, steps, cfg.token_ids, cfg.compression_ratio, 2, thought_lens=lens)
    roles = (Role.FORESIGHT, Role.MEMORY, Role.CONTINUE)
    if not set(roles) <= set(s.roles.tolist()):
        raise AssertionError("the training sample lacks a foresight, memory or continue token")
    rows = [int(np.argmax(s.roles == r)) for r in roles] + [len(s) - 1]
    return Case(s.input_ids.tolist(), s.positions.tolist(), s.mask(), rows, 0)


def pass_case(tok, cfg, kind: str) -> Case:
    """The pass ``kind`` after a causal prefix (the prompt and a step's
    text); logits at every token of the pass."""
    prefix = tok.encode(cfg.template.render(QUESTION, SYSTEM) + THOUGHTS[0] + "\n", add_special_tokens=False)
    prefix = prefix + [cfg.token_ids.splitter]
    cache_len = len(prefix) - 1  # the splitter is fed by the pass
    step = StepState(cache_len - 8, cache_len - 8)
    b = PassBuilder(cfg)
    words = tok.encode(" In 4 days", add_special_tokens=False)
    build = {"prefill": lambda: b.prefill(words, cache_len, cache_len),
             "accelerate": lambda: b.decode(words[0], cache_len, cache_len, draft_len=3),
             "verify": lambda: b.verify(words, cache_len, cache_len),
             "fused": lambda: b.decode(words[0], cache_len, cache_len, drafts=words[1:], draft_len=2),
             "compress": lambda: b.compress(step, cache_len, draft_len=2)}
    p = build[kind]()
    n = len(p)
    mask = np.zeros((cache_len + n, cache_len + n), bool)
    mask[:cache_len, :cache_len] = np.tril(np.ones((cache_len, cache_len), bool))
    mask[cache_len:] = p.rule.mask()
    return Case(prefix[:cache_len] + p.tokens.tolist(), list(range(cache_len)) + p.positions.tolist(), mask,
                list(range(cache_len, cache_len + n)), cache_len)


def cases(tok, cfg, kinds: Sequence[str] = ("training",) + PASS_KINDS):
    """``(kind, Case)`` of each kind named."""
    return [(k, training_case(tok, cfg) if k == "training" else pass_case(tok, cfg, k)) for k in kinds]


def both(hf, model, case: Case):
    """Final hidden states from ``case.start`` on and logits at ``case.rows``,
    from transformers and from MLX (the vocabulary projection at every
    position would dominate the time): ``(torch hidden, MLX hidden, torch
    logits, MLX logits)``."""
    from mlx_memosight.model import forward, lm_head

    with torch.no_grad():
        out = hf(input_ids=torch.tensor([case.ids]), position_ids=torch.tensor([case.positions]),
                 attention_mask=torch_layout.additive_mask(torch.tensor(np.asarray(case.mask))),
                 output_hidden_states=True, logits_to_keep=torch.tensor(case.rows))
    h = forward(model, case.ids, case.positions, mx.array(case.mask), hidden=True)
    logits = lm_head(model, h[:, mx.array(case.rows)])
    return (out.hidden_states[-1][0, case.start:].float().numpy(), np.array(h[0, case.start:].astype(mx.float32)),
            out.logits[0].float().numpy(), np.array(logits[0].astype(mx.float32)))


def differences(t_hidden, m_hidden, t_logits, m_logits) -> dict:
    """The largest differences: of the hidden states relative to their
    largest magnitude (at least 1), and of the logits; and the largest logit."""
    return {"hidden": float(np.abs(m_hidden - t_hidden).max() / max(1.0, np.abs(t_hidden).max())),
            "logits": float(np.abs(m_logits - t_logits).max()),
            "largest_logit": float(np.abs(t_logits).max())}
