"""MemoSight fine-tuning on MLX through mlx-lm's tuner.

* :mod:`.tokens`: a plain Qwen2 / Llama model gets the MemoSight tokens and
  rows (SPEC section 1), and :func:`prepare` its configuration;
* :mod:`.rows`: LoRA / DoRA over the vocabulary restricted to those rows;
* :mod:`.loss`: SPEC's joint LM + MTP loss in mlx-lm's trainer's shape;
* :mod:`.trainer`: trainable parameters, adapters and :func:`train`;
* :mod:`.saving`: standalone model folders and :func:`fuse`.
"""

from ..errors import DataError, TrainError
from ..options import TrainingOptions
from .loss import joint_loss, memosight_loss
from .rows import restrict_to_rows
from .saving import apply_adapters, fuse, load_base, read_adapters, save_model
from .tokens import add_token_rows, embedding_rows, memosight_token_rows, prepare
from .trainer import (ADAPTER_CONFIG, ADAPTER_FILE, TrainingReport, check_options,
                      enable_grad_checkpoint, evaluate, load_resume, model_fingerprint, rank0_print,
                      read_adapter_config, save_adapters, setup_trainable, train)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_FILE", "DataError", "TrainError", "TrainingOptions", "TrainingReport",
    "add_token_rows", "apply_adapters", "check_options", "embedding_rows", "enable_grad_checkpoint", "evaluate",
    "fuse", "joint_loss", "load_base", "load_resume", "memosight_loss", "memosight_token_rows",
    "model_fingerprint", "prepare", "rank0_print", "read_adapter_config", "read_adapters", "restrict_to_rows",
    "save_adapters", "save_model", "setup_trainable", "train",
]
