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
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if path is not None:
        hf.save_pretrained(path)
    return hf
