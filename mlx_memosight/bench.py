"""Side-by-side speed and memory: ``python -m mlx_memosight.bench --model PATH``.

On the same prompts, in one run, with the runs of each prompt interleaved:

* ``mlx_lm``: plain greedy ``mlx_lm.stream_generate`` (of ``--plain-model``
  when given, else of ``--model``);
* ``plain``: this engine with foresight and compression off;
* ``no-foresight``: compression only; ``two-pass``: the reference's schedule;
* ``memosight``: the fused schedule with drafting and compression.

Prints tokens/s, forward passes per generated token, peak KV entries,
acceptance and (where answers are known) accuracy; checks that every
MemoSight configuration commits exactly the tokens of ``no-foresight``; writes
the per-token KV curves and a summary as JSON, and PNG plots when matplotlib is
installed.
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from . import cli
from .errors import MemoSightError
from .options import GenerationOptions, add_arguments

if TYPE_CHECKING:
    from .policy import PassCost


class BenchError(MemoSightError):
    """A MemoSight configuration committed other tokens than no-foresight."""


@dataclass
class Run:
    """One configuration on one prompt."""

    tokens: List[int]
    seconds: float
    prompt_seconds: float
    passes: int
    peak_kv: int
    kv_curve: List[int]
    drafted: int = 0
    accepted: int = 0
    compress_events: int = 0
    correct: Optional[bool] = None
    choices: dict = field(default_factory=dict)  # the drafting policy's choices: passes per choice
    cost_source: str = ""
    pass_tokens: int = 0  # tokens fed over all passes (0: one per pass)
    times: List[float] = field(default_factory=list)  # per token, seconds after the first token
    text_tokens: int = 0  # the decoded answer as the tokenizer encodes it (no splitters)


WINDOW = 256  # generated tokens per point of the speed-against-length curve
TAIL = 1000  # the speed of long answers is also given over the last this many tokens every row reaches


@dataclass
class Row:
    name: str
    runs: List[Run] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    cost: Optional["PassCost"] = None  # the model's measured pass cost, for bound()
    attention: Dict[int, float] = field(default_factory=dict)  # KV entries -> attention's share of a pass

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.runs)

    def drafting(self) -> Optional[str]:
        """The drafting policy's choices over all runs, most frequent first."""
        counts: Dict[str, int] = {}
        for r in self.runs:
            for k, v in r.choices.items():
                counts[k] = counts.get(k, 0) + v
        if not counts:
            return None
        total = sum(counts.values())
        parts = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
        return f"{parts} of passes (a pass token costs {self.runs[-1].cost_source})"

    def bound(self) -> Optional[str]:
        """The speed-up over plain decoding that this row's passes allow on
        this machine: tokens per pass over the mean cost of its passes in
        one-token passes (from the measured pass cost; host work,
        compaction and prefill left out)."""
        if self.cost is None:
            return None
        passes = sum(r.passes for r in self.runs)
        fed = sum(r.pass_tokens or r.passes for r in self.runs)
        if not passes:
            return None
        per_pass = (passes + self.cost.per_token * (fed - passes)) / passes
        tpp = self.tokens / passes
        return (f"{tpp:.2f} tokens per pass / {per_pass:.2f} (mean pass cost in one-token passes, "
                f"{fed / passes:.1f} tokens fed per pass) = {tpp / per_pass:.2f}x plain decoding at most")

    def windows(self, window: int) -> int:
        """How many windows of ``window`` tokens after the first the longest answer fills."""
        return max((len(r.times) - 1) // window for r in self.runs)

    def speed_by_length(self, window: Optional[int] = None) -> List[Optional[float]]:
        """Tokens/s per window of generated tokens (tokens ``[k w + 1, (k +
        1) w]`` after the first, which prefill gives), over all answers that
        fill the window; one value per window the longest answer fills
        (``window``: :data:`WINDOW` by default)."""
        window = window or WINDOW
        return [self.speed_between(k * window, (k + 1) * window) for k in range(self.windows(window))]

    def speed_between(self, a: int, b: int) -> Optional[float]:
        """Tokens/s over generated tokens ``a + 1`` to ``b`` after the first,
        over all answers that reach ``b``, together; None if none does."""
        long = [r for r in self.runs if len(r.times) > b]
        seconds = sum(r.times[b] - r.times[a] for r in long)
        return (b - a) * len(long) / seconds if long and seconds > 0 else None

    def reaching(self, b: int) -> int:
        """How many answers reach generated token ``b`` after the first."""
        return sum(len(r.times) > b for r in self.runs)

    @property
    def longest(self) -> int:
        """Generated tokens after the first of the longest answer."""
        return max((len(r.times) - 1 for r in self.runs), default=0)

    def kv_by_length(self, window: Optional[int] = None) -> List[Optional[float]]:
        """Mean KV entries at the end of each window of generated tokens,
        over the answers that fill it (as :meth:`speed_by_length`)."""
        window = window or WINDOW
        out = []
        for k in range(self.windows(window)):
            b = (k + 1) * window
            held = [r.kv_curve[b] for r in self.runs if len(r.kv_curve) > b]
            out.append(statistics.mean(held) if held else None)
        return out

    @property
    def tps(self) -> float:
        """Generated tokens over generation time, all prompts together."""
        t = sum(r.seconds for r in self.runs)
        return self.tokens / t if t else 0.0

    @property
    def text_tps(self) -> float:
        """Answer text over generation time: tokens of the decoded answers as
        the tokenizer encodes them, the text a plain model writes, without
        MemoSight's splitters and the tokens its step boundaries add."""
        t = sum(r.seconds for r in self.runs)
        return sum(r.text_tokens for r in self.runs) / t if t else 0.0

    def summary(self, tail: Optional[Tuple[int, int]] = None) -> dict:
        """The row's figures; ``tail``: the window of :func:`common_tail`
        (generated tokens after the first) for ``tail_tokens_per_second``."""
        runs = self.runs
        known = [r.correct for r in runs if r.correct is not None]
        return dict(
            config=self.name,
            prompts=len(runs),
            generated_tokens=self.tokens,
            tokens_per_second=self.tps,
            text_tokens=sum(r.text_tokens for r in runs),
            text_tokens_per_second=self.text_tps,
            passes_per_token=sum(r.passes for r in runs) / max(1, self.tokens),
            peak_kv_tokens=max(r.peak_kv for r in runs),
            mean_peak_kv_tokens=statistics.mean(r.peak_kv for r in runs),
            drafted_tokens=sum(r.drafted for r in runs),
            accepted_draft_tokens=sum(r.accepted for r in runs),
            compress_events=sum(r.compress_events for r in runs),
            accuracy=(sum(known) / len(known)) if known else None,
            tail_tokens_per_second=self.speed_between(*tail) if tail else None,
            tail_answers=self.reaching(tail[1]) if tail else None,
        )


def common_tail(rows: Dict[str, "Row"], n: Optional[int] = None) -> Optional[Tuple[int, int]]:
    """The last ``n`` (:data:`TAIL`) generated tokens that some answer of
    every row reaches, as ``(a, b)`` for :meth:`Row.speed_between` (so the
    rows are compared at the same lengths, where their caches are as long as
    decoding to that length makes them); None if a row has no answer that
    long."""
    n = n or TAIL
    b = min(row.longest for row in rows.values())
    return (b - n, b) if b >= n else None


def run_mlx_lm(model, tokenizer, ids, max_tokens, stop_ids) -> Run:
    """Plain greedy decoding with mlx-lm's own generator."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens, times = [], []
    tic = time.perf_counter()
    first = None
    for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        now = time.perf_counter()
        if first is None:
            first = now
        tokens.append(int(t))
        times.append(now - first)
        if int(t) in stop_ids:
            break
    end = time.perf_counter()
    P = len(ids)
    return Run(tokens, end - first, first - tic, len(tokens), P + len(tokens) - 1,
               [P + i for i in range(len(tokens))], times=times)


def run_engine(model, tokenizer, ids, max_tokens, **kw) -> Run:
    from .generation import make_engine

    engine = make_engine(model, tokenizer, model.memosight_config, **kw)
    tokens, curve, times = [], [], []
    first = None
    for ev in engine.generate(ids, max_tokens):
        now = time.perf_counter()
        first = now if first is None else first
        tokens.append(ev.token)
        curve.append(ev.kv_entries)
        times.append(now - first)
    st = engine.stats
    policy = engine.policy
    return Run(tokens, st.generation_time, st.prompt_time, st.forward_passes, st.peak_kv_tokens,
               curve, st.drafted_tokens, st.accepted_draft_tokens, st.compress_events,
               choices=dict(policy.chosen) if policy else {},
               cost_source=f"{policy.cost.per_token:.2f}, {policy.cost.source}" if policy else "",
               pass_tokens=st.pass_tokens, times=times)


def configurations(cfg, draft_len=None, foresight_sets="auto"):
    """The rows that run this engine; ``draft_len`` None (and ``auto``) lets
    the drafting policy choose in the memosight row. The two-pass row runs
    the reference's schedule with ``draft_len`` or the model's default."""
    if cfg is None:
        return {"plain": dict(foresight=False, compress=False)}
    return {
        "plain": dict(foresight=False, compress=False),
        "no-foresight": dict(foresight=False),
        "two-pass": dict(draft_len=draft_len if draft_len is not None else cfg.draft_len, schedule="two-pass"),
        "memosight": dict(draft_len=draft_len, foresight_sets=foresight_sets),
    }


def format_table(rows: List[dict], baseline: str) -> str:
    """The printed table: one line per configuration; ``tok/s`` and the mean
    peak KV entries also as ratios to the ``baseline`` row."""
    base = next((r for r in rows if r["config"] == baseline), None)
    head = f"{'config':<22}{'tokens':>8}{'tok/s':>9}{'vs base':>9}{'pass/tok':>10}" \
           f"{'peak KV':>9}{'KV vs base':>12}{'accepted':>10}{'compress':>10}{'accuracy':>10}"
    lines = [f"base: {baseline}", head, "-" * len(head)]
    for r in rows:
        ratio = r["tokens_per_second"] / base["tokens_per_second"] if base and base["tokens_per_second"] else 0
        kv = r["mean_peak_kv_tokens"] / base["mean_peak_kv_tokens"] if base and base["mean_peak_kv_tokens"] else 0
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        accepted = "-" if not r["drafted_tokens"] else f"{r['accepted_draft_tokens'] / r['drafted_tokens']:.0%}"
        lines.append(
            f"{r['config']:<22}{r['generated_tokens']:>8}{r['tokens_per_second']:>9.1f}{ratio:>8.2f}x"
            f"{r['passes_per_token']:>10.3f}{r['mean_peak_kv_tokens']:>9.1f}{kv:>11.2f}x{accepted:>10}"
            f"{r['compress_events']:>10}{acc:>10}"
        )
    return "\n".join(lines)


def format_text_speed(rows: List[dict]) -> Optional[str]:
    """Answer text per second of each row against the first, where some
    row's output has more tokens than its text (MemoSight's splitters and
    step boundaries): its tok/s counts them, a plain model's text would not."""
    if not rows or all(r["text_tokens"] >= r["generated_tokens"] for r in rows):
        return None
    base = rows[0]["text_tokens_per_second"]
    parts = [f"{r['config']} {r['text_tokens_per_second']:.1f}"
             + (f" ({r['text_tokens_per_second'] / base:.2f}x)" if base and r is not rows[0] else "")
             for r in rows]
    return ("answer text per second (tokens of the decoded answers as the tokenizer encodes them, "
            "no splitters): " + ", ".join(parts))


