"""The decode engine against a no-cache full recomputation, and its invariants."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from helpers import reference_decode, run_command, split_steps
from mlx_memosight import generate, load, stream_generate
from mlx_memosight.engine import Engine
from mlx_memosight.errors import MemoSightError
from mlx_memosight.policy import forget_acceptance
from mlx_memosight.generate import main as generate_main
from mlx_memosight.sampling import make_repetition_penalty

MAX_TOKENS = 100


@pytest.fixture(scope="module")
def loaded(reasoner):
    path, task = reasoner
    model, tokenizer = load(path)
    return path, task, model, tokenizer, model.memosight_config


def prompts(task, n=3, seed=7):
    rng = np.random.default_rng(seed)
    return [task.prompt(rng) for _ in range(n)]


def run(model, cfg, prompt, max_tokens=MAX_TOKENS, **kw):
    e = Engine(model, cfg, **kw)
    events = list(e.generate(prompt, max_tokens))
    return [ev.token for ev in events], e.stats, events


def test_cached_engine_equals_full_recomputation(loaded):
    _, task, model, _, cfg = loaded
    compressions = 0
    for prompt in prompts(task):
        expected = reference_decode(model, cfg, prompt, MAX_TOKENS)
        for kw in (dict(foresight=False), dict(draft_len=2), dict(draft_len=3, schedule="two-pass")):
            tokens, stats, _ = run(model, cfg, prompt, **kw)
            assert tokens == expected, kw
        compressions += stats.compress_events
        # a splitter committed last ends the budget before its compress pass
        assert stats.compress_events == expected[:-1].count(cfg.token_ids.splitter)
    assert compressions >= 3


def test_compiled_passes_equal_passes_built_op_by_op(loaded, monkeypatch):
    """Passes run as one compiled function (the default where the Metal
    kernels are not used) commit what passes built op by op commit, with the
    same pass counts, KV and draft statistics, for every pass kind: plain
    decoding, compress blocks, fused passes with either foresight layout, the
    two-pass schedule, sampling and a penalty; cache buffers grow past their
    first 256 slots on the way."""
    _, task, model, _, cfg = loaded
    compiled = []
    run_compiled = Engine._run_compiled

    def count(self, *a, **kw):
        out = run_compiled(self, *a, **kw)
        compiled.append(out is not None)
        return out

    monkeypatch.setattr(Engine, "_run_compiled", count)
    configs = (dict(foresight=False), dict(compress=False, foresight=False), dict(draft_len=2),
               dict(draft_len=3, foresight_sets="last"), dict(draft_len=3, schedule="two-pass"),
               dict(sampler=make_sampler(temp=0.8), logits_processors=[make_repetition_penalty(1.3)]),
               dict())
    grown = 0
    for prompt in prompts(task, n=2, seed=11):
        for kw in configs:
            out = {}
            for on in (False, True):
                monkeypatch.setattr(Engine, "compiled", on)
                forget_acceptance(model)  # both start from the prior: the same drafting choices
                e = Engine(model, cfg, **kw)
                mx.random.seed(3)
                tokens = [ev.token for ev in e.generate(prompt, 300)]
                s = e.stats
                out[on] = (tokens, s.forward_passes, s.peak_kv_tokens, s.final_kv_tokens, s.compress_events,
                           s.drafted_tokens, s.accepted_draft_tokens, s.discarded_passes)
                grown += on and e.cache.layers[0].keys.shape[2] > 256
            assert out[True] == out[False], kw
    assert sum(compiled) > 100 and not all(compiled)  # prompt chunks are built op by op
    assert grown > 0


def test_compiled_pass_follows_replaced_weights(reasoner):
    """A compiled graph holds the weights it was built with: an engine made
    after the model's weights were replaced builds it again."""
    path, task = reasoner
    model, _ = load(path)
    cfg = model.memosight_config
    prompt = prompts(task, n=1, seed=2)[0]
    before, _, _ = run(model, cfg, prompt)
    head = "lm_head" if "lm_head" in dict(model.children()) else None
    emb = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = mx.array(np.random.default_rng(0).normal(size=emb.shape) * 0.05, emb.dtype)
    if head:
        model.lm_head.weight = model.lm_head.weight * 1.0
    after, _, _ = run(model, cfg, prompt)
    Engine.compiled = False
    try:
        eager, _, _ = run(model, cfg, prompt)
    finally:
        Engine.compiled = True
    assert after == eager and after != before


