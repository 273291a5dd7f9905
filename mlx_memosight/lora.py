"""``mlx_memosight.lora``: fine-tune a model for MemoSight reasoning on the Mac.

    mlx_memosight.lora --model PATH --data PATH --train [--fine-tune-type lora|dora|full]
        [--iters N] [--batch-size N] [--adapter-path DIR] [--resume-adapter-file F] ...

A plain Qwen2 / Llama model gets the MemoSight tokens first (their rows are
trained with the adapters). ``--data`` is a folder with ``train.jsonl`` /
``valid.jsonl`` / ``test.jsonl`` (or one ``.jsonl`` file) of reasoning records.
Multi-process data parallel: ``mlx.launch -n 2 --backend ring -m mlx_memosight.lora ...``.
"""

import math
import re
import sys
from pathlib import Path

from . import cli
from .options import MemoSightOverrides, TrainingOptions, add_arguments


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.lora",
        description="Fine-tune a Qwen2 / Llama model for MemoSight reasoning (LoRA, DoRA or full).",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help="YAML file of settings with mlx-lm's lora keys; flags on the command line win")
    p.add_argument("--model", help="model folder (plain base or MemoSight model)")
    p.add_argument("--data",
                   help="folder with train.jsonl / valid.jsonl / test.jsonl, or one .jsonl file")
    p.add_argument("--train", action="store_true", help="train")
    p.add_argument("--test", action="store_true", help="report the loss on test.jsonl")
    add_arguments(p, TrainingOptions)
    p.add_argument("--test-batches", type=int, default=-1,
                   help="test batches (-1: the whole set; default: %(default)s)")
    p.add_argument("--resume-adapter-file", default=None, help="adapters to resume training from")
    p.add_argument("--adapter-path", default="adapters",
                   help="where to save the adapters (default: %(default)s)")
    add_arguments(p, MemoSightOverrides)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count data lines that are not valid records instead of stopping")
    p.add_argument("--save-base", default=None, metavar="DIR",
                   help="also write the base model with the MemoSight tokens added (for "
                        "mlx_lm.load(DIR, adapter_path=...)); fuse does not need it")
    p.add_argument("--force", action="store_true", help="replace an existing --save-base folder")
    return p


# mlx-lm lora config keys that mean nothing here
IGNORED_KEYS = {"mask_prompt": "MemoSight never trains on the prompt",
                "report_to": "progress is printed", "project_name": "progress is printed",
                "wandb": "progress is printed"}


def config_defaults(parser, argv):
    """Settings from ``-c FILE`` (mlx-lm's lora YAML) become the parser's
    defaults, so that flags given on the command line win."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return
    import yaml

    from .errors import OptionError

    loader = yaml.SafeLoader
    # YAML 1.1 reads 1e-5 as a string; mlx-lm's loader reads it as a number too
    loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
        r"(?:[eE][-+][0-9]+)?)$"), list("-+0123456789."))
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=loader)
    except OSError as e:
        raise OptionError(f"config={path}: {e.strerror or e}", "config")
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OptionError(f"config={path}: not valid YAML ({' '.join(str(e).split())})", "config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise OptionError(f"config={path}: expected a mapping of settings", "config")
    dests = {a.dest for a in parser._actions}
    values = {}
    for key, value in config.items():
        if key == "lora_parameters":
            if not isinstance(value, dict) or set(value) - {"rank", "scale", "dropout"}:
                raise OptionError(f"config={path}: lora_parameters takes rank, scale and dropout "
                                  "(MemoSight trains mlx-lm's default layers and the token rows)",
                                  "config")
            values.update({f"lora_{k}": v for k, v in value.items()})
        elif key in ("optimizer_config", "lr_schedule"):
            if not isinstance(value, dict):
                raise OptionError(f"config={path}: {key} must be a mapping", "config")
            values[key] = value
        elif key in IGNORED_KEYS:
            print(f"notice: {path}: {key} is ignored ({IGNORED_KEYS[key]})", file=sys.stderr)
        elif key in dests and key not in ("config", "help"):
            values[key] = value
        else:
            raise OptionError(f"config={path}: unknown setting {key!r}", "config")
    parser.set_defaults(**values)


def run(args):
    from .datasets import MemoSightDataset, bad_lines, load_splits
    from .errors import DataError
    from .train import ADAPTER_FILE, evaluate, load_base, prepare, rank0_print, save_model, train

    for name in ("model", "data"):
        if getattr(args, name) is None:
            raise cli.UsageError(f"--{name} is required (on the command line or in --config)")
    if not (args.train or args.test):
        raise cli.UsageError("nothing to do: pass --train and/or --test")
    optimizer_config = getattr(args, "optimizer_config", None) or {}
    options = TrainingOptions.from_args(args, lr_schedule=getattr(args, "lr_schedule", None),
                                        optimizer_config=optimizer_config.get(args.optimizer, {}))
    model, tokenizer, hf_config, cfg = load_base(args.model)
    overrides = MemoSightOverrides.from_args(args)
    cfg, added = prepare(model, tokenizer, hf_config, cfg, template=overrides.template, **overrides.values())
    if added:
        rank0_print(f"Added {len(added)} MemoSight tokens; their rows start at the mean of their "
               f"descriptions' embeddings")

    splits = load_splits(args.data, args.skip_bad_lines, required=("train",) if args.train else ("test",))
    datasets = {}
    for split, (examples, skipped) in splits.items():
        ds = MemoSightDataset.from_examples(examples, tokenizer, cfg, options.max_seq_length,
                                            options.seed, name=f"{split}.jsonl")
        if skipped:
            rank0_print(f"Notice: {bad_lines(skipped)} of {split}.jsonl skipped (--skip-bad-lines)")
        if ds.truncated:
            rank0_print(f"Notice: {ds.truncated} of {len(examples)} examples of {split}.jsonl are longer "
                   f"than --max-seq-length {options.max_seq_length} non-foresight tokens and were truncated")
        if ds.dropped:
            rank0_print(f"Notice: {ds.dropped} examples of {split}.jsonl have no trained token left after "
                   f"truncation and were dropped")
        if not len(ds):
            raise DataError(f"{split}.jsonl: no examples left ({ds.dropped} have no trained token "
                            f"within max_seq_length={options.max_seq_length})")
        datasets[split] = ds

    if args.save_base:
        save_model(args.save_base, model, tokenizer, hf_config, cfg, force=args.force, src_path=args.model)
        rank0_print(f"Saved the MemoSight base model to {args.save_base}")

    if args.train:
        if "valid" not in datasets:
            rank0_print("Notice: no valid.jsonl: training without validation")
        train(model, tokenizer, datasets["train"], datasets.get("valid"), options,
              adapter_path=args.adapter_path, resume_adapter_file=args.resume_adapter_file,
              extra_config=dict(model=str(args.model), data=str(args.data), tokens_added=len(added)))
    elif args.test:
        from mlx_lm.tuner.utils import load_adapters

        if (Path(args.adapter_path) / ADAPTER_FILE).exists():
            load_adapters(model, args.adapter_path)
    if args.test:
        if "test" not in datasets:
            raise DataError(f"{args.data}: no test.jsonl (test=True)")
        loss = evaluate(model, datasets["test"], options.batch_size, args.test_batches)
        rank0_print(f"Test loss {loss:.3f}, test ppl {math.exp(min(loss, 50)):.3f}")


def main(argv=None):
    cli.run(build_parser(), run, argv, defaults=config_defaults)


if __name__ == "__main__":
    main()
