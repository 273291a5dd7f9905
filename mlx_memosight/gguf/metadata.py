"""What GGUF's metadata means for MemoSight models on MLX: tensor types,
architecture hyperparameters in both directions (mlx-lm's ``ModelArgs`` to
``{arch}.*`` keys, and back to a ``config.json``), Llama's q / k row order,
and the ``memosight.*`` keys that carry ``memosight.json``."""

import math
from typing import Optional

import gguf
import mlx.core as mx
import numpy as np

from ..config import CONFIG_FILE, SUPPORTED_FAMILIES, MemoSightConfig
from ..errors import GGUFError
from ..options import GGUF_TYPES

_Q, _F = gguf.GGMLQuantizationType, gguf.LlamaFileType
# The tensor and file types of each GGUF type name (options.GGUF_TYPES). They
# are also the tensor types mx.load reads from a GGUF file.
QTYPES = {t: _Q[t.upper()] for t in GGUF_TYPES}
FILE_TYPES = {t: _F.ALL_F32 if t == "f32" else _F[f"MOSTLY_{t.upper()}"] for t in GGUF_TYPES}
LOADABLE = set(QTYPES.values())
# llama.cpp's architecture for each model family
ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}
PREFIX = "memosight"




# ----------------------------------------------------------------------------
# Architecture


def write_hparams(writer, args, name: str, gguf_type: str):
    """The ``{arch}.*`` keys of an mlx-lm model's ``ModelArgs`` (the values the
    model runs with: ``config.json`` plus mlx-lm's defaults)."""
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None)
    writer.add_name(name)
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

    def count(k, default=None, required=True, high=1 << 24):
        """A positive integer key (sizes and counts of a model that fits a machine)."""
        v = key(k, default, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
            raise GGUFError(f"{source}: {k.format(arch=arch)} must be an integer between 1 and "
                            f"{high}, not {v!r}"[:200])
        return v

    def number(k, default=None, required=True):
        v = key(k, default, required)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise GGUFError(f"{source}: {k.format(arch=arch)} must be a positive number, not {v!r}"[:200])
        return _from_float32(v)

    embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if embd not in tensors or len(tensors[embd][0]) != 2:
        raise GGUFError(f"{source}: the tensor {embd} is missing or not a matrix")
    heads = count(K.Attention.HEAD_COUNT, high=4096)
    kv_heads = count(K.Attention.HEAD_COUNT_KV, heads, False, high=4096)
    hidden = count(K.LLM.EMBEDDING_LENGTH, high=1 << 17)
    if heads % kv_heads:
        raise GGUFError(f"{source}: {arch}.attention.head_count {heads} is not a multiple of "
                        f"head_count_kv {kv_heads}")
    config = dict(
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=count(K.LLM.BLOCK_COUNT, high=4096),
        intermediate_size=count(K.LLM.FEED_FORWARD_LENGTH, high=1 << 20),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=number(K.Attention.LAYERNORM_RMS_EPS),
        rope_theta=number(K.Rope.FREQ_BASE, 10000.0, False),
        max_position_embeddings=count(K.LLM.CONTEXT_LENGTH, 4096, False, high=1 << 26),
        vocab_size=tensors[embd][0][0],
        tie_word_embeddings=gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight" not in tensors,
    )
    if tensors[embd][0][1] != hidden:
        raise GGUFError(f"{source}: {embd} has {tensors[embd][0][1]} columns but "
                        f"{arch}.embedding_length is {hidden}")
    # qwen3's ModelArgs needs head_dim; the others take it when given
    config["head_dim"] = count(K.Attention.KEY_LENGTH, None, False, high=1 << 12) or hidden // heads
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    scaling = key(K.Rope.SCALING_TYPE, "none", False)
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": number(K.Rope.SCALING_FACTOR)}
    elif scaling != "none":
        raise GGUFError(f"{source}: rope scaling {scaling!r} is not supported (none, linear, or "
                        "a rope_freqs tensor)")
    return config



def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q / k row order in GGUF: within each head, the interleaved
    rotary pairs of llama.cpp instead of Hugging Face's two halves."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_unpermute(w, heads: int):
    """The inverse of :func:`llama_permute` (numpy or MLX arrays)."""
    return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _unscaled_freqs(base: float, dims: int) -> mx.array:
    return base ** (mx.arange(0, dims, 2) / dims)


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
