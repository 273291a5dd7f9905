"""MemoSight configuration: special tokens, templates and ``memosight.json``.

A MemoSight model is an ordinary Qwen2 / Llama model whose tokenizer has the
MemoSight special tokens. Everything the decoder and the trainer need beyond
the weights lives in ``memosight.json`` beside ``config.json``.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ConfigError

CONFIG_FILE = "memosight.json"
FORMAT_VERSION = 1

SPLITTER = "<|splitter|>"
CONTINUE = "<|continue|>"
RECOVER = "<|recover|>"
FORESIGHT = "<|register|>"
DOUBLE_NEWLINE = "\n\n"
MAX_MEMORY_TOKENS = 300


def memory_token(i: int) -> str:
    return f"<|o_{i}|>"


# The tokens MemoSight adds to a base tokenizer, in order, with the description
# whose mean embedding initialises each new row (SPEC section 1).
SPECIAL_TOKENS: List[tuple] = [
    (SPLITTER, "\n\n"),
    (CONTINUE, "continue to output according to previous content"),
    (RECOVER, "recover the token according to previous content"),
    ("<|begin_of_thought|>", "begin of thought"),
    ("<|end_of_thought|>", "end of thought"),
    ("<|begin_of_solution|>", "begin of solution"),
    ("<|end_of_solution|>", "end of solution"),
    (DOUBLE_NEWLINE, "\n\n"),
    (FORESIGHT, "predict the future token"),
] + [(memory_token(i), f"compress output {i}") for i in range(MAX_MEMORY_TOKENS)]

BESPOKE_SYSTEM_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a "
    "systematic long thinking process before providing the final precise and accurate "
    "solutions. This requires engaging in a comprehensive cycle of analysis, "
    "summarizing, exploration, reassessment, reflection, backtracing, and iteration to "
    "develop well-considered thinking process. Please structure your response into two "
    "main sections: Thought and Solution. In the Thought section, detail your reasoning "
    "process using the specified format: <|begin_of_thought|> {thought with steps "
    "separated with '\\n\\n'} <|end_of_thought|> Each step should include detailed "
    "considerations such as analisying questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any "
    "errors, and revisiting previous steps. In the Solution section, based on various "
    "attempts, explorations, and reflections from the Thought section, systematically "
    "present the final solution that you deem correct. The solution should remain a "
    "logical, accurate, concise expression style and detail necessary step needed to "
    "reach the conclusion, formatted as follows: <|begin_of_solution|> {final formatted, "
    "precise, and clear solution} <|end_of_solution|> Now, try to solve the following "
    "question through the above guidelines:"
)


def _non_finite(value, where: str = "") -> Optional[str]:
    """The dotted key of the first NaN or infinite number in parsed JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the top level"
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        found = _non_finite(v, key)
        if found:
            return found
    return None


