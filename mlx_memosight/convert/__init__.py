"""Convert a PyTorch-trained MemoSight checkpoint into an MLX model folder
(and / or a GGUF file): ``mlx_memosight.convert CKPT -o OUT``.

* :mod:`.checkpoint`: reading and validating the checkpoint folder;
* :mod:`.plan`: the output tensors, checked against ``config.json``;
* :mod:`.writer`: streaming them into safetensors files;
* :mod:`.verify`: logits of the PyTorch and the converted model compared;
* :mod:`.command`: :func:`convert` and the command line.
"""

import importlib

from ..errors import ConvertError
from .command import build_parser, convert, main

_LAZY = {
    "read_checkpoint": "checkpoint", "Checkpoint": "checkpoint", "WeightFile": "checkpoint",
    "plan_conversion": "plan", "Plan": "plan",
    "write_mlx_model": "writer", "SafetensorsWriter": "writer", "shard_entries": "writer",
    "MAX_SHARD_BYTES": "writer", "TOKENIZER_FILES": "writer",
    "verify_conversion": "verify", "VerifyResult": "verify", "TOLERANCE": "verify",
}

__all__ = ["ConvertError", "build_parser", "convert", "main", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
