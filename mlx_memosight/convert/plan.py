"""Planning a conversion: the output tensors laid out on a lazily built mlx-lm
model (never evaluated), every checkpoint tensor checked against
``config.json``, and the dtype and quantisation of each output tensor."""

import dataclasses
import importlib
import math
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx

from ..errors import one_line
from ..loading import normalize_hf_config
from ..options import DTYPES
from .checkpoint import Checkpoint, ConvertError, WeightFile

# Which config.json fields set the shape of which tensors (for error messages).
_SHAPE_FIELDS = (
    ("embed_tokens", "vocab_size, hidden_size"),
    ("lm_head", "vocab_size, hidden_size"),
    ("mlp", "hidden_size, intermediate_size"),
    ("self_attn", "hidden_size, num_attention_heads, num_key_value_heads, head_dim"),
    ("norm", "hidden_size"),
)


@dataclasses.dataclass
class TensorJob:
    """One checkpoint tensor and the output tensors it becomes."""

    file: WeightFile
    name: str
    outputs: List[str]
    dtype: Optional[mx.Dtype]  # cast to this first (None: keep)
    quantize: Optional[Tuple[int, int, str]] = None  # (group_size, bits, mode)


@dataclasses.dataclass
class Plan:
    """What the converted folder will hold."""

    config: dict  # the output config.json
    entries: List[Tuple[str, tuple, mx.Dtype]]  # output tensors, in write order
    jobs: List[TensorJob]
    dtype: str  # the floating dtype of the output ("float32", ...)
    quantization: Optional[dict] = None

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(s, d) for _, s, d in self.entries)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.size


def _model_module(model_type: str):
    return importlib.import_module(f"mlx_lm.models.{model_type}")


def _skeleton(config: dict, cfg_file: Path):
    """An mlx-lm model built from ``config``; its parameters are lazy and are
    never evaluated, so it costs no memory."""
    module = _model_module(config["model_type"])
    for f in dataclasses.fields(module.ModelArgs):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in config:
            raise ConvertError(f"{cfg_file}: missing the field {f.name!r}")
    try:
        return module.Model(module.ModelArgs.from_dict(config))
    except Exception as e:
        raise ConvertError(f"{cfg_file}: cannot build a {config['model_type']} model ({one_line(e)})")


def _shape_fields(name: str) -> str:
    for key, fields in _SHAPE_FIELDS:
        if key in name:
            return fields
    return "the model's sizes"


def _checkpoint_dtype(config: dict) -> Optional[str]:
    d = config.get("torch_dtype", config.get("dtype"))
    return d if d in DTYPES else None


def plan_conversion(
    ckpt: Checkpoint,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
) -> Plan:
    """Lay out the output tensors and check every checkpoint tensor against
    ``config.json``.

    Args:
        ckpt: the validated checkpoint.
        dtype: output dtype of floating tensors; by default ``config.json``'s
            ``torch_dtype`` / ``dtype``, else each tensor's own (as mlx-lm).
        quantize: quantise with mlx-lm's rule (every linear and embedding layer
            whose input size is a multiple of the group size).
        q_group_size, q_bits: mlx-lm's meaning and defaults (64, 4).

    Raises:
        ConvertError: a tensor is missing, unexpected or of the wrong shape.
    """
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import quantize_model

    cfg_file = ckpt.path / "config.json"
    tensors = ckpt.tensors
    config = normalize_hf_config(ckpt.config)
    config.pop("_name_or_path", None)
    if "tie_word_embeddings" not in config:
        # Hugging Face's default for both families is untied, mlx-lm's is tied:
        # follow the weights.
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    dtype = dtype or _checkpoint_dtype(config)
    target = getattr(mx, dtype) if dtype else None

    skeleton = _skeleton(config, cfg_file)
    expected = dict(tree_flatten(skeleton.parameters()))
    placeholders = {n: mx.zeros((1,)) for n in tensors}
    kept = skeleton.sanitize(dict(placeholders)) if hasattr(skeleton, "sanitize") else placeholders
    for name in expected:
        if name not in kept:
            raise ConvertError(
                f"{ckpt.path}: the weights lack the tensor {name}, which config.json implies"
            )
    for name in kept:
        shape, _, wf = tensors[name]
        if name not in expected:
            raise ConvertError(
                f"{wf.path}: unexpected tensor {name} (not part of a {ckpt.model_type} model "
                "with this config.json)"
            )
        want = tuple(expected[name].shape)
        if shape != want:
            raise ConvertError(
                f"{wf.path}: tensor {name} has shape {list(shape)} but {cfg_file.name} "
                f"({_shape_fields(name)}) implies {list(want)}"
            )

    def out_dtype(name):
        src = tensors[name][1]
        return target if target is not None and mx.issubdtype(src, mx.floating) else src

    skeleton.update(tree_unflatten([(n, mx.zeros(a.shape, out_dtype(n))) for n, a in expected.items()]))
    quantization = None
    if quantize:
        skeleton, config = quantize_model(skeleton, config, q_group_size, q_bits)
        quantization = config["quantization"]
    planned = {n: (tuple(a.shape), a.dtype) for n, a in tree_flatten(skeleton.parameters())}
    modules = dict(skeleton.named_modules())

    for key in ("torch_dtype", "dtype"):
        if key in config and dtype:
            config[key] = dtype
    entries, jobs = [], []
    for wf in ckpt.files:
        for name in wf.tensors:
            if name not in kept:
                continue
            prefix, leaf = name.rpartition(".")[::2]
            if leaf == "weight" and f"{prefix}.scales" in planned:
                m = modules[prefix]
                outs = [f"{prefix}.{k}" for k in ("weight", "scales", "biases")
                        if f"{prefix}.{k}" in planned]
                q = (m.group_size, m.bits, m.mode)
            else:
                outs, q = [name], None
            jobs.append(TensorJob(wf, name, outs, target, q))
            entries += [(o, *planned[o]) for o in outs]
    if sorted(e[0] for e in entries) != sorted(planned):
        raise RuntimeError("the conversion plan does not cover the model's parameters")
    floating = [d for _, _, d in entries if mx.issubdtype(d, mx.floating)]
    out_name = dtype or (str(floating[0]).replace("mlx.core.", "") if floating else "float32")
    return Plan(config, entries, jobs, out_name, quantization)
