"""The side-by-side benchmark runs every configuration and checks losslessness."""

import json

from helpers import run_command
from mlx_memosight.bench import bench, format_table, format_text_speed, main, stop_set


def test_bench_rows_and_outputs(reasoner, tmp_path):
    path, task = reasoner
    items = [{"question": "count", "answer": "7", "kind": "exact"}, {"question": "again"}]
    rows = bench(path, items, max_tokens=30, progress=False)
    assert list(rows) == ["mlx_lm", "plain", "no-foresight", "two-pass", "memosight"]
    summaries = [r.summary() for r in rows.values()]
    by = {s["config"]: s for s in summaries}
    # mlx-lm and the engine's plain mode decode the same tokens
    assert [r.tokens for r in rows["mlx_lm"].runs] == [r.tokens for r in rows["plain"].runs]
    assert by["mlx_lm"]["passes_per_token"] == 1.0
    assert by["memosight"]["passes_per_token"] <= by["two-pass"]["passes_per_token"]
    assert by["memosight"]["accuracy"] in (0.0, 1.0)
    table = format_table(summaries, "mlx_lm")
    assert "memosight" in table and "pass/tok" in table and "KV vs base" in table
    mine = next(line for line in table.splitlines() if line.startswith("memosight"))
    kv = by["memosight"]["mean_peak_kv_tokens"] / by["mlx_lm"]["mean_peak_kv_tokens"]
    assert f"{kv:.2f}x" in mine


def test_answer_text_is_the_generated_text():
    """The bench scores and counts the text generation shows: splitters read
    as newlines, each step decoded on its own; the text encodes to fewer
    tokens than the output (no splitters), and only then is a line printed."""
    from mlx_memosight.demo import demo_model_path, heldout_items
    from mlx_memosight.generation import decode_text, generate
    from mlx_memosight.loading import load
    from mlx_memosight.scoring import eval_prompt

    model, tok = load(demo_model_path())
    cfg = model.memosight_config
    r = generate(model, tok, eval_prompt(heldout_items(1)[0]), 400)
    assert cfg.token_ids.splitter in r.token_ids
    text = decode_text(tok, r.token_ids, cfg, stop_set(tok, cfg))
    assert text == r.text
    n = len(tok.encode(text, add_special_tokens=False))
    assert n < len(r.token_ids)
    rows = [dict(config="mlx_lm", generated_tokens=n, text_tokens=n, text_tokens_per_second=100.0),
            dict(config="memosight", generated_tokens=len(r.token_ids), text_tokens=n, text_tokens_per_second=150.0)]
    assert format_text_speed(rows).endswith("mlx_lm 100.0, memosight 150.0 (1.50x)")
    assert format_text_speed([dict(rows[0]), dict(rows[0], config="plain")]) is None


def test_bench_bound_counts_the_tokens_each_pass_fed(reasoner):
    """The bound: tokens per pass over the mean pass cost (``1 + per_token *
    (k - 1)`` one-token passes for a pass of k tokens). The plain row feeds
    one token per pass (each answer's first token comes from the prefill,
    so its bound is tokens / passes whatever a token costs); a row that
    drafts feeds more."""
    from mlx_memosight.policy import PassCost

    path, _ = reasoner
    rows = bench(path, [{"question": "count"}, {"question": "again"}], max_tokens=30, progress=False,
                 draft_len=2, foresight_sets="all")
    plain, ms = rows["plain"], rows["memosight"]
    assert sum(r.pass_tokens for r in plain.runs) == sum(r.passes for r in plain.runs) == plain.tokens - 2
    passes = sum(r.passes for r in ms.runs)
    fed = sum(r.pass_tokens for r in ms.runs)
    assert fed > 2 * passes  # anchor + 2 drafts + foresight sets in most passes
    for per_token in (0.0, 0.5):
        ms.cost = plain.cost = PassCost(per_token, "given")
        want = ms.tokens / passes / ((passes + per_token * (fed - passes)) / passes)
        assert f"= {want:.2f}x plain decoding" in ms.bound()
        assert f"= {plain.tokens / (plain.tokens - 2):.2f}x plain decoding" in plain.bound()