def test_foresight_never_changes_the_output(loaded):
    _, task, model, _, cfg = loaded
    fused_passes = two_pass_passes = accepted = 0
    for prompt in prompts(task, seed=11):
        base, base_stats, _ = run(model, cfg, prompt, foresight=False)
        assert base_stats.drafted_tokens == 0
        for g in (1, 2, 3, 4):
            fused, fs, _ = run(model, cfg, prompt, draft_len=g, foresight_sets="all")
            two, ts, _ = run(model, cfg, prompt, draft_len=g, schedule="two-pass")
            last, _, _ = run(model, cfg, prompt, draft_len=g, foresight_sets="last")
            assert fused == base, g
            assert two == base, g
            assert last == base, g
            assert fs.drafted_tokens > 0
            # a fused pass commits 1 + accepted tokens, a two-pass iteration
            # 2 + accepted in two passes: never more passes, fewer once drafts land
            assert fs.forward_passes <= ts.forward_passes
            fused_passes += fs.forward_passes
            two_pass_passes += ts.forward_passes
            accepted += fs.accepted_draft_tokens
    assert accepted > 0 and fused_passes < two_pass_passes


def test_passes_issued_ahead_change_nothing(loaded, monkeypatch):
    """A fused pass issued before the previous one is read (for "every draft
    accepted") is taken when that happens and dropped otherwise. Either way
    the tokens are those of the unpipelined loop, and with a fixed draft
    length so are the cache after every token and the pass counts, with
    drafts that are rejected, end at step boundaries and run into the token
    budget."""
    _, task, model, _, cfg = loaded
    issued, kept = [], []
    issue_after, fused_step = Engine._issue_after, Engine._fused_step

    def count_issued(self, *a):
        out = issue_after(self, *a)
        issued.append(out is not None)
        return out

    def count_kept(self, *a):
        out = fused_step(self, *a)
        kept.append(out is not None)
        return out

    monkeypatch.setattr(Engine, "_issue_after", count_issued)
    monkeypatch.setattr(Engine, "_fused_step", count_kept)
    discarded = 0
    for prompt in prompts(task, n=4, seed=5):
        expected = reference_decode(model, cfg, prompt, MAX_TOKENS)
        for kw in (dict(draft_len=2, foresight_sets="last"), dict(draft_len=3, foresight_sets="all"), dict()):
            runs = {}
            for pipeline in (False, True):
                monkeypatch.setattr(Engine, "pipeline", pipeline)
                tokens, stats, events = run(model, cfg, prompt, **kw)
                assert tokens == expected, (kw, pipeline)
                runs[pipeline] = (stats, [(e.kv_entries, e.forward_passes, e.from_draft) for e in events])
            (plain, plain_events), (piped, piped_events) = runs[False], runs[True]
            assert plain.discarded_passes == 0
            discarded += piped.discarded_passes
            if not kw:
                continue  # the policy chooses a pass ahead before it sees the last one: its choices may differ
            assert piped_events == plain_events, kw
            assert (piped.forward_passes, piped.pass_tokens, piped.compress_events, piped.peak_kv_tokens) == (
                plain.forward_passes, plain.pass_tokens, plain.compress_events, plain.peak_kv_tokens)
    assert sum(kept) >= 20 and discarded >= 1 and sum(issued) == sum(kept) + discarded


def test_policy_drafts_where_it_pays_and_not_where_it_cannot():
    """Decisions under given pass costs: a pass token nearly free (GPU, fast
    BLAS) asks for long drafts with a foresight set after every prefix; a
    costly one (the reference BLAS) for short drafts with one set; a pass
    token as dear as a pass, for no drafting at all."""
    from mlx_memosight.policy import DraftPolicy, PassCost, time_per_token

    def decide(per_token, right=None, forced=None):
        p = DraftPolicy(PassCost(per_token, "given"), max_draft=5, trained_offset=3, draft_len=forced)
        for drafted, n in right or []:
            p.observe(drafted, n)
        return p.choose()

    g, layout = decide(0.02)
    assert g >= 3 and layout == "all"
    # a costly pass token: no drafting at the prior acceptance, short drafts
    # with one foresight set once nearly every draft has been right
    assert decide(0.45)[0] == 0
    g, layout = decide(0.25, right=[(2, 2)] * 50)
    assert 1 <= g <= 3 and layout == "last"
    assert decide(1.2, right=[(2, 2)] * 50)[0] == 0
    # acceptance seen so far: drafts that are never right are not worth a token
    assert decide(0.05, right=[(3, 0)] * 40)[0] == 0
    # a forced draft length leaves only the layout to choose
    assert decide(0.45, forced=4)[0] == 4
    # the formulas: drafting at cost 0 beats plain decoding whenever drafts land
    q = [0.9] * 5
    assert time_per_token(PassCost(0.0, "x"), q, 3, "all") < time_per_token(PassCost(0.0, "x"), q, 0, "all")


