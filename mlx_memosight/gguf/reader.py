"""GGUF import: a GGUF file as an mlx-lm model (weights through ``mx.load``,
quantised tensors staying quantised), a Hugging Face fast tokenizer rebuilt
from the ``tokenizer.ggml.*`` keys and the MemoSight configuration from the
``memosight.*`` keys."""

import math
import mmap
import struct
from pathlib import Path
from typing import Dict, Tuple

import gguf
import mlx.core as mx
import mlx.nn as nn

from ..errors import one_line
from ..loading import readable
from .metadata import ARCHS, LOADABLE, GGUFError, _unscaled_freqs, hf_config, llama_unpermute, read_memosight
from .tokenizer import build_tokenizer, read_tokenizer_meta

def scan_gguf(path) -> Dict[str, Tuple[tuple, "gguf.GGMLQuantizationType"]]:
    """Check that a file is a complete GGUF file that ``mx.load`` can read,
    without reading its data (``mx.load`` crashes the process on truncated
    files and on float64 values).

    gguf-py's ``GGUFReader`` would do the parsing, but it builds a numpy view
    of every string in the file: 8.1 s for a Qwen2 vocabulary (152k tokens
    and 151k merges) where this walk takes 0.27 s, and its errors on a
    truncated file are numpy reshape messages.

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
    readable(path, GGUFError)
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
        raise GGUFError(f"{path}: MLX cannot read the file ({one_line(e)})")
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


def build_model(config: dict, arrays: Dict[str, mx.array], source: str) -> nn.Module:
    """An mlx-lm model from GGUF tensors (quantised ones stay quantised)."""
    import importlib

    from mlx.utils import tree_flatten

    from ..model import attach_token_rope

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except Exception as e:  # the architecture keys were checked one by one; not together
        raise GGUFError(f"{source}: mlx-lm builds no {config['model_type']} model from these "
                        f"architecture keys ({one_line(e)})"[:300])
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
                        f"metadata ({one_line(e)})")
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
        raise GGUFError(f"{source}: cannot rebuild the tokenizer from tokenizer.ggml.* ({one_line(e)})")
    stop = [tok_meta.special[k] for k in ("eos", "eot") if k in tok_meta.special]
    model = build_model(config, arrays, source)
    return model, TokenizerWrapper(hf, detokenizer, eos_token_ids=stop), cfg
