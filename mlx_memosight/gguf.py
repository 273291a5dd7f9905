"""GGUF export and import with the MemoSight configuration.

Export (``mlx_memosight.convert CKPT --gguf FILE [--gguf-type TYPE]``) writes
an MLX model folder (Qwen2 or Llama) as one GGUF file that llama.cpp loads:

* architecture metadata and tensor names from gguf-py's tables (``Keys``,
  ``MODEL_ARCH``, ``get_tensor_name_map``), Llama's q / k row permutation,
  rope base and scaling (a Llama-3 scaling becomes the ``rope_freqs`` tensor);
* the tokenizer: byte-level BPE as ``gpt2`` with merges and the pre-tokenizer
  named from ``tokenizer.json``'s own pre-tokenizer (``qwen2``, ``llama-bpe``,
  ``gpt-2``), SentencePiece-style BPE as ``llama`` with scores; token types,
  special ids and the chat template;
* ``memosight.*`` keys holding every key of ``memosight.json``;
* f32 / f16 / q8_0 / q4_0 / q4_1 tensors through ``gguf.quants``; an MLX
  4-bit group-32 affine model maps to q4_1 block for block, without
  requantising.

Import (:func:`load_gguf`, used by ``generate --model FILE.gguf``) rebuilds an
mlx-lm model from ``mx.load`` of the file (quantised tensors arrive as MLX
weight / scales / biases), a Hugging Face fast tokenizer from the
``tokenizer.ggml.*`` keys and the MemoSight configuration from the
``memosight.*`` keys.
"""

import dataclasses
import json
import math
import mmap
import os
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import (
    CONFIG_FILE,
    DOUBLE_NEWLINE,
    SPECIAL_TOKENS,
    SUPPORTED_FAMILIES,
    ConfigError,
    MemoSightConfig,
)

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}
# Tensor types mx.load reads from a GGUF file.
LOADABLE = {
    gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
}
PREFIX = "memosight"

# The pre-tokenizer regexes of the Qwen2 and Llama-3 tokenizer.json files, and
# the names llama.cpp gives the pre-tokenizers that reproduce them.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama-bpe"}
PRE_NAMES = ("qwen2", "llama-bpe", "gpt-2")

# Text the export tokenizes with the source tokenizer and with the tokenizer
# rebuilt from the GGUF metadata; they must agree.
CHECK_TEXT = (
    "Tom has 3 apples and buys 4 more. How many apples does he have?\n\n"
    "3 + 4 = 7, so 33 + 444 = 477 and 12345 / 5 = 2469.\n"
    "  He said: \"I'll go; we've seen it.\"\t(nice)  \n\n\n"
    "Él está aquí. Это тест. 我想在apple工作 🦙🦙 ✅\n"
    "The answer is \\boxed{7}."
)


class GGUFError(ConfigError):
    """A GGUF problem, phrased for the user (one line, naming the file, key,
    tensor or flag)."""


def _one_line(e: BaseException) -> str:
    return " ".join((str(e).strip() or type(e).__name__).split())


# ----------------------------------------------------------------------------
# Tokenizer metadata


@dataclasses.dataclass
class TokenizerMeta:
    """The ``tokenizer.ggml.*`` content of a GGUF file."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]] = None
    merges: Optional[List[str]] = None
    special: Dict[str, int] = dataclasses.field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: Optional[bool] = None
    chat_template: Optional[str] = None


def _memosight_tokens() -> set:
    return {t for t, _ in SPECIAL_TOKENS}


def _is_control(content: str, special: bool) -> bool:
    """llama.cpp drops control tokens from detokenized text and only matches
    them when asked to parse special tokens; markup such as ``<|splitter|>`` is
    control, a whitespace token such as MemoSight's ``"\\n\\n"`` is text
    (user-defined)."""
    looks_special = content.startswith("<") and content.endswith(">")
    return (special or looks_special) and content.strip() != ""


def _bpe_pre_name(spec: dict, source: str) -> str:
    """The llama.cpp pre-tokenizer that reproduces a byte-level BPE
    ``tokenizer.json`` pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise GGUFError(f"{source}: tokenizer.json has a {norm.get('type')} normalizer, which "
                        "llama.cpp does not reproduce")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PRE:
            return SPLIT_PRE[pattern]
    raise GGUFError(
        f"{source}: tokenizer.json's byte-level pre-tokenizer is none that llama.cpp reproduces "
        f"(known: the Qwen2 and Llama-3 regex splits and GPT-2's ByteLevel): {json.dumps(pre)[:160]}"
    )


def _spm_space_prefix(spec: dict, source: str) -> bool:
    """Whether a SentencePiece-style ``tokenizer.json`` prepends "▁" to the
    text (llama.cpp's ``add_space_prefix``)."""
    pre = spec.get("pre_tokenizer") or {}
    norm = spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "▁":
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [s.get("type") for s in steps]
    if "Replace" in kinds and not pre:
        return "Prepend" in kinds
    raise GGUFError(f"{source}: tokenizer.json is byte-fallback BPE but not SentencePiece-style "
                    "(no Metaspace pre-tokenizer or ▁ normalizer)")


