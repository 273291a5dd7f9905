"""Make small PyTorch-trained MemoSight checkpoints, as the reference makes them.

A tiny Qwen2 / Llama model with a base tokenizer gets the MemoSight tokens
(SPEC section 1: added in SPEC order, embeddings resized with
``mean_resizing=False``, each new row set to the mean of its description's
token embeddings, rows processed in reverse list order), is trained for a few
optimizer steps of the joint loss (``convert.torch_layout``) and is saved with
``save_pretrained``, optionally in small shards, as ``pytorch_model*.bin``, in
bfloat16, with a transformers-4 style ``config.json`` and with the extra files
of a Trainer ``checkpoint-N/`` folder. Never imported by the runtime package.

    python -m convert.make_checkpoint -o ckpt --family qwen2 --tokenizer bpe
"""

import argparse
import json
import random
from pathlib import Path
from typing import Optional

import torch

from convert import torch_layout

# SPEC section 1, written here from the SPEC rather than imported from the
# runtime, so that the tests that compare the two check one against the other.
# The tokens MemoSight adds, in order, with the description whose mean
# embedding initialises each new row.
MEMOSIGHT_TOKENS = [
    ("<|splitter|>", "\n\n"),
    ("<|continue|>", "continue to output according to previous content"),
    ("<|recover|>", "recover the token according to previous content"),
    ("<|begin_of_thought|>", "begin of thought"),
    ("<|end_of_thought|>", "end of thought"),
    ("<|begin_of_solution|>", "begin of solution"),
    ("<|end_of_solution|>", "end of solution"),
    ("\n\n", "\n\n"),
    ("<|register|>", "predict the future token"),
] + [(f"<|o_{i}|>", f"compress output {i}") for i in range(300)]

# Per family: the chat tokens of its prompt template (BOS, EOS) and the
# reference's training defaults.
FAMILIES = {
    "qwen2": dict(bos="<|im_start|>", eos="<|im_end|>", compression_ratio=6, max_offset=2,
                  lm_loss_weight=0.7, mtp_loss_weight=0.3),
    "llama": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", compression_ratio=5, max_offset=3,
                  lm_loss_weight=1.0, mtp_loss_weight=0.3),
    "qwen3": dict(bos="<|im_start|>", eos="<|im_end|>", compression_ratio=6, max_offset=2,
                  lm_loss_weight=0.7, mtp_loss_weight=0.3),
}
PROMPTS = {
    "qwen2": "{bos}system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
             "<|im_start|>assistant\n",
    "qwen3": "{bos}system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
             "<|im_start|>assistant\n",
    "llama": "{bos}<|start_header_id|>system<|end_header_id|>\n{system}<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n{question}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n",
    # a tokenizer without the family's chat tokens: its own BOS / EOS
    "plain": "{bos}{system}\n\nQuestion: {question}\n\nAnswer:\n",
}


def _known(tokenizer, token: str) -> bool:
    """Whether the tokenizer maps ``token`` to an id of its own (not the
    unknown token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid is not None and not (tid == tokenizer.unk_token_id and token != tokenizer.unk_token)


def template_tokens(family: str, tokenizer):
    """``(prompt, bos, eos)``: the family's template when the tokenizer has its
    chat tokens, else the plain one with the tokenizer's own BOS / EOS."""
    f = FAMILIES[family]
    if _known(tokenizer, f["eos"]) and _known(tokenizer, f["bos"]):
        return PROMPTS[family], f["bos"], f["eos"]
    return PROMPTS["plain"], tokenizer.bos_token, tokenizer.eos_token


# Reasoning examples the checkpoints are trained on: (question, steps).
EXAMPLES = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?",
     ["Tom starts with 3 apples.", "He buys 4 more, so 3 + 4 = 7.", "The answer is \\boxed{7}."]),
    ("A train travels 60 miles in 2 hours. What is its speed?",
     ["Speed is distance over time.", "60 / 2 = 30 miles per hour.", "The answer is \\boxed{30}."]),
    ("What is 12 times 5?",
     ["12 times 5 is 12 + 12 + 12 + 12 + 12.", "That is 60.", "The answer is \\boxed{60}."]),
    ("Anna reads 15 pages a day. How many pages does she read in 4 days?",
     ["Each day she reads 15 pages.", "In 4 days: 15 * 4 = 60 pages.", "The answer is \\boxed{60}."]),
]

TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "training_args.bin")


