"""Generation far past the prompt: hundreds of compress events, positions past
the trained context, the cache checked against a no-cache recomputation at
the end of a long run."""

import mlx.core as mx
import numpy as np
import pytest

from helpers import reference_logits, split_steps
from mlx_memosight import demo, load
from mlx_memosight.engine import Engine
from mlx_memosight.scoring import eval_prompt

TOKENS = 10_000  # the generation whose KV and drafting are checked
CHECKED_TOKENS = 2500  # the one checked against a no-cache recomputation (quadratic in its length)
STEP = 20  # a step ends (the splitter is forced) after this many tokens at most


@pytest.fixture(scope="module")
def demo_model():
    model, tokenizer = load(demo.demo_model_path())
    cfg = model.memosight_config
    question = eval_prompt(demo.problems("heldout", 1)[0].eval_item())
    prompt = tokenizer.encode(cfg.template.render(question), add_special_tokens=False)
    return model, cfg, prompt


class EndlessSteps:
    """A logits processor that never lets the answer end and ends a step
    after ``STEP`` tokens: the model writes step after step for as long as
    the budget lasts. With ``keep``, it records the logits it is given by
    the length of the history they follow (one row per pass without
    drafting)."""

    def __init__(self, cfg, prompt_len: int, keep: bool = False):
        self.splitter, self.eos, self.prompt_len = cfg.token_ids.splitter, cfg.token_ids.eos, prompt_len
        self.seen = {} if keep else None

    def __call__(self, tokens, logits):
        t = np.array(tokens)[self.prompt_len:]
        ends = np.flatnonzero(t == self.splitter)
        run = len(t) - (ends[-1] + 1 if len(ends) else 0)
        if self.seen is not None:
            self.seen[len(t)] = np.array(logits[-1])
        bias = np.zeros(logits.shape[-1], np.float32)
        if run >= STEP:
            bias[:] = -1e9
            bias[self.splitter] = 0
        bias[self.eos] = -1e9
        return logits + mx.array(bias)


def generate(model, cfg, prompt, processor, tokens=TOKENS, **kw):
    e = Engine(model, cfg, logits_processors=[processor], max_position=2 * TOKENS, **kw)
    events = list(e.generate(prompt, tokens))
    return [ev.token for ev in events], events, e.stats


def test_hundreds_of_evictions_keep_kv_bounded_and_outputs_equal(demo_model):
    """A 10,000-token answer (about 480 compress events), greedy, with and
    without drafting."""
    model, cfg, prompt = demo_model
    P = len(prompt)
    base, base_events, base_stats = generate(model, cfg, prompt, EndlessSteps(cfg, P), foresight=False)
    drafted, events, stats = generate(model, cfg, prompt, EndlessSteps(cfg, P), draft_len=3, foresight_sets="all")
    assert len(base) == TOKENS and base_stats.finish_reason == stats.finish_reason == "length"
    # greedy output with drafting equals output without
    assert drafted == base
    assert stats.accepted_draft_tokens > 0
    steps = split_steps(base[:-1], cfg.token_ids.splitter)
    # a step ends after STEP tokens at the latest
    assert base_stats.compress_events == stats.compress_events == len(steps) >= TOKENS // (STEP + 1)
    # KV after every committed token: the prompt, m + 1 entries per finished
    # step, and at most the step being written; exactly the first two right
    # after a compress event (the event of a step's first token)
    kept = np.cumsum([P] + [cfg.memory_count(len(s)) + 1 for s in steps])
    step_of = np.cumsum([0] + [t == cfg.token_ids.splitter for t in base[:-1]])  # finished before token i
    lens = [len(s) for s in steps] + [TOKENS]
    for evs in (base_events, events):
        for i, ev in enumerate(evs):
            s = step_of[i]
            assert ev.compress_event == (i > 0 and base[i - 1] == cfg.token_ids.splitter)
            if ev.compress_event:
                assert ev.kv_entries == kept[s]
            assert ev.kv_entries <= kept[s] + lens[s]
    plain = P + TOKENS
    assert stats.peak_kv_tokens <= kept[-1] + 2 * STEP + 4 * (3 + 4)
    assert stats.peak_kv_tokens < 0.25 * plain


def test_cache_after_hundreds_of_evictions_equals_recomputation(demo_model):
    """The logits the cached engine computed late in a long run (after
    hundreds of evictions and compactions) equal a no-cache recomputation of
    the same visible sequence."""
    model, cfg, prompt = demo_model
    keep = EndlessSteps(cfg, len(prompt), keep=True)
    n = CHECKED_TOKENS
    out, _, stats = generate(model, cfg, prompt, keep, n, foresight=False)
    assert stats.compress_events >= 150
    splitter = cfg.token_ids.splitter
    ends = [i + 1 for i, t in enumerate(out) if t == splitter]
    # right after a compress event (the row follows memory tokens and
    # <|continue|>), and mid-step, late in the run
    checks = [h for h in (ends[-1], ends[-2] + 5, ends[len(ends) // 2], n - 1) if h < n]
    for h in checks:
        expected, position = reference_logits(model, cfg, prompt, out[:h], position=True)
        if h == n - 1:
            # positions run far past the model's trained context
            assert position > model.args.max_position_embeddings
        got = keep.seen[h]
        assert int(np.argmax(got)) == int(np.argmax(expected))
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-3)