def tokenizer_metadata(tokenizer, vocab_size: int, source: str = "tokenizer",
                       eot: Optional[int] = None) -> TokenizerMeta:
    """The GGUF tokenizer metadata of a Hugging Face fast tokenizer.

    Args:
        tokenizer: the model's tokenizer (with the MemoSight tokens).
        vocab_size: rows of the embedding; ids the tokenizer lacks become
            unused ``[PAD{i}]`` tokens, as llama.cpp's converter writes them.
        source: names the tokenizer in errors.
        eot: the end-of-turn id (the MemoSight template's EOS), if any.

    Raises:
        GGUFError: the tokenizer is of a kind llama.cpp would tokenize
            differently.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{source}: not a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{source}: tokenizer.json holds a {model.get('type')} model; the GGUF "
                        "export supports byte-level BPE and SentencePiece-style BPE")
    spm = bool(model.get("byte_fallback"))
    if spm:
        kind, pre, space_prefix = "llama", "default", _spm_space_prefix(spec, source)
    else:
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise GGUFError(f"{source}: BPE without a ByteLevel decoder is not byte-level BPE")
        kind, pre, space_prefix = "gpt2", _bpe_pre_name(spec, source), None

    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise GGUFError(f"{source}: token id {max(by_id)} is beyond the model's vocab_size {vocab_size}")
    added = {int(i): a for i, a in tokenizer.added_tokens_decoder.items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank = {}
    if spm:
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
    # byte-level BPE needs no unknown token; SentencePiece's is typed as such
    unk = (model.get("unk_token") or getattr(tokenizer, "unk_token", None)) if spm else None
    tokens, types, scores = [], [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1e9)
            continue
        if t == unk:
            ty = T.UNKNOWN
        elif i in added:
            ty = T.CONTROL if _is_control(t, added[i].special) else T.USER_DEFINED
            if spm and ty == T.USER_DEFINED:
                t = t.replace("▁", " ")
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            ty = T.BYTE
        else:
            ty = T.NORMAL
        tokens.append(t)
        types.append(int(ty))
        # llama.cpp's SentencePiece tokenizer merges the pair whose merged piece
        # scores highest: the piece's merge rank, negated, keeps BPE's order.
        scores.append(-float(rank.get(t, len(merges) + i)) if spm else 0.0)

    special = {}
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            special[key] = int(tid)
    if eot is not None and eot != special.get("eos"):
        special["eot"] = int(eot)
    probe = tokenizer.encode("a", add_special_tokens=True)
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return TokenizerMeta(
        model=kind,
        pre=pre,
        tokens=tokens,
        types=types,
        scores=scores if spm else None,
        merges=None if spm else merges,
        special=special,
        add_bos="bos" in special and probe[:1] == [special["bos"]],
        add_eos="eos" in special and probe[-1:] == [special["eos"]],
        add_space_prefix=space_prefix,
        chat_template=template,
    )


def write_tokenizer(writer: "gguf.GGUFWriter", meta: TokenizerMeta):
    writer.add_tokenizer_model(meta.model)
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    if meta.merges:
        writer.add_token_merges(meta.merges)
    for key, tid in meta.special.items():
        getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.add_space_prefix is not None:
        writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)


def read_tokenizer_meta(meta: dict, source: str) -> TokenizerMeta:
    """:class:`TokenizerMeta` from a GGUF file's metadata (as :func:`read_gguf`
    returns it)."""
    K = gguf.Keys.Tokenizer
    model = meta.get(K.MODEL)
    if model not in ("gpt2", "llama"):
        raise GGUFError(f"{source}: {K.MODEL} is {model!r}; only 'gpt2' (byte-level BPE) and "
                        "'llama' (SentencePiece) tokenizers can be rebuilt")
    for key in (K.LIST, K.TOKEN_TYPE):
        if key not in meta:
            raise GGUFError(f"{source}: the key {key} is missing")
    special = {}
    for name, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("unk", K.UNK_ID), ("pad", K.PAD_ID),
                      ("eot", K.EOT_ID)):
        if key in meta:
            special[name] = int(meta[key])
    return TokenizerMeta(
        model=model,
        pre=meta.get(K.PRE, "default"),
        tokens=list(meta[K.LIST]),
        types=[int(t) for t in meta[K.TOKEN_TYPE]],
        scores=[float(s) for s in meta[K.SCORES]] if K.SCORES in meta else None,
        merges=list(meta.get(K.MERGES, [])) or None,
        special=special,
        add_bos=bool(meta.get(K.ADD_BOS, False)),
        add_eos=bool(meta.get(K.ADD_EOS, False)),
        add_space_prefix=bool(meta[K.ADD_PREFIX]) if K.ADD_PREFIX in meta else None,
        chat_template=meta.get(K.CHAT_TEMPLATE),
    )


def _spm_merges(tokens: List[str], types: List[int], scores: List[float]) -> List[Tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a piece into two
    pieces, ordered by the piece's score (highest first)."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
    found = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                found.append((-scores[i], normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_tokenizer(meta: TokenizerMeta, source: str = "GGUF"):
    """A Hugging Face fast tokenizer rebuilt from GGUF tokenizer metadata.

    Returns:
        ``(tokenizer, detokenizer_class)`` where the second is the mlx-lm
        streaming detokenizer that fits.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    T = gguf.TokenType
    vocab = {}
    for i, t in enumerate(meta.tokens):
        vocab.setdefault(t, i)
    if meta.model == "gpt2":
        if meta.pre not in PRE_NAMES:
            raise GGUFError(f"{source}: tokenizer.ggml.pre {meta.pre!r} is not supported "
                            f"(supported: {', '.join(PRE_NAMES)})")
        if not meta.merges:
            raise GGUFError(f"{source}: a gpt2 tokenizer needs tokenizer.ggml.merges")
        merges = [tuple(m.split(" ", 1)) for m in meta.merges]
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=meta.pre == "llama-bpe")
        tok = Tokenizer(bpe)
        if meta.pre == "gpt-2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            pattern = QWEN2_PATTERN if meta.pre == "qwen2" else LLAMA3_PATTERN
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        post = [processors.ByteLevel(trim_offsets=False)]
        detokenizer = BPEStreamingDetokenizer
    else:
        if meta.scores is None:
            raise GGUFError(f"{source}: a llama tokenizer needs tokenizer.ggml.scores")
        unk = meta.special.get("unk")
        bpe = models.BPE(vocab=vocab, merges=_spm_merges(meta.tokens, meta.types, meta.scores),
                         unk_token=None if unk is None else meta.tokens[unk], fuse_unk=True,
                         byte_fallback=True)
        tok = Tokenizer(bpe)
        prepend = "first" if meta.add_space_prefix is not False else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prepend != "never":
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        post = []
        detokenizer = SPMStreamingDetokenizer
    control = [i for i, ty in enumerate(meta.types) if ty == T.CONTROL]
    user = [i for i, ty in enumerate(meta.types) if ty == T.USER_DEFINED]
    tok.add_special_tokens([AddedToken(meta.tokens[i], special=True, normalized=False) for i in control])
    tok.add_tokens([AddedToken(meta.tokens[i], special=False, normalized=False) for i in user])
    bos = meta.special.get("bos")
    eos = meta.special.get("eos")
    if meta.add_bos and bos is not None:
        b = meta.tokens[bos]
        post.append(processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                  special_tokens=[(b, bos)]))
    if meta.add_eos and eos is not None:
        e = meta.tokens[eos]
        post.append(processors.TemplateProcessing(single=f"$A {e}", pair=f"$A {e} $B {e}",
                                                  special_tokens=[(e, eos)]))
    if post:
        tok.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    names = {k: meta.tokens[v] for k, v in meta.special.items() if k in ("bos", "eos", "unk", "pad")}
    # Control tokens other than MemoSight's are the tokenizer's extra special
    # tokens (the engine exempts special ids from the repetition penalty).
    skip = _memosight_tokens() | set(names.values())
    extra = [meta.tokens[i] for i in control if meta.tokens[i] not in skip]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names.get("bos"),
        eos_token=names.get("eos"),
        unk_token=names.get("unk"),
        pad_token=names.get("pad"),
        additional_special_tokens=extra,
        chat_template=meta.chat_template,
        clean_up_tokenization_spaces=False,
    )
    return hf, detokenizer