def read_json(path, error=ConfigError, expect=dict):
    """A JSON file the user gave, as Python values.

    Raises:
        ``error`` (a :class:`MemoSightError` type), naming the file: missing,
        unreadable, not UTF-8, not JSON, nested too deeply, holding NaN or
        infinite numbers (Python's parser accepts them, JSON does not), or not
        of the type ``expect``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found")
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno} "
                    f"column {e.colno})")
    except RecursionError:
        raise error(f"{path}: nested too deeply")
    bad = _non_finite(value)
    if bad:
        raise error(f"{path}: {bad} is NaN or infinite, which is not a JSON number")
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                    f"found {type(value).__name__}")
    return value


@dataclass
class Template:
    """A prompt template: ``prompt`` is formatted with ``bos``, ``system`` and
    ``question``; generation stops at ``eos``."""

    name: str
    prompt: str
    bos: Optional[str]
    eos: str
    system: str = BESPOKE_SYSTEM_PROMPT

    def render(self, question: str, system: Optional[str] = None) -> str:
        return self.prompt.format(
            bos=self.bos or "",
            system=self.system if system is None else system,
            question=question,
        )


TEMPLATES: Dict[str, Template] = {
    "qwen": Template(
        name="qwen",
        prompt="{bos}system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n",
        bos="<|im_start|>",
        eos="<|im_end|>",
    ),
    "llama3": Template(
        name="llama3",
        prompt="{bos}<|start_header_id|>system<|end_header_id|>\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n{question}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
    ),
    # For tokenizers without chat tokens (SentencePiece models, the demo model);
    # bos / eos are the tokenizer's own.
    "plain": Template(
        name="plain",
        prompt="{bos}{system}\n\nQuestion: {question}\n\nAnswer:\n",
        bos=None,
        eos="</s>",
        system="Solve the problem step by step.",
    ),
}

# The reference's settings per model family (SPEC section 1).
FAMILY_DEFAULTS = {
    "qwen2": dict(template="qwen", compression_ratio=6, max_offset=2, lm_loss_weight=0.7, mtp_loss_weight=0.3),
    "llama": dict(template="llama3", compression_ratio=5, max_offset=3, lm_loss_weight=1.0, mtp_loss_weight=0.3),
    # Qwen3 speaks ChatML as Qwen2 does; the reference has no Qwen3 setting, so Qwen's apply
    "qwen3": dict(template="qwen", compression_ratio=6, max_offset=2, lm_loss_weight=0.7, mtp_loss_weight=0.3),
}
SUPPORTED_FAMILIES = tuple(FAMILY_DEFAULTS)
DEFAULT_DRAFT_LEN = 2
MAX_DRAFT_LEN = 16
# Keys of a checkpoint's config.json that the reference adds.
CHECKPOINT_EXTRA_KEYS = ("lm_loss_weight", "mtp_loss_weight", "max_offset")




@dataclass
class TokenIds:
    splitter: int
    continue_: int
    foresight: int
    memory: List[int]
    eos: int
    bos: Optional[int] = None

    def to_dict(self) -> dict:
        return {
            "splitter": self.splitter,
            "continue": self.continue_,
            "foresight": self.foresight,
            "memory": list(self.memory),
            "eos": self.eos,
            "bos": self.bos,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG_FILE) -> "TokenIds":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: token_ids must be an object")
        for key in ("splitter", "continue", "foresight", "memory", "eos"):
            if key not in d:
                raise ConfigError(f"{source}: token_ids is missing the key {key!r}")
        memory = d["memory"]
        if not isinstance(memory, list) or not memory:
            raise ConfigError(f"{source}: token_ids.memory must be a non-empty list of ids")
        return cls(
            splitter=_id(d["splitter"], "splitter", source),
            continue_=_id(d["continue"], "continue", source),
            foresight=_id(d["foresight"], "foresight", source),
            memory=[_id(i, f"memory[{k}]", source) for k, i in enumerate(memory)],
            eos=_id(d["eos"], "eos", source),
            bos=None if d.get("bos") is None else _id(d["bos"], "bos", source),
        )


def _id(value, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: token_ids.{key} must be a token id (an integer >= 0), "
                          f"not {value!r}"[:200])
    return value


def _template(t, source: str) -> "Template":
    if isinstance(t, str):
        if t not in TEMPLATES:
            raise ConfigError(f"{source}: unknown template {t!r} (known: {', '.join(TEMPLATES)})"[:200])
        return TEMPLATES[t]
    if not isinstance(t, dict):
        raise ConfigError(f"{source}: template must be a name or an object")
    names = {f.name for f in fields(Template)}
    if set(t) - names or not {"name", "prompt", "eos"} <= set(t):
        raise ConfigError(f"{source}: template takes {', '.join(sorted(names))} (name, prompt and "
                          "eos required)")
    for key, value in t.items():
        if not (isinstance(value, str) or (key == "bos" and value is None)):
            raise ConfigError(f"{source}: template.{key} must be a string")
    template = Template(**{"bos": None, **t})
    try:
        template.render("question", "system")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{source}: template.prompt is not a template of bos, system and question "
                          f"({type(e).__name__}: {e})"[:300])
    if "{question}" not in template.prompt:
        raise ConfigError(f"{source}: template.prompt has no {{question}}")
    return template


@dataclass
class MemoSightConfig:
    """What ``memosight.json`` records. Field names are the file's keys."""

    token_ids: TokenIds
    template: Template
    compression_ratio: int = 6
    max_offset: int = 2
    draft_len: int = DEFAULT_DRAFT_LEN
    max_memory_tokens: int = MAX_MEMORY_TOKENS
    lm_loss_weight: float = 0.7
    mtp_loss_weight: float = 0.3
    model_family: str = "qwen2"
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def memory_count(self, n_tokens: int) -> int:
        """Number of memory tokens for a step of ``n_tokens`` tokens."""
        return memory_count(n_tokens, self.compression_ratio, self.max_memory_tokens)

    def to_dict(self) -> dict:
        d = {
            "format_version": self.format_version,
            "model_family": self.model_family,
            "compression_ratio": self.compression_ratio,
            "max_offset": self.max_offset,
            "draft_len": self.draft_len,
            "max_memory_tokens": self.max_memory_tokens,
            "lm_loss_weight": self.lm_loss_weight,
            "mtp_loss_weight": self.mtp_loss_weight,
            "template": asdict(self.template),
            "token_ids": self.token_ids.to_dict(),
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG_FILE) -> "MemoSightConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        for key in ("token_ids", "template", "compression_ratio"):
            if key not in d:
                raise ConfigError(f"{source}: missing key {key!r}")
        token_ids = TokenIds.from_dict(d["token_ids"], source)
        template = _template(d["template"], source)
        known = {f.name for f in fields(cls)} - {"token_ids", "template", "extra"}
        kwargs = {k: d[k] for k in known if k in d}
        extra = {k: v for k, v in d.items() if k not in known | {"token_ids", "template"}}
        cfg = cls(token_ids=token_ids, template=template, extra=extra, **kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = CONFIG_FILE):
        def integer(key, low, high=None):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                limit = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ConfigError(f"{source}: {key} must be an integer {limit}, not {v!r}"[:200])

        integer("compression_ratio", 1)
        integer("max_offset", 0)
        integer("draft_len", 0, MAX_DRAFT_LEN)
        integer("format_version", 1)
        integer("max_memory_tokens", 1, len(self.token_ids.memory))
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {self.format_version} is newer than this "
                              f"version of mlx-memosight reads ({FORMAT_VERSION}); upgrade it")
        for key in ("lm_loss_weight", "mtp_loss_weight"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{source}: {key} must be a number >= 0, not {v!r}"[:200])
        if self.model_family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"{source}: model_family {self.model_family!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_FAMILIES)})"[:200])

    def save(self, model_dir) -> Path:
        path = Path(model_dir) / CONFIG_FILE
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path

    @classmethod
    def load(cls, model_dir) -> Optional["MemoSightConfig"]:
        """The configuration beside a model, or None when there is none."""
        path = Path(model_dir) / CONFIG_FILE
        if not path.exists():
            return None
        d = read_json(path)
        return cls.from_dict(d, str(path))


