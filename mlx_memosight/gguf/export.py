"""GGUF export: an MLX model folder (Qwen2 or Llama) as one GGUF file that
llama.cpp loads.

* architecture metadata and tensor names from gguf-py's tables (``Keys``,
  ``MODEL_ARCH``, ``get_tensor_name_map``), Llama's q / k row permutation,
  rope base and scaling (a Llama-3 scaling becomes the ``rope_freqs`` tensor);
* the tokenizer (:mod:`.tokenizer`), checked to tokenize like the original;
* ``memosight.*`` keys holding every key of ``memosight.json``;
* f32 / f16 / q8_0 / q4_0 / q4_1 tensors through ``gguf.quants``; an MLX
  4-bit group-32 affine model maps to q4_1 block for block, without
  requantising. Tensors stream out one at a time into a file that is renamed
  into place at the end.
"""

import dataclasses
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import one_line
from ..loading import ModelFolder, load_folder
from ..model import TokenRoPE
from ..options import ConvertOptions
from ..outputs import check_output, release_stream_cache, staged_file
from .metadata import (ARCHS, PREFIX, QTYPES, GGUFError, _unscaled_freqs, llama_permute,
                       write_hparams, write_memosight)
from .tokenizer import check_tokenizer, tokenizer_metadata, write_tokenizer

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


def _quantized(model) -> Dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if hasattr(m, "scales")}


def _parameters(model) -> Dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


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
    rope = rope.base if isinstance(rope, TokenRoPE) else rope
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


def plan_tensors(folder: ModelFolder, gguf_type: Optional[str]) -> Tuple[str, List[GGUFTensor]]:
    """The GGUF tensors of a model folder, with their types.

    Args:
        gguf_type: one of :data:`GGUF_TYPES`; by default ``q4_1`` for an MLX
            4-bit group-32 model, else ``f16``.

    Returns:
        ``(gguf_type, tensors)``.

    Raises:
        GGUFError: the type does not fit the weights at hand (naming
            ``gguf_type``).
    """
    cfg = folder.config
    model_type = cfg["model_type"]
    if model_type not in ARCHS:
        raise GGUFError(f"{folder.path / 'config.json'}: model_type {model_type!r} has no GGUF "
                        f"export (supported: {', '.join(ARCHS)})")
    ConvertOptions.check("gguf_type", gguf_type)
    if getattr(folder.model.args, "rope_traditional", False):
        raise GGUFError(f"{folder.path / 'config.json'}: rope_traditional models have no GGUF export")
    quantized = _quantized(folder.model)
    if quantized:
        kinds = sorted({(m.bits, m.group_size, getattr(m, "mode", "affine")) for m in quantized.values()})
        what = ", ".join(f"{b}-bit group-{g} {mode}" for b, g, mode in kinds)
        mappable = kinds == [(4, 32, "affine")]
        gguf_type = gguf_type or ("q4_1" if mappable else None)
        if gguf_type != "q4_1" or not mappable:
            subject = f"gguf_type={gguf_type}" if gguf_type else "gguf_type"
            raise GGUFError(
                f"{subject}: {folder.path} holds MLX-quantised weights ({what}), which would have "
                "to be requantised; only 4-bit group-32 affine weights map to q4_1 exactly "
                "(convert with quantize=True q_bits=4 q_group_size=32), or export the float model "
                "with gguf_type=f32, f16, q8_0 or q4_0", "gguf_type")
    gguf_type = gguf_type or "f16"
    qtype = QTYPES[gguf_type]
    arch = ARCHS[model_type]
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    heads = folder.model.args.num_attention_heads
    kv_heads = folder.model.args.num_key_value_heads or heads
    params = _parameters(folder.model)
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
                raise GGUFError(f"gguf_type=q4_1: the {what} of {t.source} do not fit float16 "
                                "exactly (q4_1 stores them as float16); quantise a float16 model "
                                "(convert dtype=float16 quantize=True ...)")
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
            raise GGUFError(f"gguf_type=f16: {t.source}.{t.suffix} has values beyond float16's "
                            "range; use gguf_type=f32")
        return y
    return gguf.quants.quantize(x, t.qtype)


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

    out_file = Path(out_file)
    ConvertOptions.check("gguf_type", gguf_type)
    check_output(out_file, force, folder=False)
    folder = load_folder(model_dir, lazy=True)
    gguf_type, tensors = plan_tensors(folder, gguf_type)
    ms = folder.memosight
    source = str(folder.path)
    tok_meta = tokenizer_metadata(folder.hf_tokenizer, folder.model.args.vocab_size, source,
                                  eot=ms.token_ids.eos if ms else None)
    check_tokenizer(folder.hf_tokenizer, tok_meta, source, ms)
    params = _parameters(folder.model)
    arch = gguf.MODEL_ARCH_NAMES[ARCHS[folder.config["model_type"]]]
    with staged_file(out_file, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            write_hparams(writer, folder.model.args, folder.path.name, gguf_type)
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
                    release_stream_cache()
                    bar.update()
        except OSError as e:
            raise GGUFError(f"{out_file}: writing failed ({e.strerror or one_line(e)})")
        finally:
            writer.close()
    result = ExportResult(out_file, gguf_type, len(tensors), out_file.stat().st_size,
                          f"{tok_meta.model}/{tok_meta.pre}", ms is not None)
    log(result.summary())
    return result