def format_speed_by_length(rows: Dict[str, Row]) -> Optional[str]:
    """Tokens/s per window of :data:`WINDOW` generated tokens, one column per
    row, and each row's speed over the last :data:`TAIL` tokens every row
    reaches (:func:`common_tail`) against the first row's; None unless some
    answer fills two windows."""
    window = WINDOW
    curves = {name: row.speed_by_length(window) for name, row in rows.items()}
    n = max(len(c) for c in curves.values())
    if n < 2:
        return None
    names = list(rows)
    width = max(14, *(len(x) + 2 for x in names))

    def table(title, cell):
        """``title``, a header of the rows' names, then per window ``cell(name, k)`` (text) of each row."""
        out = [title, f"{'tokens':<14}" + "".join(f"{x:>{width}}" for x in names)]
        for k in range(n):
            out.append(f"{f'{k * window + 1}-{(k + 1) * window}':<14}"
                       + "".join(f"{cell(x, k):>{width}}" for x in names))
        return out

    def speed(x, k):
        c = curves[x][k] if k < len(curves[x]) else None
        return "-" if c is None else f"{c:.1f}"

    lines = table(f"tokens/s by generated length (windows of {window} tokens, over the answers that reach them):",
                  speed)
    tail = common_tail(rows)
    if tail:
        a, b = tail
        base = rows[names[0]].speed_between(a, b)  # the ratios are against the first row
        parts = []
        for x in names:
            t, k = rows[x].speed_between(a, b), rows[x].reaching(b)
            speed = "-" if t is None else f"{t:.1f}"  # None: no time passed (one pass gave them all)
            parts.append(f"{x} {speed} over {k} answer{'s' * (k > 1)}" + (f" ({t / base:.2f}x)" if t and base else ""))
        lines.append(f"tokens {a + 1:,}-{b:,}, the last {b - a:,} that every row reaches: " + ", ".join(parts))
    kv = {x: rows[x].kv_by_length(window) for x in names}

    def held(x, k):
        h = kv[x][k] if k < len(kv[x]) else None
        if h is None:
            return "-"
        share = rows[x].attention.get(_grid(h))
        return f"{h:.0f}" + ("" if share is None else f" ({share:.0%})")

    lines += table("KV entries at the end of each window, and (in brackets) the share of a one-token pass over that "
                   "many entries spent attending to them (from a line fitted through pass times measured here at 1 "
                   "entry and at each length):", held)
    return "\n".join(lines)


