"""Evaluate a model on an eval set: ``python -m mlx_memosight.evaluate``.

    mlx_memosight.evaluate --model PATH --data FILE [--limit N] [--out FILE]
        [--max-tokens N] [--repetition-penalty X] [--no-foresight] [--no-compress]
        [--draft-len G]

Each item is asked with the reference evaluation's prompt and scored by its
rules (:mod:`mlx_memosight.scoring`). Per-item results go to ``--out`` as JSON
lines, one line per item as soon as it is done, so an interrupted run leaves
a valid file and rerunning with the same ``--out`` continues where it
stopped. A summary follows: accuracy, output tokens, peak KV entries,
compress events, draft acceptance and wall time.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import cli
from .errors import EvaluateError
from .options import GenerationOptions, add_arguments
from .scoring import eval_prompt, extract_boxed, gold_answer, load_items, score

DEFAULT_MAX_TOKENS = 1024
# What each per-item record keeps of the generation's statistics.
RECORD_STATS = ("peak_kv_tokens", "plain_kv_tokens", "compress_events", "forward_passes",
                "drafted_tokens", "accepted_draft_tokens", "finish_reason")
# Settings that change the generated text; a results file holds one setting.
SETTINGS = ("max_tokens", "repetition_penalty", "foresight", "compress", "draft_len", "system")




def item_id(item: dict) -> str:
    """A stable id of an item within its eval file."""
    subject = item.get("subject") or ""
    return f"{subject}/{item['index']}" if subject else str(item["index"])


def read_results(path: Path) -> List[dict]:
    """The records already in a results file.

    A last line cut short (a run killed while writing it) is dropped from
    the file with a notice; any other bad line is an error naming it.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good_bytes = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not a result record")
        except ValueError as e:
            if n == len(lines):  # no newline after it: an unfinished write
                print(f"notice: {path}:{n}: dropping an incomplete last line", file=sys.stderr)
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise EvaluateError(f"{path}:{n}: not a result line ({e}); use another out=FILE")
        records.append(rec)
        good_bytes += len(line) + 1
    return records


def check_resumable(records: List[dict], items: Dict[str, dict], settings: dict, path: Path):
    """Refuse to continue a results file made from other items or settings."""
    for rec in records:
        item = items.get(rec["id"])
        if item is not None and rec.get("question") != item["question"]:
            raise EvaluateError(
                f"{path}: holds results of another eval file (item {rec['id']} has another "
                f"question); use another out=FILE"
            )
        old = rec.get("settings", {})
        diff = [k for k in SETTINGS if k in old and old[k] != settings[k]]
        if diff:
            raise EvaluateError(
                f"{path}: was written with other settings ({', '.join(f'{k}={old[k]!r}' for k in diff)}); "
                f"use another out=FILE"
            )


def evaluate_item(model, tokenizer, item: dict, settings: dict) -> dict:
    """Generate an answer to one item and score it."""
    from .generation import generate, special_ids

    options = _options(settings)
    tic = time.perf_counter()
    result = generate(
        model, tokenizer, eval_prompt(item), options.max_tokens, system=settings["system"],
        logits_processors=options.logits_processors(special_ids(tokenizer)), **options.engine_options(),
    )
    return make_record(item, result.text, result.stats, time.perf_counter() - tic, settings, tokenizer)


def _options(settings: dict) -> GenerationOptions:
    return GenerationOptions(max_tokens=settings["max_tokens"], draft_len=settings["draft_len"],
                             foresight=settings["foresight"], compress=settings["compress"],
                             repetition_penalty=settings["repetition_penalty"])


def make_record(item: dict, text: str, stats, wall: float, settings: dict, tokenizer) -> dict:
    """The result record of one item. ``text_kv_tokens``: what plain decoding
    of the same text would hold at its end, the prompt plus the answer text as
    the tokenizer encodes it (plus the end of sequence, where the answer
    ended on one, as ``plain_kv_tokens`` counts it). MemoSight's own output
    has more tokens than that text (each step's splitter, and the tokens a
    step boundary adds), and ``plain_kv_tokens`` counts them; a plain model
    writing this text would not."""
    st = stats.to_dict()
    text_tokens = len(tokenizer.encode(text, add_special_tokens=False)) + (st["finish_reason"] == "stop")
    return dict(
        id=item_id(item),
        subject=item.get("subject", ""),
        question=item["question"],
        answer=gold_answer(item),
        prediction=extract_boxed(text),
        correct=bool(score(text, item)),
        output_tokens=st["generated_tokens"],
        **{k: st[k] for k in RECORD_STATS},
        text_kv_tokens=st["prompt_tokens"] + text_tokens,
        wall_time=round(wall, 4),
        generation_tps=round(st["generation_tps"], 2),
        output=text,
        settings=settings,
    )