def check_tokenizer(original, meta: TokenizerMeta, source: str, memosight: Optional[MemoSightConfig]):
    """Tokenize :data:`CHECK_TEXT` (and a MemoSight prompt with its special
    tokens) with the source tokenizer and the one rebuilt from ``meta``.

    Raises:
        GGUFError: naming the first text they disagree on.
    """
    rebuilt, _ = build_tokenizer(meta, source)
    texts = [CHECK_TEXT, CHECK_TEXT.replace("\n\n", "\n" + DOUBLE_NEWLINE)]
    if memosight is not None:
        texts.append(memosight.template.render("What is 3 + 4?", system="Think step by step.")
                     + "3 + 4 = 7.\n<|splitter|><|o_0|><|continue|><|register|>The answer is 7.")
    for text in texts:
        for add in (False, True):
            a = original.encode(text, add_special_tokens=add)
            b = rebuilt.encode(text, add_special_tokens=add)
            if a != b:
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise GGUFError(
                    f"{source}: the tokenizer rebuilt from the GGUF metadata ({meta.model}, pre "
                    f"{meta.pre!r}) tokenizes differently from the original at token {k} "
                    f"({a[k:k + 3]} vs {b[k:k + 3]})"
                )


# ----------------------------------------------------------------------------
# MemoSight metadata


def _add_value(writer, key: str, value):
    V = gguf.GGUFValueType
    if value is None:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _add_value(writer, f"{key}.{k}", v)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_key_value(key, value, V.UINT32 if 0 <= value < 2**32 else V.INT64)
    elif isinstance(value, float):
        # MLX's GGUF reader cannot read float64 values.
        writer.add_float32(key, value)
    elif isinstance(value, str):
        # GGUFWriter.add_string drops empty strings.
        writer.add_key_value(key, value, V.STRING)
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if all(isinstance(v, bool) for v in items):
            sub = V.BOOL
        elif all(isinstance(v, int) for v in items):
            sub = V.UINT32 if all(0 <= v < 2**32 for v in items) else V.INT64
        elif all(isinstance(v, (int, float)) for v in items):
            sub, items = V.FLOAT32, [float(v) for v in items]
        elif all(isinstance(v, str) for v in items):
            sub = V.STRING
        else:
            raise GGUFError(f"{CONFIG_FILE}: {key[len(PREFIX) + 1:]} mixes value types")
        writer.add_key_value(key, items, V.ARRAY, sub_type=sub if items else V.UINT32)
    else:
        raise GGUFError(f"{CONFIG_FILE}: {key[len(PREFIX) + 1:]} has a value GGUF cannot hold")