def test_policy_choice_is_the_best_of_every_option():
    """The choice (computed incrementally over draft lengths, as it is made
    for every pass of every row) is the option of least expected time per
    token by the formulas, alone and in batches, ties to the shorter draft."""
    from mlx_memosight.policy import LAYOUTS, DraftPolicy, PassCost, time_per_token

    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(300):
        cost = PassCost(float(rng.choice([0.0, 0.02, 0.1, 0.3, 0.6, 1.2])), "given")
        p = DraftPolicy(cost, max_draft=6, trained_offset=3)
        p.since_explore = -10 ** 6  # no exploring step in this test
        for _ in range(int(rng.integers(0, 30))):
            drafted = int(rng.integers(1, 7))
            p.observe(drafted, int(rng.integers(0, drafted + 1)))
        rows, free = int(rng.integers(1, 17)), int(rng.integers(1, 8))
        c = cost if rows == 1 and free <= 1 else cost.in_batch(rows, free)
        q = p.acceptance()
        options = [(round(time_per_token(c, q, g, lay), 9), g, LAYOUTS.index(lay), lay)
                   for g in range(7) for lay in LAYOUTS]
        best = min(options)
        assert p.choose(rows, free) == (best[1], best[3])
        seen.add(best[1] > 0)
    assert seen == {True, False}


def test_policy_choices_are_the_same_every_run(loaded):
    """The policy decides from the cost model and the tokens committed with
    the model in the process only: two runs from a freshly loaded model (two
    commands) make the same choices and the same draft statistics; a second
    sequence in the same process starts from the acceptance the first saw."""
    _, task, model, _, cfg = loaded
    prompt = prompts(task)[0]

    def seen(**kw):  # the acceptance an engine of this model starts from
        return list(Engine(model, cfg, **kw).policy.seen.tried)

    def fresh_run():
        forget_acceptance(model)
        out = run(model, cfg, prompt, 80)
        return out[0], out[1], seen()

    (a, sa, ta), (b, sb, tb) = fresh_run(), fresh_run()
    assert a == b and (sa.drafted_tokens, sa.accepted_draft_tokens, sa.draft_policy) == \
        (sb.drafted_tokens, sb.accepted_draft_tokens, sb.draft_policy)
    assert sa.draft_policy and "of passes" in sa.draft_policy
    assert a == reference_decode(model, cfg, prompt, 80)
    assert ta == tb
    # the acceptance seen is kept on the model: a later engine starts from it
    # (a forced draft length, so that every pass verifies drafts)
    for p in prompts(task, n=4, seed=5):
        run(model, cfg, p, 80, draft_len=2)
    tried = seen(draft_len=2)
    assert tried[0] > 0 and seen(draft_len=2) == tried
    forget_acceptance(model)
    assert seen(draft_len=2) == [0, 0]


def test_no_compression_equals_plain_causal_decoding(loaded):
    _, task, model, _, cfg = loaded
    prompt = prompts(task)[0]
    expected = reference_decode(model, cfg, prompt, 60, compress=False)
    for kw in (dict(foresight=False), dict(draft_len=2)):
        tokens, stats, _ = run(model, cfg, prompt, 60, compress=False, **kw)
        assert tokens == expected
        assert stats.compress_events == 0
        # every committed token but the last (never fed) is in the cache
        assert stats.final_kv_tokens == len(prompt) + len(tokens) - 1


def test_kv_after_every_compress_event(loaded):
    """After a compress event the cache holds the prompt plus (m_s + 1) per
    finished step and nothing of the new step."""
    _, task, model, _, cfg = loaded
    for g in (0, 2):
        for prompt in prompts(task, seed=3):
            tokens, stats, events = run(model, cfg, prompt, draft_len=g, foresight=g > 0)
            steps = split_steps(tokens[:-1], cfg.token_ids.splitter)
            seen = 0
            for i, ev in enumerate(events):
                if ev.compress_event:
                    done = steps[:seen + 1]
                    seen += 1
                    assert ev.kv_entries == len(prompt) + sum(cfg.memory_count(len(s)) + 1 for s in done)
            assert seen == stats.compress_events == len(steps)


