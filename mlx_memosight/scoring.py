"""The reference evaluation's prompt and scoring (SPEC section 4)."""

import json
import re
from pathlib import Path
from typing import List, Optional

from .config import ConfigError

PROMPT_PREFIX = "Return your final response within \\boxed{}. "
KINDS = ("gsm8k", "mmlu", "gpqa", "bbh", "exact")


def eval_prompt(item: dict) -> str:
    """The question as the reference evaluation asks it."""
    return PROMPT_PREFIX + item["question"]


def extract_boxed(text: str) -> str:
    """The content of the last balanced ``\\boxed{...}``, or ``"error"``."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth == 0:
            return text[i : j - 1]
        start = text.rfind("\\boxed{", 0, start)
    return "error"


def gold_answer(item: dict) -> str:
    """The reference answer; GSM8K keeps the number after ``####``."""
    answer = str(item.get("answer", ""))
    if "####" in answer:
        answer = answer.split("####")[-1]
    return answer.strip()


def _letter(s: str) -> Optional[str]:
    m = re.fullmatch(r"\(?([A-Z])\)?", s.strip())
    return m.group(1) if m else None


def score(output: str, item: dict) -> bool:
    """Whether an output answers ``item`` correctly, by the item's kind."""
    pred = extract_boxed(output)
    if pred == "error":
        return False
    kind = item.get("kind", "exact")
    gold = gold_answer(item)
    if kind == "gsm8k":
        norm = lambda s: s.lower().replace(",", "").strip()  # noqa: E731
        return norm(pred) == norm(gold)
    if kind in ("mmlu", "gpqa"):
        letter = _letter(gold) or gold.strip()
        choices = item.get("choices_list") or []
        full = None
        if len(letter) == 1 and choices and 0 <= ord(letter) - ord("A") < len(choices):
            full = f"{letter}. {choices[ord(letter) - ord('A')]}"
        p = pred.strip()
        return p == letter or _letter(p) == letter or (full is not None and p == full)
    if kind == "bbh":
        if pred.strip().lower() == gold.lower():
            return True
        g = _letter(gold)
        return g is not None and _letter(pred) == g
    return pred.strip().lower() == gold.lower()


def _kind_from_name(path: Path) -> str:
    name = path.name.lower()
    for kind in ("gsm8k", "mmlu", "gpqa", "bbh"):
        if kind in name:
            return kind
    return "exact"


def load_items(path, limit: Optional[int] = None) -> List[dict]:
    """Eval items from the reference's JSON format (a dict of subject -> list
    of items with ``question`` and ``answer``) or JSON lines.

    Each item gets ``kind`` (from the file name unless the item has one),
    ``subject`` and ``index``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    kind = _kind_from_name(path)
    text = path.read_text()
    items = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "question" in data:  # JSON lines with one item
        items = [data]
    elif isinstance(data, dict):
        for subject, rows in data.items():
            if not isinstance(rows, list):
                raise ConfigError(f"{path}: subject {subject!r} is not a list of items")
            for row in rows:
                items.append(dict(row, subject=subject))
    elif isinstance(data, list):
        items = [dict(r) for r in data]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "question" not in it:
            raise ConfigError(f"{path}: item {i} has no 'question'")
        it.setdefault("kind", kind)
        it.setdefault("subject", "")
        it["index"] = i
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ConfigError(f"{path}: no items")
    return items