def test_bench_cli_writes_summary_and_plots(reasoner, tmp_path, capsys):
    path, _ = reasoner
    out = tmp_path / "out"
    code, stdout, stderr = run_command(main, ["--model", path, "--prompt", "go", "--max-tokens", "20",
                                              "--out", out, "--plain-model", path], capsys)
    assert code == 0, stderr
    assert "memosight" in stdout
    # the mlx_lm row (here of the given plain model) is the base of the ratios
    assert "base: mlx_lm (plain model)" in stdout and "0.00x" not in stdout
    d = json.loads((out / "summary.json").read_text())
    assert {row["config"] for row in d["rows"]} >= {"mlx_lm (plain model)", "memosight"}
    assert all(row["text_tokens_per_second"] > 0 for row in d["rows"])
    assert (out / "kv_curve.png").stat().st_size > 1000
    assert (out / "tokens_per_second.png").stat().st_size > 1000


def test_bench_batched(tmp_path, capsys):
    """--batch-size: mlx-lm's continuous batching against this engine's at
    each size, the same tokens at every size (checked by the bench), KV
    entries of the whole batch and the sequences a 64 MB budget holds."""
    from mlx_memosight import demo
    from mlx_memosight.bench import bench_batched, format_batched
    from mlx_memosight.config import MemoSightConfig
    from mlx_memosight.demo import demo_model_path

    items = demo.heldout_items(6)
    runs = bench_batched(demo_model_path(), items, [1, 3], max_tokens=200, progress=False)
    assert [(r.config, r.batch_size) for r in runs] == [("mlx_lm", 1), ("memosight", 1), ("mlx_lm", 3),
                                                         ("memosight", 3)]
    lm1, ms1, lm3, ms3 = runs
    assert ms1.tokens == ms3.tokens and lm1.tokens == lm3.tokens
    # three answers held at once take more KV than one; MemoSight's far less than plain decoding's
    assert lm3.peak_kv > lm1.peak_kv and ms3.peak_kv > ms1.peak_kv
    assert ms3.peak_kv < 0.5 * lm3.peak_kv and ms3.fits() > lm3.fits()
    assert all(c is not None for c in ms3.correct)
    # plain decoding feeds back each token but the last; MemoSight feeds memory tokens and continues too
    assert lm1.fed == lm3.fed == sum(len(t) - 1 for t in lm3.tokens)
    splitter = MemoSightConfig.load(demo_model_path()).token_ids.splitter
    steps = sum(max(t.count(splitter) - 1, 0) for t in ms1.tokens)  # compressed, the last step aside
    assert steps >= len(items)
    for r in (ms1, ms3):  # each compressed step feeds at least one memory token and a continue (drafts: more)
        assert r.fed >= sum(len(t) - 1 for t in r.tokens) + 2 * steps and r.fed_per_token > 1.05
    table = format_batched(runs)
    assert "fit 64 MB" in table and len([x for x in table.splitlines() if "memosight" in x]) == 2
    row = next(x for x in table.splitlines() if x.split()[:2] == ["3", "memosight"]).split()
    assert int(row[6]) == ms3.passes and float(row[7]) == round(ms3.fed_per_token, 3)
    out = tmp_path / "out"
    code, stdout, stderr = run_command(main, ["--prompt", "What is 2 + 3?", "--prompt", "Add 4 and 5.",
                                              "--max-tokens", "40", "--batch-size", "2", "--out", out], capsys)
    assert code == 0, stderr
    d = json.loads((out / "summary_batched.json").read_text())
    assert [r["batch_size"] for r in d["batched"]] == [2, 2]
    code, _, stderr = run_command(main, ["--prompt", "hi", "--batch-size", "0"], capsys)
    assert code == 1 and "--batch-size must be between 1 and 256" in stderr


