"""Tiny models and tokenizers built inside the tests (nothing is downloaded)."""

import tempfile
from pathlib import Path

import numpy as np

from mlx_memosight.config import SPECIAL_TOKENS, TokenIds

BASE_VOCAB = 96


def spec_token_ids(base: int = BASE_VOCAB, eos: int = 2, bos=None) -> TokenIds:
    """The ids SPEC order gives the MemoSight tokens added after ``base`` base tokens."""
    names = [t for t, _ in SPECIAL_TOKENS]
    return TokenIds(
        splitter=base + names.index("<|splitter|>"),
        continue_=base + names.index("<|continue|>"),
        foresight=base + names.index("<|register|>"),
        memory=[base + names.index(f"<|o_{i}|>") for i in range(300)],
        eos=eos,
        bos=bos,
    )


def vocab_size(base: int = BASE_VOCAB) -> int:
    return base + len(SPECIAL_TOKENS)


def hf_model(family: str, vocab: int, seed: int = 0, **kw):
    """A tiny random transformers model in float32 (transformers writes a
    transformers-5 style config with ``rope_parameters``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.2,
        max_position_embeddings=4096,
    )
    common.update(kw)
    if family == "qwen2":
        common.setdefault("num_key_value_heads", 2)
        common.setdefault("rope_theta", 12345.0)
        common.setdefault("tie_word_embeddings", True)
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "llama":
        common.setdefault("num_key_value_heads", 1)
        common.setdefault("rope_theta", 500000.0)
        common.setdefault("tie_word_embeddings", False)
        common.setdefault(
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        )
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        common.setdefault("num_key_value_heads", 2)
        common.setdefault("head_dim", 32)  # wider than hidden / heads, as Qwen3's 0.6B is
        common.setdefault("rope_theta", 1000000.0)
        common.setdefault("tie_word_embeddings", True)
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        raise ValueError(family)
    return model.eval()


def save_hf_model(model, path=None) -> Path:
    path = Path(path or tempfile.mkdtemp())
    model.save_pretrained(path)
    return path


def random_steps(rng: np.random.Generator, n_steps, token_ids: TokenIds, low=3, high=40, min_len=1, max_len=9):
    """Random step contents ending with the splitter, and their thought lengths."""
    steps, thought_lens = [], []
    for _ in range(n_steps):
        n = int(rng.integers(min_len, max_len + 1))
        body = rng.integers(low, high, size=n).tolist()
        steps.append(body + [token_ids.splitter])
        thought_lens.append(max(1, n - 1))
    return steps, thought_lens


CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "First, 3 + 4 = 7.\n\nSo Tom has 7 apples.\n\nThe answer is \\boxed{7}.",
    "A train travels 60 miles in 2 hours. What is its speed?",
    "Speed is distance over time: 60 / 2 = 30.\n\nThe answer is \\boxed{30}.",
    "continue to output according to previous content",
    "recover the token according to previous content",
    "begin of thought end of thought begin of solution end of solution",
    "predict the future token compress output 0 1 2 3 4 5 6 7 8 9",
]


def make_bpe_tokenizer(path=None, vocab_size=300):
    """A small byte-level BPE tokenizer with ChatML tokens, trained here."""
    from convert.make_checkpoint import bpe_tokenizer

    hf = bpe_tokenizer(vocab_size, CORPUS)
    if path is not None:
        hf.save_pretrained(path)
    return hf


# ----------------------------------------------------------------------------
# A tiny MLX reasoner that really emits splitters, trained in a few seconds.


def mlx_model(family: str, vocab: int, seed: int = 0, **kw):
    """A tiny random mlx-lm model, MemoSight-ready."""
    import importlib

    import mlx.core as mx

    from mlx_memosight.model import attach_token_rope

    mx.random.seed(seed)
    args = dict(
        model_type=family,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=family == "qwen2",
    )
    args.update(kw)
    if family == "qwen3":
        args.setdefault("head_dim", 32)
        args.setdefault("rope_theta", 1000000.0)
    module = importlib.import_module(f"mlx_lm.models.{family}")
    model = module.Model(module.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    return attach_token_rope(model), args


class Task:
    """Synthetic reasoning: after a prompt ending in token x, six steps, each
    counting up from x for 3-6 tokens, then "\n" and the splitter; EOS last."""

    def __init__(self, cfg, newline: int, lo: int, hi: int, n_steps: int = 6):
        self.cfg, self.newline, self.lo, self.hi, self.n_steps = cfg, newline, lo, hi, n_steps

    def word(self, i):
        return self.lo + i % (self.hi - self.lo)

    def prompt(self, rng, n=4):
        return rng.integers(self.lo, self.hi, size=n).tolist()

    def steps(self, prompt):
        x = prompt[-1] - self.lo
        n = 3 + x % 4
        step = [self.word(x + j) for j in range(n)] + [self.newline, self.cfg.token_ids.splitter]
        return [list(step) for _ in range(self.n_steps)]


def train_reasoner(model, task: Task, steps: int = 150, batch: int = 6, seed: int = 0, lr: float = 1e-2):
    """A few hundred Adam steps of the joint LM + MTP loss on the task."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_memosight.layout import build_training_sample, collate
    from mlx_memosight.model import forward
    from mlx_memosight.layout import attention_mask

    cfg = task.cfg
    rng = np.random.default_rng(seed)

    def make_batch():
        samples = []
        for _ in range(batch):
            p = task.prompt(rng)
            st = task.steps(p)
            samples.append(build_training_sample(
                p, st, cfg.token_ids, cfg.compression_ratio, int(rng.integers(0, cfg.max_offset + 1)),
                thought_lens=[len(s) - 2 for s in st],
            ))
        b = collate(samples, length=96 * ((max(len(s) for s in samples) + 95) // 96))
        return [mx.array(a) for a in (b.input_ids, b.positions, b.lm_targets, b.mtp_targets,
                                       b.query_slot, b.query_limit, b.key_visible_until)]

    def loss_fn(model, ids, pos, lm, mtp, qs, ql, kv):
        mask = attention_mask(qs, ql, kv, xp=mx)
        logits = forward(model, ids, pos, mask)
        def ce(t):
            valid = t >= 0
            l = nn.losses.cross_entropy(logits, mx.maximum(t, 0)) * valid
            return l.sum() / mx.maximum(valid.sum(), 1)
        return cfg.lm_loss_weight * ce(lm) + cfg.mtp_loss_weight * ce(mtp)

    from functools import partial

    opt = optim.Adam(learning_rate=lr)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, *batch)
        opt.update(model, grads)
        return loss

    losses = []
    for _ in range(steps):
        loss = step(*make_batch())
        mx.eval(state, loss)
        losses.append(loss.item())
    return losses


REASONERS = Path(__file__).resolve().parent / "data"
TASK_RANGE = (40, 52)


def tiny_reasoner(family: str, path, steps: int = 150, ratio: int = 2):
    """Train and save a tiny MemoSight model folder (config, weights, tokenizer,
    memosight.json). Returns ``(path, task)``."""
    from mlx_lm.utils import save_config, save_model

    from mlx_memosight.config import add_memosight_tokens, build_config

    path = Path(path)
    tok = make_bpe_tokenizer()
    add_memosight_tokens(tok)
    cfg = build_config(tok, family, compression_ratio=ratio, max_offset=2, draft_len=2)
    if family == "llama":
        # the self-contained tokenizer has ChatML tokens only
        from mlx_memosight.config import TEMPLATES

        cfg = build_config(tok, family, template=TEMPLATES["qwen"], compression_ratio=ratio,
                           max_offset=2, draft_len=2)
    model, args = mlx_model(family, len(tok))
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    task = Task(cfg, newline, *TASK_RANGE)
    train_reasoner(model, task, steps=steps)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(args), path / "config.json")
    tok.save_pretrained(path)
    cfg.save(path)
    return path, task