def test_repetition_penalty_matches_reference(loaded):
    _, task, model, tokenizer, cfg = loaded
    exempt = tokenizer.all_special_ids
    prompt = prompts(task, seed=5)[1]
    ref = reference_decode(model, cfg, prompt, 80, repetition_penalty=1.3, exempt_ids=exempt)
    plain, _, _ = run(model, cfg, prompt, 80)
    penalty = [make_repetition_penalty(1.3, exempt)]
    for kw in (dict(foresight=False), dict(draft_len=3), dict(draft_len=3, foresight_sets="last"),
               dict(draft_len=2, schedule="two-pass")):
        tokens, _, _ = run(model, cfg, prompt, 80, logits_processors=penalty, **kw)
        assert tokens == ref
    assert ref != plain  # the penalty did something


def test_penalty_history_starts_afresh_with_each_generation(loaded):
    """One engine, two generations: the second sees only its own prompt and
    output, so it equals a fresh engine's."""
    _, task, model, tokenizer, cfg = loaded
    first, second = prompts(task, n=2, seed=5)
    engine = Engine(model, cfg, draft_len=2, logits_processors=[make_repetition_penalty(1.3)])
    list(engine.generate(first, 60))
    again = [ev.token for ev in engine.generate(second, 60)]
    assert again == reference_decode(model, cfg, second, 60, repetition_penalty=1.3)


def test_repetition_penalty_processor_formula():
    logits = mx.array([[2.0, -2.0, 1.0, -1.0, 3.0]])
    out = make_repetition_penalty(2.0, exempt_ids=[4])(mx.array([0, 1, 1, 4]), logits)
    np.testing.assert_allclose(np.array(out), [[1.0, -4.0, 1.0, -1.0, 3.0]])


def test_chunked_prefill(loaded):
    _, task, model, _, cfg = loaded
    prompt = prompts(task)[0] * 5
    a, _, _ = run(model, cfg, prompt, 40, draft_len=2)
    b, stats, _ = run(model, cfg, prompt, 40, draft_len=2, prefill_step_size=3)
    # 19 of the 20 tokens in chunks of 3, then the last one alone
    assert a == b and stats.prefill_passes == 8


def test_token_budget_is_exact(loaded):
    _, task, model, _, cfg = loaded
    prompt = prompts(task)[0]
    full, _, _ = run(model, cfg, prompt, foresight=False)
    for n in (1, 2, 5, 17):
        if n > len(full):
            continue
        for kw in (dict(draft_len=4), dict(draft_len=4, schedule="two-pass"), dict(foresight=False)):
            tokens, stats, _ = run(model, cfg, prompt, n, **kw)
            assert tokens == full[:n], (n, kw)


def test_sampling_is_reproducible(loaded):
    _, task, model, _, cfg = loaded
    prompt = prompts(task)[0]
    outs = []
    for _ in range(2):
        mx.random.seed(42)
        outs.append(run(model, cfg, prompt, 50, sampler=make_sampler(1.0, top_p=0.9), draft_len=2)[0])
    mx.random.seed(43)
    other = run(model, cfg, prompt, 50, sampler=make_sampler(1.0), draft_len=2)[0]
    assert outs[0] == outs[1]
    assert outs[0] != other


def test_stream_generate_api(loaded):
    _, task, model, tokenizer, cfg = loaded
    for prompt in prompts(task, n=6, seed=1):
        responses = list(stream_generate(model, tokenizer, prompt, 60, draft_len=2))
        if any(r.from_draft for r in responses):
            break
    else:
        pytest.fail("no draft was accepted on any prompt")
    tokens = [r.token for r in responses]
    assert tokens == run(model, cfg, prompt, 60, draft_len=2)[0]
    assert sum(r.compress_event for r in responses) == responses[-1].stats.compress_events
    assert responses[-1].finish_reason in ("stop", "length")
    assert all(r.finish_reason is None for r in responses[:-1])
    nl = tokenizer.encode("\n", add_special_tokens=False)[-1]
    shown = [nl if t == cfg.token_ids.splitter else t for t in tokens if t != cfg.token_ids.eos]
    assert "".join(r.text for r in responses) == tokenizer.decode(shown)
    result = generate(model, tokenizer, prompt, 60, draft_len=2)
    assert result.token_ids == tokens and result.stats.generated_tokens == len(tokens)