GRID = 128  # attention shares are measured at KV lengths rounded to this


def _grid(n: float) -> int:
    return max(GRID, int(round(n / GRID)) * GRID)


def attention_shares(model, lengths) -> Dict[int, float]:
    """Per KV length ``n`` (on the grid), the share of a one-token pass over
    ``n`` cached entries that attending to them takes: ``b n / (a + b n)``
    for the straight line ``t(n) = a + b n`` fitted (least squares) through
    median pass times measured here at 1 entry and at each length (the rest
    of a pass does not depend on the cache; the line keeps one noisy length
    from showing as a jump)."""
    import numpy as np

    from .backend import one_token_costs

    lengths = sorted(set(lengths))
    times = one_token_costs(model, [1] + lengths)
    n = np.array(sorted(times), dtype=np.float64)
    b, a = np.polyfit(n, [times[int(x)] for x in n], 1)
    b = max(b, 0.0)
    return {x: b * x / (a + b * x) if a + b * x > 0 else 0.0 for x in lengths}


def write_plots(rows: Dict[str, Row], out_dir: Path) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed; no plots written (pip install matplotlib)",
              file=sys.stderr)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, ax, name, xlabel, ylabel, title, legend=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if legend:
            ax.legend()
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in rows.items():
        longest = max(row.runs, key=lambda r: len(r.tokens))
        ax.plot(range(1, len(longest.kv_curve) + 1), longest.kv_curve, label=name)
    save(fig, ax, "kv_curve.png", "generated tokens", "KV cache entries", "KV cache during generation (longest answer)")
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    ax.bar(names, [rows[n].tps for n in names])
    save(fig, ax, "tokens_per_second.png", "", "generated tokens / s", "Decoding speed", legend=False)
    curves = {name: row.speed_by_length() for name, row in rows.items()}
    if max(len(c) for c in curves.values()) >= 2:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, c in curves.items():
            ax.plot([(k + 1) * WINDOW for k in range(len(c))], [float("nan") if x is None else x for x in c],
                    marker=".", label=name)
        save(fig, ax, "speed_by_length.png", f"generated tokens (end of each window of {WINDOW})",
             "tokens / s in the window", "Decoding speed against generated length")
    return paths


