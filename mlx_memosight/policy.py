"""How to draft: draft length and foresight layout, no drafting included.

Drafting commits several tokens per forward pass, but each pass then carries
more tokens, and what a token of a pass costs depends on the machine: little
on a GPU or with a fast CPU BLAS, a lot with the reference BLAS of MLX's
Linux wheel. :class:`DraftPolicy` picks, before every pass, the choice that
minimises the expected time per committed token under

* a cost model: a pass of ``k`` tokens costs ``1 + per_token * (k - 1)``
  one-token passes (:class:`PassCost`), with ``per_token`` measured for this
  model on this machine (a per-user cache file that ``bench`` and
  ``examples/pass_cost.py`` fill) or, without a measurement, the stated
  default of the backend (:data:`DEFAULT_PER_TOKEN`);
* the acceptance seen so far with this model in this process (every
  sequence it decoded, kept on the loaded model: :class:`Acceptance`): per
  draft position ``i``, how often draft ``i`` was right when the drafts
  before it were (with a prior from the model's trained foresight offsets).

Both depend only on the cache file, the tokens committed in the process and
the engine's settings (which draft lengths ran, passes issued ahead), so a
given command on a given machine makes the same choices every time. With
sampling, the tokens depend on the drafting choices: two sampled calls in one
process with the same ``mx.random.seed`` can differ (``forget_acceptance``
between them makes them equal).
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from .backend import blas_library, describe

# The extra cost of each token of a pass, as a fraction of a one-token pass,
# where this machine has no measurement for the model. Measured on a 2-core
# x86-64 CPU (examples/pass_cost.py, examples/bench_scale.py): 0.29-0.61 with
# the reference BLAS (demo model to a 2-layer and a full 0.5B shape), 0.04-0.05
# with OpenBLAS; Apple GPUs are assumed to be as fast as a fast BLAS or faster
# (no figure measured here).
DEFAULT_PER_TOKEN = {"gpu": 0.02, "fast BLAS": 0.05, "reference BLAS": 0.45}
# Prior chance that draft i is right when the drafts before it were: good up
# to the model's trained offsets (the i-th foresight token predicts i + 1
# positions ahead; training offsets reach max_offset), poor beyond them.
PRIOR_IN_RANGE, PRIOR_BEYOND, PRIOR_WEIGHT = 0.75, 0.3, 4.0
EXPLORE_EVERY = 8
# ... while the position one further has been verified fewer than this many
# times (faded counts: exploring pauses there and resumes as they fade, so
# it is throttled rather than stopped; the demo bench still explores draft
# length 4 in ~9% of passes): exploring costs a pass (the pass issued ahead,
# assuming every draft right, is dropped when the extra draft is wrong), and
# what it learns is kept for every later sequence (Acceptance).
EXPLORE_UNTIL = 32
# What was seen fades by this factor with every choose() call (passes issued
# ahead and dropped included)
# (half of it is gone after ~350 passes), so that the prior comes back where
# nothing new is seen: a policy that stopped drafting after a bad start tries
# again later instead of never.
FADE = 0.998
LAYOUTS = ("all", "last")
# Models this small are timed on first use (a few passes of 1 and 9 tokens
# take well under a second); larger ones use the default until measured by
# bench or examples/pass_cost.py --save.
MEASURE_UP_TO = 50_000_000
# How calibrate() times passes; part of the cache file's keys, so that a
# figure timed another way (model calls built op by op, before the engine
# compiled its passes; the median of the rounds rather than the fastest) is
# measured again rather than reused. The fastest: a pass of a millisecond
# is often slowed by other work on the machine, and a slow one-token pass
# makes pass tokens look cheap. Calibrations of the demo model (reference
# BLAS, 2-core x86-64) gave 0.29-0.45 from the medians of 31 rounds and
# 0.49-0.52 from the fastest (five of each in a row), and 0.47-0.55 from the
# fastest of the seven rounds calibrate() times; a figure of 0.25 from one
# median calibration made the batch engine draft where drafting loses
# (README, Batched decoding).
MEASURED_ON = "engine decoding passes, fastest of the rounds"


def parameter_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mlx-memosight" / "pass_costs.json"


def _backend() -> str:
    if mx.default_device() == mx.gpu:
        return "gpu"
    return "reference BLAS" if blas_library() == "reference BLAS" else "fast BLAS"


def model_key(model) -> str:
    """The model's shape and weight types, with the machine and MLX version:
    what a pass's cost depends on."""
    from mlx.utils import tree_flatten

    shapes = [(k, tuple(v.shape), str(v.dtype)) for k, v in tree_flatten(model.parameters())]
    text = json.dumps([shapes, describe(), mx.__version__, MEASURED_ON], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class PassCost:
    """A pass of ``k`` tokens costs ``1 + per_token * (k - 1)`` one-token passes."""

    per_token: float
    source: str

    def __call__(self, k: int) -> float:
        return 1.0 + self.per_token * (k - 1)

    def in_batch(self, rows: int, free: int = 1) -> "BatchPassCost":
        """What one row's tokens cost in a pass over ``rows`` rows padded to
        a common width of at least ``free`` tokens (see :class:`BatchPassCost`)."""
        return BatchPassCost(self, rows, free)

    @classmethod
    def for_model(cls, model) -> "PassCost":
        """The cost measured for this model on this machine (kept in the
        per-user cache file; a model of up to :data:`MEASURE_UP_TO` parameters
        is measured on first use, in a fraction of a second), else the
        backend's default (:data:`DEFAULT_PER_TOKEN`)."""
        measured = _read_table().get(model_key(model))
        if _valid(measured):
            return cls(float(measured), f"measured for this model on {describe()}")
        if parameter_count(model) <= MEASURE_UP_TO:
            return calibrate(model)
        return cls(DEFAULT_PER_TOKEN[_backend()], f"default for {describe()}")


@dataclass(frozen=True)
class BatchPassCost:
    """One row's view of a batched pass: rows are padded to the widest, so
    widening one row by a token costs ``rows`` tokens, measured against a
    one-token pass of all rows (``1 + per_token * (rows - 1)``); the first
    ``free`` tokens of width are paid anyway (another row needs them)."""

    base: PassCost
    rows: int
    free: int = 1

    @property
    def per_token(self) -> float:
        p, b = self.base.per_token, self.rows
        return b * p / (1.0 + p * (b - 1))

    def __call__(self, k: int) -> float:
        return 1.0 + self.per_token * (max(k, self.free) - 1)


def _valid(per_token) -> bool:
    return isinstance(per_token, (int, float)) and not isinstance(per_token, bool) and 0 <= per_token < 10


def _read_table() -> dict:
    """The cache file's table; empty when it is missing or damaged (it is
    measured over and rewritten)."""
    try:
        table = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def calibrate(model, sizes=(1, 9), force: bool = False) -> PassCost:
    """Measure ``per_token`` for this model here (the fastest passes of 1 and
    9 tokens, as the engine runs them: :func:`mlx_memosight.engine.decoding_pass_costs`)
    and keep it in the per-user cache file; a measurement already there is
    kept unless ``force``."""
    from .engine import decoding_pass_costs

    path = _cache_file()
    table = _read_table()
    key = model_key(model)
    if not _valid(table.get(key)) or force:
        costs = decoding_pass_costs(model, list(sizes))
        lo, hi = sizes
        table[key] = round(max(0.0, (costs[hi] / costs[lo] - 1) / (hi - lo)), 4)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache only costs the measurement next time
    return PassCost(float(table[key]), f"measured for this model on {describe()}")


def expected_accepted(q: List[float], g: int) -> Tuple[float, float]:
    """``(expected drafts accepted, chance all g are)`` when draft ``i`` is
    right with chance ``q[i]`` given the ones before it were."""
    p, total = 1.0, 0.0
    for i in range(g):
        p *= q[i]
        total += p
    return total, p


def time_per_token(cost: PassCost, q: List[float], g: int, layout: str) -> float:
    """Expected one-token-pass units per committed token.

    ``all``: every pass feeds the anchor, ``g`` drafts and a foresight set of
    ``g`` after each prefix, so drafts survive any rejection. ``last``: one
    set after the whole block; after a rejection the next pass has no drafts
    (anchor and ``g`` foresight tokens) and commits one token.
    """
    return _time(cost, g, layout, *expected_accepted(q, g))


def _time(cost, g: int, layout: str, accepted: float, all_right: float) -> float:
    """:func:`time_per_token` given ``expected_accepted(q, g)``."""
    if g == 0:
        return cost(1)
    if layout == "all":
        return cost(1 + g + (g + 1) * g) / (1 + accepted)
    miss = 1 - all_right
    return (cost(1 + 2 * g) + miss * cost(1 + g)) / (1 + accepted + miss)


def _times(cost, q: List[float], lengths, layouts):
    """``(time_per_token, g, layout)`` for every draft length (ascending) and
    layout, the expected acceptance of each length built on the one before's
    (a choice is made for every pass of every sequence: this is host time
    on the decode path)."""
    out, accepted, all_right, g_done = [], 0.0, 1.0, 0
    for g in lengths:
        while g_done < g:
            all_right *= q[g_done]
            accepted += all_right
            g_done += 1
        out += [(_time(cost, g, lay, accepted, all_right), g, lay) for lay in layouts]
    return out


@dataclass
class Acceptance:
    """Per draft position ``i``: how many passes verified draft ``i`` (the
    drafts before it right) and in how many it was right. One is kept per
    loaded model and longest draft (:func:`acceptance_for`) and shared by every sequence decoded
    with it, so that a sequence starts from what earlier ones saw rather than
    from the prior; it fades with every pass (:data:`FADE`)."""

    tried: List[float]
    right: List[float]

    @classmethod
    def empty(cls, max_draft: int) -> "Acceptance":
        return cls([0.0] * max_draft, [0.0] * max_draft)

    def fade(self):
        self.tried = [x * FADE for x in self.tried]
        self.right = [x * FADE for x in self.right]

    def observe(self, drafted: int, right: int):
        for i in range(min(drafted, right + 1, len(self.tried))):
            self.tried[i] += 1
            self.right[i] += i < right


def acceptance_for(model, max_draft: int) -> Acceptance:
    """The acceptance seen with ``model`` in this process (kept on the model
    object, as its compiled passes are; a model loaded again starts afresh)."""
    table = model.__dict__.setdefault("_memosight_acceptance", {})
    if max_draft not in table:
        table[max_draft] = Acceptance.empty(max_draft)
    return table[max_draft]


def forget_acceptance(model):
    """Drop what :func:`acceptance_for` kept for ``model``."""
    model.__dict__.pop("_memosight_acceptance", None)


@dataclass
class DraftPolicy:
    """Chooses ``(draft length, layout)`` before each pass.

    Args:
        cost: the pass cost model.
        max_draft: the longest draft considered.
        trained_offset: the model's ``max_offset`` (drafts up to ``max_offset
            + 1`` positions ahead were trained).
        draft_len, layout: a choice forced by the user (None: the policy's).
        seen: the acceptance to start from and add to (shared with other
            sequences of the same model: :func:`acceptance_for`); None: its own.
    """

    cost: PassCost
    max_draft: int
    trained_offset: int
    draft_len: Optional[int] = None
    layout: Optional[str] = None
    seen: Optional[Acceptance] = None
    chosen: Dict[str, int] = field(default_factory=dict)  # this sequence's choices, for its statistics
    since_explore: int = 0

    def __post_init__(self):
        if self.seen is None:
            self.seen = Acceptance.empty(self.max_draft)

    def acceptance(self) -> List[float]:
        out = []
        seen = self.seen
        for i in range(self.max_draft):
            prior = PRIOR_IN_RANGE if i <= self.trained_offset else PRIOR_BEYOND
            out.append((seen.right[i] + prior * PRIOR_WEIGHT) / (seen.tried[i] + PRIOR_WEIGHT))
        return out

    def choose(self, rows: int = 1, free: int = 1) -> Tuple[int, str]:
        """The choice for the next pass; ``rows`` and ``free`` describe a
        batched pass (:meth:`PassCost.in_batch`)."""
        self.seen.fade()
        q = self.acceptance()
        lengths = [self.draft_len] if self.draft_len is not None else range(self.max_draft + 1)
        layouts = [self.layout] if self.layout is not None else LAYOUTS
        cost = self.cost if rows == 1 and free <= 1 else self.cost.in_batch(rows, free)
        best = min(_times(cost, q, lengths, layouts), key=lambda x: (round(x[0], 9), x[1], LAYOUTS.index(x[2])))
        _, g, lay = best
        if 0 < g < self.max_draft and self.draft_len is None and self.seen.tried[g] < EXPLORE_UNTIL:
            # one pass in EXPLORE_EVERY drafts one token further, so that the
            # acceptance there is seen too (a fixed schedule: still
            # deterministic), until it has been seen often enough
            self.since_explore += 1
            if self.since_explore >= EXPLORE_EVERY:
                self.since_explore = 0
                g += 1
        name = "no drafting" if g == 0 else f"draft length {g}, {lay} foresight sets"
        self.chosen[name] = self.chosen.get(name, 0) + 1
        return g, lay

    def choices(self) -> tuple:
        """What :meth:`choose` changes, to go back to with :meth:`undo_choices`
        (a choice made for a pass that never ran), but the fading of the shared
        acceptance, which stays (deterministic all the same)."""
        return self.since_explore, dict(self.chosen)

    def undo_choices(self, state: tuple):
        self.since_explore, self.chosen = state[0], dict(state[1])

    def observe(self, drafted: int, right: int):
        """A pass verified ``drafted`` drafts, the first ``right`` of them
        equal to the model's own tokens."""
        self.seen.observe(drafted, right)

    def summary(self) -> str:
        total = sum(self.chosen.values()) or 1
        parts = [f"{name} ({n / total:.0%} of passes)" for name, n in
                 sorted(self.chosen.items(), key=lambda x: -x[1])]
        return (", ".join(parts) or "no drafting") + \
            f"; a pass token costs {self.cost.per_token:.2f} of a one-token pass ({self.cost.source})"
