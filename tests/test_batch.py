"""Batched decoding: every sequence of a batch commits exactly the tokens it
commits alone, whatever the batch size, the moment it joins and what the
other rows do in the same pass."""

from collections import defaultdict

import mlx.core as mx
import numpy as np
import pytest

from mlx_memosight import load
from mlx_memosight.cache import BatchKVCache, KVCache
from mlx_memosight.engine import BatchEngine, Engine
from mlx_memosight.sampling import make_repetition_penalty

MAX_TOKENS = 90


@pytest.fixture(scope="module")
def loaded(reasoner):
    path, task = reasoner
    model, tokenizer = load(path)
    return task, model, model.memosight_config


def sixteen_prompts(task, seed=5):
    """16 prompts of 2 to 12 tokens (different lengths, different answers)."""
    rng = np.random.default_rng(seed)
    return [task.prompt(rng, n=2 + i % 11) for i in range(16)]


def budgets(n):
    """Different token budgets: some sequences end by length, others by EOS."""
    return [MAX_TOKENS - 7 * (i % 4) for i in range(n)]


def alone(model, cfg, prompts, max_tokens, **kw):
    return [[ev.token for ev in Engine(model, cfg, **kw).generate(p, m)] for p, m in zip(prompts, max_tokens)]


def continuous(engine, prompts, max_tokens, batch_size):
    """Decode with at most ``batch_size`` sequences in the batch; a waiting
    prompt joins as soon as a sequence leaves. Returns each prompt's tokens
    and, per iteration, what each row did."""
    waiting = list(range(len(prompts)))
    uid_of, tokens, log = {}, defaultdict(list), []
    while waiting or len(engine):
        while waiting and len(engine) < batch_size:
            i = waiting.pop(0)
            uid_of[engine.add(prompts[i], max_tokens[i])] = i
        it = {}
        for r in engine.step():
            i = uid_of[r.uid]
            tokens[i] += [e.token for e in r.events]
            it[i] = dict(compress=any(e.compress_event for e in r.events),
                         drafted=sum(e.from_draft for e in r.events), finished=r.finished, stats=r.stats)
        log.append(it)
    return [tokens[i] for i in range(len(prompts))], log


