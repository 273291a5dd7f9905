"""The reference evaluation's prompt and scoring (SPEC section 4)."""

import json
import re
from pathlib import Path
from typing import List, Optional

from .errors import DataError

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


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})")


def _check_item(it, where: str, require_answer: bool):
    if not isinstance(it, dict):
        raise DataError(f"{where}: expected an object with 'question', found {type(it).__name__}")
    q = it.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    if "answer" in it and not isinstance(it["answer"], (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number")
    if require_answer and "answer" not in it:
        raise DataError(f"{where}: no 'answer', so the item cannot be scored")
    if "kind" in it and it["kind"] not in KINDS:
        raise DataError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, not {it['kind']!r}")
    choices = it.get("choices_list")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise DataError(f"{where}: 'choices_list' must be a list of strings")


def load_items(path, limit: Optional[int] = None, require_answer: bool = True) -> List[dict]:
    """Eval items from the reference's JSON format (a dict of subject -> list
    of items with ``question`` and ``answer``), a JSON list, or JSON lines.

    Each item gets ``kind`` (from the file name unless the item has one),
    ``subject`` and ``index``.

    Raises:
        DataError: naming the file and the item or line at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _kind_from_name(path)
    text = _read_text(path)
    rows = []  # (where, item, subject)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be an eval file")
    if isinstance(data, dict) and "question" in data:  # JSON lines with one item
        rows = [(f"{path}:1", data, "")]
    elif isinstance(data, dict):
        for subject, items in data.items():
            if not isinstance(items, list):
                raise DataError(f"{path}: subject {subject!r} is not a list of items")
            rows += [(f"{path}: subject {subject!r} item {i}", it, subject) for i, it in enumerate(items)]
    elif isinstance(data, list):
        rows = [(f"{path}: item {i}", it, "") for i, it in enumerate(data)]
    elif data is not None:
        raise DataError(f"{path}: expected a JSON object, list or JSON lines, found a "
                        f"{type(data).__name__}")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line), ""))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg.removesuffix(' at')} at column "
                                f"{e.colno})")
            except RecursionError:
                raise DataError(f"{path}:{n}: nested too deeply")
    items = []
    for i, (where, it, subject) in enumerate(rows):
        _check_item(it, where, require_answer)
        it = dict(it)
        it.setdefault("kind", kind)
        it.setdefault("subject", subject)
        it["index"] = i
        items.append(it)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DataError(f"{path}: no items")
    return items
