"""MemoSight fine-tuning on MLX through mlx-lm's tuner.

* :func:`add_token_rows` turns a plain Qwen2 / Llama model into a MemoSight
  model (SPEC section 1): the MemoSight tokens are added to its tokenizer and
  its embedding (and untied ``lm_head``) get rows initialised to the mean of
  each token's description.
* :func:`memosight_loss` is SPEC's joint LM + MTP loss in the shape mlx-lm's
  trainer calls (``loss(model, *batch) -> (loss, tokens)``); the batches come
  from :class:`datasets.BatchIterator`, which folds the per-step target
  counts into row weights (see there).
* :func:`train` runs ``mlx_lm.tuner.trainer.train`` with LoRA, DoRA or full
  fine-tuning. Under LoRA / DoRA the MemoSight tokens' rows of the embedding
  and ``lm_head`` are trained too, by a low-rank update restricted to those
  rows (:func:`restrict_to_rows`), stored under mlx-lm's own adapter names so
  that ``mlx_lm.load(..., adapter_path=...)`` and fusing handle it.
* :func:`fuse` writes a standalone MemoSight model folder.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .config import (
    DOUBLE_NEWLINE,
    SPECIAL_TOKENS,
    ConfigError,
    TEMPLATES,
    MemoSightConfig,
    Template,
    _token_id,
    add_memosight_tokens,
    build_config,
    description_ids,
)
from .datasets import BatchIterator, DataError, MemoSightDataset, batch_arrays, num_targets
from .layout import attention_mask
from .model import attach_token_rope, forward, lm_head

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapters.safetensors"
FINE_TUNE_TYPES = ("lora", "dora", "full")


class TrainError(ValueError):
    """A training problem, phrased for the user (names the file or flag)."""


def _raw_tokenizer(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's wrapper (or the tokenizer itself)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def _is_tied(model) -> bool:
    return bool(getattr(model.args, "tie_word_embeddings", False)) or "lm_head" not in model


def _output_modules(model) -> List[nn.Module]:
    """The modules holding one row per token: the embedding and, when
    untied, ``lm_head``."""
    mods = [model.model.embed_tokens]
    if not _is_tied(model):
        mods.append(model.lm_head)
    return mods


# ----------------------------------------------------------------------------
# Plain base models: MemoSight tokens and their rows


def _rows(module, ids) -> mx.array:
    """Rows ``ids`` of an (optionally quantised) embedding or linear layer, in float32."""
    ids = mx.array(ids)
    if isinstance(module, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        biases = module.get("biases")
        return mx.dequantize(
            module.weight[ids], module.scales[ids], None if biases is None else biases[ids],
            group_size=module.group_size, bits=module.bits, mode=module.mode,
        ).astype(mx.float32)
    return module.weight[ids].astype(mx.float32)


def _mean_row(module, n: int, chunk: int = 8192) -> mx.array:
    total = None
    for start in range(0, n, chunk):
        part = _rows(module, mx.arange(start, min(n, start + chunk))).sum(axis=0)
        total = part if total is None else total + part
    return total / n


def _resize_rows(module, keep: int, new_rows: mx.array):
    """Keep the first ``keep`` rows of ``module`` and append ``new_rows``."""
    if isinstance(module, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        q = mx.quantize(new_rows.astype(module.scales.dtype), group_size=module.group_size,
                        bits=module.bits, mode=module.mode)
        module.weight = mx.concatenate([module.weight[:keep], q[0]])
        module.scales = mx.concatenate([module.scales[:keep], q[1]])
        if module.get("biases") is not None:
            module.biases = mx.concatenate([module.biases[:keep], q[2]])
    else:
        w = module.weight
        module.weight = mx.concatenate([w[:keep], new_rows.astype(w.dtype)])


def add_token_rows(model, tokenizer) -> List[tuple]:
    """Add the MemoSight tokens a tokenizer lacks, and the model's rows for them.

    The embedding (and untied ``lm_head``) are resized to ``len(tokenizer)``
    and each added token's row is set to the mean of the rows of its
    description's tokens, tokenised after all tokens were added, in reverse
    order (SPEC section 1). A description token that is itself added and not
    yet set (the reference reads its freshly resized row there) reads the
    mean of the base rows. Quantised layers get quantised rows.

    Args:
        model: an mlx-lm Qwen2 / Llama model.
        tokenizer: its tokenizer (Hugging Face or mlx-lm's wrapper); changed
            in place.

    Returns:
        The ``(token, description)`` pairs added (empty when none were).
    """
    tok = _raw_tokenizer(tokenizer)
    n_base = len(tok)
    n_rows = model.model.embed_tokens.weight.shape[0]
    if n_rows < n_base:
        raise TrainError(f"the model has {n_rows} embedding rows for a tokenizer of {n_base} tokens")
    added = add_memosight_tokens(tok)
    if not added:
        return []
    descriptions = [description_ids(tok, d) for _, d in added]
    for module in _output_modules(model):
        fresh = _mean_row(module, n_base)
        new: Dict[int, mx.array] = {}
        for k in reversed(range(len(added))):
            ids = descriptions[k]
            parts = []
            base = [i for i in ids if i < n_base]
            base_rows = _rows(module, base) if base else None
            for i in ids:
                if i < n_base:
                    parts.append(base_rows[base.index(i)])
                else:
                    parts.append(new.get(i, fresh))
            new[n_base + k] = mx.stack(parts).mean(axis=0) if parts else fresh
        _resize_rows(module, n_base, mx.stack([new[n_base + k] for k in range(len(added))]))
    vocab = len(tok)
    model.args.vocab_size = vocab
    if hasattr(model.model, "vocab_size"):
        model.model.vocab_size = vocab
    mx.eval(model.parameters())
    return added


def memosight_token_rows(tokenizer) -> List[int]:
    """Ids of the MemoSight tokens whose rows are trained under LoRA: every
    MemoSight token, and ``"\\n\\n"`` only when it is an added token."""
    tok = _raw_tokenizer(tokenizer)
    added_vocab = tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}
    ids = []
    for t, _ in SPECIAL_TOKENS:
        if t == DOUBLE_NEWLINE and t not in added_vocab:
            continue
        tid = _token_id(tok, t)
        if tid is not None:
            ids.append(tid)
    return sorted(set(ids))


def template_named(name: str, tokenizer) -> Template:
    """A prompt template by name; ``plain`` takes the tokenizer's own BOS / EOS."""
    if name not in TEMPLATES:
        raise ConfigError(f"--template {name!r}: expected one of {', '.join(TEMPLATES)}")
    t = TEMPLATES[name]
    if name == "plain":
        tok = _raw_tokenizer(tokenizer)
        if getattr(tok, "eos_token", None) is None:
            raise ConfigError("--template plain: the tokenizer has no EOS token")
        t = dataclasses.replace(t, bos=getattr(tok, "bos_token", None), eos=tok.eos_token)
    return t


def prepare(model, tokenizer, hf_config: dict, cfg: Optional[MemoSightConfig] = None,
            template=None, **overrides):
    """Make a loaded model MemoSight-ready for training, in place.

    Adds the MemoSight tokens and rows when the tokenizer lacks them, and
    returns the configuration: ``cfg`` (the model's ``memosight.json``) when
    given, else built from the family defaults and the checkpoint's extra
    ``config.json`` keys; ``template`` (a name or a :class:`config.Template`)
    and ``overrides`` (compression_ratio,
    max_offset, lm_loss_weight, mtp_loss_weight; None leaves a value) win.

    Returns:
        ``(cfg, added)`` where ``added`` lists the tokens that were added.
    """
    attach_token_rope(model)
    added = add_token_rows(model, tokenizer)
    if isinstance(template, str):
        template = template_named(template, tokenizer)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if cfg is not None and not added and template is None:
        if overrides:
            d = cfg.to_dict()
            d.update(overrides)
            cfg = MemoSightConfig.from_dict(d, "configuration")
    else:
        values = {}
        if cfg is not None and not added:  # a new template for a MemoSight model
            values = {k: getattr(cfg, k) for k in
                      ("compression_ratio", "max_offset", "lm_loss_weight", "mtp_loss_weight", "draft_len")}
        values.update(overrides)
        cfg = build_config(_raw_tokenizer(tokenizer), hf_config.get("model_type"), hf_config,
                           template=template, **values)
    hf_config["vocab_size"] = embedding_rows(model)
    for key in ("lm_loss_weight", "mtp_loss_weight", "max_offset"):
        hf_config[key] = getattr(cfg, key)
    return cfg, added


# ----------------------------------------------------------------------------
# Trainable token rows under LoRA / DoRA


class _TokenRows:
    """Mixin for mlx-lm's LoRA / DoRA embedding and linear layers that keeps
    their update to the rows of chosen tokens: the factors of the other rows
    (zero from the start) get no gradient. Parameter names and the forward
    pass are mlx-lm's, so the saved adapters load with mlx-lm unchanged."""

    def _masked(self, fn, *args, **kwargs):
        saved = {}
        for name, mask in self._row_masks.items():
            saved[name] = self[name]
            self[name] = mx.where(mask, saved[name], mx.stop_gradient(saved[name]))
        try:
            return fn(*args, **kwargs)
        finally:
            for name, value in saved.items():
                self[name] = value

    def __call__(self, *args, **kwargs):
        return self._masked(super().__call__, *args, **kwargs)

    def as_linear(self, *args, **kwargs):
        return self._masked(super().as_linear, *args, **kwargs)


_ROW_CLASSES: Dict[type, type] = {}


def restrict_to_rows(module, token_ids: Sequence[int]):
    """Restrict an mlx-lm LoRA / DoRA layer over the vocabulary (the
    embedding or ``lm_head``) to the rows of ``token_ids``, in place."""
    cls = type(module)
    if cls not in _ROW_CLASSES:
        _ROW_CLASSES[cls] = type(f"TokenRows{cls.__name__}", (_TokenRows, cls), {})
    vocab = module.m.shape[0] if "m" in module else None
    is_embedding = "embedding" in module
    if vocab is None:
        vocab = module.lora_a.shape[0] if is_embedding else module.lora_b.shape[1]
    rows = np.zeros(vocab, bool)
    rows[np.asarray(token_ids, np.int64)] = True
    rows = mx.array(rows)
    masks = {}
    if is_embedding:
        module.lora_a = module.lora_a * rows[:, None]
        masks["lora_a"] = rows[:, None]
    else:
        module.lora_b = module.lora_b * rows[None, :]
        masks["lora_b"] = rows[None, :]
    if "m" in module:
        masks["m"] = rows
    module.__class__ = _ROW_CLASSES[cls]
    module._row_masks = masks
    return module


# ----------------------------------------------------------------------------
# Gradient checkpointing of one model's layers


_CHECKPOINT_CLASSES: Dict[type, type] = {}


def _checkpointed_class(cls):
    if cls not in _CHECKPOINT_CLASSES:

        class Checkpointed(cls):
            def __call__(self, x, *args, **kwargs):
                call = super().__call__

                def inner(params, x):
                    self.update(params)
                    return call(x, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), x)

        Checkpointed.__name__ = f"Checkpointed{cls.__name__}"
        _CHECKPOINT_CLASSES[cls] = Checkpointed
    return _CHECKPOINT_CLASSES[cls]


