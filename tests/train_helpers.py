"""Tiny model folders and reasoning data for the training tests."""

import json
from pathlib import Path

from helpers import hf_model, make_bpe_tokenizer, save_hf_model


def make_base_model(path, family="qwen2", seed=0, extra_rows=0, **kw) -> Path:
    """A plain base model folder (no MemoSight tokens) with a small BPE
    tokenizer that has ChatML tokens; ``extra_rows`` pads the embedding beyond
    the tokenizer, as Qwen checkpoints do."""
    path = Path(path)
    tok = make_bpe_tokenizer(path)
    save_hf_model(hf_model(family, len(tok) + extra_rows, seed=seed, **kw), path)
    return path


def record(i):
    a, b = i % 7 + 1, i % 5 + 2
    return {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "system_prompt": "Solve the problem step by step.",
        "gt_output": f"First, {a} + {b} = {a + b}.\n\nSo Tom has {a + b} apples.\n\n"
                     f"The answer is \\boxed{{{a + b}}}.",
    }


def chat(i):
    r = record(i)
    return {"messages": [
        {"role": "system", "content": r["system_prompt"]},
        {"role": "user", "content": r["question"]},
        {"role": "assistant", "content": r["gt_output"]},
    ]}


def write_jsonl(path, rows):
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return Path(path)


def make_data(path, n_train=24, n_valid=8) -> Path:
    """``train.jsonl`` in the reference's format, ``valid.jsonl`` as chat records."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "train.jsonl", [record(i) for i in range(n_train)])
    write_jsonl(path / "valid.jsonl", [chat(i) for i in range(n_train, n_train + n_valid)])
    return path
