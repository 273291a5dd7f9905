"""Train the packaged demo model, and its plain baseline, from scratch.

    examples/with_openblas.sh python examples/train_tiny_reasoner.py --out tiny-reasoner

On Linux, run it under ``examples/with_openblas.sh``: with the reference BLAS
of MLX's Linux wheel training is about seven times slower (README, "Speed on
Linux"), far over the hour the defaults are sized for.

Steps (each timed; the total is printed at the end):

1. data: the synthetic task of :mod:`mlx_memosight.demo` (train and valid
   splits as reference-format JSON lines under ``OUT/data``, which both models
   are trained from; the held-out problems as an eval file
   ``OUT/heldout.jsonl``);
2. tokenizer: a SentencePiece BPE model trained on the training text (digits
   split, byte fallback), loaded as a Hugging Face ``LlamaTokenizer``, with a
   chat template that renders the prompt both models are trained on;
3. two Llama models, freshly initialised with the same weights, trained with
   :func:`mlx_memosight.train.train` (full fine-tuning) on the same examples
   with the same steps, batch size and learning-rate schedule: a MemoSight
   model (joint LM + foresight loss, memory tokens) written to
   ``mlx_memosight/demo_model``, or ``mlx_memosight/long_demo_model`` with
   ``--task turns`` (``--demo-dir``; the packaged models, which a default run
   replaces), and a plain model (ordinary SFT on the same text) written to
   ``OUT/plain``.

Then compare them on the held-out problems::

    python -m mlx_memosight.bench --model mlx_memosight/demo_model \\
        --plain-model OUT/plain --data OUT/heldout.jsonl --max-tokens 400

Ctrl-C stops the training and writes each model as trained so far to
``OUT/memosight-partial`` and ``OUT/plain-partial`` (never over a finished
model); the trainer's adapters stay in ``OUT/.KIND-checkpoints``; the exit
status is 130.
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_memosight import demo  # noqa: E402
from mlx_memosight.backend import reference_blas_in_use  # noqa: E402
from mlx_memosight.config import TEMPLATES  # noqa: E402
from mlx_memosight.datasets import MemoSightDataset, read_jsonl  # noqa: E402
from mlx_memosight.scoring import PROMPT_PREFIX  # noqa: E402
from mlx_memosight.train import TrainingOptions, prepare, save_model, train  # noqa: E402

SYSTEM = TEMPLATES["plain"].system
# The chat template renders the "plain" MemoSight template, so that a model
# without memosight.json (the baseline) is prompted exactly like the demo model
# (the "plain" template starts with the tokenizer's BOS).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}{{ '" + SYSTEM + "' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\\n\\nQuestion: ' + m['content'] + '\\n\\nAnswer:\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=demo.TASKS, default="days",
                   help="days: the packaged demo model's task; turns: the long-reasoning task (answers of "
                        "about 1,700-5,700 tokens)")
    p.add_argument("--out", default=None, help="folder for data, tokenizer and the plain model "
                   "(default: tiny-reasoner, or tiny-reasoner-long for --task turns)")
    p.add_argument("--demo-dir", default=None, help="where the MemoSight model goes (default: "
                   "mlx_memosight/demo_model, or mlx_memosight/long_demo_model for --task turns)")
    p.add_argument("--only", choices=["memosight", "plain"], help="train one model only")
    p.add_argument("--jobs", type=int, default=2, help="models trained at once (1: one after the other)")
    p.add_argument("--model-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="draws the problems (and, unless --model-seed, the rest)")
    p.add_argument("--model-seed", type=int, default=None,
                   help="initial weights, layouts and batch order (default: --seed); the data stay --seed's")
    p.add_argument("--train-examples", type=int, default=None, help="default: 10000 (days), 6000 (turns)")
    p.add_argument("--valid-examples", type=int, default=64)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--bare-questions", type=float, default=0.2,
                   help="share of training questions without the evaluation prefix")
    p.add_argument("--vocab-size", type=int, default=640, help="SentencePiece vocabulary")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="default: --train-examples")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=None, help="default: 5e-4 (days), 1e-3 (turns)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--compression-ratio", type=int, default=None,
                   help="default: 12 (days), 16 (turns: its steps of about 25 tokens then keep 2 memory entries, "
                   "not 3)")
    p.add_argument("--max-offset", type=int, default=3)
    p.add_argument("--draft-len", type=int, default=2)
    p.add_argument("--short-share", type=float, default=0.5,
                   help="--task turns: share of training problems of %d-%d turns (the rest are long ones of %d-%d "
                   "turns, as the held-out ones, whole or cut: see --prefix-share); short problems teach the "
                   "steps at a fraction of the cost" % (*demo.SHORT_STEPS, demo.MIN_TURNS, demo.MAX_TURNS))
    p.add_argument("--prefix-share", type=float, default=None,
                   help="--task turns: share of training problems that are long ones cut to their first %d-%d "
                   "steps (no end): how a long solution begins, at the cost of a short problem (default: 0.4, "
                   "or less so that a tenth are whole long ones; the two shares must add up to less than 1)"
                   % demo.SHORT_STEPS)
    p.add_argument("--max-position", type=int, default=None,
                   help="max_position_embeddings (default: 2048, or 8192 for --task turns)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights")
    return p


# per task: defaults of (--out, --train-examples, --max-position, --learning-rate, --compression-ratio)
TASK_DEFAULTS = {"days": ("tiny-reasoner", 10000, 2048, 5e-4, 12),
                 "turns": ("tiny-reasoner-long", 6000, 8192, 1e-3, 16)}


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.short_share < 1:
        parser.error(f"--short-share must be in [0, 1), got {args.short_share}")
    if args.prefix_share is None:
        args.prefix_share = max(0.0, min(0.4, 0.9 - args.short_share))
    elif not 0 <= args.prefix_share < 1 - args.short_share:
        parser.error(f"--prefix-share must be in [0, 1 - --short-share) = [0, {1 - args.short_share:g}), got "
                     f"{args.prefix_share}: some training problems must be whole long ones")
    out, examples, max_position, learning_rate, ratio = TASK_DEFAULTS[args.task]
    args.compression_ratio = args.compression_ratio or ratio
    args.out = args.out or out
    args.train_examples = args.train_examples or examples
    args.iters = args.iters or args.train_examples
    args.model_seed = args.seed if args.model_seed is None else args.model_seed
    args.max_position = args.max_position or max_position
    if args.learning_rate is None:
        args.learning_rate = learning_rate
    if args.demo_dir is None:
        args.demo_dir = str(demo.DEMO_DIR if args.task == "days" else demo.LONG_DIR)
    return args


class Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.last = self.start

    def done(self, what):
        now = time.perf_counter()
        print(f"[{now - self.start:7.1f} s] {what} ({now - self.last:.1f} s)", flush=True)
        self.last = now

    @property
    def total(self):
        return time.perf_counter() - self.start


def write_data(out: Path, args):
    train_p = demo.problems("train", args.train_examples, args.seed, args.task)
    prefix = [None] * len(train_p)  # per training problem: the steps it is cut to, or None (whole)
    if args.task == "turns" and args.short_share + args.prefix_share > 0:
        import numpy as np

        rng = np.random.default_rng(args.seed)
        n_short = int(round(args.short_share * args.train_examples))
        n_prefix = max(0, min(int(round(args.prefix_share * args.train_examples)), args.train_examples - n_short - 1))
        fewest, most = demo.SHORT_STEPS
        mixed = demo.problems("train", n_short, args.seed, "turns", demo.SHORT_STEPS) + train_p[n_short:]
        cut = [None] * n_short + [int(k) for k in rng.integers(fewest, most + 1, n_prefix)]
        cut += [None] * (len(mixed) - len(cut))
        order = rng.permutation(len(mixed))
        train_p, prefix = [mixed[i] for i in order], [cut[i] for i in order]
    valid_p = demo.problems("valid", args.valid_examples, args.seed, args.task)
    held = demo.problems("heldout", args.heldout, args.seed, args.task)
    train_q, valid_q = questions(train_p, args.bare_questions), questions(valid_p, 0.0)
    records = [p.training_record(q, k) for p, q, k in zip(train_p, train_q, prefix)]
    demo.write_jsonl(out / "data" / "train.jsonl", records)
    demo.write_jsonl(out / "data" / "valid.jsonl", [p.training_record(q) for p, q in zip(valid_p, valid_q)])
    demo.write_jsonl(out / "heldout.jsonl", [p.eval_item() for p in held])
    texts = []
    for r in records:
        texts += [TEMPLATES["plain"].render(r["question"]), "\n\n".join(r["thoughts_list"])]
    return len(train_p), len(valid_p), texts, held


def answer_lengths(tok_dir: Path, held) -> str:
    """The length of the held-out problems' reference answers in the
    tokenizer's tokens: what a model has to write to answer them."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    n = np.array([len(tokenizer.encode(p.solution, add_special_tokens=False)) for p in held])
    return f"{n.min():,} to {n.max():,} tokens (median {int(np.median(n)):,}) over {len(n)} problems"


