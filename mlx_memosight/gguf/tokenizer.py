"""The GGUF tokenizer: ``tokenizer.ggml.*`` metadata from a Hugging Face fast
tokenizer, and a Hugging Face fast tokenizer rebuilt from that metadata.

The rebuild is this project's own, not transformers' GGUF tokenizer
conversion: transformers respells every vocabulary entry of a byte-level
(``gpt2``) tokenizer into the byte alphabet, so a user-defined token stored as
text, as llama.cpp stores them (MemoSight's ``"\\n\\n"``), collides with the
base entry ``"ĊĊ"`` and is never matched whole; its reader also took 13-17 s
for the 128k-152k-token Qwen2 and Llama-3 vocabularies where this one takes
under a second; and its module moved within transformers 5 (from
``integrations/ggml.py`` to ``integrations/gguf/``).
"""

import dataclasses
import json
from typing import Dict, List, Optional, Tuple

import gguf

from ..config import DOUBLE_NEWLINE, SPECIAL_TOKENS, MemoSightConfig
from .metadata import GGUFError

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
    for add, value in ((writer.add_tokenizer_model, meta.model), (writer.add_tokenizer_pre, meta.pre),
                       (writer.add_token_list, meta.tokens), (writer.add_token_types, meta.types),
                       (writer.add_token_scores, meta.scores), (writer.add_token_merges, meta.merges or None),
                       (writer.add_add_bos_token, meta.add_bos), (writer.add_add_eos_token, meta.add_eos),
                       (writer.add_add_space_prefix, meta.add_space_prefix),
                       (writer.add_chat_template, meta.chat_template or None)):
        if value is not None:
            add(value)
    for key, tid in meta.special.items():
        getattr(writer, f"add_{key}_token_id")(tid)


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