def bpe_tokenizer(vocab_size: int = 400, corpus=None):
    """A small byte-level BPE tokenizer with ChatML tokens, trained on
    ``corpus`` (default: :data:`EXAMPLES` and the MemoSight descriptions), for
    checkpoints and tests that need no downloaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus is None:
        corpus = [q + "\n\n" + "\n\n".join(s) for q, s in EXAMPLES]
        corpus += ["continue to output according to previous content",
                   "recover the token according to previous content",
                   "begin of thought end of thought begin of solution end of solution",
                   "predict the future token compress output 0 1 2 3 4 5 6 7 8 9"]
    tok.train_from_iterator(list(corpus) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def load_tokenizer(tokenizer):
    """A tokenizer object, a tokenizer folder, or ``"bpe"``."""
    if tokenizer is None or tokenizer == "bpe":
        return bpe_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def base_model(family: str, vocab: int, hidden: int, layers: int, heads: int,
               kv_heads: Optional[int], intermediate: Optional[int], tie: Optional[bool],
               seed: int, tokenizer=None):
    """A randomly initialised float32 Qwen2 / Llama / Qwen3 model."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        max_position_embeddings=4096,
        initializer_range=0.1,
    )
    if family == "qwen2":
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(
            **common, rope_theta=1000000.0,
            tie_word_embeddings=True if tie is None else tie)
    elif family == "llama":
        cls, cfg = LlamaForCausalLM, LlamaConfig(
            **common, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
            tie_word_embeddings=False if tie is None else tie)
    elif family == "qwen3":
        cls, cfg = Qwen3ForCausalLM, Qwen3Config(
            **common, head_dim=max(8, hidden // heads * 2), rope_theta=1000000.0,
            tie_word_embeddings=True if tie is None else tie)
    else:
        raise ValueError(f"family must be qwen2, llama or qwen3, not {family!r}")
    if tokenizer is not None:
        _, bos, eos = template_tokens(family, tokenizer)
        cfg.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
        if bos is not None:
            cfg.bos_token_id = tokenizer.convert_tokens_to_ids(bos)
    return cls(cfg)


@torch.no_grad()
def init_token_rows(matrix: torch.Tensor, tokenizer, added: list, n_base: int):
    """Set the rows of the ``added`` tokens (ids ``n_base`` on, in order) of an
    embedding or ``lm_head`` matrix as the reference does: each to the mean of
    the rows of its description's tokens, descriptions tokenised after every
    token was added, rows set from the last added token back to the first (so
    ``<|splitter|>`` copies the freshly set row of the added ``"\\n\\n"``)."""
    for k in reversed(range(len(added))):
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(added[k][1]))
        matrix[n_base + k, :] = matrix[ids].float().mean(dim=0).to(matrix.dtype)


@torch.no_grad()
def add_tokens_as_reference(model, tokenizer) -> list:
    """Add the MemoSight tokens and initialise their rows as the reference does.

    Returns:
        The ``(token, description)`` pairs that were added.
    """
    added = [(t, d) for t, d in MEMOSIGHT_TOKENS if not _known(tokenizer, t)]
    if not added:
        return added
    n_base = len(tokenizer)
    tokenizer.add_tokens([t for t, _ in added], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    init_token_rows(embed, tokenizer, added, n_base)
    if head.data_ptr() != embed.data_ptr():
        init_token_rows(head, tokenizer, added, n_base)
    return added


def training_examples(tokenizer, family: str, seed: int):
    """MemoSight training layouts of :data:`EXAMPLES` (``torch_layout``)."""
    f = FAMILIES[family]
    prompt_text, bos, eos = template_tokens(family, tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    token_ids = {"foresight": ids("<|register|>"), "continue": ids("<|continue|>"), "eos": ids(eos),
                 "memory": [ids(f"<|o_{i}|>") for i in range(300)]}
    rng = random.Random(seed)
    out = []
    for question, thoughts in EXAMPLES:
        text = prompt_text.format(bos=bos or "", system="Think step by step.", question=question)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        steps = [tokenizer.encode(t + "\n" + "<|splitter|>", add_special_tokens=False)
                 for t in thoughts]
        thought_lens = [len(tokenizer.encode(t, add_special_tokens=False)) for t in thoughts]
        offset = rng.randint(0, f["max_offset"])
        out.append(torch_layout.training_layout(prompt, steps, thought_lens, token_ids,
                                                f["compression_ratio"], offset))
    return out


def plain_examples(tokenizer):
    """Causal language-model examples for a checkpoint without MemoSight tokens."""
    out = []
    for question, thoughts in EXAMPLES:
        ids = torch.tensor(tokenizer.encode(question + "\n" + "\n\n".join(thoughts),
                                            add_special_tokens=False))
        T = len(ids)
        out.append(dict(input_ids=ids, position_ids=torch.arange(T), labels=ids,
                        is_foresight=torch.zeros(T, dtype=torch.bool),
                        mask=torch.tril(torch.ones(T, T, dtype=torch.bool))))
    return out


def train(model, examples, steps: int, lr: float, lm_weight: float, mtp_weight: float):
    """A few AdamW steps of the joint loss, one example per micro-batch and all
    examples in each optimizer step. Returns the optimizer and the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        terms = []
        for ex in examples:
            logits = model(
                input_ids=ex["input_ids"][None],
                position_ids=ex["position_ids"][None],
                attention_mask=torch_layout.additive_mask(ex["mask"]),
            ).logits
            terms.append(torch_layout.joint_loss_terms(logits[0], ex["labels"], ex["is_foresight"]))
        loss = torch_layout.joint_loss(terms, lm_weight, mtp_weight)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return opt, losses


def _size_bytes(size) -> Optional[int]:
    if size is None or isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    s = size.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def save_bin(model, out: Path, max_shard_size=None):
    """``pytorch_model.bin`` (or shards with an index), the transformers-4
    pickle format. The state dict keeps a tied ``lm_head.weight``."""
    state = model.state_dict()
    limit = _size_bytes(max_shard_size)
    shards, size = [{}], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if limit and shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        torch.save(shards[0], out / "pytorch_model.bin")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, out / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(out / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def to_transformers4_config(path: Path):
    """Rewrite ``config.json`` the way transformers 4 writes it: ``torch_dtype``
    and top-level ``rope_theta`` / ``rope_scaling`` instead of ``rope_parameters``."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rp = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    cfg["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg["transformers_version"] = "4.46.0"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_trainer_files(path: Path, opt, steps: int):
    """The extra files of a Trainer ``checkpoint-N/`` folder. The converter
    must ignore them; ``training_args.bin`` is a pickle (as Trainer's is)."""
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save({"last_epoch": steps}, path / "scheduler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.get_rng_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": []}))
    torch.save(argparse.Namespace(output_dir=str(path), learning_rate=1e-3),
               path / "training_args.bin")


