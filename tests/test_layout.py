"""The layout module against SPEC sections 2-3: a hand-worked example, the
inference passes spelled out, and property tests."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_memosight.config import MemoSightConfig, TEMPLATES, TokenIds
from mlx_memosight.layout import (
    IGNORE_INDEX as X,
    PassBuilder,
    Role,
    StepState,
    attention_mask,
    build_training_sample,
    collate,
    memory_positions,
)

S, C, R, E = 89, 91, 90, 99  # splitter, continue, foresight, eos
IDS = TokenIds(splitter=S, continue_=C, foresight=R, memory=list(range(200, 500)), eos=E)
M0 = 200


def rows(*lines):
    return np.array([[ch == "1" for ch in line] for line in lines])


def make_cfg(ratio=2, token_ids=IDS):
    return MemoSightConfig(token_ids=token_ids, template=TEMPLATES["qwen"], compression_ratio=ratio)


def test_hand_worked_training_sample():
    # prompt [10, 11]; step 0 = thought [20, 21] + "\n"(30) + splitter, step 1 =
    # thought [22] + "\n" + splitter; r = 2, o = 1; m_0 = ceil(2/2) = 1, m_1 = 1.
    s = build_training_sample(
        [10, 11], [[20, 21, 30, S], [22, 30, S]], IDS, compression_ratio=2, offset=1,
        thought_lens=[2, 1],
    )
    assert s.input_ids.tolist() == [
        10, 11,
        R, 20, R, 21, R, 30, R, S, M0, C,
        R, 22, R, 30, R, S, M0, C,
        E,
    ]
    # b_0 = 2: content 2..5, foresight min(b+j+o-1, b+L-1), memory 2+int(0*4+2),
    # continue b+L = 6; b_1 = 7: content 7..9, memory 7+int(1.5), continue 10; EOS 11.
    assert s.positions.tolist() == [
        0, 1,
        2, 2, 3, 3, 4, 4, 5, 5, 4, 6,
        7, 7, 8, 8, 9, 9, 8, 10,
        11,
    ]
    F, P, M, Co, Ct = Role.FORESIGHT, Role.PROMPT, Role.MEMORY, Role.CONTENT, Role.CONTINUE
    assert s.roles.tolist() == [
        P, P, F, Co, F, Co, F, Co, F, Co, M, Ct, F, Co, F, Co, F, Co, M, Ct, Role.EOS
    ]
    # LM: the logit at each non-foresight token against the next one's label
    assert s.lm_targets.tolist() == [
        X, 20,
        X, 21, X, 30, X, S, X, X, X, 22,
        X, 30, X, S, X, X, X, E,
        X,
    ]
    # MTP: the logit at R before c_j against c_{j+o}, never across a step
    assert s.mtp_targets.tolist() == [
        X, X,
        21, X, 30, X, S, X, X, X, X, X,
        30, X, S, X, X, X, X, X,
        X,
    ]
    expected = rows(
        "1....................",
        "11...................",
        "111..................",
        "11.1.................",
        "11.11................",
        "11.1.1...............",
        "11.1.11..............",
        "11.1.1.1.............",
        "11.1.1.11............",
        "11.1.1.1.1...........",
        "11.1.1.1.11..........",
        "11........11.........",
        "11........111........",
        "11........11.1.......",
        "11........11.11......",
        "11........11.1.1.....",
        "11........11.1.11....",
        "11........11.1.1.1...",
        "11........11.1.1.11..",
        "11........11......11.",
        "11........11......111",
    )
    np.testing.assert_array_equal(s.mask(), expected)


def test_offset_zero_foresight_sits_before_the_step():
    s = build_training_sample([10, 11], [[20, 30, S]], IDS, 2, offset=0, thought_lens=[1])
    f = s.roles == Role.FORESIGHT
    # R before c_j predicts c_j itself, at position b + j - 1
    assert s.positions[f].tolist() == [1, 2, 3]
    assert s.mtp_targets[f].tolist() == [20, 30, S]


def test_hand_worked_compress_pass():
    # cache: prompt (slots 0-1), step content 20, 21, 30 (slots 2-4); the anchor is
    # the splitter. L = 4 (splitter included), m = ceil(4/2) = 2, b = 2.
    p = PassBuilder(make_cfg()).compress(StepState(start_slot=2, begin=2), cache_len=5, draft_len=2)
    assert p.tokens.tolist() == [S, M0, M0 + 1, C, R, R]
    assert p.positions.tolist() == [5, 3, 5, 6, 7, 8]
    np.testing.assert_array_equal(
        p.rule.mask(),
        rows(
            "111111.....",
            "1111111....",
            "11111111...",
            "11....111..",
            "11....1111.",
            "11....111.1",
        ),
    )
    assert p.exact_rows.tolist() == [3]
    assert [r.tolist() for r in p.foresight_rows] == [[4, 5]]
    assert p.evict == (2, 6)


def test_compress_pass_after_its_cached_splitter():
    """The compress pass of the hand-worked example when plain decoding has
    already fed the splitter (slot 5): the same rows but the first, over the
    same key slots, the same rows read and the same eviction."""
    full = PassBuilder(make_cfg()).compress(StepState(start_slot=2, begin=2), cache_len=5, draft_len=2)
    p = full.after_first()
    assert p.tokens.tolist() == [M0, M0 + 1, C, R, R] and p.positions.tolist() == [3, 5, 6, 7, 8]
    np.testing.assert_array_equal(p.rule.mask(), full.rule.mask()[1:])
    assert p.exact_rows.tolist() == [2] and [r.tolist() for r in p.foresight_rows] == [[3, 4]]
    assert (p.evict, p.keep, p.cached, len(p)) == (full.evict, full.keep - 1, 1, len(full) - 1)


def test_hand_worked_fused_pass():
    # anchor 40 at position 7 over 8 cached entries, drafts 41, 42, g = 2
    p = PassBuilder(make_cfg()).decode(40, 7, cache_len=8, drafts=[41, 42], draft_len=2)
    assert p.kind == "fused"
    assert p.tokens.tolist() == [40, 41, 42, R, R, R, R, R, R]
    assert p.positions.tolist() == [7, 8, 9, 8, 9, 9, 10, 10, 11]
    np.testing.assert_array_equal(
        p.rule.mask(),
        rows(
            "111111111........",
            "1111111111.......",
            "11111111111......",
            "111111111..1.....",
            "111111111...1....",
            "1111111111...1...",
            "1111111111....1..",
            "11111111111....1.",
            "11111111111.....1",
        ),
    )
    assert p.exact_rows.tolist() == [0, 1, 2]
    assert [r.tolist() for r in p.foresight_rows] == [[3, 4], [5, 6], [7, 8]]


def test_fused_pass_with_the_last_foresight_set_only():
    p = PassBuilder(make_cfg()).decode(40, 7, cache_len=8, drafts=[41, 42], draft_len=2, prefixes=[2])
    assert p.tokens.tolist() == [40, 41, 42, R, R]
    assert p.positions.tolist() == [7, 8, 9, 10, 11]
    np.testing.assert_array_equal(
        p.rule.mask(),
        rows(
            "111111111....",
            "1111111111...",
            "11111111111..",
            "111111111111.",
            "11111111111.1",
        ),
    )
    assert p.foresight_prefixes == [2] and [r.tolist() for r in p.foresight_rows] == [[3, 4]]


def test_accelerate_and_verify_passes():
    b = PassBuilder(make_cfg())
    a = b.decode(40, 7, cache_len=3, draft_len=2)
    assert a.kind == "accelerate"
    assert a.positions.tolist() == [7, 8, 9]
    np.testing.assert_array_equal(a.rule.mask(), rows("1111..", "11111.", "1111.1"))
    v = b.verify([41, 42, 43], 7, cache_len=4)
    assert v.positions.tolist() == [8, 9, 10]
    assert v.rule.is_causal()
    np.testing.assert_array_equal(v.rule.mask(), rows("11111..", "111111.", "1111111"))
    plain = b.decode(40, 7, cache_len=3)
    assert plain.kind == "decode" and plain.rule.is_causal()


def test_memory_positions_centre_slices():
    assert memory_positions(10, 6, 3) == [11, 13, 15]
    assert memory_positions(0, 4, 1) == [2]
    assert memory_positions(0, 1, 1) == [0]
    # SPEC's floor(k L/m + L/2m), evaluated in floating point as the reference
    # does: it equals the exact value except where that value is an integer,
    # where the float sum can land just below it (for example L = 12, m = 7).
    ties = 0
    for L in range(1, 200):
        for m in range(1, L + 1):
            got = memory_positions(0, L, m)
            for k in range(m):
                exact, rem = divmod((2 * k + 1) * L, 2 * m)
                if rem:
                    assert got[k] == exact
                else:
                    assert got[k] in (exact, exact - 1)
                    ties += got[k] != exact
    assert memory_positions(0, 12, 7)[3] == 5 and ties > 0


def test_truncation_counts_non_foresight_tokens():
    full = build_training_sample([10, 11], [[20, 21, 30, S], [22, 30, S]], IDS, 2, 1, thought_lens=[2, 1])
    for n in range(1, full.num_real_tokens + 1):
        s = build_training_sample([10, 11], [[20, 21, 30, S], [22, 30, S]], IDS, 2, 1,
                                  thought_lens=[2, 1], max_length=n)
        assert s.num_real_tokens == n
        assert s.roles[-1] != Role.FORESIGHT
        assert s.truncated == (n < full.num_real_tokens)
        # the prefix is unchanged, the last token has no LM target
        assert s.input_ids.tolist() == full.input_ids[: len(s)].tolist()
        assert s.positions.tolist() == full.positions[: len(s)].tolist()
        assert s.mtp_targets.tolist() == full.mtp_targets[: len(s)].tolist()
        assert s.lm_targets[-1] == X
        np.testing.assert_array_equal(s.mask(), full.mask()[: len(s), : len(s)])


def test_collate_pads_by_copying_the_last_row():
    a = build_training_sample([10], [[20, S]], IDS, 2, 1, thought_lens=[1])
    b = build_training_sample([10, 11], [[20, 21, 30, S], [22, S]], IDS, 2, 0, thought_lens=[3, 1])
    batch = collate([a, b])
    m = batch.mask()
    n = len(a)
    assert m.shape == (2, len(b), len(b))
    np.testing.assert_array_equal(m[0, :n, :n], a.mask())
    for q in range(n, len(b)):
        np.testing.assert_array_equal(m[0, q], m[0, n - 1])
    assert not m[0, :, n:].any()
    assert (batch.lm_targets[0, n:] == X).all() and (batch.mtp_targets[0, n:] == X).all()
    np.testing.assert_array_equal(m[1], b.mask())


# ----------------------------------------------------------------------------
# Properties


def steps_from_roles(roles):
    """(start, end, m) of every step: maximal runs of content / foresight tokens
    after the prompt, and the memory tokens that follow."""
    out, i, T = [], 0, len(roles)
    while i < T:
        if roles[i] in (Role.CONTENT, Role.FORESIGHT):
            j = i
            while j < T and roles[j] in (Role.CONTENT, Role.FORESIGHT):
                j += 1
            k = j
            while k < T and roles[k] == Role.MEMORY:
                k += 1
            out.append((i, j, k - j))
            i = k
        else:
            i += 1
    return out


def spec_mask(roles):
    """SPEC's three rules, applied literally."""
    T = len(roles)
    steps = steps_from_roles(roles)
    m = np.zeros((T, T), bool)
    for q in range(T):
        for k in range(q + 1):
            if roles[k] == Role.FORESIGHT and k != q:
                continue
            if any(q >= end + ms and start <= k < end for start, end, ms in steps):
                continue
            m[q, k] = True
    return m


