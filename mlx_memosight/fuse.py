"""``mlx_memosight.fuse``: fuse trained adapters into a standalone MemoSight model.

    mlx_memosight.fuse --model PATH --adapter-path DIR --save-path DIR

``--model`` is the model the adapters were trained from (a plain base model
gets its MemoSight tokens again, the same way). The output folder holds the
weights, ``config.json``, the tokenizer and ``memosight.json``, and loads with
``mlx_memosight.load`` and ``mlx_lm.load``.
"""

from . import cli


def build_parser():
    p = cli.ArgumentParser(prog="mlx_memosight.fuse",
                           description="Fuse MemoSight adapters into their base model.")
    p.add_argument("--model", dest="model_path", required=True,
                   help="the model folder the adapters were trained from")
    p.add_argument("--adapter-path", default="adapters",
                   help="folder of the trained adapters (default: %(default)s)")
    p.add_argument("--save-path", default="fused_model",
                   help="folder to write the fused model to (default: %(default)s)")
    p.add_argument("--dequantize", action="store_true", help="write a dequantised model")
    p.add_argument("--force", action="store_true", help="replace an existing --save-path folder")
    return p


def _fuse(args):
    from .train import fuse

    path = fuse(args.model_path, args.adapter_path, args.save_path, args.dequantize, args.force)
    print(f"Saved the fused model to {path}")


def main(argv=None):
    cli.run(build_parser(), _fuse, argv)


if __name__ == "__main__":
    main()