def write_memosight(writer, cfg: MemoSightConfig):
    """Every key of ``memosight.json`` as a ``memosight.*`` key (nested
    objects as dotted keys; absent bos ids and nulls are left out)."""
    _add_value(writer, PREFIX, cfg.to_dict())


def _from_float32(x: float) -> float:
    # The shortest decimal that reads back as the same float32 (0.7, not
    # 0.699999988...), which is what memosight.json held.
    return float(str(np.float32(x)))


def read_memosight(meta: dict, source: str) -> Optional[MemoSightConfig]:
    """The MemoSight configuration from the ``memosight.*`` keys, or None."""
    keys = [k for k in meta if k.startswith(PREFIX + ".")]
    if not keys:
        return None
    d: dict = {}
    for k in keys:
        v = meta[k]
        if isinstance(v, float):
            v = _from_float32(v)
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = [_from_float32(x) for x in v]
        node = d
        parts = k.split(".")[1:]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    if isinstance(d.get("template"), dict):
        d["template"].setdefault("bos", None)
    return MemoSightConfig.from_dict(d, f"{source} ({PREFIX}.* keys)")


# ----------------------------------------------------------------------------
# Weights


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of the GGUF file and where it comes from."""

    name: str  # GGUF name
    source: str  # MLX parameter path without the .weight / .bias suffix
    suffix: str  # "weight" or "bias"
    shape: Tuple[int, ...]  # logical (numpy-order) shape
    qtype: "gguf.GGMLQuantizationType"
    heads: Optional[int] = None  # Llama q / k: rows are permuted in groups of heads
    from_mlx_q4: bool = False  # MLX 4-bit group-32 weights mapped to q4_1
    data: Optional[np.ndarray] = None  # a tensor computed up front (rope_freqs)

    @property
    def nbytes(self) -> int:
        if self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return math.prod(self.shape) * (4 if self.qtype == gguf.GGMLQuantizationType.F32 else 2)
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q / k row order in GGUF: within each head, the interleaved
    rotary pairs of llama.cpp instead of Hugging Face's two halves."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_unpermute(w, heads: int):
    """The inverse of :func:`llama_permute` (numpy or MLX arrays)."""
    return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def mlx_q4_to_q4_1(w: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """MLX 4-bit group-32 affine weights as ggml q4_1 blocks, bit for bit.

    MLX: ``w = scale * q + bias`` per group of 32, eight 4-bit ``q`` per
    uint32, element ``j`` in bits ``4j .. 4j + 3``. ggml q4_1 block: ``d`` and
    ``m`` as float16, then 16 bytes whose low nibbles hold elements 0-15 and
    high nibbles elements 16-31; ``x = d * q + m``.

    Returns:
        ``(rows, groups * 20)`` uint8.
    """
    rows, groups = scales.shape
    q = w.astype("<u4").view(np.uint8).reshape(rows, groups, 16)
    q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(rows, groups, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)
    d = scales.astype("<f2").view(np.uint8).reshape(rows, groups, 2)
    m = biases.astype("<f2").view(np.uint8).reshape(rows, groups, 2)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, groups * 20)


@dataclasses.dataclass
class ModelFolder:
    """An MLX model folder, loaded lazily."""

    path: Path
    config: dict
    model: nn.Module
    tokenizer: object
    memosight: Optional[MemoSightConfig]

    @property
    def quantized(self) -> Dict[str, nn.Module]:
        return {p: m for p, m in self.model.named_modules() if hasattr(m, "scales")}

    @property
    def parameters(self) -> Dict[str, mx.array]:
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.parameters()))


def is_mlx_folder(path: Path) -> bool:
    """An mlx-lm model folder (weights written by MLX, or a quantised config)
    rather than a Hugging Face checkpoint."""
    path = Path(path)
    try:
        with open(path / "config.json") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if "quantization" in cfg:
        return True
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        return False
    try:
        with open(files[0], "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(min(n, 1 << 24)))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (header.get("__metadata__") or {}).get("format") == "mlx"


def read_model_folder(path) -> ModelFolder:
    """Load an MLX model folder lazily (no weight is read), with its tokenizer
    and ``memosight.json``.

    Raises:
        GGUFError: naming the file at fault.
    """
    from mlx_lm.utils import load_model

    from .convert import ConvertError, load_tokenizer
    from .model import normalize_hf_config, read_hf_config

    path = Path(path)
    if not path.is_dir():
        raise GGUFError(f"{path}: not a model folder")
    config = normalize_hf_config(read_hf_config(path))
    overrides = {k: config[k] for k in ("rope_theta", "rope_scaling") if k in config}
    if not sorted(path.glob("model*.safetensors")):
        raise GGUFError(f"{path}: no model*.safetensors weights")
    try:
        model, _ = load_model(path, lazy=True, model_config=overrides)
    except Exception as e:
        raise GGUFError(f"{path}: mlx-lm cannot load the model ({_one_line(e)})")
    try:
        tokenizer = load_tokenizer(path)
    except ConvertError as e:
        raise GGUFError(str(e))
    return ModelFolder(path, config, model, tokenizer, MemoSightConfig.load(path))


def _rope_factors(folder: ModelFolder) -> Optional[np.ndarray]:
    """``rope_freqs`` for a Llama-3 rope scaling: per frequency, the factor
    that turns the unscaled frequency into mlx-lm's scaled one. Each factor
    is nudged so that MLX's float32 product reproduces mlx-lm's frequency
    exactly (the import multiplies them back)."""
    scaling = folder.model.args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "linear", None):
        return None
    if kind != "llama3":
        raise GGUFError(f"{folder.path / 'config.json'}: rope_scaling type {kind!r} is not "
                        "supported by the GGUF export (supported: linear, llama3)")
    rope = folder.model.layers[0].self_attn.rope
    if not hasattr(rope, "_freqs"):
        raise GGUFError(f"{folder.path / 'config.json'}: this mlx-lm version's llama3 rope keeps "
                        "no frequencies to export")
    dims = rope.dims
    plain = np.array(_unscaled_freqs(float(folder.model.args.rope_theta), dims))
    target = np.array(rope._freqs.astype(mx.float32))
    factors = (target / plain).astype(np.float32)
    for i in range(len(factors)):
        for _ in range(8):
            got = np.float32(plain[i]) * factors[i]
            if got == target[i]:
                break
            factors[i] = np.nextafter(factors[i], np.float32(np.inf if got < target[i] else -np.inf))
    return factors


def _unscaled_freqs(base: float, dims: int) -> mx.array:
    return base ** (mx.arange(0, dims, 2) / dims)


def plan_tensors(folder: ModelFolder, gguf_type: Optional[str]) -> Tuple[str, List[GGUFTensor]]:
    """The GGUF tensors of a model folder, with their types.

    Args:
        gguf_type: one of :data:`GGUF_TYPES`; by default ``q4_1`` for an MLX
            4-bit group-32 model, else ``f16``.

    Returns:
        ``(gguf_type, tensors)``.

    Raises:
        GGUFError: the type does not fit the weights at hand (naming
            ``--gguf-type``).
    """
    cfg = folder.config
    model_type = cfg["model_type"]
    if model_type not in ARCHS:
        raise GGUFError(f"{folder.path / 'config.json'}: model_type {model_type!r} has no GGUF "
                        f"export (supported: {', '.join(ARCHS)})")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise GGUFError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if getattr(folder.model.args, "rope_traditional", False):
        raise GGUFError(f"{folder.path / 'config.json'}: rope_traditional models have no GGUF export")
    quantized = folder.quantized
    if quantized:
        kinds = sorted({(m.bits, m.group_size, getattr(m, "mode", "affine")) for m in quantized.values()})
        what = ", ".join(f"{b}-bit group-{g} {mode}" for b, g, mode in kinds)
        mappable = kinds == [(4, 32, "affine")]
        gguf_type = gguf_type or ("q4_1" if mappable else None)
        if gguf_type != "q4_1" or not mappable:
            flag = f"--gguf-type {gguf_type}" if gguf_type else "--gguf-type"
            raise GGUFError(
                f"{flag}: {folder.path} holds MLX-quantised weights ({what}), which would have "
                "to be requantised; only 4-bit group-32 affine weights map to q4_1 exactly "
                "(convert with -q --q-bits 4 --q-group-size 32), or export the float model "
                "with --gguf-type f32, f16, q8_0 or q4_0"
            )
    gguf_type = gguf_type or "f16"
    qtype = QTYPES[gguf_type]
    arch = ARCHS[model_type]
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    heads = folder.model.args.num_attention_heads
    kv_heads = folder.model.args.num_key_value_heads or heads
    params = folder.parameters
    tensors = []
    for path, value in params.items():
        prefix, leaf = path.rpartition(".")[::2]
        if leaf in ("scales", "biases") and prefix in quantized:
            continue
        name = names.get_name(path, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{folder.path}: the tensor {path} has no GGUF name for {model_type}")
        module = quantized.get(prefix) if leaf == "weight" else None
        if module is not None:
            shape = (value.shape[0], params[f"{prefix}.scales"].shape[-1] * module.group_size)
        else:
            shape = tuple(value.shape)
        t = GGUFTensor(name, prefix, leaf, shape, qtype)
        if len(shape) < 2 or name.endswith("_norm.weight") or leaf != "weight":
            t.qtype = gguf.GGMLQuantizationType.F32
        elif module is not None:
            t.from_mlx_q4 = True
        elif qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and (
            shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] or quantized
        ):
            # as llama.cpp's converter: rows that do not fill whole blocks stay f16
            t.qtype = gguf.GGMLQuantizationType.F16
        if model_type == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            t.heads = heads
        elif model_type == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            t.heads = kv_heads
        tensors.append(t)
    factors = _rope_factors(folder)
    if factors is not None:
        tensors.append(GGUFTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", "", "",
                                  factors.shape, gguf.GGMLQuantizationType.F32, data=factors))
    return gguf_type, tensors


def tensor_data(t: GGUFTensor, params: Dict[str, mx.array]) -> np.ndarray:
    """The bytes of one GGUF tensor (a numpy array in its GGUF layout)."""
    Q = gguf.GGMLQuantizationType
    if t.data is not None:
        return t.data
    if t.from_mlx_q4:
        w = np.asarray(params[f"{t.source}.weight"])
        s, b = (np.asarray(params[f"{t.source}.{k}"].astype(mx.float32)) for k in ("scales", "biases"))
        for x, what in ((s, "scales"), (b, "biases")):
            if not np.array_equal(x, x.astype(np.float16).astype(np.float32)):
                raise GGUFError(f"--gguf-type q4_1: the {what} of {t.source} do not fit float16 "
                                "exactly (q4_1 stores them as float16); quantise a float16 model "
                                "(convert --dtype float16 -q ...)")
        if t.heads:
            w, s, b = (llama_permute(x, t.heads) for x in (w, s, b))
        return mlx_q4_to_q4_1(w, s, b)
    x = np.asarray(params[f"{t.source}.{t.suffix}"].astype(mx.float32))
    if t.heads:
        x = llama_permute(x, t.heads)
    if t.qtype == Q.F32:
        return np.ascontiguousarray(x)
    if t.qtype == Q.F16:
        y = x.astype(np.float16)
        if not np.isfinite(y).all() and np.isfinite(x).all():
            raise GGUFError(f"--gguf-type f16: {t.source}.{t.suffix} has values beyond float16's "
                            "range; use --gguf-type f32")
        return y
    return gguf.quants.quantize(x, t.qtype)


def _hparams(writer, folder: ModelFolder, gguf_type: str):
    # mlx-lm's ModelArgs hold the values the model runs with (config.json
    # plus mlx-lm's defaults for the keys it leaves out).
    args = folder.model.args
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None)
    writer.add_name(folder.path.name)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(int(getattr(args, "max_position_embeddings", None) or 4096))
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(args.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    if head_dim:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if args.model_type == "llama":
        writer.add_vocab_size(args.vocab_size)
        writer.add_rope_dimension_count(head_dim or args.hidden_size // heads)
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(FILE_TYPES[gguf_type])
    if gguf_type not in ("f32", "f16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@contextmanager
def staged_file(out: Path, force: bool = False):
    """Yield a temporary path beside ``out``; rename it to ``out`` when the
    block succeeds, remove it when it fails."""
    out = Path(out)
    if out.exists() and not force:
        raise GGUFError(f"{out}: already exists (pass --force to replace it)")
    if out.exists() and out.is_dir():
        raise GGUFError(f"{out}: is a folder, not a file")
    if not out.parent.is_dir():
        raise GGUFError(f"{out}: the folder {out.parent} does not exist")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class ExportResult:
    path: Path
    gguf_type: str
    tensors: int
    nbytes: int
    tokenizer: str
    memosight: bool

    def summary(self) -> str:
        return (f"saved {self.path}: {self.gguf_type}, {self.tensors} tensors, "
                f"{self.nbytes / 1e6:.1f} MB, tokenizer {self.tokenizer}"
                + (f", {PREFIX}.* metadata" if self.memosight else ", no MemoSight metadata"))


def export_gguf(model_dir, out_file, gguf_type: Optional[str] = None, force: bool = False,
                progress: bool = True, log=print) -> ExportResult:
    """Write an MLX model folder as a GGUF file.

    Args:
        model_dir: an MLX model folder (``mlx_memosight.convert`` output).
        out_file: the ``.gguf`` file to create (written beside it first and
            renamed at the end).
        gguf_type: one of :data:`GGUF_TYPES` (see :func:`plan_tensors`).
        force: replace an existing file.

    Raises:
        GGUFError: with a one-line message; nothing is left at ``out_file``.
    """
    from tqdm import tqdm

    from .convert import CACHE_BYTES

    out_file = Path(out_file)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise GGUFError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if out_file.exists() and not force:
        raise GGUFError(f"{out_file}: already exists (pass --force to replace it)")
    folder = read_model_folder(model_dir)
    gguf_type, tensors = plan_tensors(folder, gguf_type)
    ms = folder.memosight
    source = str(folder.path)
    tok_meta = tokenizer_metadata(folder.tokenizer, folder.model.args.vocab_size, source,
                                  eot=ms.token_ids.eos if ms else None)
    check_tokenizer(folder.tokenizer, tok_meta, source, ms)
    params = folder.parameters
    arch = gguf.MODEL_ARCH_NAMES[ARCHS[folder.config["model_type"]]]
    with staged_file(out_file, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _hparams(writer, folder, gguf_type)
            write_tokenizer(writer, tok_meta)
            if ms is not None:
                write_memosight(writer, ms)
            for t in tensors:
                if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                    writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
                else:
                    writer.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(t.shape, t.qtype),
                                           np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = tqdm(total=len(tensors), unit="tensor", desc="writing GGUF", disable=not progress,
                       file=sys.stderr)
            with bar:
                for t in tensors:
                    writer.write_tensor_data(tensor_data(t, params))
                    if mx.get_cache_memory() > CACHE_BYTES:
                        mx.clear_cache()
                    bar.update()
        except OSError as e:
            raise GGUFError(f"{out_file}: writing failed ({e.strerror or _one_line(e)})")
        finally:
            writer.close()
    result = ExportResult(out_file, gguf_type, len(tensors), out_file.stat().st_size,
                          f"{tok_meta.model}/{tok_meta.pre}", ms is not None)
    log(result.summary())
    return result


# ----------------------------------------------------------------------------
# Import


def scan_gguf(path) -> Dict[str, Tuple[tuple, "gguf.GGMLQuantizationType"]]:
    """Check that a file is a complete GGUF file that ``mx.load`` can read,
    without reading its data (``mx.load`` crashes the process on truncated
    files and on float64 values).

    Returns:
        ``{tensor name: (numpy-order shape, type)}``.

    Raises:
        GGUFError: not a GGUF file, truncated, or holding what MLX cannot read.
    """
    V = gguf.GGUFValueType
    fixed = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
             V.FLOAT32: 4, V.BOOL: 1, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 24 or f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 4

        def take(fmt):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise GGUFError(f"{path}: truncated (the header ends past the end of the file)")
            v = struct.unpack_from(fmt, buf, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        def string():
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise GGUFError(f"{path}: truncated (the header ends past the end of the file)")
            s = bytes(buf[pos:pos + n])
            pos += n
            return s.decode("utf-8", errors="replace")

        version = take("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = string()
            vtype = take("<I")
            if vtype == V.FLOAT64:
                raise GGUFError(f"{path}: the key {key} is a float64, which MLX's GGUF reader "
                                "cannot read")
            if vtype == V.STRING:
                string()
            elif vtype == V.ARRAY:
                itype, n = take("<I"), take("<Q")
                if itype == V.STRING:
                    for _ in range(n):
                        string()
                elif itype in fixed and itype != V.FLOAT64:
                    pos += fixed[itype] * n
                else:
                    raise GGUFError(f"{path}: the key {key} is an array of a type MLX cannot read")
            elif vtype in fixed:
                if key == gguf.Keys.General.ALIGNMENT and vtype == V.UINT32:
                    alignment = take("<I")
                else:
                    pos += fixed[vtype]
            else:
                raise GGUFError(f"{path}: the key {key} has the unknown value type {vtype}")
        tensors, spans = {}, []
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            ttype, offset = take("<I"), take("<Q")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise GGUFError(f"{path}: tensor {name} has the unknown type {ttype}")
            if qtype not in LOADABLE:
                raise GGUFError(f"{path}: tensor {name} is {qtype.name}, which MLX cannot load "
                                f"(it loads {', '.join(sorted(t.name for t in LOADABLE))})")
            shape = tuple(int(d) for d in reversed(dims))
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            spans.append((name, offset, math.prod(shape) // block * nbytes))
            tensors[name] = (shape, qtype)
        if pos > size:
            raise GGUFError(f"{path}: truncated (the header ends past the end of the file)")
        start = -(-pos // alignment) * alignment
        for name, offset, n in spans:
            if start + offset + n > size:
                raise GGUFError(f"{path}: truncated (tensor {name} ends at byte {start + offset + n}, "
                                f"the file has {size})")
        return tensors
    finally:
        buf.close()


def _to_python(v):
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def read_gguf(path) -> Tuple[Dict[str, mx.array], dict, dict]:
    """Validate and load a GGUF file through ``mx.load``.

    Returns:
        ``(arrays, metadata, tensors)``: MLX arrays by name (quantised tensors
        as ``NAME.weight`` / ``NAME.scales`` / ``NAME.biases``), the metadata
        as Python values, and :func:`scan_gguf`'s tensor table.
    """
    tensors = scan_gguf(path)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise GGUFError(f"{path}: MLX cannot read the file ({_one_line(e)})")
    return arrays, {k: _to_python(v) for k, v in meta.items()}, tensors


class FreqsRoPE(nn.Module):
    """RoPE with explicit per-frequency wavelengths (a Llama-3 scaling given
    as GGUF's ``rope_freqs``)."""

    def __init__(self, dims: int, freqs: mx.array, traditional: bool = False):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self._freqs = freqs

    def __call__(self, x, offset=0):
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)