examples = st.fixed_dictionaries(
    dict(
        prompt=st.integers(1, 6),
        lens=st.lists(st.integers(1, 9), min_size=1, max_size=4),
        ratio=st.integers(1, 7),
        offset=st.integers(0, 3),
        seed=st.integers(0, 2**16),
    )
)


def make_sample(ex, foresight=True, inference_counts=False, max_length=None):
    rng = np.random.default_rng(ex["seed"])
    prompt = rng.integers(3, 40, size=ex["prompt"]).tolist()
    steps = [rng.integers(3, 40, size=n - 1).tolist() + [S] for n in ex["lens"]]
    thought_lens = [max(1, n - 2) for n in ex["lens"]]
    counts = None
    if inference_counts:
        counts = [make_cfg(ex["ratio"]).memory_count(len(s)) for s in steps]
    return prompt, steps, build_training_sample(
        prompt, steps, IDS, ex["ratio"], ex["offset"], memory_counts=counts,
        thought_lens=thought_lens, foresight=foresight, max_length=max_length,
    )


@settings(max_examples=150, deadline=None)
@given(examples, st.one_of(st.none(), st.integers(1, 40)))
def test_mask_obeys_the_three_rules(ex, max_length):
    _, _, s = make_sample(ex, max_length=max_length)
    mask = s.mask()
    np.testing.assert_array_equal(mask, spec_mask(s.roles))
    assert mask.any(axis=1).all()
    assert mask[np.arange(len(s)), np.arange(len(s))].all()


