"""Training through mlx-lm's trainer: trainable parameters (LoRA, DoRA or full,
plus the MemoSight tokens' rows), adapters and their checks, gradient
checkpointing, progress reports and the run itself."""

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..config import read_json
from ..datasets import BatchIterator, MemoSightDataset, check_batch_size
from ..errors import TrainError
from ..model import attach_token_rope
from ..options import TrainingOptions
from .loss import memosight_loss
from .rows import restrict_to_rows
from .tokens import _is_tied, _output_modules, embedding_rows, memosight_token_rows

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapters.safetensors"

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

    TrainingOptions.check("fine_tune_type", fine_tune_type)
    TrainingOptions.check("num_layers", num_layers)
    n = len(model.layers)
    if num_layers is None:
        num_layers = min(16, n)
    elif num_layers < 0:
        num_layers = n
    if num_layers > n:
        raise TrainError(f"num_layers={num_layers}: the model has only {n} layers", "num_layers")
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
        raise TrainError(f"{path}: file not found (adapter_path={Path(adapter_path)})")
    return read_json(path, TrainError)


def load_resume(model, adapter_file, fingerprint: Optional[str] = None):
    """Load adapters to resume from, checking that they belong to this model.

    Raises:
        TrainError: naming the file, when it is missing, unreadable, or holds
            adapters of another model.
    """
    path = Path(adapter_file)
    if not path.is_file():
        raise TrainError(f"resume_adapter_file={path}: file not found", "resume_adapter_file")
    beside = path.parent / ADAPTER_CONFIG
    if fingerprint is not None and beside.is_file():
        try:
            recorded = read_json(beside, TrainError).get("base_fingerprint")
        except TrainError:
            recorded = None
        if recorded is not None and recorded != fingerprint:
            raise TrainError(
                f"resume_adapter_file={path}: adapters of another model (their "
                f"{ADAPTER_CONFIG} records a different base model)", "resume_adapter_file")
    try:
        weights = mx.load(str(path))
    except Exception as e:  # mlx raises several types for unreadable files
        raise TrainError(f"{path}: not a safetensors adapter file ({e})")
    params = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name not in params:
            raise TrainError(
                f"{path}: {name} is not trainable in this model (adapters of another model, "
                f"or of another fine_tune_type, num_layers or train_token_rows)"
            )
        if w.shape != params[name].shape:
            raise TrainError(
                f"{path}: {name} has shape {tuple(w.shape)}, this model's has "
                f"{tuple(params[name].shape)} (adapters of another model)"
            )
    model.load_weights(list(weights.items()), strict=False)


def save_adapters(model, adapter_file):
    mx.save_safetensors(str(adapter_file), dict(tree_flatten(model.trainable_parameters())))


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
    """mlx-lm training callback: records the curves and prints one progress
    line per report (loss, tokens/s, peak memory, ETA) to ``out``; mlx-lm's
    own lines are not shown (they would repeat these)."""

    def __init__(self, iters, report: TrainingReport, user=None, verbose=True, out=None):
        self.iters = iters
        self.report = report
        self.user = user
        self.verbose = verbose and _rank() == 0
        self.out = out or sys.stdout
        self.start = time.perf_counter()

    def _print(self, line: str):
        if self.verbose:
            print(line, file=self.out, flush=True)

    def on_train_loss_report(self, info):
        it = info["iteration"]
        self.report.train_losses.append((it, info["train_loss"]))
        self.report.tokens_per_second.append(info["tokens_per_second"])
        self.report.peak_memory_gb = max(self.report.peak_memory_gb, info["peak_memory"])
        elapsed = time.perf_counter() - self.start
        self._print(f"Iter {it}/{self.iters}: train loss {info['train_loss']:.3f}, "
                    f"{info['tokens_per_second']:,.0f} tok/s, peak mem {info['peak_memory']:.2f} GB, "
                    f"ETA {_format_eta(elapsed / it * (self.iters - it))}")
        if self.user is not None:
            self.user.on_train_loss_report(info)

    def on_val_loss_report(self, info):
        self.report.val_losses.append((info["iteration"], info["val_loss"]))
        self._print(f"Iter {info['iteration']}/{self.iters}: val loss {info['val_loss']:.3f} "
                    f"({info['val_time']:.1f} s)")
        if self.user is not None:
            self.user.on_val_loss_report(info)


def _optimizer(options: TrainingOptions):
    from mlx_lm.tuner.utils import build_schedule

    lr = build_schedule(options.lr_schedule) if options.lr_schedule else options.learning_rate
    # options.OPTIMIZERS names MLX's optimizer classes in lower case
    classes = {name.lower(): c for name, c in vars(optim).items()
               if isinstance(c, type) and issubclass(c, optim.Optimizer)}
    return classes[options.optimizer](learning_rate=lr, **options.optimizer_config)


def check_options(options: TrainingOptions, train_set, valid_set=None):
    """Reject a batch size the data sets or the processes cannot honour (the
    options check themselves)."""
    world = mx.distributed.init().size()
    for ds in (train_set, valid_set):
        check_batch_size(ds, options.batch_size, world)


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
        A :class:`TrainingReport`. On Ctrl-C the adapters are saved and a
        ``KeyboardInterrupt`` saying where propagates.
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
        config = dataclasses.asdict(options)
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
    reporter = _Reporter(options.iters, report, callback, verbose, out=sys.stdout)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_train(model=model, optimizer=_optimizer(options), train_dataset=train_set,
                      val_dataset=valid_set, args=args, loss=memosight_loss, iterate_batches=iterate,
                      training_callback=reporter)
    except KeyboardInterrupt:
        if _rank() == 0:
            save_adapters(model, adapter_file)
        raise KeyboardInterrupt(f"adapters saved to {adapter_file}")
    reporter._print(f"Saved the adapters to {adapter_file}")
    return report


def evaluate(model, dataset: MemoSightDataset, batch_size: int = 4, num_batches: int = -1) -> float:
    """The joint loss over the first ``num_batches`` batches (-1: all)."""
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate

    attach_token_rope(model)
    cfg = dataset.cfg
    iterate = BatchIterator(cfg.lm_loss_weight, cfg.mtp_loss_weight, eval_batches=num_batches)
    return mlx_evaluate(model, dataset, batch_size, num_batches, loss=memosight_loss,
                        iterate_batches=iterate)