def hf_config(meta: dict, tensors: dict, source: str) -> dict:
    """A Hugging Face style ``config.json`` (what mlx-lm reads) from GGUF
    architecture metadata."""
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    if arch not in SUPPORTED_FAMILIES:
        raise GGUFError(f"{source}: general.architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    K = gguf.Keys

    def key(k, default=None, required=True):
        name = k.format(arch=arch)
        if name not in meta:
            if required:
                raise GGUFError(f"{source}: the key {name} is missing")
            return default
        return meta[name]

    embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if embd not in tensors:
        raise GGUFError(f"{source}: the tensor {embd} is missing")
    heads = int(key(K.Attention.HEAD_COUNT))
    config = dict(
        model_type=arch,
        hidden_size=int(key(K.LLM.EMBEDDING_LENGTH)),
        num_hidden_layers=int(key(K.LLM.BLOCK_COUNT)),
        intermediate_size=int(key(K.LLM.FEED_FORWARD_LENGTH)),
        num_attention_heads=heads,
        num_key_value_heads=int(key(K.Attention.HEAD_COUNT_KV, heads, False)),
        rms_norm_eps=_from_float32(key(K.Attention.LAYERNORM_RMS_EPS)),
        rope_theta=_from_float32(key(K.Rope.FREQ_BASE, 10000.0, False)),
        max_position_embeddings=int(key(K.LLM.CONTEXT_LENGTH, 4096, False)),
        vocab_size=tensors[embd][0][0],
        tie_word_embeddings=gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight" not in tensors,
    )
    head_dim = key(K.Attention.KEY_LENGTH, None, False)
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    scaling = key(K.Rope.SCALING_TYPE, "none", False)
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(key(K.Rope.SCALING_FACTOR))}
    elif scaling != "none":
        raise GGUFError(f"{source}: rope scaling {scaling!r} is not supported (none, linear, or "
                        "a rope_freqs tensor)")
    return config


