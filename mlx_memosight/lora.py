"""``mlx_memosight.lora``: fine-tune a model for MemoSight reasoning on the Mac.

    mlx_memosight.lora --model PATH --data PATH --train [--fine-tune-type lora|dora|full]
        [--iters N] [--batch-size N] [--adapter-path DIR] [--resume-adapter-file F] ...

A plain Qwen2 / Llama model gets the MemoSight tokens first (their rows are
trained with the adapters). ``--data`` is a folder with ``train.jsonl`` /
``valid.jsonl`` / ``test.jsonl`` (or one ``.jsonl`` file) of reasoning records.
Multi-process data parallel: ``mlx.launch -n 2 --backend ring -m mlx_memosight.lora ...``.
"""

import math
from pathlib import Path

from . import cli
from .config import TEMPLATES
from .options import TrainingOptions, add_arguments


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.lora",
        description="Fine-tune a Qwen2 / Llama model for MemoSight reasoning (LoRA, DoRA or full).",
    )
    p.add_argument("--model", required=True, help="model folder (plain base or MemoSight model)")
    p.add_argument("--data", required=True,
                   help="folder with train.jsonl / valid.jsonl / test.jsonl, or one .jsonl file")
    p.add_argument("--train", action="store_true", help="train")
    p.add_argument("--test", action="store_true", help="report the loss on test.jsonl")
    add_arguments(p, TrainingOptions)
    p.add_argument("--test-batches", type=int, default=-1, help="test batches (-1: the whole set)")
    p.add_argument("--resume-adapter-file", default=None, help="adapters to resume training from")
    p.add_argument("--adapter-path", default="adapters",
                   help="where to save the adapters (default: %(default)s)")
    p.add_argument("--compression-ratio", type=int, default=None,
                   help="thought tokens per memory token (family default: Qwen 6, Llama 5)")
    p.add_argument("--max-offset", type=int, default=None,
                   help="largest foresight offset (family default: Qwen 2, Llama 3)")
    p.add_argument("--lm-loss-weight", type=float, default=None)
    p.add_argument("--mtp-loss-weight", type=float, default=None)
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="prompt template of a plain base model (default: by family and tokenizer)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count data lines that are not valid records instead of stopping")
    p.add_argument("--save-base", default=None, metavar="DIR",
                   help="also write the base model with the MemoSight tokens added (for "
                        "mlx_lm.load(DIR, adapter_path=...)); fuse does not need it")
    p.add_argument("--force", action="store_true", help="replace an existing --save-base folder")
    return p


def run(args):
    from .datasets import MemoSightDataset, load_splits
    from .errors import DataError
    from .train import ADAPTER_FILE, evaluate, load_base, prepare, rank0_print, save_model, train

    if not (args.train or args.test):
        raise cli.UsageError("nothing to do: pass --train and/or --test")
    options = TrainingOptions.from_args(args)
    model, tokenizer, hf_config, cfg = load_base(args.model)
    cfg, added = prepare(
        model, tokenizer, hf_config, cfg,
        template=args.template,
        compression_ratio=args.compression_ratio, max_offset=args.max_offset,
        lm_loss_weight=args.lm_loss_weight, mtp_loss_weight=args.mtp_loss_weight,
    )
    if added:
        rank0_print(f"Added {len(added)} MemoSight tokens; their rows start at the mean of their "
               f"descriptions' embeddings")

    splits = load_splits(args.data, args.skip_bad_lines, required=("train",) if args.train else ("test",))
    datasets = {}
    for split, (examples, skipped) in splits.items():
        ds = MemoSightDataset.from_examples(examples, tokenizer, cfg, options.max_seq_length,
                                            options.seed, name=f"{split}.jsonl")
        if skipped:
            rank0_print(f"Notice: {skipped} bad lines of {split}.jsonl skipped (--skip-bad-lines)")
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
    cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    main()