def memory_count(n_tokens: int, compression_ratio: int, max_memory: int = MAX_MEMORY_TOKENS) -> int:
    """``m = min(max_memory, max(1, ceil(n / r)))`` (SPEC section 2)."""
    return min(max_memory, max(1, math.ceil(n_tokens / compression_ratio)))


def _token_id(tokenizer, token: str) -> Optional[int]:
    """The id a tokenizer maps ``token`` to, or None when it is unknown.

    ``convert_tokens_to_ids`` returns the unknown-token id for unknown tokens in
    SentencePiece tokenizers; that counts as unknown here.
    """
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None):
        return None
    return int(tid)


def missing_special_tokens(tokenizer) -> List[str]:
    return [t for t, _ in SPECIAL_TOKENS if _token_id(tokenizer, t) is None]


def add_memosight_tokens(tokenizer) -> List[tuple]:
    """Add the MemoSight tokens the tokenizer lacks, in SPEC order.

    Returns the ``(token, description)`` pairs that were added, in the order
    they were added (their ids follow the base vocabulary in this order).
    """
    added = [(t, d) for t, d in SPECIAL_TOKENS if _token_id(tokenizer, t) is None]
    if added:
        n = tokenizer.add_tokens([t for t, _ in added], special_tokens=True)
        if n != len(added):
            raise ConfigError(f"tokenizer accepted {n} of {len(added)} MemoSight tokens")
    return added


def description_ids(tokenizer, description: str) -> List[int]:
    """Token ids whose mean embedding initialises a new token's row."""
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(description))
    return [int(i) for i in ids]


def has_memosight_tokens(tokenizer) -> bool:
    return all(
        _token_id(tokenizer, t) is not None
        for t in (SPLITTER, CONTINUE, FORESIGHT, memory_token(0))
    )


def normalize_model_type(model_type: Optional[str]) -> str:
    if model_type not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    return model_type


def template_named(name: str, tokenizer) -> Template:
    """A prompt template by name; ``plain`` takes the tokenizer's own BOS / EOS."""
    if name not in TEMPLATES:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATES)}, not {name!r}", "template")
    t = TEMPLATES[name]
    if name == "plain":
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ConfigError("template=plain needs an EOS token, and the tokenizer has none",
                              "template")
        t = replace(t, bos=getattr(tokenizer, "bos_token", None), eos=eos)
    return t


def default_template(model_type: str, tokenizer) -> Template:
    """The family's template when the tokenizer has its chat tokens, else the
    plain template with the tokenizer's own BOS / EOS."""
    t = TEMPLATES[FAMILY_DEFAULTS[model_type]["template"]]
    if _token_id(tokenizer, t.eos) is not None and (
        t.bos is None or _token_id(tokenizer, t.bos) is not None
    ):
        return t
    if getattr(tokenizer, "eos_token", None) is None:
        raise ConfigError("tokenizer has neither chat tokens nor an EOS token")
    return template_named("plain", tokenizer)