def evaluate_batched(model, tokenizer, items: List[dict], settings: dict, batch_size: int):
    """Yield the record of every item, decoded ``batch_size`` at a time in
    one batch (:class:`mlx_memosight.engine.BatchEngine`), in the order they
    finish; each item's text is what :func:`evaluate_item` gives it."""
    from .generation import TextStream, make_engine, prompt_ids, special_ids

    cfg = model.memosight_config
    options = _options(settings)
    engine = make_engine(model, tokenizer, logits_processors=options.logits_processors(special_ids(tokenizer)),
                         batch=True, **options.engine_options())
    ids = [prompt_ids(tokenizer, eval_prompt(item), cfg, settings["system"]) for item in items]
    texts = {}  # prompt index -> (text stream, pieces)
    for results in engine.run(ids, options.max_tokens, batch_size):
        for i, r in results:
            if i not in texts:
                texts[i] = (TextStream(tokenizer, cfg, engine.stop_ids), [])
            text, pieces = texts[i]
            for event in r.events:
                out = text.feed(event, r.stats)
                if out is not None:
                    pieces.append(out.text)
            if r.finished:
                del texts[i]
                last = text.finish(r.stats)
                pieces.append(last.text if last is not None else "")
                # a sequence's time: its prefill, then its decoding in the batch
                wall = r.stats.prompt_time + r.stats.generation_time
                yield make_record(items[i], "".join(pieces), r.stats, wall, settings, tokenizer)


def summarize(records: List[dict], wall: Optional[float] = None) -> dict:
    """Totals and means over result records; ``wall``: the time they took
    together (items decoded in a batch overlap), else the sum of theirs."""
    n = len(records)
    if not n:
        return dict(items=0)
    drafted = sum(r["drafted_tokens"] for r in records)
    tokens = sum(r["output_tokens"] for r in records)
    wall = sum(r["wall_time"] for r in records) if wall is None else wall
    # records written before text_kv_tokens existed lack it: then no text figure
    vs_text = [r["peak_kv_tokens"] / max(1, r["text_kv_tokens"]) for r in records if "text_kv_tokens" in r]
    vs_text = vs_text if len(vs_text) == n else None
    return dict(
        items=n,
        accuracy=sum(r["correct"] for r in records) / n,
        output_tokens=tokens,
        mean_output_tokens=tokens / n,
        mean_peak_kv_tokens=statistics.mean(r["peak_kv_tokens"] for r in records),
        max_peak_kv_tokens=max(r["peak_kv_tokens"] for r in records),
        peak_kv_vs_plain=statistics.mean(r["peak_kv_tokens"] / max(1, r["plain_kv_tokens"]) for r in records),
        max_peak_kv_vs_plain=max(r["peak_kv_tokens"] / max(1, r["plain_kv_tokens"]) for r in records),
        peak_kv_vs_text=statistics.mean(vs_text) if vs_text else None,
        max_peak_kv_vs_text=max(vs_text) if vs_text else None,
        compress_events=sum(r["compress_events"] for r in records),
        drafted_tokens=drafted,
        accepted_draft_tokens=sum(r["accepted_draft_tokens"] for r in records),
        acceptance=(sum(r["accepted_draft_tokens"] for r in records) / drafted) if drafted else None,
        wall_time=wall,
        tokens_per_second=tokens / wall if wall else 0.0,
    )


