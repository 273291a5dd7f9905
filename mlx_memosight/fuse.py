"""``mlx_memosight.fuse``: fuse trained adapters into a standalone MemoSight model.

    mlx_memosight.fuse --model PATH --adapter-path DIR --save-path DIR

``--model`` is the model the adapters were trained from (a plain base model
gets its MemoSight tokens again, the same way). The output folder holds the
weights, ``config.json``, the tokenizer and ``memosight.json``, and loads with
``mlx_memosight.load`` and ``mlx_lm.load``.
"""

import argparse
import sys

from .config import ConfigError
from .train import TrainError, fuse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_memosight.fuse",
                                description="Fuse MemoSight adapters into their base model.")
    p.add_argument("--model", required=True, help="The model folder the adapters were trained from.")
    p.add_argument("--adapter-path", default="adapters", help="Folder of the trained adapters.")
    p.add_argument("--save-path", default="fused_model", help="Folder to write the fused model to.")
    p.add_argument("--dequantize", action="store_true", help="Write a dequantised model.")
    p.add_argument("--force", action="store_true", help="Replace an existing --save-path folder.")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        path = fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.force)
    except (TrainError, ConfigError, ValueError) as e:
        # mlx-lm's adapter checks list every tensor; the first line says what is wrong
        print(f"mlx_memosight.fuse: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    print(f"Saved the fused model to {path}")


if __name__ == "__main__":
    main()