def test_speed_against_generated_length():
    """Windows of generated tokens after the first (which prefill gives):
    tokens over the seconds they took, over the answers that fill them; the
    tail speed over the last TAIL tokens that every row reaches, the same
    tokens for every row."""
    from mlx_memosight import bench as b

    def run(times):
        return b.Run(list(range(len(times))), times[-1], 0.0, len(times), 1, [10 + i for i in range(len(times))],
                     times=times)

    # one answer of 9 tokens at 1 s per token, one of 5 tokens at 0.5 s per token
    row = b.Row("x", runs=[run([float(i) for i in range(9)]), run([0.5 * i for i in range(5)])])
    assert row.speed_by_length(4) == [8 / 6, 4 / 4]  # window 1: both answers; window 2: the first only
    assert row.speed_by_length(3) == [6 / 4.5, 3 / 3]
    assert row.speed_between(5, 8) == 3 / 3 and row.speed_between(0, 4) == 8 / 6 and row.speed_between(0, 9) is None
    assert row.longest == 8 and row.reaching(4) == 2 and row.reaching(8) == 1
    fast = b.Row("y", runs=[run([0.25 * i for i in range(9)])])
    old = b.WINDOW, b.TAIL
    try:
        b.WINDOW, b.TAIL = 4, 5
        text = b.format_speed_by_length({"x": row, "y": fast})
        lines = text.splitlines()
        assert lines[2].split() == ["1-4", "1.3", "4.0"] and lines[3].split() == ["5-8", "1.0", "4.0"]
        assert ("tokens 4-8, the last 5 that every row reaches: x 1.0 over 1 answer (1.00x), "
                "y 4.0 over 1 answer (4.00x)") in text
        # KV at each window's end (token 4: both answers, token 8: the first only)
        assert lines[-2].split() == ["1-4", "14", "14"] and lines[-1].split() == ["5-8", "18", "18"]
        # a row without answers that long: no tail line
        short = b.Row("s", runs=[run([0.5 * i for i in range(5)])])
        assert b.common_tail({"s": short, "y": fast}) is None
        assert "every row reaches" not in b.format_speed_by_length({"s": short, "y": fast})
        # rows of different lengths are compared where both are: a row that slows down after token 4
        # is not judged by its slow end against the other row's early tokens
        slowing = b.Row("z", runs=[run([0.25 * i for i in range(5)] + [1.0 + i for i in range(1, 5)])])
        assert b.common_tail({"s": short, "z": slowing}, 3) == (1, 4)
        b.TAIL = 3
        text = b.format_speed_by_length({"s": short, "z": slowing})
        assert ("tokens 2-4, the last 3 that every row reaches: s 2.0 over 1 answer (1.00x), "
                "z 4.0 over 1 answer (2.00x)") in text
        assert short.summary((1, 4))["tail_tokens_per_second"] == 2.0 and slowing.summary((1, 4))["tail_answers"] == 1
        assert slowing.summary((1, 4))["tail_tokens_per_second"] == 4.0 and slowing.summary()["tail_answers"] is None
        # tail tokens that took no time (all from one pass): shown as "-", no ratio
        still = b.Row("w", runs=[run([0.0] * 9)])
        assert "s 2.0 over 1 answer (1.00x), w - over 1 answer" in b.format_speed_by_length({"s": short, "w": still})
        b.WINDOW = 8
        assert b.format_speed_by_length({"x": row}) is None  # no answer fills two windows
    finally:
        b.WINDOW, b.TAIL = old


def test_bench_cli_prints_and_plots_speed_by_length(reasoner, tmp_path, capsys, monkeypatch):
    from mlx_memosight import bench as b

    monkeypatch.setattr(b, "WINDOW", 8)
    monkeypatch.setattr(b, "TAIL", 12)
    path, _ = reasoner
    out = tmp_path / "out"
    code, stdout, stderr = run_command(main, ["--model", path, "--prompt", "go", "--max-tokens", "30",
                                              "--out", out], capsys)
    assert code == 0, stderr
    assert "tokens/s by generated length (windows of 8 tokens" in stdout
    assert "the last 12 that every row reaches: mlx_lm" in stdout
    kv_table = stdout[stdout.index("KV entries at the end of each window"):].splitlines()
    first = kv_table[2].split()
    assert first[0] == "1-8" and first[1].isdigit() and first[2].startswith("(") and first[2].endswith("%)")
    d = json.loads((out / "summary.json").read_text())
    assert d["speed_window"] == 8 and len(d["speed_by_length"]["memosight"]) >= 2
    assert all(r["tail_tokens_per_second"] > 0 and r["tail_answers"] >= 1 for r in d["rows"])
    low, high = d["tail_window"]
    assert high - low == 11 and high == min(r["generated_tokens"] for r in d["rows"]) - 1  # one prompt: the shortest
    shares = d["attention_share"]["memosight"]
    assert shares and all(0 <= v < 1 for v in shares.values())
    # plain decoding holds every token: its KV grows by the window each time
    plain = d["kv_by_length"]["plain"]
    assert plain[1] - plain[0] == 8
    assert (out / "speed_by_length.png").stat().st_size > 1000