@pytest.mark.parametrize(
    "kwargs, prompt, message",
    [
        (dict(), [], "prompt is empty"),
        (dict(), [5] * 3000, "context is 2048"),
        (dict(max_tokens=0), [5, 6], "max_tokens must be at least 1"),
        (dict(draft_len=-1), [5, 6], "draft_len must be between 0 and 16"),
        (dict(draft_len=17), [5, 6], "draft_len must be between 0 and 16"),
        (dict(schedule="three-pass"), [5, 6], "schedule must be one of fused, two-pass"),
        (dict(prefill_step_size=0), [5, 6], "prefill_step_size must be at least 1"),
    ],
)
def test_bad_input(loaded, kwargs, prompt, message):
    _, _, model, _, cfg = loaded
    kwargs = dict(kwargs)
    max_tokens = kwargs.pop("max_tokens", 10)
    with pytest.raises(MemoSightError, match=message):
        list(Engine(model, cfg, **kwargs).generate(prompt, max_tokens))


def test_cli_streams_and_writes_stats(loaded, tmp_path, capsys):
    path, task, model, tokenizer, cfg = loaded
    stats_file = tmp_path / "stats.json"
    code, out, err = run_command(generate_main, ["--model", path, "--prompt", "count", "--max-tokens", "40",
                                                 "--stats-json", stats_file], capsys)
    assert code == 0, err
    assert "tokens/s" in err and "compress events" in err
    d = json.loads(stats_file.read_text())
    for key in ("text", "token_ids", "generated_tokens", "forward_passes", "drafted_tokens",
                "accepted_draft_tokens", "compress_events", "peak_kv_tokens", "final_kv_tokens",
                "prompt_tps", "generation_tps", "peak_memory_gb"):
        assert key in d, key
    assert d["generated_tokens"] == len(d["token_ids"]) <= 40
    # the text as generated, its trailing blank lines (the last step's) printed as one newline
    assert out == d["text"].rstrip("\n") + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt", "hi", "--draft-len", "17"], "--draft-len must be between 0 and 16, got 17"),
        (["--prompt", "hi", "--draft-len", "-2"], "--draft-len must be between 0 and 16, got -2"),
    ],
)
def test_cli_bad_input(loaded, args, message, capsys):
    code, _, err = run_command(generate_main, ["--model", loaded[0], *args], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == f"mlx_memosight.generate: error: {message}"


def test_cli_unreadable_model(tmp_path, capsys):
    code, _, err = run_command(generate_main, ["--model", tmp_path / "missing", "--prompt", "hi"], capsys)
    assert code == 1 and "missing" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_command(generate_main, ["--model", tmp_path / "empty", "--prompt", "hi"], capsys)
    assert code == 1 and "config.json" in err and "Traceback" not in err


def test_plain_model_runs_plain_decoding(loaded, tmp_path, capsys):
    import shutil

    path = loaded[0]
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    (plain / "memosight.json").unlink()
    code, _, err = run_command(generate_main, ["--model", plain, "--prompt", "hi", "--max-tokens", "8"],
                               capsys)
    assert code == 0, err
    assert "plain decoding" in err
    model, tokenizer = load(plain)
    assert model.memosight_config is None
    res = generate(model, tokenizer, [40, 41, 42], 8)
    assert res.stats.compress_events == 0 and res.stats.drafted_tokens == 0


def test_compress_pass_reuses_the_splitter_plain_decoding_fed(loaded, monkeypatch):
    """Without drafting, plain decoding feeds the splitter before it is read;
    the compress pass then starts after its entry instead of feeding it
    again, and the output still equals the recomputation without a cache."""
    from mlx_memosight.layout import Pass

    _, task, model, _, cfg = loaded
    after_first = Pass.after_first
    used = []
    monkeypatch.setattr(Pass, "after_first", lambda self: used.append(1) or after_first(self))
    for prompt in prompts(task, n=2, seed=3):
        tokens, stats, _ = run(model, cfg, prompt, foresight=False)
        assert tokens == reference_decode(model, cfg, prompt, MAX_TOKENS)
        assert stats.compress_events >= 1
    assert len(used) >= 2