def bench(model_path, prompts, max_tokens=256, draft_len=None, plain_model_path=None,
          repeats=1, system=None, raw_prompt=False, progress=True,
          foresight_sets="auto") -> Dict[str, Row]:
    """Run every configuration on every prompt, interleaved; returns the rows.

    Args:
        prompts: items with ``question`` and optionally ``answer`` / ``kind``
            (see :mod:`mlx_memosight.scoring`).
        repeats: timed repetitions per prompt (the fastest is kept).
    """
    from .policy import calibrate
    from .generation import decode_text, prompt_ids
    from .loading import load_for_decoding
    from .scoring import score

    model, tokenizer = load_for_decoding(model_path)
    cfg = model.memosight_config
    stop = stop_set(tokenizer, cfg)
    plain = None
    if plain_model_path is not None:
        plain = load_for_decoding(plain_model_path)
    cost = calibrate(model) if cfg is not None else None  # measured once per model and machine
    configs = configurations(cfg, draft_len, foresight_sets)
    rows: Dict[str, Row] = {"mlx_lm": Row("mlx_lm")}
    if plain is not None:
        rows["mlx_lm"].name = "mlx_lm (plain model)"
    rows.update({name: Row(name, settings=kw, cost=cost) for name, kw in configs.items()})
    iterator = prompts
    if progress:
        from tqdm import tqdm

        iterator = tqdm(prompts, desc="bench", unit="prompt", file=sys.stderr)
    warm = False
    for item in iterator:
        text = item.get("prompt", item["question"])
        ids = prompt_ids(tokenizer, text, cfg, system, raw_prompt)
        lm_model, lm_tok = plain if plain is not None else (model, tokenizer)
        lm_cfg = lm_model.memosight_config if plain is not None else cfg
        lm_ids = prompt_ids(lm_tok, text, lm_cfg, system, raw_prompt)
        lm_stop = stop_set(lm_tok, lm_cfg)
        jobs = {"mlx_lm": lambda: run_mlx_lm(lm_model, lm_tok, lm_ids, max_tokens, lm_stop)}
        for name, kw in configs.items():
            jobs[name] = (lambda kw=kw: run_engine(model, tokenizer, ids, max_tokens, **kw))
        if not warm:
            for job in jobs.values():
                job()
            warm = True
        best: Dict[str, Run] = {}
        for _ in range(repeats):
            for name, job in jobs.items():
                r = job()
                if name not in best or r.seconds < best[name].seconds:
                    best[name] = r
        for name, r in best.items():
            tok = lm_tok if name == "mlx_lm" else tokenizer
            answer = decode_text(tok, r.tokens, *((lm_cfg, lm_stop) if name == "mlx_lm" else (cfg, stop)))
            r.text_tokens = len(tok.encode(answer, add_special_tokens=False))
            if "answer" in item:
                r.correct = score(answer, item)
            rows[name].runs.append(r)
        if cfg is not None:
            ref = best["no-foresight"].tokens
            for name in ("two-pass", "memosight"):
                if best[name].tokens != ref:
                    raise BenchError(
                        f"{name} committed other tokens than no-foresight on {item['question'][:40]!r}"
                    )
    if any(len(r.times) > 2 * WINDOW for row in rows.values() for r in row.runs):
        # long answers: how much of a pass attention takes at the KV each row holds
        for name, row in rows.items():
            m = plain[0] if name == "mlx_lm" and plain is not None else model
            row.attention = attention_shares(m, [_grid(x) for x in row.kv_by_length() if x is not None])
    return rows