def questions(ps, bare_share: float):
    """The questions as the models are trained on them: most carry the
    evaluation's prefix (that is how bench and evaluate ask them), the first
    ``bare_share`` do not, so that a bare question works too."""
    n_bare = int(round(bare_share * len(ps)))
    return [p.question if i < n_bare else PROMPT_PREFIX + p.question for i, p in enumerate(ps)]


def train_tokenizer(texts, folder: Path, vocab_size: int):
    """A SentencePiece BPE tokenizer (digits split, byte fallback, text kept
    as is), loaded through transformers as a LlamaTokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(folder))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


def fresh_model(tokenizer, args):
    """A randomly initialised Llama model for the tokenizer (seeded)."""
    from mlx_lm.models import llama

    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=len(tokenizer),
        max_position_embeddings=args.max_position,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    mx.random.seed(args.model_seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model, config


INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (after writing what it had)


class Progress:
    """Training callback: the last step whose loss was reported."""

    step = 0

    def on_train_loss_report(self, info):
        self.step = info["iteration"]

    def on_val_loss_report(self, info):
        pass


def build(kind: str, tok_dir: Path, args, out: Path, clock: Clock):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model, hf_config = fresh_model(tokenizer, args)
    # both models get the MemoSight tokens, so they have the same shape; the
    # plain one never sees them
    cfg, _ = prepare(model, tokenizer, hf_config, template="plain",
                     compression_ratio=args.compression_ratio, max_offset=args.max_offset,
                     draft_len=args.draft_len)
    plain = kind == "plain"
    question = "How many?"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered != cfg.template.render(question):
        raise AssertionError(f"the chat template renders {rendered!r}, the training prompt is "
                             f"{cfg.template.render(question)!r}")

    def dataset(split):
        examples, _ = read_jsonl(out / "data" / f"{split}.jsonl")
        return MemoSightDataset.from_examples(examples, tokenizer, cfg, seed=args.model_seed, name=split,
                                              plain=plain)

    train_set, valid_set = dataset("train"), dataset("valid")
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    real = train_set.num_real_tokens
    longest = max(len(s) for s in train_set.samples)
    print(f"{kind}: {n_params / 1e6:.2f}M parameters, {len(train_set)} examples, "
          f"{real / len(train_set):.0f} real tokens per example "
          f"({sum(len(s) for s in train_set.samples) / len(train_set):.0f} laid out, at most {longest})",
          flush=True)
    last = max(int(s.positions.max()) for s in train_set.samples)
    if last >= args.max_position:
        sys.exit(f"--max-position {args.max_position} is too small: a training sample reaches position {last}")
    options = TrainingOptions(
        fine_tune_type="full", num_layers=-1, optimizer="adamw",
        optimizer_config=dict(weight_decay=0.01),
        learning_rate=args.learning_rate,
        lr_schedule=dict(name="cosine_decay", arguments=[args.learning_rate, args.iters, args.learning_rate / 20],
                         warmup=args.warmup),
        # validation: every --valid-examples problem, at the start and the end
        batch_size=args.batch_size, iters=args.iters, val_batches=-1,
        steps_per_report=max(1, args.iters // 20), steps_per_eval=args.iters, save_every=10 ** 9,
        max_seq_length=max(4096, longest), seed=args.model_seed,
    )
    checkpoints = out / f".{kind}-checkpoints"
    progress = Progress()
    try:
        report = train(model, tokenizer, train_set, valid_set, options, adapter_path=checkpoints,
                       callback=progress)
    except KeyboardInterrupt:
        # train() saved the adapters (kept in checkpoints); the weights in memory are theirs
        interrupted = True
        clock.done(f"{kind}: interrupted after step {progress.step} of {args.iters} (last reported); "
                   f"writing the model trained so far")
    else:
        interrupted = False
        shutil.rmtree(checkpoints, ignore_errors=True)
        clock.done(f"{kind} model trained ({args.iters} steps of {args.batch_size}; final train loss "
                   f"{report.train_losses[-1][1]:.3f}, valid loss {report.val_losses[-1][1]:.3f})")
    dtype = getattr(mx, args.dtype)
    model.set_dtype(dtype)
    hf_config["torch_dtype"] = args.dtype
    path = Path(args.demo_dir) if not plain else out / "plain"
    if interrupted:  # never in place of a finished model (the packaged demo model included)
        path = out / f"{kind}-partial"
    save_model(path, model, tokenizer, hf_config, None if plain else cfg, force=True)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{kind}: wrote {path} ({size / 1e6:.2f} MB)"
          + (f", trained for {progress.step} of {args.iters} steps only" if interrupted else ""), flush=True)
    if interrupted:
        sys.exit(INTERRUPTED)
    return path


def run_parallel(kinds, argv, out: Path, clock: Clock):
    """Train the models in child processes side by side: MLX's CPU backend
    runs a training step on one core, so two runs use both cores."""
    logs, procs = {}, {}
    (out / "logs").mkdir(exist_ok=True)
    for kind in kinds:
        logs[kind] = open(out / "logs" / f"{kind}.log", "w")
        procs[kind] = subprocess.Popen(
            [sys.executable, __file__, *argv, "--only", kind, "--model-only"],
            stdout=logs[kind], stderr=subprocess.STDOUT,
        )
    print(f"training {' and '.join(kinds)} side by side; logs in {out / 'logs'}", flush=True)
    failed = []
    interrupted = False
    for kind, proc in procs.items():
        while True:
            try:
                status = proc.wait()
                break
            except KeyboardInterrupt:  # the children got it too: wait while they write their models
                interrupted = True
        interrupted |= status == INTERRUPTED
        if status and status != INTERRUPTED:
            failed.append(kind)
        logs[kind].close()
        for line in (out / "logs" / f"{kind}.log").read_text().splitlines():
            if line.startswith((kind + ":", "[")):
                print(line)
    if failed:
        sys.exit(f"training failed: {', '.join(failed)} (see {out / 'logs'})")
    if interrupted:
        print(f"interrupted: the models above were written as trained so far; adapters in {out}/.*-checkpoints",
              flush=True)
        sys.exit(INTERRUPTED)
    clock.done(f"{' and '.join(kinds)} models trained")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    if not args.model_only and reference_blas_in_use():
        print("note: MLX's CPU products go through the reference BLAS here; training is about "
              "seven times slower than under examples/with_openblas.sh", flush=True)
    if args.model_only:
        build(args.only, out / "tokenizer", args, out, clock)
        return
    n_train, n_valid, texts, held = write_data(out, args)
    clock.done(f"data: {n_train} train, {n_valid} valid, {args.heldout} held-out problems")
    tok_dir = train_tokenizer(texts, out / "tokenizer", args.vocab_size)
    clock.done(f"tokenizer: {tok_dir}")
    if held:
        print(f"held-out reference answers: {answer_lengths(tok_dir, held)}", flush=True)
    kinds = [k for k in ("memosight", "plain") if args.only in (None, k)]
    if args.jobs > 1 and len(kinds) > 1:
        run_parallel(kinds, argv, out, clock)
    else:
        for kind in kinds:
            build(kind, tok_dir, args, out, clock)
    (out / "train_settings.json").write_text(json.dumps(vars(args), indent=2))
    print(f"total: {clock.total / 60:.1f} minutes")


if __name__ == "__main__":
    main()