def build_config(
    tokenizer,
    model_type: str,
    hf_config: Optional[dict] = None,
    template: Optional[Template] = None,
    **overrides,
) -> MemoSightConfig:
    """Detect the MemoSight token ids of a tokenizer and fill the rest from the
    family defaults, the checkpoint's ``config.json`` extra keys and
    ``overrides`` (in increasing priority).

    Raises:
        ConfigError: when the tokenizer lacks the MemoSight tokens.
    """
    model_type = normalize_model_type(model_type)
    missing = [t for t in (SPLITTER, CONTINUE, FORESIGHT) if _token_id(tokenizer, t) is None]
    if missing:
        raise ConfigError(f"tokenizer has no MemoSight tokens ({', '.join(missing)} missing)")
    memory = []
    for i in range(MAX_MEMORY_TOKENS):
        tid = _token_id(tokenizer, memory_token(i))
        if tid is None:
            break
        memory.append(tid)
    if not memory:
        raise ConfigError(f"tokenizer has no memory tokens ({memory_token(0)} missing)")

    values = {k: v for k, v in FAMILY_DEFAULTS[model_type].items() if k != "template"}
    for key in CHECKPOINT_EXTRA_KEYS:
        if hf_config and key in hf_config:
            values[key] = hf_config[key]
    values.update({k: v for k, v in overrides.items() if v is not None})

    template = template or default_template(model_type, tokenizer)
    eos = _token_id(tokenizer, template.eos)
    if eos is None:
        raise ConfigError(f"tokenizer has no id for the template's EOS {template.eos!r}")
    bos = None if template.bos is None else _token_id(tokenizer, template.bos)
    if template.bos is not None and bos is None:
        raise ConfigError(f"tokenizer has no id for the template's BOS {template.bos!r}")
    cfg = MemoSightConfig(
        token_ids=TokenIds(
            splitter=_token_id(tokenizer, SPLITTER),
            continue_=_token_id(tokenizer, CONTINUE),
            foresight=_token_id(tokenizer, FORESIGHT),
            memory=memory,
            eos=eos,
            bos=bos,
        ),
        template=template,
        max_memory_tokens=values.pop("max_memory_tokens", len(memory)),
        model_family=model_type,
        **values,
    )
    cfg.validate("configuration")
    return cfg


# The memosight.json values that can be chosen on purpose; a new template
# keeps them.
TUNABLE_KEYS = ("compression_ratio", "max_offset", "lm_loss_weight", "mtp_loss_weight", "draft_len")


def with_overrides(cfg: Optional[MemoSightConfig], tokenizer, model_type: str,
                   hf_config: Optional[dict] = None, template=None, **overrides) -> MemoSightConfig:
    """A model's configuration with values chosen on purpose.

    Args:
        cfg: the model's own configuration (its ``memosight.json``); None
            builds one from the family defaults and ``hf_config``'s extra keys.
        template: a template (or its name) to use instead of the model's; the
            token ids of its BOS / EOS are looked up in ``tokenizer``.
        overrides: :data:`TUNABLE_KEYS` values; None keeps a value.
    """
    if isinstance(template, str):
        template = template_named(template, tokenizer)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if cfg is not None and template is None:
        if not overrides:
            return cfg
        d = cfg.to_dict()
        d.update(overrides)
        return MemoSightConfig.from_dict(d, "configuration")
    values = {k: getattr(cfg, k) for k in TUNABLE_KEYS} if cfg is not None else {}
    values.update(overrides)
    return build_config(tokenizer, model_type, hf_config, template=template, **values)


MODEL_CARD = """# {name}

A MemoSight model (https://arxiv.org/abs/2604.14889) for MLX: {family} weights whose tokenizer
has the MemoSight special tokens, and `memosight.json` (compression ratio {ratio}, {memory}
memory tokens, draft length {draft}, template `{template}`).

Run it with MemoSight decoding, which compresses each finished reasoning step into memory
tokens and drafts with foresight tokens:

```bash
pip install mlx-memosight
python -m mlx_memosight.generate --model {name} --prompt "What is 17 * 23?"
```

`mlx_lm.load` reads this folder, but plain mlx-lm decoding keeps every finished step in the
cache: the model was trained to see only the memory tokens of finished steps, so with
`mlx_lm.generate` its output degrades after the first step.
"""


def write_model_card(folder, cfg: MemoSightConfig, name: Optional[str] = None) -> Path:
    """A ``README.md`` saying how to run the model (and what plain mlx-lm does);
    ``name``: the folder's final name (it may be written under another)."""
    path = Path(folder) / "README.md"
    path.write_text(MODEL_CARD.format(
        name=name or Path(folder).name, family=cfg.model_family, ratio=cfg.compression_ratio,
        memory=len(cfg.token_ids.memory), draft=cfg.draft_len, template=cfg.template.name))
    return path