CONFIGS = {
    "memosight": dict(),
    "draft-3-all": dict(draft_len=3, foresight_sets="all"),
    "draft-2-last": dict(draft_len=2, foresight_sets="last"),
    "no-foresight": dict(foresight=False),
    "two-pass": dict(draft_len=3, schedule="two-pass"),
    "plain": dict(foresight=False, compress=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_equals_alone(loaded, name):
    task, model, cfg = loaded
    kw = CONFIGS[name]
    prompts = sixteen_prompts(task)
    max_tokens = budgets(len(prompts))
    expected = alone(model, cfg, prompts, max_tokens, **kw)
    for bs in (1, 4, 16):
        got, log = continuous(BatchEngine(model, cfg, **kw), prompts, max_tokens, bs)
        assert got == expected, (name, bs)
        assert max(len(it) for it in log) == bs
    if kw.get("compress", True):
        # rows compress in different iterations, and while one row compresses
        # another accepts drafts in the same pass
        _, log = continuous(BatchEngine(model, cfg, **kw), prompts, max_tokens, 16)
        compressing = [sorted(i for i, r in it.items() if r["compress"]) for it in log]
        assert len({tuple(c) for c in compressing if c}) > 3
        if "draft_len" in kw:  # (the policy may not draft at all in a batch of 16 on this machine)
            assert any(c and any(r["drafted"] for i, r in it.items() if i not in c)
                       for c, it in zip(compressing, log))


@pytest.mark.parametrize("name", ["memosight", "draft-2-last", "no-foresight", "plain"])
def test_compiled_batch_passes_equal_passes_built_op_by_op(loaded, name, monkeypatch):
    """Batched passes run as one compiled function (the default where the
    Metal kernels are not used) commit what single sequences decoded with
    passes built op by op commit, as rows join, compress and leave."""
    task, model, cfg = loaded
    kw = CONFIGS[name]
    prompts = sixteen_prompts(task, seed=9)
    max_tokens = budgets(len(prompts))
    monkeypatch.setattr(Engine, "compiled", False)
    expected = alone(model, cfg, prompts, max_tokens, **kw)
    monkeypatch.setattr(Engine, "compiled", True)
    for bs in (4, 16):
        got, _ = continuous(BatchEngine(model, cfg, **kw), prompts, max_tokens, bs)
        assert got == expected, (name, bs)
    assert "_memosight_compiled_batch_pass" in model.__dict__


def test_sequences_join_mid_way_and_leave_at_once(loaded):
    task, model, cfg = loaded
    prompts = sixteen_prompts(task, seed=9)
    max_tokens = budgets(len(prompts))
    expected = alone(model, cfg, prompts, max_tokens, draft_len=3)
    engine = BatchEngine(model, cfg, draft_len=3)
    uid_of, tokens, sizes = {}, defaultdict(list), []
    step = 0
    while len(uid_of) < len(prompts) or len(engine):
        # one new prompt every third iteration
        if step % 3 == 0 and len(uid_of) < len(prompts):
            i = len(uid_of)
            uid_of[engine.add(prompts[i], max_tokens[i])] = i
        for r in engine.step():
            tokens[uid_of[r.uid]] += [e.token for e in r.events]
            if r.finished:
                assert r.uid not in [s.uid for s in engine.sequences]
                assert r.stats.finish_reason in ("stop", "length")
                assert r.stats.generated_tokens == len(tokens[uid_of[r.uid]])
        sizes.append(len(engine))
        step += 1
    assert [tokens[i] for i in range(len(prompts))] == expected
    assert engine.batch.batch_size == 0 and all(c.keys is None for c in engine.batch.layers)
    assert max(sizes) > 4  # sequences overlapped


def test_cancel_drops_the_row_and_the_others_go_on(loaded):
    task, model, cfg = loaded
    prompts = sixteen_prompts(task)[:4]
    expected = alone(model, cfg, prompts, [MAX_TOKENS] * 4)
    engine = BatchEngine(model, cfg)
    uids = [engine.add(p, MAX_TOKENS) for p in prompts]
    tokens = defaultdict(list)
    for _ in range(3):
        for r in engine.step():
            tokens[r.uid] += [e.token for e in r.events]
    left = len(engine)
    victim = engine.sequences[1].uid
    engine.cancel(victim)
    assert len(engine) == left - 1 and victim not in [s.uid for s in engine.sequences]
    while len(engine):
        for r in engine.step():
            tokens[r.uid] += [e.token for e in r.events]
    for uid, want in zip(uids, expected):
        if uid == victim:
            assert 0 < len(tokens[uid]) < len(want) and tokens[uid] == want[: len(tokens[uid])]
        else:
            assert tokens[uid] == want


def test_repetition_penalty_per_row(loaded):
    """Each row's logits processors see that row's own history."""
    task, model, cfg = loaded
    prompts = sixteen_prompts(task, seed=3)[:6]
    kw = dict(draft_len=2, logits_processors=[make_repetition_penalty(1.3)])
    expected = alone(model, cfg, prompts, [60] * 6, **kw)
    got, _ = continuous(BatchEngine(model, cfg, **kw), prompts, [60] * 6, 6)
    assert got == expected


def test_batch_stats_match_alone(loaded):
    task, model, cfg = loaded
    prompts = sixteen_prompts(task)[:5]
    engine = BatchEngine(model, cfg, draft_len=3, foresight_sets="all")
    uids = [engine.add(p, MAX_TOKENS) for p in prompts]
    stats = {}
    while len(engine):
        for r in engine.step():
            if r.finished:
                stats[r.uid] = r.stats
    for uid, p in zip(uids, prompts):
        e = Engine(model, cfg, draft_len=3, foresight_sets="all")
        list(e.generate(p, MAX_TOKENS))
        a, b = e.stats, stats[uid]
        for field in ("generated_tokens", "drafted_tokens", "accepted_draft_tokens", "compress_events",
                      "final_kv_tokens", "plain_kv_tokens", "finish_reason"):
            assert getattr(a, field) == getattr(b, field), field
        # a compress block may be fed in chunks over several passes
        assert a.forward_passes <= b.forward_passes <= a.forward_passes + a.compress_events * 3
        assert a.peak_kv_tokens == b.peak_kv_tokens


def test_batch_cache_rows_keep_their_own_entries():
    """Rows of different lengths: a pass writes each row's block at its own
    length, a row's eviction moves only its own tail, and removing a row
    keeps the others' entries."""
    rng = np.random.default_rng(0)
    H, D = 2, 4

    def filled(n):
        c = KVCache(2)
        for layer in c.layers:
            k = mx.array(rng.standard_normal((1, H, n, D)).astype(np.float32))
            layer.update_and_fetch(k, k + 1)
        return c

    singles = [filled(n) for n in (5, 300, 17)]
    batch = BatchKVCache(2)
    rows = [batch.add(c) for c in singles]
    assert batch.lengths == [5, 300, 17]

    def row_entries(b):
        return [np.array(x[b, :, : rows[b].length]) for c in batch.layers for x in (c.keys, c.values)]

    def single_entries(c):
        return [np.array(x[0, :, : c.length]) for layer in c.layers for x in (layer.keys, layer.values)]

    for b, c in enumerate(singles):
        assert all(np.array_equal(x, y) for x, y in zip(row_entries(b), single_entries(c)))
    rows[1].evict(10, 250)
    singles[1].evict(10, 250)
    rows[2].trim(3)
    singles[2].trim(3)
    for b, c in enumerate(singles):
        assert rows[b].length == c.length
        assert all(np.array_equal(x, y) for x, y in zip(row_entries(b), single_entries(c)))
    assert batch.layers[0].keys.shape[2] == 512
    batch.remove(rows[1])
    rows.pop(1)
    singles.pop(1)
    assert batch.layers[0].keys.shape[:3] == (2, H, 256)  # shrunk to what the longest row left needs
    for b, c in enumerate(singles):
        assert all(np.array_equal(x, y) for x, y in zip(row_entries(b), single_entries(c)))


@pytest.mark.parametrize("min_chunk", [1, 2])
def test_compress_blocks_fed_in_chunks(loaded, min_chunk):
    """Beside one-token rows, a compress block goes in chunks of
    ``min_chunk`` tokens over several passes; the tokens do not change."""
    task, model, cfg = loaded
    prompts = sixteen_prompts(task, seed=2)[:6]
    expected = alone(model, cfg, prompts, [MAX_TOKENS] * 6, foresight=False)
    engine = BatchEngine(model, cfg, foresight=False)
    engine.min_chunk = min_chunk
    chunked = 0

    def spy(feeds, lazy_tokens=None):
        nonlocal chunked
        chunked += sum(end < len(plan.p) for _, plan, _, end in feeds)
        return issue(feeds, lazy_tokens)

    issue, engine._issue = engine._issue, spy
    got, _ = continuous(engine, prompts, [MAX_TOKENS] * 6, 6)
    assert got == expected
    assert chunked > 0


def test_rows_sample_with_their_own_sampler_and_seed(loaded):
    """Greedy rows, sampled rows and rows with a repetition penalty in one
    batch; a seeded row samples the same tokens as when it runs alone."""
    from mlx_lm.sample_utils import make_sampler

    task, model, cfg = loaded
    prompts = sixteen_prompts(task, seed=4)[:6]
    choices = [dict(), dict(sampler=make_sampler(temp=1.0), seed=11), dict(),
               dict(sampler=make_sampler(temp=0.8, top_p=0.9), seed=5),
               dict(logits_processors=[make_repetition_penalty(1.2)]), dict(sampler=make_sampler(temp=1.0), seed=11)]
    expected = [[ev.token for ev in Engine(model, cfg, draft_len=2).generate(p, 60, **c)]
                for p, c in zip(prompts, choices)]
    engine = BatchEngine(model, cfg, draft_len=2)
    uids = [engine.add(p, 60, **c) for p, c in zip(prompts, choices)]
    tokens = defaultdict(list)
    while len(engine):
        for r in engine.step():
            tokens[r.uid] += [e.token for e in r.events]
    assert [tokens[u] for u in uids] == expected
    greedy = alone(model, cfg, [prompts[1]], [60], draft_len=2)[0]
    assert expected[1] != greedy  # sampling did sample
    # a seeded sequence's tokens do not depend on the drafting either
    for kw in (dict(foresight=False), dict(draft_len=3, foresight_sets="last")):
        assert [ev.token for ev in Engine(model, cfg, **kw).generate(prompts[1], 60, **choices[1])] == expected[1]


def test_bench_batch_pass_script():
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_batch_pass.py"), "--batch-sizes", "1", "3",
                        "--cache", "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "3"] and all(float(row[2]) > 0 for row in rows)


@pytest.mark.parametrize("kw", [dict(foresight=False), dict(foresight=False, compress=False)], ids=["compress", "plain"])
def test_plain_rows_run_a_pass_ahead(loaded, kw):
    """Rows that all decode one greedy token issue the next pass before the
    current one is read; a row whose token ends it or starts a compress block
    drops its entry of the pass ahead. Same tokens with and without."""
    task, model, cfg = loaded
    prompts = sixteen_prompts(task, seed=8)
    max_tokens = budgets(len(prompts))
    expected = alone(model, cfg, prompts, max_tokens, **kw)
    engine = BatchEngine(model, cfg, **kw)
    ahead = 0
    issue = engine._issue_ahead

    def spy(*a):
        nonlocal ahead
        ahead += 1
        return issue(*a)

    engine._issue_ahead = spy
    got, _ = continuous(engine, prompts, max_tokens, 5)
    assert got == expected and ahead > 50
    engine = BatchEngine(model, cfg, **kw)
    engine.pipeline = False
    assert continuous(engine, prompts, max_tokens, 5)[0] == expected


@pytest.mark.parametrize("kw", [dict(draft_len=2, foresight_sets="last"), dict(draft_len=3, foresight_sets="all")],
                         ids=["draft-2-last", "draft-3-all"])
def test_a_drafting_sequence_alone_runs_a_pass_ahead(loaded, kw):
    """A sequence alone in the batch that verifies drafts issues its next
    fused block, as it will be if every draft is accepted, before the pass
    is read; it keeps that block when every draft was accepted and drops it
    otherwise (as Engine does). Each sequence's tokens, passes, drafts and
    largest cache are those of the batch that reads every pass first; with
    other rows beside it, a drafting row does not go ahead."""
    task, model, cfg = loaded
    prompts = sixteen_prompts(task, seed=9)[:8]
    max_tokens = budgets(len(prompts))
    expected = alone(model, cfg, prompts, max_tokens, **kw)

    def decode(engine):
        """Each sequence alone in the batch: its tokens and final statistics."""
        tokens, log = continuous(engine, prompts, max_tokens, 1)
        final = {i: row["stats"] for it in log for i, row in it.items() if row["finished"]}
        return tokens, [(s.forward_passes, s.pass_tokens, s.compress_events, s.drafted_tokens,
                         s.accepted_draft_tokens, s.peak_kv_tokens, s.discarded_passes)
                        for s in (final[i] for i in range(len(prompts)))]

    engine = BatchEngine(model, cfg, **kw)
    kept, take = [], engine._take_after

    rejected = 0  # blocks dropped for a rejected draft (the sequence goes on, without a compress block next)

    def spy(*a):
        nonlocal rejected
        kept.append(take(*a))
        rejected += not kept[-1] and a[0].done() is None and not a[0].must_compress()
        return kept[-1]

    engine._take_after = spy
    got, stats = decode(engine)
    assert got == expected
    assert sum(kept) >= 5 and rejected >= 1
    assert sum(s[-1] for s in stats) == kept.count(False)  # dropped passes, counted per sequence
    engine = BatchEngine(model, cfg, **kw)
    engine.pipeline = False
    tokens, unpiped = decode(engine)
    assert tokens == expected
    assert [s[:-1] for s in stats] == [s[:-1] for s in unpiped] and not any(s[-1] for s in unpiped)
    engine = BatchEngine(model, cfg, **kw)
    alone_in_batch = []

    def spy_rows(*a):
        alone_in_batch.append(len(engine) == 1)
        return take(*a)

    take, engine._take_after = engine._take_after, spy_rows
    assert continuous(engine, prompts, max_tokens, 4)[0] == expected and alone_in_batch and all(alone_in_batch)


def test_a_sequence_leaving_drops_its_block_ahead(loaded):
    """A drafting sequence cancelled while its next block, issued ahead,
    stands in the cache leaves with the statistics of one cancelled after as
    many iterations without passes ahead, that block counted as a dropped
    pass; a sequence joining afterwards decodes as it does alone."""
    task, model, cfg = loaded
    kw = dict(draft_len=2, foresight_sets="last")
    prompt, other = sixteen_prompts(task, seed=3)[:2]
    expected = alone(model, cfg, [other], [MAX_TOKENS], **kw)[0]
    left, steps = {}, None
    for pipeline in (True, False):
        engine = BatchEngine(model, cfg, **kw)
        engine.pipeline = pipeline
        uid = engine.add(prompt, MAX_TOKENS)
        n = 0
        while (n < 6 or engine._ahead is None or engine._ahead[2] != [True]) if pipeline else n < steps:
            engine.step()
            n += 1
        steps = n
        s = engine.cancel(uid)
        left[pipeline] = (s.generated_tokens, s.forward_passes, s.pass_tokens, s.final_kv_tokens, s.peak_kv_tokens,
                          s.accepted_draft_tokens, s.discarded_passes)
        engine.add(other, MAX_TOKENS)
        tokens = []
        while len(engine):
            tokens += [e.token for r in engine.step() for e in r.events]
        assert tokens == expected
    assert left[True][:-1] == left[False][:-1] and left[True][-1] >= 1 and left[False][-1] == 0