def format_summary(s: dict) -> str:
    if not s["items"]:
        return "no items evaluated"
    acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.0%} of {s['drafted_tokens']} drafted"
    text = "" if s["peak_kv_vs_text"] is None else (
        f"; {s['peak_kv_vs_text']:.1%} of plain decoding of the same text (largest {s['max_peak_kv_vs_text']:.1%})")
    return "\n".join([
        f"Accuracy: {s['accuracy']:.1%} ({round(s['accuracy'] * s['items'])}/{s['items']})",
        f"Output tokens: {s['output_tokens']} ({s['mean_output_tokens']:.1f} per item)",
        f"Peak KV entries: {s['mean_peak_kv_tokens']:.1f} per item (largest {s['max_peak_kv_tokens']}), "
        f"{s['peak_kv_vs_plain']:.1%} of plain decoding's (largest {s['max_peak_kv_vs_plain']:.1%}){text}",
        f"Compress events: {s['compress_events']} ({s['compress_events'] / s['items']:.1f} per item)",
        f"Drafts accepted: {acc}",
        f"Wall time: {s['wall_time']:.1f} s ({s['tokens_per_second']:.1f} output tokens/s)",
    ])


def run(args) -> dict:
    """Evaluate as the command line asks; returns the summary."""
    from .loading import load_for_decoding, resolve_model
    from .outputs import check_writable

    if args.limit is not None and args.limit < 1:
        raise EvaluateError(f"limit must be at least 1, got {args.limit}", "limit")
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise EvaluateError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {args.batch_size}",
                            "batch_size")
    GenerationOptions.from_args(args)
    items = load_items(args.data, limit=args.limit)
    by_id = {item_id(it): it for it in items}
    settings = dict(
        max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
        foresight=args.foresight, compress=args.compress, draft_len=args.draft_len,
        system=args.system,
    )
    out = Path(args.out) if args.out else None
    if out is not None:
        check_writable(out, "out")
    done: Dict[str, dict] = {}
    if out is not None:
        records = read_results(out)
        check_resumable(records, by_id, settings, out)
        done = {r["id"]: r for r in records if r["id"] in by_id}
    todo = [it for it in items if item_id(it) not in done]
    if done:
        print(f"{out}: {len(done)} of {len(items)} items already evaluated; continuing", file=sys.stderr)

    model_path = resolve_model(args.model)
    model, tokenizer = load_for_decoding(model_path)
    if model.memosight_config is None:
        print(f"notice: {model_path} has no MemoSight configuration; running plain decoding",
              file=sys.stderr)
    results = list(done.values())
    wall = sum(r["wall_time"] for r in results)
    if todo:
        from tqdm import tqdm

        f = open(out, "a", encoding="utf-8") if out is not None else None
        bar = tqdm(total=len(todo), desc="evaluate", unit="item", file=sys.stderr)
        if args.batch_size > 1:
            records = evaluate_batched(model, tokenizer, todo, settings, args.batch_size)
        else:
            records = (evaluate_item(model, tokenizer, item, settings) for item in todo)
        tic = time.perf_counter()
        try:
            for rec in records:
                bar.update(1)
                results.append(rec)
                if f is not None:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                bar.set_postfix_str(f"{sum(r['correct'] for r in results)}/{len(results)} correct")
        finally:
            bar.close()
            if f is not None:
                f.close()
        wall += time.perf_counter() - tic
    order = {item_id(it): i for i, it in enumerate(items)}
    results.sort(key=lambda r: order[r["id"]])
    return summarize(results, wall)


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.evaluate",
        description="Evaluate a model on an eval set with the reference's prompt and scoring.",
    )
    p.add_argument("--model", help=cli.MODEL_HELP)
    p.add_argument("--data", required=True,
                   help="eval file: the reference's JSON format (subject -> items) or JSON lines")
    p.add_argument("--limit", type=int, help="evaluate the first N items (default: all)")
    p.add_argument("--out", help="per-item results (JSON lines); rerunning with it continues")
    add_arguments(p, GenerationOptions, ("max_tokens", "repetition_penalty", "foresight", "compress",
                                         "draft_len"), max_tokens=DEFAULT_MAX_TOKENS)
    p.add_argument("--system", "--system-prompt", dest="system",
                   help="system prompt (default: the model's template's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="items decoded together in one batch; the answers are the same at any batch size "
                   "(default: %(default)s)")
    return p


MAX_BATCH_SIZE = 256


def _evaluate(args):
    try:
        summary = run(args)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"rerun with --out {args.out} to continue" if args.out else "")
    print(format_summary(summary))


def main(argv=None):
    cli.run(build_parser(), _evaluate, argv)


if __name__ == "__main__":
    main()