@settings(max_examples=100, deadline=None)
@given(examples)
def test_positions_follow_spec(ex):
    prompt, steps, s = make_sample(ex)
    pos, roles = s.positions, s.roles
    P = len(prompt)
    assert pos[:P].tolist() == list(range(P))
    content = pos[roles == Role.CONTENT]
    conts = pos[roles == Role.CONTINUE]
    # content and continue positions are contiguous, EOS follows the last continue
    real = pos[(roles == Role.CONTENT) | (roles == Role.CONTINUE) | (roles == Role.EOS)]
    assert real.tolist() == list(range(P, P + len(real)))
    assert len(conts) == len(steps)
    # every foresight token sits within its step, never before b - 1
    for start, end, _ in steps_from_roles(roles):
        f = pos[start:end][roles[start:end] == Role.FORESIGHT]
        c = pos[start:end][roles[start:end] == Role.CONTENT]
        assert f.min() >= c.min() - 1 and f.max() <= c.max()
    assert len(content) == sum(len(x) for x in steps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(examples)
def test_training_and_inference_layouts_agree(ex):
    """Teacher-force the same text through the decoder's passes: every token gets
    the training position, and every pass row sees exactly what the training
    mask lets the same token see (evicted entries are those it may not see)."""
    prompt, steps, s = make_sample(ex, foresight=False, inference_counts=True)
    train_mask = s.mask()
    cfg = make_cfg(ex["ratio"])
    builder = PassBuilder(cfg)
    slot_to_index = []  # cache slot -> training index
    index = 0

    def run(p):
        nonlocal index
        K = len(slot_to_index) + len(p)
        mask = p.rule.mask()
        assert mask.shape == (len(p), K)
        keys = slot_to_index + list(range(index, index + len(p)))
        for r in range(len(p)):
            assert s.input_ids[index + r] == p.tokens[r]
            assert s.positions[index + r] == p.positions[r]
            seen = {keys[k] for k in range(K) if mask[r, k]}
            expected = set(np.nonzero(train_mask[index + r])[0].tolist())
            # evicted keys are gone from the cache: they must be invisible anyway
            assert seen == expected & set(keys)
            assert expected <= set(keys)
        slot_to_index.extend(range(index, index + len(p)))
        index += len(p)
        return p

    run(builder.prefill(prompt))
    b = len(prompt)
    for content in steps:
        start = len(slot_to_index)
        for j, tok in enumerate(content[:-1]):
            run(builder.decode(tok, b + j, len(slot_to_index)))
        p = run(builder.compress(StepState(start, b), len(slot_to_index)))
        lo, hi = p.evict
        del slot_to_index[lo:hi]
        b += len(content) + 1
    run(builder.decode(E, b, len(slot_to_index)))
    assert index == len(s)


@settings(max_examples=60, deadline=None)
@given(examples, st.integers(0, 4), st.integers(1, 4), st.integers(0, 50))
def test_pass_rules_every_query_sees_itself(ex, k, g, cache_len):
    b = PassBuilder(make_cfg(ex["ratio"]))
    passes = [
        b.decode(7, cache_len, cache_len, drafts=list(range(8, 8 + k)), draft_len=g),
        b.verify(list(range(8, 8 + k + 1)), cache_len, cache_len),
        b.prefill(list(range(3, 3 + k + 1)), cache_len, cache_len),
    ]
    if cache_len:
        start = cache_len // 2
        passes.append(b.compress(StepState(start, start + 3), cache_len, draft_len=g))
    for p in passes:
        mask = p.rule.mask()
        slots = p.rule.query_slot
        assert mask[np.arange(len(p)), slots].all()
        assert (slots == np.arange(cache_len, cache_len + len(p))).all()
        # nothing in the block attends to a foresight token but itself
        f = np.nonzero(p.roles == Role.FORESIGHT)[0] + cache_len
        for col in f:
            assert mask[:, col].sum() == 1


def test_attention_mask_matches_in_mlx():
    import mlx.core as mx

    s = build_training_sample([10, 11], [[20, 21, 30, S], [22, 30, S]], IDS, 2, 2, thought_lens=[2, 1])
    r = s.rule
    m = attention_mask(mx.array(r.query_slot), mx.array(r.query_limit), mx.array(r.key_visible_until), xp=mx)
    np.testing.assert_array_equal(np.array(m), s.mask())


@settings(max_examples=80, deadline=None)
@given(examples, st.one_of(st.none(), st.integers(1, 40)))
def test_torch_oracle_agrees(ex, max_length):
    torch_layout = pytest.importorskip("convert.torch_layout")
    prompt, steps, s = make_sample(ex, max_length=max_length)
    thought_lens = [max(1, n - 2) for n in ex["lens"]]
    o = torch_layout.training_layout(
        prompt, steps, thought_lens,
        {"foresight": R, "continue": C, "eos": E, "memory": IDS.memory},
        ex["ratio"], ex["offset"], max_length=max_length,
    )
    assert o["input_ids"].tolist() == s.input_ids.tolist()
    assert o["position_ids"].tolist() == s.positions.tolist()
    np.testing.assert_array_equal(o["mask"].numpy(), s.mask())
    f = o["is_foresight"].numpy()
    np.testing.assert_array_equal(f, s.roles == Role.FORESIGHT)
    assert o["labels"].numpy()[f].tolist() == s.mtp_targets[f].tolist()