def enable_grad_checkpoint(model):
    """Recompute each layer's activations in the backward pass (this model's
    layers only; mlx-lm's own switch patches the layer class process-wide)."""
    for layer in model.layers:
        if type(layer) not in _CHECKPOINT_CLASSES.values():
            layer.__class__ = _checkpointed_class(type(layer))


# ----------------------------------------------------------------------------
# Loss


def memosight_loss(model, inputs, positions, query_slot, query_limit, key_visible_until,
                   rows, targets, weights, real_tokens):
    """SPEC's joint loss of one micro-batch, as mlx-lm's trainer calls it.

    The arrays are :func:`datasets.batch_arrays`' tuple. Logits are computed
    only at the scored rows; each row's cross-entropy is weighted by
    ``weights`` (its stream's loss weight over its stream's target count,
    with the factors the trainer expects, see :class:`BatchIterator`).

    The mask is materialised here rather than passed in compact form: the
    compact form goes to the decoder's attention kernels, which have no
    gradient; a boolean mask goes to ``mx.fast.scaled_dot_product_attention``.

    Returns:
        ``(loss, real_tokens)``.
    """
    mask = attention_mask(query_slot, query_limit, key_visible_until, xp=mx)
    h = forward(model, inputs, positions, mask, hidden=True)
    h = mx.take_along_axis(h, rows[..., None], axis=1)
    ce = nn.losses.cross_entropy(lm_head(model, h), targets)
    return (ce.astype(mx.float32) * weights).sum(), real_tokens