def shipped_reasoner(family: str):
    """The tiny reasoner of ``family`` that :func:`tiny_reasoner` trained once
    (``python tests/helpers.py`` writes them again). Returns ``(path, task)``."""
    from transformers import AutoTokenizer

    from mlx_memosight.config import MemoSightConfig

    path = REASONERS / f"reasoner-{family}"
    tok = AutoTokenizer.from_pretrained(str(path))
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    return path, Task(MemoSightConfig.load(path), newline, *TASK_RANGE)


def reference_decode(model, cfg, prompt, max_tokens, compress=True, repetition_penalty=1.0,
                     exempt_ids=()):
    """Greedy decoding with no cache: every token recomputes the whole visible
    sequence (prompt, finished steps with their memory tokens and continue, the
    open step) under the layout's mask. The oracle of the cached engine.

    The repetition penalty is the reference evaluation's, written here in
    numpy: every distinct token of prompt and output so far, except
    ``exempt_ids``, divides a positive logit by the penalty (multiplies a
    negative one) once."""
    import mlx.core as mx

    from mlx_memosight.model import forward

    ids = cfg.token_ids
    exempt = set(exempt_ids)
    out, finished, open_step = [], [], []
    while len(out) < max_tokens:
        if compress:
            row = _visible_logits(model, cfg, prompt, finished, open_step)
        else:
            seq = list(prompt) + out
            row = np.array(forward(model, seq, 0, "causal", rows=[len(seq) - 1])[0, 0].astype(mx.float32))
        if repetition_penalty != 1.0:
            for tok in set(prompt) | set(out):
                if tok not in exempt:
                    row[tok] = row[tok] / repetition_penalty if row[tok] > 0 else row[tok] * repetition_penalty
        t = int(np.argmax(row))
        out.append(t)
        if t == ids.eos:
            break
        if compress and t == ids.splitter:
            finished.append(open_step + [t])
            open_step = []
        else:
            open_step.append(t)
    return out


