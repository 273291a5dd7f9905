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
from .options import MAX_DRAFT_LEN

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
}
SUPPORTED_FAMILIES = tuple(FAMILY_DEFAULTS)
DEFAULT_DRAFT_LEN = 2
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
        try:
            return cls(
                splitter=int(d["splitter"]),
                continue_=int(d["continue"]),
                foresight=int(d["foresight"]),
                memory=[int(i) for i in d["memory"]],
                eos=int(d["eos"]),
                bos=None if d.get("bos") is None else int(d["bos"]),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: token_ids is missing the key {e.args[0]!r}")
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: token_ids holds a value that is not an id ({e})")


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
        t = d["template"]
        if isinstance(t, str):
            if t not in TEMPLATES:
                raise ConfigError(
                    f"{source}: unknown template {t!r} (known: {', '.join(TEMPLATES)})"
                )
            template = TEMPLATES[t]
        else:
            try:
                template = Template(**t)
            except TypeError as e:
                raise ConfigError(f"{source}: template: {e}")
        known = {f.name for f in fields(cls)} - {"token_ids", "template", "extra"}
        kwargs = {k: d[k] for k in known if k in d}
        extra = {k: v for k, v in d.items() if k not in known | {"token_ids", "template"}}
        cfg = cls(token_ids=token_ids, template=template, extra=extra, **kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = CONFIG_FILE):
        if int(self.compression_ratio) < 1:
            raise ConfigError(f"{source}: compression_ratio must be >= 1")
        if int(self.max_offset) < 0:
            raise ConfigError(f"{source}: max_offset must be >= 0")
        if not 0 <= int(self.draft_len) <= MAX_DRAFT_LEN:
            raise ConfigError(f"{source}: draft_len must be between 0 and {MAX_DRAFT_LEN}")
        if self.max_memory_tokens < 1 or len(self.token_ids.memory) < self.max_memory_tokens:
            raise ConfigError(
                f"{source}: max_memory_tokens={self.max_memory_tokens} but token_ids.memory "
                f"holds {len(self.token_ids.memory)} ids"
            )

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
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})")
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
