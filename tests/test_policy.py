"""The pass cost the drafting policy decides with: measured once per model and
machine, kept in the per-user cache file, the backend's default otherwise."""

import json

import pytest

from helpers import mlx_model
from mlx_memosight import policy


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "mlx-memosight"


def test_small_model_is_measured_once_and_kept(cache_dir, monkeypatch):
    model, _ = mlx_model("qwen2", 300, seed=3)
    first = policy.PassCost.for_model(model)
    assert first.source.startswith("measured") and 0 <= first.per_token < 10
    table = json.loads((cache_dir / "pass_costs.json").read_text())
    assert table == {policy.model_key(model): first.per_token}
    # the next run reads the file: no timing, the same number
    monkeypatch.setattr(policy, "calibrate", lambda *a, **kw: pytest.fail("measured again"))
    assert policy.PassCost.for_model(model) == first


def test_cost_key_follows_the_weights(cache_dir):
    a, _ = mlx_model("qwen2", 300, seed=3)
    b, _ = mlx_model("qwen2", 300, seed=4)  # other values, same shapes and types
    c, _ = mlx_model("qwen2", 300, seed=3, hidden_size=96)
    assert policy.model_key(a) == policy.model_key(b) != policy.model_key(c)


def test_large_model_uses_the_backend_default_until_measured(cache_dir, monkeypatch):
    model, _ = mlx_model("qwen2", 300, seed=3)
    monkeypatch.setattr(policy, "MEASURE_UP_TO", 10)
    monkeypatch.setattr(policy, "calibrate", lambda *a, **kw: pytest.fail("a large model is not timed unasked"))
    cost = policy.PassCost.for_model(model)
    assert cost.per_token == policy.DEFAULT_PER_TOKEN[policy._backend()] and cost.source.startswith("default")
    # bench / examples/pass_cost.py --save store a measurement; it is used from then on
    cache_dir.mkdir(parents=True)
    (cache_dir / "pass_costs.json").write_text(json.dumps({policy.model_key(model): 0.123}))
    assert policy.PassCost.for_model(model).per_token == 0.123


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": "fast"}', '{"%s": -1}', '{"%s": 1e9}'])
def test_a_damaged_cache_file_is_measured_over(cache_dir, content):
    model, _ = mlx_model("qwen2", 300, seed=3)
    cache_dir.mkdir(parents=True)
    path = cache_dir / "pass_costs.json"
    path.write_text(content.replace("%s", policy.model_key(model)))
    cost = policy.PassCost.for_model(model)
    assert cost.source.startswith("measured") and 0 <= cost.per_token < 10


def test_an_unwritable_cache_costs_only_the_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where a folder should be
    model, _ = mlx_model("qwen2", 300, seed=3)
    assert policy.PassCost.for_model(model).source.startswith("measured")


def test_calibration_times_the_passes_the_engine_runs(cache_dir, monkeypatch):
    """Decoding passes run compiled (kernels aside): that path is timed, with
    logits at every token of the pass, not mlx-lm's model call built op by op."""
    from mlx_memosight import backend, engine

    model, _ = mlx_model("qwen2", 300, seed=3)
    fed = []
    real = engine.Engine._call_compiled

    def spy(self, seq, x, positions, *rest):
        start = seq.cache.length
        out = real(self, seq, x, positions, *rest)
        fed.append((start, len(positions), len(rest[-1]), out is not None))
        return out

    monkeypatch.setattr(engine.Engine, "_call_compiled", spy)
    monkeypatch.setattr(engine.kernels, "kernels_available", lambda: False)  # where Metal runs, passes are op by op
    monkeypatch.setattr(backend, "pass_costs", lambda *a, **kw: pytest.fail("op-by-op model call timed"))
    cost = policy.calibrate(model)
    assert 0 <= cost.per_token < 10
    # after the prompt's prefill: interleaved rounds (2 untimed) of a 1- and a 9-token pass over the
    # same 64 entries, each compiled
    assert fed[-18:] == [(64, 1, 1, True), (64, 9, 9, True)] * 9


def test_acceptance_is_shared_by_the_sequences_of_a_model_and_fades():
    """A sequence starts from the acceptance earlier sequences of the model saw
    (a fresh policy of a model whose drafts were never right does not draft);
    what was seen fades pass by pass, so a policy that stopped drafting tries
    again later instead of never."""
    from mlx_memosight.policy import DraftPolicy, PassCost, acceptance_for, forget_acceptance

    model, _ = mlx_model("qwen2", 300, seed=3)
    forget_acceptance(model)

    def fresh():
        return DraftPolicy(PassCost(0.05, "given"), max_draft=5, trained_offset=3,
                           seen=acceptance_for(model, 5))

    assert fresh().choose()[0] > 0  # the prior: drafting pays at this cost
    first = fresh()
    for _ in range(40):
        first.observe(3, 0)
    later = fresh()
    assert later.choose()[0] == 0 and later.seen is first.seen
    passes = 1
    while later.choose()[0] == 0:
        passes += 1
        assert passes < 10_000, "the prior never came back"
    assert passes > 200  # but only after the evidence has faded
    forget_acceptance(model)
    assert fresh().seen.tried == [0.0] * 5


def test_exploring_pauses_once_the_next_position_is_known():
    """One pass in EXPLORE_EVERY drafts one token further than the choice,
    while that position has been verified fewer than EXPLORE_UNTIL times
    (faded counts: it resumes once they fade below)."""
    from mlx_memosight.policy import EXPLORE_EVERY, EXPLORE_UNTIL, DraftPolicy, PassCost

    p = DraftPolicy(PassCost(0.3, "given"), max_draft=5, trained_offset=3)
    for _ in range(60):
        p.observe(2, 2)
    assert p.choose()[0] == 2
    lengths = [p.choose()[0] for _ in range(4 * EXPLORE_EVERY)]
    assert lengths.count(3) == 4 and set(lengths) == {2, 3}
    for _ in range(EXPLORE_UNTIL + 8):
        p.observe(3, 2)  # the third draft is always wrong
    lengths = [p.choose()[0] for _ in range(4 * EXPLORE_EVERY)]
    assert set(lengths) == {2}