def make_checkpoint(
    out,
    family: str = "qwen2",
    tokenizer=None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: Optional[int] = None,
    intermediate: Optional[int] = None,
    tie: Optional[bool] = None,
    steps: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size=None,
    bin_format: bool = False,
    memosight: bool = True,
    transformers4_config: bool = False,
    trainer_files: bool = False,
) -> dict:
    """Make a PyTorch-trained checkpoint folder.

    Args:
        out: the folder to write (created).
        family: ``"qwen2"`` or ``"llama"``.
        tokenizer: a tokenizer, a tokenizer folder, or ``"bpe"`` / None for a
            small self-contained BPE tokenizer.
        tie: tie the input embedding and ``lm_head`` (family default when None).
        steps: optimizer steps of the joint loss.
        dtype: ``"float32"`` or ``"bfloat16"`` (the weights as saved).
        max_shard_size: e.g. ``"200KB"``; shards the weights when given.
        bin_format: write ``pytorch_model*.bin`` instead of safetensors.
        memosight: add the MemoSight tokens (False makes a plain checkpoint).
        transformers4_config: write ``config.json`` as transformers 4 does.
        trainer_files: add optimizer, scheduler, RNG and trainer-state files.

    Returns:
        ``{"path", "losses", "added_tokens", "vocab_size"}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    model = base_model(family, len(tok), hidden, layers, heads, kv_heads, intermediate, tie,
                       seed, tok)
    defaults = FAMILIES[family]
    if memosight:
        added = add_tokens_as_reference(model, tok)
        model.config.vocab_size = len(tok)
        for key in ("mtp_loss_weight", "lm_loss_weight", "max_offset"):
            setattr(model.config, key, defaults[key])
        examples = training_examples(tok, family, seed)
        weights = (defaults["lm_loss_weight"], defaults["mtp_loss_weight"])
    else:
        added = []
        examples = plain_examples(tok)
        weights = (1.0, 0.0)
    opt, losses = train(model, examples, steps, lr, *weights)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    if bin_format:
        for f in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            f.unlink()
        save_bin(model, out, max_shard_size)
    tok.save_pretrained(out)
    if transformers4_config:
        to_transformers4_config(out)
    if trainer_files:
        write_trainer_files(out, opt, steps)
    return {"path": out, "losses": losses, "added_tokens": [t for t, _ in added],
            "vocab_size": len(tok)}


def main():
    p = argparse.ArgumentParser(description="Make a small PyTorch-trained MemoSight checkpoint.")
    p.add_argument("-o", "--out", required=True, help="Checkpoint folder to write.")
    p.add_argument("--family", choices=sorted(FAMILIES), default="qwen2")
    p.add_argument("--tokenizer", default="bpe",
                   help="A tokenizer folder, or 'bpe' for a small self-contained one.")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None,
                   help="Tie the embedding and lm_head (default: the family's).")
    p.add_argument("--steps", type=int, default=2, help="Optimizer steps of the joint loss.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-shard-size", default=None, help="e.g. 200MB (default: one file).")
    p.add_argument("--bin", action="store_true", help="Write pytorch_model*.bin files.")
    p.add_argument("--plain", action="store_true", help="No MemoSight tokens.")
    p.add_argument("--transformers4-config", action="store_true")
    p.add_argument("--trainer-files", action="store_true")
    args = p.parse_args()
    info = make_checkpoint(
        args.out, family=args.family, tokenizer=args.tokenizer, hidden=args.hidden,
        layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        intermediate=args.intermediate, tie=args.tie, steps=args.steps, lr=args.lr,
        seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size,
        bin_format=args.bin, memosight=not args.plain,
        transformers4_config=args.transformers4_config, trainer_files=args.trainer_files,
    )
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    losses = ", ".join(f"{x:.3f}" for x in info["losses"])
    print(f"wrote {args.out}: vocab {info['vocab_size']}, {len(info['added_tokens'])} MemoSight "
          f"tokens added, {size / 1e6:.1f} MB, losses {losses}")


if __name__ == "__main__":
    main()
