"""Option objects: each setting's default, choices, limits and help in one place.

An options class is a dataclass whose fields are declared with :func:`option`.
Constructing it validates every field (:class:`OptionError` names the
parameter); the commands build their argparse flags from the same fields
(:func:`add_arguments`), so a default, a list of choices or a limit is written
once. This module imports nothing heavy: the commands read it before MLX is
loaded.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from .config import MAX_DRAFT_LEN, TEMPLATES
from .errors import OptionError




@dataclass(frozen=True)
class Spec:
    """What an option allows and how the commands offer it."""

    help: str
    choices: Optional[Tuple] = None
    low: Optional[float] = None  # inclusive
    high: Optional[float] = None  # inclusive
    above: Optional[float] = None  # exclusive lower bound
    kind: Optional[type] = None  # int, float, str, bool (None: from the default)
    flags: Tuple[str, ...] = ()  # command-line names; default --name-with-dashes
    negate: bool = False  # a True default offered as --no-... (store_false)
    metavar: Optional[str] = None


def option(default, help: str, *, choices: Optional[Sequence] = None, low=None, high=None,
           above=None, kind: Optional[type] = None, flags: Sequence[str] = (), negate: bool = False,
           metavar: Optional[str] = None, factory=None):
    """A dataclass field carrying its :class:`Spec`."""
    spec = Spec(help, tuple(choices) if choices is not None else None, low, high, above, kind,
                tuple(flags), negate, metavar)
    if factory is not None:
        return field(default_factory=factory, metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def _kind(f: dataclasses.Field) -> Optional[type]:
    spec: Spec = f.metadata["spec"]
    if spec.kind is not None:
        return spec.kind
    default = f.default if f.default is not dataclasses.MISSING else None
    return type(default) if isinstance(default, (bool, int, float, str)) else None


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check(f: dataclasses.Field, value: Any) -> Any:
    """``value`` for the field ``f``, or :class:`OptionError`. Integers are
    accepted for float fields; None is accepted where the default is None."""
    name, spec = f.name, f.metadata["spec"]
    if value is None and f.default is None:
        return value
    kind = _kind(f)
    if kind is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{name} must be true or false, not {value!r}", name)
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise OptionError(f"{name} must be an integer, not {value!r}", name)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{name} must be a number, not {value!r}", name)
        if not math.isfinite(value):
            raise OptionError(f"{name} must be a finite number, not {value!r}", name)
        value = float(value)
    if kind is str and not isinstance(value, str):
        raise OptionError(f"{name} must be a string, not {value!r}", name)
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"{name} must be one of {', '.join(map(str, spec.choices))}, not {value!r}",
                          name)
    low, high, above = spec.low, spec.high, spec.above
    if above is not None and high is not None and not above < value <= high:
        raise OptionError(f"{name} must be greater than {_number(above)} and at most "
                          f"{_number(high)}, got {_number(value)}", name)
    if low is not None and high is not None and not low <= value <= high:
        raise OptionError(f"{name} must be between {_number(low)} and {_number(high)}, got "
                          f"{_number(value)}", name)
    if low is not None and value < low:
        raise OptionError(f"{name} must be at least {_number(low)}, got {_number(value)}", name)
    if high is not None and value > high:
        raise OptionError(f"{name} must be at most {_number(high)}, got {_number(value)}", name)
    if above is not None and not value > above:
        raise OptionError(f"{name} must be greater than {_number(above)}, got {_number(value)}", name)
    return value


class Options:
    """Base of the option dataclasses: validates on construction."""

    def __post_init__(self):
        for f in fields(self):
            if "spec" in f.metadata:
                object.__setattr__(self, f.name, check(f, getattr(self, f.name)))

    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        return next(f for f in fields(cls) if f.name == name)

    @classmethod
    def check(cls, name: str, value):
        """Validate one value as the field ``name`` would."""
        return check(cls.field(name), value)

    @classmethod
    def default(cls, name: str):
        f = cls.field(name)
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if "spec" in f.metadata)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides):
        """The options from parsed arguments (fields not on the parser keep
        their defaults); ``overrides`` win."""
        values = {n: getattr(args, n) for n in cls.names() if hasattr(args, n)}
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {n: getattr(self, n) for n in self.names()}


def flags_of(f: dataclasses.Field) -> Tuple[str, ...]:
    spec: Spec = f.metadata["spec"]
    if spec.flags:
        return spec.flags
    prefix = "--no-" if spec.negate else "--"
    return (prefix + f.name.replace("_", "-"),)


def _argument_type(kind, name):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser, cls, names: Optional[Iterable[str]] = None, **defaults):
    """Add the fields ``names`` of the options class ``cls`` (all by default)
    to ``parser``: flags, type, choices, default and help come from the
    fields; ``defaults`` replace the class's defaults on this parser.
    Values are checked when the options object is built from the parsed
    arguments (:meth:`Options.from_args`)."""
    for name in names or cls.names():
        f = cls.field(name)
        spec: Spec = f.metadata["spec"]
        default = defaults.get(name, cls.default(name))
        kind = _kind(f)
        kw = dict(dest=name, default=default)
        help_text = spec.help
        if kind is bool:
            kw["action"] = "store_false" if spec.negate else "store_true"
        else:
            if kind in (int, float):
                kw["type"] = _argument_type(kind, name)
            if spec.choices is not None:
                kw["choices"] = spec.choices
            if spec.metavar:
                kw["metavar"] = spec.metavar
            if default is not None and "%(default)" not in help_text:
                help_text += " (default: %(default)s)"
        kw["help"] = help_text
        parser.add_argument(*flags_of(f), **kw)


# ----------------------------------------------------------------------------
# Generation

SCHEDULES = ("fused", "two-pass")
FORESIGHT_SETS = ("auto", "all", "last")
DEFAULT_MAX_TOKENS = 512


@dataclass
class GenerationOptions(Options):
    """How to decode: the engine's MemoSight settings and the sampling.

    ``sampler()`` and ``logits_processors()`` turn the sampling settings into
    mlx-lm's objects; ``engine_options()`` are the keyword arguments of
    :class:`mlx_memosight.engine.Engine`.
    """

    max_tokens: int = option(DEFAULT_MAX_TOKENS, "committed output tokens at most", low=1,
                             flags=("--max-tokens", "-m"))
    draft_len: Optional[int] = option(None, "foresight tokens per draft (default: chosen before "
                                      "each pass from what a pass costs and what drafts were "
                                      "accepted)", kind=int, low=0, high=MAX_DRAFT_LEN)
    foresight: bool = option(True, "do not draft with foresight tokens", negate=True)
    compress: bool = option(True, "do not compress finished steps", negate=True)
    schedule: str = option("fused", "fused: verify and draft in one pass; two-pass: the "
                           "reference's schedule", choices=SCHEDULES)
    foresight_sets: str = option(
        "auto", "fused schedule: a foresight set after every draft prefix (all) or only after "
        "the whole block (last: fewer tokens per pass); auto: chosen before each pass, as the "
        "draft length",
        choices=FORESIGHT_SETS)
    temp: float = option(0.0, "sampling temperature (0: greedy)", low=0.0)
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens whose "
                          "probability reaches this (1: off)", above=0.0, high=1.0)
    top_k: int = option(0, "sample among the k most likely tokens (0: off)", low=0)
    min_p: float = option(0.0, "drop tokens less likely than this times the most likely one "
                          "(0: off)", low=0.0, high=1.0)
    repetition_penalty: float = option(1.0, "divide the logits of tokens already in the prompt "
                                       "or output (1: off; 1.1 reproduces the reference "
                                       "evaluation)", above=0.0)
    seed: Optional[int] = option(None, "random seed of the sampler", kind=int, low=0)
    prefill_step_size: int = option(2048, "prompt tokens per prefill pass (as mlx-lm)", low=1)

    def engine_options(self) -> Dict[str, Any]:
        return dict(draft_len=self.draft_len, foresight=self.foresight, compress=self.compress,
                    schedule=self.schedule, foresight_sets=self.foresight_sets,
                    prefill_step_size=self.prefill_step_size)

    def sampler(self):
        """mlx-lm's sampler for these settings; None for greedy decoding."""
        if self.temp == 0:
            return None
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self, exempt_ids: Sequence[int] = ()) -> list:
        """The logits processors (mlx-lm's protocol) for these settings."""
        if self.repetition_penalty == 1.0:
            return []
        from .sampling import make_repetition_penalty

        return [make_repetition_penalty(self.repetition_penalty, exempt_ids)]