def joint_loss(model, samples, lm_loss_weight: float, mtp_loss_weight: float) -> mx.array:
    """The joint loss of ``samples`` taken as one batch (no accumulation)."""
    n_lm = sum(num_targets(s)[0] for s in samples)
    n_mtp = sum(num_targets(s)[1] for s in samples)
    lm = lm_loss_weight / n_lm if n_lm else 0.0
    mtp = mtp_loss_weight / n_mtp if n_mtp else 0.0
    return memosight_loss(model, *batch_arrays(samples, lm, mtp))[0]


# ----------------------------------------------------------------------------
# Trainable parameters and adapters


def _layer_keys(model) -> List[str]:
    """The layer-relative names mlx-lm's LoRA converts by default."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    types = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear,
             nn.Embedding, nn.QuantizedEmbedding)
    keys = set()
    for layer in model.layers:
        for name, m in layer.named_modules():
            if hasattr(m, "to_lora") or isinstance(m, types):
                keys.add(name)
    return sorted(keys)


def setup_trainable(model, fine_tune_type: str = "lora", num_layers: Optional[int] = None,
                    lora_parameters: Optional[dict] = None,
                    token_rows: Optional[Sequence[int]] = None) -> dict:
    """Freeze the model and make the parts to train trainable.

    Args:
        fine_tune_type: ``lora``, ``dora`` or ``full``.
        num_layers: train the last ``num_layers`` layers (-1: all; None:
            16, or all when the model has fewer, like mlx-lm's default).
        lora_parameters: ``rank``, ``scale``, ``dropout`` (mlx-lm's keys).
        token_rows: token ids whose embedding / ``lm_head`` rows get a LoRA
            update restricted to them (LoRA / DoRA; None or empty: none).
            Full fine-tuning trains the embedding and ``lm_head`` whole.

    Returns:
        The adapter settings mlx-lm's ``load_adapters`` reads
        (``fine_tune_type``, ``num_layers``, ``lora_parameters``).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if fine_tune_type not in FINE_TUNE_TYPES:
        raise TrainError(f"--fine-tune-type {fine_tune_type!r}: expected one of {', '.join(FINE_TUNE_TYPES)}")
    n = len(model.layers)
    if num_layers is None:
        num_layers = min(16, n)
    elif num_layers < 0:
        num_layers = n
    if num_layers > n:
        raise TrainError(f"--num-layers {num_layers}: the model has only {n} layers")
    model.freeze()
    if fine_tune_type == "full":
        if num_layers == n:
            model.unfreeze()
        else:
            for layer in model.layers[n - num_layers:]:
                layer.unfreeze()
            for m in _output_modules(model):
                m.unfreeze()
        return dict(fine_tune_type="full", num_layers=num_layers, lora_parameters=None)
    params = dict(rank=8, dropout=0.0, scale=20.0)
    params.update(lora_parameters or {})
    keys = _layer_keys(model)
    if token_rows:
        keys += ["model.embed_tokens"] + ([] if _is_tied(model) else ["lm_head"])
    params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    if token_rows:
        for m in _output_modules(model):
            restrict_to_rows(m, token_rows)
    return dict(fine_tune_type=fine_tune_type, num_layers=num_layers, lora_parameters=params)


def model_fingerprint(model) -> str:
    """A short hash of the model's shape and a few of its weights, recorded
    with the adapters to recognise the model they belong to."""
    h = hashlib.sha256()
    emb = model.model.embed_tokens
    for a in (emb.weight[:2], emb.weight[-2:], model.model.norm.weight,
              model.layers[0].input_layernorm.weight):
        a = a if a.dtype in (mx.uint32, mx.uint8) else a.astype(mx.float32)
        h.update(str(a.shape).encode())
        h.update(np.array(a).tobytes())
    h.update(f"{type(model).__module__}:{len(model.layers)}".encode())
    return h.hexdigest()[:16]


def read_adapter_config(adapter_path) -> dict:
    path = Path(adapter_path) / ADAPTER_CONFIG
    if not path.is_file():
        raise TrainError(f"{path}: file not found (--adapter-path)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})")


def load_resume(model, adapter_file, fingerprint: Optional[str] = None):
    """Load adapters to resume from, checking that they belong to this model.

    Raises:
        TrainError: naming the file, when it is missing, unreadable, or holds
            adapters of another model.
    """
    path = Path(adapter_file)
    if not path.is_file():
        raise TrainError(f"{path}: file not found (--resume-adapter-file)")
    beside = path.parent / ADAPTER_CONFIG
    if fingerprint is not None and beside.is_file():
        try:
            recorded = json.loads(beside.read_text()).get("base_fingerprint")
        except json.JSONDecodeError:
            recorded = None
        if recorded is not None and recorded != fingerprint:
            raise TrainError(
                f"{path}: adapters of another model (--resume-adapter-file; their "
                f"{ADAPTER_CONFIG} records a different base model)"
            )
    try:
        weights = mx.load(str(path))
    except Exception as e:  # mlx raises several types for unreadable files
        raise TrainError(f"{path}: not a safetensors adapter file ({e})")
    params = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name not in params:
            raise TrainError(
                f"{path}: {name} is not trainable in this model (adapters of another model "
                f"or another --fine-tune-type / --num-layers / --freeze-token-rows)"
            )
        if w.shape != params[name].shape:
            raise TrainError(
                f"{path}: {name} has shape {tuple(w.shape)}, this model's has "
                f"{tuple(params[name].shape)} (adapters of another model)"
            )
    model.load_weights(list(weights.items()), strict=False)


def save_adapters(model, adapter_file):
    mx.save_safetensors(str(adapter_file), dict(tree_flatten(model.trainable_parameters())))


# ----------------------------------------------------------------------------
# Training


@dataclass
class TrainingOptions:
    """Training settings (the names and defaults of mlx-lm's ``lora``)."""

    fine_tune_type: str = "lora"
    num_layers: Optional[int] = None
    lora_parameters: dict = field(default_factory=lambda: dict(rank=8, dropout=0.0, scale=20.0))
    train_token_rows: bool = True
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    learning_rate: float = 1e-5
    lr_schedule: Optional[dict] = None
    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    seed: int = 0


@dataclass
class TrainingReport:
    train_losses: List[tuple] = field(default_factory=list)  # (iteration, loss)
    val_losses: List[tuple] = field(default_factory=list)
    tokens_per_second: List[float] = field(default_factory=list)
    peak_memory_gb: float = 0.0
    adapter_file: Optional[Path] = None


def _rank() -> int:
    return mx.distributed.init().rank()


def rank0_print(*args):
    if _rank() == 0:
        print(*args, flush=True)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Reporter:
    """mlx-lm training callback: records the curves and prints a progress
    line with loss, tokens/s, peak memory and ETA."""

    def __init__(self, iters, report: TrainingReport, user=None, verbose=True):
        self.iters = iters
        self.report = report
        self.user = user
        self.verbose = verbose
        self.start = time.perf_counter()

    def on_train_loss_report(self, info):
        it = info["iteration"]
        self.report.train_losses.append((it, info["train_loss"]))
        self.report.tokens_per_second.append(info["tokens_per_second"])
        self.report.peak_memory_gb = max(self.report.peak_memory_gb, info["peak_memory"])
        elapsed = time.perf_counter() - self.start
        if self.verbose:
            rank0_print(
                f"Iter {it}/{self.iters}: train loss {info['train_loss']:.3f}, "
                f"{info['tokens_per_second']:,.0f} tok/s, peak mem {info['peak_memory']:.2f} GB, "
                f"ETA {_format_eta(elapsed / it * (self.iters - it))}"
            )
        if self.user is not None:
            self.user.on_train_loss_report(info)

    def on_val_loss_report(self, info):
        self.report.val_losses.append((info["iteration"], info["val_loss"]))
        if self.verbose:
            rank0_print(f"Iter {info['iteration']}: val loss {info['val_loss']:.3f} ({info['val_time']:.1f}s)")
        if self.user is not None:
            self.user.on_val_loss_report(info)


def _optimizer(options: TrainingOptions):
    from mlx_lm.tuner.utils import build_schedule

    classes = dict(adam=optim.Adam, adamw=optim.AdamW, sgd=optim.SGD, adafactor=optim.Adafactor,
                   muon=optim.Muon)
    name = options.optimizer.lower()
    if name not in classes:
        raise TrainError(f"--optimizer {options.optimizer!r}: expected one of {', '.join(classes)}")
    lr = build_schedule(options.lr_schedule) if options.lr_schedule else options.learning_rate
    return classes[name](learning_rate=lr, **options.optimizer_config)


def check_options(options: TrainingOptions, train_set, valid_set=None):
    """Reject settings the run cannot honour, naming the flag."""
    world = mx.distributed.init().size()
    K = options.grad_accumulation_steps
    if K < 1:
        raise TrainError("--grad-accumulation-steps must be at least 1")
    if options.iters < 1:
        raise TrainError("--iters must be at least 1")
    if options.iters % K:
        raise TrainError(f"--iters {options.iters} must be a multiple of --grad-accumulation-steps {K}")
    if options.batch_size < 1 or options.batch_size % world:
        raise TrainError(
            f"--batch-size {options.batch_size} must be a positive multiple of the number of "
            f"processes ({world})"
        )
    for ds in (train_set, valid_set):
        if ds is not None and len(ds) < options.batch_size:
            raise DataError(f"{ds.name}: {len(ds)} examples, fewer than --batch-size {options.batch_size}")


def train(model, tokenizer, train_set: MemoSightDataset, valid_set: Optional[MemoSightDataset] = None,
          options: TrainingOptions = None, adapter_path="adapters",
          resume_adapter_file=None, callback=None, extra_config: Optional[dict] = None,
          verbose: bool = True) -> TrainingReport:
    """Fine-tune a MemoSight model with mlx-lm's trainer.

    Args:
        model: an mlx-lm Qwen2 / Llama model with the MemoSight tokens (see
            :func:`prepare`); trainable layers are set up here.
        tokenizer: its tokenizer (picks the MemoSight token rows).
        train_set, valid_set: :class:`MemoSightDataset` splits; both carry
            the MemoSight configuration (loss weights).
        options: :class:`TrainingOptions`.
        adapter_path: folder for ``adapters.safetensors``, its periodic
            checkpoints and ``adapter_config.json``.
        resume_adapter_file: adapters to start from.
        callback: an mlx-lm ``TrainingCallback``.
        extra_config: more keys for ``adapter_config.json``.

    Returns:
        A :class:`TrainingReport`. On Ctrl-C the adapters are saved and
        ``KeyboardInterrupt`` propagates.
    """
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_train
    from mlx_lm.tuner.utils import print_trainable_parameters

    options = options or TrainingOptions()
    check_options(options, train_set, valid_set)
    cfg = train_set.cfg
    mx.random.seed(options.seed)
    attach_token_rope(model)
    fingerprint = model_fingerprint(model)
    vocab = embedding_rows(model)
    rows = memosight_token_rows(tokenizer) if options.train_token_rows else []
    adapter = setup_trainable(model, options.fine_tune_type, options.num_layers,
                              options.lora_parameters, rows)
    if resume_adapter_file is not None:
        load_resume(model, resume_adapter_file, fingerprint)
        rank0_print(f"Resuming from {resume_adapter_file}")
    if options.grad_checkpoint:
        enable_grad_checkpoint(model)
    if verbose:
        print_trainable_parameters(model)

    adapter_path = Path(adapter_path)
    adapter_file = adapter_path / ADAPTER_FILE
    if _rank() == 0:
        adapter_path.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(options).items() if k not in ("lora_parameters",)}
        config.update(adapter)
        config.update(
            memosight=cfg.to_dict(),
            base_fingerprint=fingerprint,
            token_rows=len(rows),
            vocab_size=vocab,
        )
        config.update(extra_config or {})
        with open(adapter_path / ADAPTER_CONFIG, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    K = options.grad_accumulation_steps
    args = TrainingArgs(
        batch_size=options.batch_size,
        iters=options.iters,
        val_batches=options.val_batches,
        steps_per_report=K * math.ceil(options.steps_per_report / K),
        steps_per_eval=options.steps_per_eval,
        steps_per_save=options.save_every,
        max_seq_length=options.max_seq_length,
        adapter_file=adapter_file,
        grad_checkpoint=False,
        grad_accumulation_steps=K,
    )
    iterate = BatchIterator(cfg.lm_loss_weight, cfg.mtp_loss_weight, K, options.val_batches,
                            options.seed)
    report = TrainingReport(adapter_file=adapter_file)
    reporter = _Reporter(options.iters, report, callback, verbose)
    try:
        mlx_train(
            model=model,
            optimizer=_optimizer(options),
            train_dataset=train_set,
            val_dataset=valid_set,
            args=args,
            loss=memosight_loss,
            iterate_batches=iterate,
            training_callback=reporter,
        )
    except KeyboardInterrupt:
        if _rank() == 0:
            save_adapters(model, adapter_file)
            print(f"Interrupted: adapters saved to {adapter_file}", flush=True)
        raise
    return report


def evaluate(model, dataset: MemoSightDataset, batch_size: int = 4, num_batches: int = -1) -> float:
    """The joint loss over the first ``num_batches`` batches (-1: all)."""
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate

    attach_token_rope(model)
    cfg = dataset.cfg
    iterate = BatchIterator(cfg.lm_loss_weight, cfg.mtp_loss_weight, eval_batches=num_batches)
    return mlx_evaluate(model, dataset, batch_size, num_batches, loss=memosight_loss,
                        iterate_batches=iterate)


# ----------------------------------------------------------------------------
# Saving and fusing


def _staging_dir(path: Path, force: bool) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise TrainError(f"{path}: already exists (--save-path; use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def _commit(staging: Path, path: Path):
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(staging, path)


def save_model(path, model, tokenizer, hf_config: dict, cfg: Optional[MemoSightConfig],
               force: bool = False, src_path=None) -> Path:
    """Write a standalone MemoSight model folder (weights, ``config.json``,
    tokenizer, ``memosight.json``) that ``mlx_memosight.load`` and
    ``mlx_lm.load`` read; with ``cfg=None`` a plain model folder (no
    ``memosight.json``). Written to a staging folder first: nothing is left
    half-written."""
    from mlx_lm.utils import save_config
    from mlx_lm.utils import save_model as mlx_save_model

    path = Path(path)
    staging = _staging_dir(path, force)
    try:
        mlx_save_model(staging, model)
        config = dict(hf_config)
        config["vocab_size"] = int(embedding_rows(model))
        for key in ("lm_loss_weight", "mtp_loss_weight", "max_offset"):
            if cfg is None:
                config.pop(key, None)
            else:
                config[key] = getattr(cfg, key)
        if cfg is not None:
            eos = config.get("eos_token_id")
            eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
            if cfg.token_ids.eos not in eos:
                config["eos_token_id"] = eos + [cfg.token_ids.eos]
        save_config(config, config_path=staging / "config.json")
        _raw_tokenizer(tokenizer).save_pretrained(str(staging))
        if cfg is not None:
            cfg.save(staging)
        if src_path is not None and (Path(src_path) / "generation_config.json").exists():
            shutil.copy(Path(src_path) / "generation_config.json", staging)
        _commit(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def embedding_rows(model) -> int:
    """Rows of the model's (possibly LoRA-wrapped) embedding."""
    emb = model.model.embed_tokens
    emb = emb.get("embedding", emb)
    return int(emb.weight.shape[0])


def load_base(model_path):
    """Load a model folder for training or fusing.

    Returns:
        ``(model, tokenizer, hf_config, cfg_or_None)``.
    """
    from mlx_lm.utils import load_tokenizer

    from .model import load_model

    model_path = Path(model_path)
    try:
        model, config = load_model(model_path)
    except FileNotFoundError as e:
        raise TrainError(f"{model_path}: {e} (--model)")
    tokenizer = load_tokenizer(model_path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config, MemoSightConfig.load(model_path)


def fuse(model_path, adapter_path, save_path, dequantize: bool = False, force: bool = False) -> Path:
    """Fuse trained adapters into their base model and write a standalone
    MemoSight model folder.

    ``model_path`` may be the plain base model the adapters were trained
    from: the MemoSight tokens and rows are added the same way again.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model

    adapter_path = Path(adapter_path)
    ac = read_adapter_config(adapter_path)
    if not (adapter_path / ADAPTER_FILE).is_file():
        raise TrainError(f"{adapter_path / ADAPTER_FILE}: file not found (--adapter-path)")
    if "memosight" not in ac:
        raise TrainError(f"{adapter_path / ADAPTER_CONFIG}: not MemoSight adapters (no 'memosight' key)")
    cfg = MemoSightConfig.from_dict(ac["memosight"], str(adapter_path / ADAPTER_CONFIG))
    model, tokenizer, config, _ = load_base(model_path)
    add_token_rows(model, tokenizer)
    recorded = ac.get("base_fingerprint")
    if recorded is not None and recorded != model_fingerprint(model):
        raise TrainError(f"{adapter_path}: adapters of another model than {model_path} (--adapter-path)")
    load_adapters(model, str(adapter_path))
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return save_model(save_path, model, tokenizer, config, cfg, force=force, src_path=model_path)