def build_model(config: dict, arrays: Dict[str, mx.array], source: str) -> nn.Module:
    """An mlx-lm model from GGUF tensors (quantised ones stay quantised)."""
    import importlib

    from mlx.utils import tree_flatten

    from .model import attach_token_rope

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    arch = ARCHS[config["model_type"]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def gguf_name(path):
        name = names.get_name(path, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{source}: no GGUF name for {path}")
        return name

    def quant_params(p, m):
        if not hasattr(m, "to_quantized") or f"{p}.weight" not in expected:
            return False
        scales = arrays.get(gguf_name(f"{p}.weight")[: -len(".weight")] + ".scales")
        if scales is None:
            return False
        # ggml blocks hold 32 weights; MLX packs them into `bits` uint32 words
        bits = arrays[gguf_name(f"{p}.weight")].shape[-1] // scales.shape[-1]
        return {"group_size": 32, "bits": bits, "mode": "affine"}

    expected = dict(tree_flatten(model.parameters()))
    nn.quantize(model, class_predicate=quant_params)
    weights = []
    for path in dict(tree_flatten(model.parameters())):
        prefix, leaf = path.rpartition(".")[::2]
        if leaf in ("scales", "biases") and f"{prefix}.weight" in expected:
            base = gguf_name(f"{prefix}.weight")[: -len(".weight")]
            name = f"{base}.{leaf}"
        else:
            name = gguf_name(path)
        if name not in arrays:
            raise GGUFError(f"{source}: the tensor {name} is missing")
        x = arrays[name]
        if config["model_type"] == "llama":
            if ".attn_q." in name:
                x = llama_unpermute(x, heads)
            elif ".attn_k." in name:
                x = llama_unpermute(x, kv_heads)
        weights.append((path, x))
    floats = [x.dtype for p, x in weights if x.ndim == 2 and mx.issubdtype(x.dtype, mx.floating)]
    # Norms and biases are stored as float32 (as llama.cpp wants them); they
    # go back to the dtype of the weight matrices.
    dtype = mx.float16 if mx.float16 in floats else (floats[0] if floats else mx.float32)
    weights = [(p, x.astype(dtype) if x.ndim == 1 and mx.issubdtype(x.dtype, mx.floating) else x)
               for p, x in weights]
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise GGUFError(f"{source}: the tensors do not fit a {config['model_type']} model with this "
                        f"metadata ({_one_line(e)})")
    freqs_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    if freqs_name in arrays:
        factors = arrays[freqs_name].astype(mx.float32)
        for layer in model.layers:
            dims = layer.self_attn.rope.dims
            if factors.shape != (dims // 2,):
                raise GGUFError(f"{source}: {freqs_name} has shape {list(factors.shape)}, expected "
                                f"[{dims // 2}]")
            freqs = _unscaled_freqs(config["rope_theta"], dims) * factors
            layer.self_attn.rope = FreqsRoPE(dims, freqs)
    mx.eval(model.parameters())
    return attach_token_rope(model)


def load_gguf(path):
    """Load a GGUF file as ``(model, tokenizer, memosight_config_or_None)``.

    The model is an mlx-lm Qwen2 / Llama model (MemoSight-ready), the
    tokenizer an mlx-lm ``TokenizerWrapper`` around a Hugging Face fast
    tokenizer rebuilt from the ``tokenizer.ggml.*`` keys.

    Raises:
        GGUFError: naming the file and the key or tensor at fault.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    path = Path(path)
    source = str(path)
    arrays, meta, tensors = read_gguf(path)
    config = hf_config(meta, tensors, source)
    cfg = read_memosight(meta, source)
    tok_meta = read_tokenizer_meta(meta, source)
    try:
        hf, detokenizer = build_tokenizer(tok_meta, source)
    except GGUFError:
        raise
    except Exception as e:
        raise GGUFError(f"{source}: cannot rebuild the tokenizer from tokenizer.ggml.* ({_one_line(e)})")
    stop = [tok_meta.special[k] for k in ("eos", "eot") if k in tok_meta.special]
    model = build_model(config, arrays, source)
    return model, TokenizerWrapper(hf, detokenizer, eos_token_ids=stop), cfg