# Bytes of one KV entry at the Qwen2.5-1.5B-Instruct shape (published
# config.json, kept in convert/shapes.json): keys and values, 28 layers, 2 KV
# heads of dimension 128, bfloat16.
QWEN_1_5B_ENTRY_BYTES = 2 * 28 * 2 * 128 * 2
KV_BUDGET_BYTES = 64 * 2**20


@dataclass
class BatchRun:
    """One configuration at one batch size over all prompts."""

    config: str
    batch_size: int
    tokens: List[List[int]]
    seconds: float
    peak_kv: int  # entries of every sequence in the batch together, at the fullest
    seq_peak_kv: List[int]  # per sequence, its own largest cache
    passes: int = 0
    # tokens fed to the model after the prompts, padding left out: plain decoding feeds each
    # token it generated but the last; MemoSight also feeds memory tokens, continues and drafts
    fed: int = 0
    correct: List[Optional[bool]] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def fed_per_token(self) -> float:
        return self.fed / self.generated if self.generated else 0.0

    @property
    def tps(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    def fits(self, budget: int = KV_BUDGET_BYTES, entry_bytes: int = QWEN_1_5B_ENTRY_BYTES) -> int:
        """Sequences of this run's mean largest cache that fit in the budget."""
        return int(budget // (entry_bytes * statistics.mean(self.seq_peak_kv)))


def run_mlx_lm_batched(model, prompts, max_tokens, stop_ids, batch_size) -> BatchRun:
    """Plain greedy decoding with mlx-lm's continuous batching
    (``BatchGenerator``, as ``batch_generate`` and ``mlx_lm.server`` use it)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(stop_ids)], max_tokens=max_tokens,
                         completion_batch_size=batch_size, prefill_batch_size=batch_size)
    tic = time.perf_counter()
    uids = gen.insert([list(p) for p in prompts], [max_tokens] * len(prompts))
    index = {u: i for i, u in enumerate(uids)}
    tokens = [[] for _ in prompts]
    active, peak, steps = set(), 0, 0
    try:
        while responses := gen.next_generated():
            steps += 1
            for r in responses:
                i = index[r.uid]
                tokens[i].append(int(r.token))
                active.add(i)
                if r.finish_reason is not None:
                    active.discard(i)
            peak = max(peak, sum(len(prompts[i]) + len(tokens[i]) for i in active))
    finally:
        gen.close()
    seconds = time.perf_counter() - tic
    return BatchRun("mlx_lm", batch_size, tokens, seconds, peak,
                    [len(p) + len(t) - 1 for p, t in zip(prompts, tokens)], steps,
                    fed=sum(max(len(t) - 1, 0) for t in tokens))


def run_engine_batched(model, tokenizer, prompts, max_tokens, batch_size, **kw) -> BatchRun:
    """This engine's continuous batching: at most ``batch_size`` sequences
    together, a waiting prompt joining as soon as one leaves."""
    from .generation import make_engine

    engine = make_engine(model, tokenizer, batch=True, **kw)
    tic = time.perf_counter()
    tokens, seq_peak = [[] for _ in prompts], [0] * len(prompts)
    peak = steps = fed = 0
    for results in engine.run(prompts, max_tokens, batch_size):
        for i, r in results:
            tokens[i] += [e.token for e in r.events]
            if r.finished:
                seq_peak[i] = r.stats.peak_kv_tokens
                fed += r.stats.pass_tokens
        steps += 1
        peak = max(peak, sum(engine.batch.lengths))
    seconds = time.perf_counter() - tic
    return BatchRun("memosight", batch_size, tokens, seconds, peak, seq_peak, steps, fed=fed)


def bench_batched(model_path, prompts, batch_sizes, max_tokens=256, plain_model_path=None, system=None,
                  raw_prompt=False, progress=True, **engine_options) -> List[BatchRun]:
    """At each batch size, in one run: mlx-lm's continuous batching of the
    plain model (``--plain-model``, else ``--model``) and this engine's
    batched MemoSight decoding, over every prompt."""
    from .generation import decode_text, prompt_ids
    from .loading import load_for_decoding
    from .policy import calibrate
    from .scoring import score

    model, tokenizer = load_for_decoding(model_path)
    cfg = model.memosight_config
    lm_model, lm_tok = load_for_decoding(plain_model_path) if plain_model_path is not None else (model, tokenizer)
    lm_cfg = lm_model.memosight_config
    lm_stop = stop_set(lm_tok, lm_cfg)
    stop = stop_set(tokenizer, cfg)
    texts = [item.get("prompt", item["question"]) for item in prompts]
    ids = [prompt_ids(tokenizer, t, cfg, system, raw_prompt) for t in texts]
    lm_ids = [prompt_ids(lm_tok, t, lm_cfg, system, raw_prompt) for t in texts]
    if cfg is not None:
        calibrate(model)
    # warm both paths up (graph caches, first-use allocations)
    run_mlx_lm_batched(lm_model, lm_ids[:2], 8, lm_stop, 2)
    run_engine_batched(model, tokenizer, ids[:2], 8, 2, **engine_options)
    runs = []
    sizes = sorted(set(batch_sizes))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * len(sizes), desc="bench", unit="run", file=sys.stderr)
    for bs in sizes:
        for name in ("mlx_lm", "memosight"):
            if name == "mlx_lm":
                r = run_mlx_lm_batched(lm_model, lm_ids, max_tokens, lm_stop, bs)
                tok, c, s = lm_tok, lm_cfg, lm_stop
            else:
                r = run_engine_batched(model, tokenizer, ids, max_tokens, bs, **engine_options)
                tok, c, s = tokenizer, cfg, stop
            r.correct = [score(decode_text(tok, t, c, s), item) if "answer" in item else None
                         for t, item in zip(r.tokens, prompts)]
            runs.append(r)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    ours = [r for r in runs if r.config == "memosight"]
    for r in ours[1:]:
        for i, (a, b) in enumerate(zip(ours[0].tokens, r.tokens)):
            if a != b:
                raise BenchError(f"at batch size {r.batch_size} prompt {i} ({texts[i][:40]!r}) got other "
                                 f"tokens than at batch size {ours[0].batch_size}")
    return runs


def format_batched(runs: List[BatchRun]) -> str:
    """The batched table: per batch size, mlx_lm then memosight, with
    throughput against mlx_lm at the same batch size and against the same
    configuration at the smallest batch size."""
    head = f"{'batch':>5}  {'config':<11}{'tokens':>8}{'tok/s':>9}{'vs mlx_lm':>11}{'vs smallest':>13}" \
           f"{'passes':>8}{'fed/token':>11}{'peak KV':>9}{'KV vs mlx_lm':>14}{'fit 64 MB':>11}{'accuracy':>10}"
    lines = [head, "-" * len(head)]
    first = {}
    for r in runs:
        first.setdefault(r.config, r)
    lm = {r.batch_size: r for r in runs if r.config == "mlx_lm"}
    for r in runs:
        base = lm[r.batch_size]
        known = [c for c in r.correct if c is not None]
        acc = f"{sum(known) / len(known):.1%}" if known else "-"
        lines.append(
            f"{r.batch_size:>5}  {r.config:<11}{r.generated:>8}{r.tps:>9.1f}{r.tps / base.tps:>10.2f}x"
            f"{r.tps / first[r.config].tps:>12.2f}x{r.passes:>8}{r.fed_per_token:>11.3f}"
            f"{r.peak_kv:>9}{r.peak_kv / base.peak_kv:>13.2f}x"
            f"{r.fits():>11}{acc:>10}"
        )
    lines.append(f"(vs smallest: against the same config at batch {runs[0].batch_size}; passes: steps of each tool's "
                 "batch loop; fed/token: tokens fed to the model after the prompts (memory tokens, continues "
                 "and drafts with MemoSight; padding left out) per generated token; peak KV: entries of "
                 "all sequences in the batch together at the fullest; fit 64 MB: sequences of the mean "
                 "largest cache that fit in 64 MB of KV at the Qwen2.5-1.5B shape, "
                 f"{QWEN_1_5B_ENTRY_BYTES:,} bytes an entry)")
    return "\n".join(lines)


def stop_set(tokenizer, cfg) -> set:
    """The tokens that end a model's answer: the tokenizer's EOS ids and the
    template's."""
    from .generation import stop_ids

    return set(stop_ids(tokenizer)) | ({cfg.token_ids.eos} if cfg is not None else set())


def build_parser():
    p = cli.ArgumentParser(prog="mlx_memosight.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=cli.MODEL_HELP)
    p.add_argument("--plain-model", help="a plain (SFT) model for the mlx_lm row")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a question (repeatable)")
    src.add_argument("--data", help="eval file: the reference's JSON format or JSON lines")
    p.add_argument("--limit", type=int, help="use the first N items of --data (default: all)")
    p.add_argument("--system", "--system-prompt", dest="system",
                   help="system prompt (default: the template's)")
    p.add_argument("--raw-prompt", "--ignore-chat-template", dest="raw_prompt", action="store_true",
                   help="prompts are the full text, without the model's template")
    add_arguments(p, GenerationOptions, ("max_tokens", "draft_len", "foresight_sets"), max_tokens=256)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per prompt, the fastest kept (default: %(default)s)")
    p.add_argument("--batch-size", type=int, nargs="+", metavar="N",
                   help="compare batched decoding instead: at each of these batch sizes, mlx-lm's continuous "
                   "batching of the plain model against this engine's batched MemoSight decoding")
    p.add_argument("--out", help="folder for summary.json and the PNG plots")
    return p


MAX_BATCH_SIZE = 256


def _bench_batched(args, model_path, items, describe):
    for n in args.batch_size:
        if not 1 <= n <= MAX_BATCH_SIZE:
            raise cli.UsageError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {n}")
    if args.repeats != 1:
        raise cli.UsageError("--repeats applies to the per-prompt bench, not with --batch-size")
    runs = bench_batched(model_path, items, args.batch_size, args.max_tokens, args.plain_model, args.system,
                         args.raw_prompt, draft_len=args.draft_len, foresight_sets=args.foresight_sets)
    print(f"device: {describe()}, {len(items)} prompts, max {args.max_tokens} tokens each")
    print(format_batched(runs))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [dict(config=r.config, batch_size=r.batch_size, generated_tokens=r.generated,
                     seconds=r.seconds, tokens_per_second=r.tps, peak_kv_tokens=r.peak_kv,
                     mean_sequence_peak_kv_tokens=statistics.mean(r.seq_peak_kv), steps=r.passes, fed_tokens=r.fed,
                     sequences_in_64mb_at_qwen2_5_1_5b=r.fits(),
                     accuracy=(lambda k: sum(k) / len(k) if k else None)([c for c in r.correct if c is not None]))
                for r in runs]
        payload = dict(model=str(model_path), plain_model=args.plain_model, max_tokens=args.max_tokens,
                       device=describe(), batched=rows)
        (out / "summary_batched.json").write_text(json.dumps(payload, indent=2))


def _bench(args):
    from .backend import describe, reference_blas_in_use
    from .loading import resolve_model
    from .scoring import eval_prompt, load_items

    GenerationOptions.from_args(args)
    if args.repeats < 1:
        raise cli.UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.limit is not None and args.limit < 1:
        raise cli.UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise cli.UsageError(f"--out {args.out}: is a file, not a folder")
    model_path = resolve_model(args.model)
    if args.prompt:
        items = [{"question": q} for q in args.prompt]
    else:
        items = [dict(it, prompt=eval_prompt(it))
                 for it in load_items(args.data, limit=args.limit, require_answer=False)]
    if args.batch_size:
        return _bench_batched(args, model_path, items, describe)
    rows = bench(model_path, items, args.max_tokens, args.draft_len, args.plain_model,
                 args.repeats, args.system, args.raw_prompt, foresight_sets=args.foresight_sets)
    tail = common_tail(rows)
    summaries = [r.summary(tail) for r in rows.values()]
    settings = rows["memosight"].settings if "memosight" in rows else {}
    note = (" - every token of a pass costs compute with this BLAS, so drafting cannot pay "
            "(README: Speed on Linux)") if reference_blas_in_use() else ""
    print(f"device: {describe()}" + "".join(f", {k}: {v}" for k, v in settings.items()) + note)
    print(format_table(summaries, summaries[0]["config"]))  # the mlx_lm row
    if "memosight" in rows and rows["memosight"].drafting():
        print(f"drafting in the memosight row: {rows['memosight'].drafting()}")
    if "memosight" in rows and rows["memosight"].bound():
        print(f"bound of the memosight row at this machine's pass cost: {rows['memosight'].bound()}")
    text = format_text_speed(summaries)
    if text:
        print(text)
    by_length = format_speed_by_length(rows)
    if by_length:
        print(by_length)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = dict(
            model=str(model_path),
            plain_model=args.plain_model,
            max_tokens=args.max_tokens,
            device=describe(),
            memosight_settings=settings,
            memosight_drafting=rows["memosight"].drafting() if "memosight" in rows else None,
            memosight_bound=rows["memosight"].bound() if "memosight" in rows else None,
            rows=summaries,
            kv_curves={name: [r.kv_curve for r in row.runs] for name, row in rows.items()},
            speed_window=WINDOW,
            tail_window=[tail[0] + 1, tail[1]] if tail else None,
            speed_by_length={name: row.speed_by_length() for name, row in rows.items()},
            kv_by_length={name: row.kv_by_length() for name, row in rows.items()},
            attention_share={name: row.attention for name, row in rows.items()},
        )
        (out / "summary.json").write_text(json.dumps(payload, indent=2))
        for path in write_plots(rows, out):
            print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    cli.run(build_parser(), _bench, argv)


if __name__ == "__main__":
    main()