# ----------------------------------------------------------------------------
# Serving

REASONING_SPLITS = ("steps", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerOptions(Options):
    """How ``mlx_memosight.server`` listens and what it allows."""

    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = option(8080, "port to listen on", low=0, high=65535)
    api_key: Optional[str] = option(None, "require this key on every request (default: "
                                    "$MLX_MEMOSIGHT_API_KEY, else none)", kind=str)
    max_tokens: int = option(2048, "a request's max_tokens when it sets none", low=1)
    max_queue: int = option(16, "requests that may wait for the model; more get a 503", low=1)
    batch_size: int = option(8, "requests decoded together in one batch (1: one at a time)", low=1, high=256,
                             flags=("--batch-size", "--decode-concurrency"))
    max_body_bytes: int = option(1 << 20, "largest request body; larger get a 413", low=1)
    reasoning_split: str = option("steps", "steps: finished steps (or a <think> block) are the "
                                  "reasoning, the last step the answer; none: everything in content",
                                  choices=REASONING_SPLITS)
    prompt_cache_bytes: int = option(1 << 30, "KV entries of recent prompts kept for later prompts "
                                     "that start the same way, least recently used dropped first "
                                     "(0: none)", low=0)
    log_level: str = option("info", "uvicorn's log level", choices=LOG_LEVELS)


# ----------------------------------------------------------------------------
# Conversion and GGUF export

DTYPES = ("float16", "bfloat16", "float32")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")


@dataclass
class ConvertOptions(Options):
    """What ``mlx_memosight.convert`` writes (besides where)."""

    dtype: Optional[str] = option(None, "type of the non-quantised parameters (default: the "
                                  "checkpoint's)", choices=DTYPES, kind=str)
    quantize: bool = option(False, "quantise the weights (as mlx_lm.convert -q)",
                            flags=("-q", "--quantize"))
    q_bits: Optional[int] = option(None, "bits per quantised weight (default 4)", kind=int, low=1)
    q_group_size: Optional[int] = option(None, "weights per quantisation group (default 64)",
                                         kind=int, low=1)
    gguf_type: Optional[str] = option(None, "GGUF tensor type (default: q4_1 for an MLX 4-bit "
                                      "group-32 model, else f16)", choices=GGUF_TYPES, kind=str)
    force: bool = option(False, "replace existing outputs")
    verify: bool = option(False, "compare logits with the PyTorch model on a MemoSight sample "
                          "(needs torch)")


# ----------------------------------------------------------------------------
# Training

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")


@dataclass
class TrainingOptions(Options):
    """Training settings: the names and defaults of mlx-lm's ``lora``."""

    fine_tune_type: str = option("lora", "what to train", choices=FINE_TUNE_TYPES)
    num_layers: Optional[int] = option(None, "layers to fine-tune, from the last (-1: all; "
                                       "default 16, or all if fewer)", kind=int, low=-1)
    lora_rank: int = option(8, "rank of the LoRA / DoRA update", low=1)
    lora_scale: float = option(20.0, "scale of the LoRA / DoRA update", above=0.0)
    lora_dropout: float = option(0.0, "dropout of the LoRA / DoRA input", low=0.0, high=0.99)
    train_token_rows: bool = option(True, "do not train the MemoSight tokens' embedding / "
                                    "lm_head rows (LoRA, DoRA)", flags=("--freeze-token-rows",),
                                    negate=True)
    optimizer: str = option("adam", "optimizer", choices=OPTIMIZERS)
    learning_rate: float = option(1e-5, "learning rate", above=0.0)
    batch_size: int = option(4, "global batch size", low=1)
    iters: int = option(1000, "iterations (micro-batches) to train for", low=1)
    val_batches: int = option(25, "validation batches per evaluation (-1: the whole set)", low=-1)
    steps_per_report: int = option(10, "iterations between loss reports", low=1)
    steps_per_eval: int = option(200, "iterations between validations", low=1)
    save_every: int = option(100, "iterations between adapter checkpoints", low=1)
    max_seq_length: int = option(2048, "truncate samples to this many non-foresight tokens "
                                 "(SPEC section 2)", low=1)
    grad_checkpoint: bool = option(False, "recompute activations in the backward pass to save memory")
    grad_accumulation_steps: int = option(1, "micro-batches per optimizer step", low=1)
    seed: int = option(0, "seeds the foresight offsets, LoRA and data order", low=0)
    optimizer_config: dict = field(default_factory=dict)
    lr_schedule: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        if self.val_batches == 0:
            raise OptionError("val_batches must be -1 (the whole set) or at least 1, got 0",
                              "val_batches")
        if self.num_layers == 0:
            raise OptionError("num_layers must be -1 (all) or at least 1, got 0", "num_layers")
        if self.iters % self.grad_accumulation_steps:
            raise OptionError(f"iters {self.iters} must be a multiple of "
                              f"grad_accumulation_steps={self.grad_accumulation_steps}", "iters")

    @property
    def lora_parameters(self) -> Dict[str, float]:
        return dict(rank=self.lora_rank, dropout=self.lora_dropout, scale=self.lora_scale)


# ----------------------------------------------------------------------------
# MemoSight settings chosen on purpose


@dataclass
class MemoSightOverrides(Options):
    """``memosight.json`` values given on purpose, over a model's own (convert)
    or the family defaults (lora); None keeps the value."""

    compression_ratio: Optional[int] = option(None, "thought tokens per memory token (family "
                                              "default: Qwen 6, Llama 5)", kind=int, low=1)
    max_offset: Optional[int] = option(None, "largest foresight offset (family default: Qwen 2, "
                                       "Llama 3)", kind=int, low=0)
    default_draft_len: Optional[int] = option(None, "the model's default draft length "
                                              "(memosight.json's draft_len)", kind=int, low=0,
                                              high=MAX_DRAFT_LEN)
    lm_loss_weight: Optional[float] = option(None, "weight of the language-model loss", kind=float,
                                             low=0.0)
    mtp_loss_weight: Optional[float] = option(None, "weight of the foresight (MTP) loss", kind=float,
                                              low=0.0)
    template: Optional[str] = option(None, "prompt template (default: the model's, or by family "
                                     "and tokenizer)", choices=tuple(TEMPLATES), kind=str)

    def values(self) -> Dict[str, Any]:
        """The values given, under ``memosight.json``'s keys (template aside)."""
        d = {k: v for k, v in self.to_dict().items() if v is not None and k != "template"}
        if "default_draft_len" in d:
            d["draft_len"] = d.pop("default_draft_len")
        return d
