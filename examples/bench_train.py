"""Training throughput of MemoSight LoRA against mlx-lm's own LoRA training.

Both runs use mlx-lm's trainer on the same model (same weights, same LoRA
layers and rank) and the same sequences of real tokens: mlx-lm trains on each
MemoSight sample with its foresight tokens left out (prompt, steps, memory
and continue tokens, EOS) with its default loss; MemoSight trains on the full
sample (one foresight token before every step token) with the joint loss.
Throughput counts real (non-foresight) tokens per second, so the foresight
tokens MemoSight adds count as its cost.

    python examples/bench_train.py [--hidden 128] [--layers 4] [--batch-size 4] [--epochs 2]

Runs on any MLX backend; a random model is built here with a byte-level BPE
tokenizer trained here (``--vocab``), or a given Hugging Face tokenizer
(``--tokenizer ../shared/tokenizers/qwen2`` for Qwen2's 151k vocabulary).
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen2  # noqa: E402
from mlx_lm.tuner.trainer import TrainingArgs, default_loss, iterate_batches  # noqa: E402
from mlx_lm.tuner.trainer import train as mlx_train  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

from mlx_memosight.config import BESPOKE_SYSTEM_PROMPT, build_config  # noqa: E402
from mlx_memosight.datasets import BatchIterator, Example, MemoSightDataset  # noqa: E402
from mlx_memosight.layout import Role  # noqa: E402
from mlx_memosight.model import attach_token_rope  # noqa: E402
from mlx_memosight.train import (  # noqa: E402
    add_token_rows,
    memosight_loss,
    memosight_token_rows,
    setup_trainable,
)

WORDS = ("first we add the numbers then check result carefully so total is apples oranges "
         "train speed distance time half double remaining each every day week price cost sum "
         "difference product ratio percent more less than equal gives means after before left "
         "right count group share split between friends people pieces cake boxes bags coins "
         "dollars miles hours minutes rate work together alone faster slower start end again "
         "verify answer question assume suppose let denote unknown value equation solve both "
         "sides subtract multiply divide known rule pattern next previous step wait actually "
         "reconsider mistake correct wrong maybe perhaps clearly therefore hence thus").split()


def examples(n, rng):
    """Arithmetic word problems with several reasoning steps of varied length."""
    out = []
    for _ in range(n):
        a, b = int(rng.integers(2, 99)), int(rng.integers(2, 99))
        steps = []
        for s in range(int(rng.integers(6, 11))):
            filler = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 50))))
            steps.append(f"Step {s + 1}: {filler}, {a} + {b * (s + 1)} = {a + b * (s + 1)}.")
        steps.append(f"The answer is \\boxed{{{a + b * len(steps)}}}.")
        out.append(Example(f"Tom has {a} apples and buys {b} more each day. How many after a week?",
                           steps, system=BESPOKE_SYSTEM_PROMPT))
    return out


def tokenizer_for(args, corpus):
    if args.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus + [BESPOKE_SYSTEM_PROMPT] * 4, trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:]), "BPE trained here"


def build_model(args, vocab):
    mx.random.seed(0)
    return qwen2.Model(qwen2.ModelArgs(
        model_type="qwen2", hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=args.hidden * 3, num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 128), rms_norm_eps=1e-6, vocab_size=vocab,
        tie_word_embeddings=True, rope_theta=1e6))


class Timer:
    """Training callback: seconds of training time per report window (mlx-lm
    reports iterations_per_second = steps_per_report / training time)."""

    def __init__(self, steps_per_report):
        self.steps = steps_per_report
        self.windows = []

    def on_train_loss_report(self, info):
        self.windows.append(self.steps / info["iterations_per_second"])

    def on_val_loss_report(self, info):
        pass


def run(kind, model_weights, args, dataset, n_batches, cfg=None, tokenizer=None, vocab=None):
    model = build_model(args, vocab)
    model.load_weights(model_weights)
    mx.eval(model.parameters())
    mx.random.seed(0)
    lora = dict(rank=8, scale=20.0, dropout=0.0)
    if kind == "memosight":
        attach_token_rope(model)
        setup_trainable(model, "lora", -1, lora, memosight_token_rows(tokenizer))
        loss = memosight_loss
        iterate = BatchIterator(cfg.lm_loss_weight, cfg.mtp_loss_weight, seed=0)
    else:
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), lora)
        loss = default_loss
        iterate = iterate_batches
    timer = Timer(n_batches)
    targs = TrainingArgs(batch_size=args.batch_size, iters=n_batches * (args.epochs + 1),
                         steps_per_report=n_batches, steps_per_eval=10**9, steps_per_save=10**9,
                         max_seq_length=100000, adapter_file=str(Path(args.out) / f"{kind}.safetensors"))
    mlx_train(model, optim.Adam(learning_rate=1e-4), dataset, None, targs, loss=loss,
              iterate_batches=iterate, training_callback=timer)
    return timer.windows[1:]  # the first epoch compiles


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000, help="Vocabulary of the BPE trained here.")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="Measured epochs (after one warm-up epoch).")
    p.add_argument("--trials", type=int, default=2, help="Alternating runs of each trainer.")
    p.add_argument("--tokenizer", default=None, help="A Hugging Face tokenizer folder instead.")
    p.add_argument("--out", default=None, help="Folder for the adapters written (default: a temporary one).")
    args = p.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="bench_train.")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(0)
    exs = examples(args.examples - args.examples % args.batch_size, rng)
    tok, tok_name = tokenizer_for(args, [e.question + " " + " ".join(e.thoughts) for e in exs])
    n_base = len(tok)
    model = build_model(args, n_base)
    add_token_rows(model, tok)
    vocab = len(tok)
    weights = list(tree_flatten(model.parameters()))
    cfg = build_config(tok, "qwen2", template=None)
    ms = MemoSightDataset.from_examples(exs, tok, cfg, max_seq_length=4096, seed=0, name="bench")
    plain = [(s.input_ids[s.roles != Role.FORESIGHT].tolist(), 0) for s in ms.samples]
    real = sum(len(x) for x, _ in plain)
    physical = sum(len(s) for s in ms.samples)
    n_batches = len(exs) // args.batch_size

    print(f"model: qwen2, hidden {args.hidden}, {args.layers} layers, vocab {vocab} "
          f"(tokenizer: {tok_name}); LoRA rank 8 on all layers")
    print(f"data: {len(exs)} examples, {real} real tokens per epoch "
          f"({real / len(exs):.0f} per example), {physical} with foresight tokens "
          f"({physical / real:.2f}x); batch {args.batch_size}; backend {mx.default_device()}")
    # mlx-lm on sequences as long as MemoSight's (foresight tokens kept as
    # ordinary tokens): the same work per sequence, to separate the layout's
    # extra tokens from this implementation's overhead
    same_length = [(s.input_ids.tolist(), 0) for s in ms.samples]
    runs = {"mlx_lm": (plain, real), "memosight": (ms, real), "mlx_lm_same_length": (same_length, physical)}
    tps = {k: [] for k in runs}
    for _ in range(args.trials):
        for kind, (data, tokens) in runs.items():
            secs = run(kind.split("_same")[0], weights, args, data, n_batches, cfg, tok, vocab)
            tps[kind] += [tokens / s for s in secs]
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"{'trainer':<48}{'tokens/s':>10}")
    print(f"{'mlx-lm LoRA, default loss (real tokens)':<48}{med['mlx_lm']:>10,.0f}")
    print(f"{'MemoSight LoRA, joint loss (real tokens)':<48}{med['memosight']:>10,.0f}")
    print(f"{'mlx-lm LoRA on MemoSight-length sequences':<48}{med['mlx_lm_same_length']:>10,.0f}")
    print(f"ratio MemoSight / mlx-lm, real tokens/s: {med['memosight'] / med['mlx_lm']:.2f}x")
    print(f"ratio MemoSight / mlx-lm at equal sequence length (all tokens/s): "
          f"{med['memosight'] * physical / real / med['mlx_lm_same_length']:.2f}x")


if __name__ == "__main__":
    main()