def _visible_logits(model, cfg, prompt, finished, open_step, position=False):
    """Logits after the sequence a compressing decoder sees (prompt, each
    finished step with its memory tokens and continue, the open step),
    computed from scratch under the layout's mask."""
    import mlx.core as mx

    from mlx_memosight.layout import build_training_sample
    from mlx_memosight.model import forward

    s = build_training_sample(
        prompt, finished, cfg.token_ids, cfg.compression_ratio, 0,
        memory_counts=[cfg.memory_count(len(x)) for x in finished],
        add_eos=False, foresight=False, open_step=open_step,
    )
    logits = forward(model, s.input_ids, s.positions, mx.array(s.mask()), rows=[len(s) - 1])
    row = np.array(logits[0, 0].astype(mx.float32))
    return (row, int(s.positions[-1])) if position else row


def reference_logits(model, cfg, prompt, output, position=False):
    """The no-cache logits after ``prompt`` and the committed ``output``
    (whose steps end with the splitter) under compression; with
    ``position``, also the position id of the last token."""
    steps = split_steps(output, cfg.token_ids.splitter)
    done = sum(len(s) for s in steps)
    return _visible_logits(model, cfg, prompt, steps, list(output[done:]), position)


def run_command(main, argv, capsys):
    """Run a command's ``main(argv)`` in this process; returns ``(exit code,
    stdout, stderr)``."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def split_steps(tokens, splitter):
    """Finished steps (ending with the splitter) of an output."""
    steps, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == splitter:
            steps.append(cur)
            cur = []
    return steps


if __name__ == "__main__":
    # Train the tiny reasoners the tests use (about a minute each on two cores).
    import shutil

    for family in ("qwen2", "llama"):
        dst = REASONERS / f"reasoner-{family}"
        shutil.rmtree(dst, ignore_errors=True)
        tiny_reasoner(family, dst)
        print(f"wrote {dst}")
