"""``mlx_memosight.lora``: fine-tune a model for MemoSight reasoning on the Mac.

    mlx_memosight.lora --model PATH --data PATH --train [--fine-tune-type lora|dora|full]
        [--iters N] [--batch-size N] [--adapter-path DIR] [--resume-adapter-file F] ...

A plain Qwen2 / Llama model gets the MemoSight tokens first (their rows are
trained with the adapters). ``--data`` is a folder with ``train.jsonl`` /
``valid.jsonl`` / ``test.jsonl`` (or one ``.jsonl`` file) of reasoning records.
Multi-process data parallel: ``mlx.launch -n 2 --backend ring -m mlx_memosight.lora ...``.
"""

import argparse
import math
import sys
from pathlib import Path

from .config import TEMPLATES, ConfigError
from .datasets import DataError, MemoSightDataset, load_splits
from .train import (
    ADAPTER_FILE,
    FINE_TUNE_TYPES,
    TrainError,
    TrainingOptions,
    rank0_print,
    evaluate,
    load_base,
    prepare,
    save_model,
    train,
)


def _typed(kind, low, strict):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if strict else '>='} {low}")
        return value

    return parse


positive_int = _typed(int, 0, True)
nonneg_int = _typed(int, 0, False)
positive_float = _typed(float, 0.0, True)
nonneg_float = _typed(float, 0.0, False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_memosight.lora",
        description="Fine-tune a Qwen2 / Llama model for MemoSight reasoning (LoRA, DoRA or full).",
    )
    p.add_argument("--model", required=True, help="Model folder (plain base or MemoSight model).")
    p.add_argument("--data", required=True,
                   help="Folder with train.jsonl / valid.jsonl / test.jsonl, or one .jsonl file.")
    p.add_argument("--train", action="store_true", help="Train.")
    p.add_argument("--test", action="store_true", help="Report the loss on test.jsonl.")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, default="lora")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "adafactor", "muon"], default="adam")
    p.add_argument("--num-layers", type=int, default=None,
                   help="Layers to fine-tune, from the last (-1: all; default 16 or all if fewer).")
    p.add_argument("--batch-size", type=positive_int, default=4, help="Global batch size.")
    p.add_argument("--iters", type=positive_int, default=1000,
                   help="Iterations (micro-batches) to train for.")
    p.add_argument("--val-batches", type=int, default=25,
                   help="Validation batches per evaluation (-1: the whole set).")
    p.add_argument("--test-batches", type=int, default=-1, help="Test batches (-1: the whole set).")
    p.add_argument("--learning-rate", type=positive_float, default=1e-5)
    p.add_argument("--steps-per-report", type=positive_int, default=10)
    p.add_argument("--steps-per-eval", type=positive_int, default=200)
    p.add_argument("--grad-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--resume-adapter-file", default=None, help="Adapters to resume training from.")
    p.add_argument("--adapter-path", default="adapters", help="Where to save the adapters.")
    p.add_argument("--save-every", type=positive_int, default=100, help="Checkpoint every N iterations.")
    p.add_argument("--max-seq-length", type=positive_int, default=2048,
                   help="Truncate samples to this many non-foresight tokens (SPEC section 2).")
    p.add_argument("--grad-checkpoint", action="store_true", help="Recompute activations to save memory.")
    p.add_argument("--seed", type=int, default=0, help="Seeds the foresight offsets, LoRA and data order.")
    p.add_argument("--lora-rank", type=positive_int, default=8)
    p.add_argument("--lora-scale", type=positive_float, default=20.0)
    p.add_argument("--lora-dropout", type=nonneg_float, default=0.0)
    p.add_argument("--freeze-token-rows", action="store_true",
                   help="Do not train the MemoSight tokens' embedding / lm_head rows (LoRA, DoRA).")
    p.add_argument("--compression-ratio", type=positive_int, default=None,
                   help="Thought tokens per memory token (family default: Qwen 6, Llama 5).")
    p.add_argument("--max-offset", type=nonneg_int, default=None,
                   help="Largest foresight offset (family default: Qwen 2, Llama 3).")
    p.add_argument("--lm-loss-weight", type=nonneg_float, default=None)
    p.add_argument("--mtp-loss-weight", type=nonneg_float, default=None)
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="Prompt template of a plain base model (default: by family and tokenizer).")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="Skip and count data lines that are not valid records instead of stopping.")
    p.add_argument("--save-base", default=None, metavar="DIR",
                   help="Also write the base model with the MemoSight tokens added (for "
                        "mlx_lm.load(DIR, adapter_path=...)); fuse does not need it.")
    p.add_argument("--force", action="store_true", help="Replace an existing --save-base folder.")
    return p


def options_from_args(args) -> TrainingOptions:
    return TrainingOptions(
        fine_tune_type=args.fine_tune_type,
        num_layers=args.num_layers,
        lora_parameters=dict(rank=args.lora_rank, scale=args.lora_scale, dropout=args.lora_dropout),
        train_token_rows=not args.freeze_token_rows,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        iters=args.iters,
        val_batches=args.val_batches,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        save_every=args.save_every,
        max_seq_length=args.max_seq_length,
        grad_checkpoint=args.grad_checkpoint,
        grad_accumulation_steps=args.grad_accumulation_steps,
        seed=args.seed,
    )


def run(args):
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
        ds = MemoSightDataset.from_examples(examples, tokenizer, cfg, args.max_seq_length,
                                            args.seed, name=f"{split}.jsonl")
        if skipped:
            rank0_print(f"Notice: {skipped} bad lines of {split}.jsonl skipped (--skip-bad-lines)")
        if ds.truncated:
            rank0_print(f"Notice: {ds.truncated} of {len(examples)} examples of {split}.jsonl are longer "
                   f"than --max-seq-length {args.max_seq_length} non-foresight tokens and were truncated")
        if ds.dropped:
            rank0_print(f"Notice: {ds.dropped} examples of {split}.jsonl have no trained token left after "
                   f"truncation and were dropped")
        if not len(ds):
            raise DataError(f"{split}.jsonl: no examples left ({ds.dropped} have no trained token "
                            f"within --max-seq-length {args.max_seq_length})")
        datasets[split] = ds

    if args.save_base:
        save_model(args.save_base, model, tokenizer, hf_config, cfg, force=args.force, src_path=args.model)
        rank0_print(f"Saved the MemoSight base model to {args.save_base}")

    if args.train:
        if "valid" not in datasets:
            rank0_print("Notice: no valid.jsonl: training without validation")
        train(model, tokenizer, datasets["train"], datasets.get("valid"), options_from_args(args),
              adapter_path=args.adapter_path, resume_adapter_file=args.resume_adapter_file,
              extra_config=dict(model=str(args.model), data=str(args.data), tokens_added=len(added)))
    elif args.test:
        from mlx_lm.tuner.utils import load_adapters

        if (Path(args.adapter_path) / ADAPTER_FILE).exists():
            load_adapters(model, args.adapter_path)
    if args.test:
        if "test" not in datasets:
            raise DataError(f"{args.data}: no test.jsonl (--test)")
        loss = evaluate(model, datasets["test"], args.batch_size, args.test_batches)
        rank0_print(f"Test loss {loss:.3f}, test ppl {math.exp(min(loss, 50)):.3f}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.train or args.test):
        parser.error("nothing to do: pass --train and/or --test")
    try:
        run(args)
    except KeyboardInterrupt:
        print("mlx_memosight.lora: interrupted", file=sys.stderr)
        sys.exit(130)
    except (DataError, TrainError, ConfigError) as e:
        print(f"mlx_memosight.lora: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
