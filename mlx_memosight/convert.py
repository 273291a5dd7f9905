"""Convert a PyTorch-trained MemoSight checkpoint into an MLX model folder.

    mlx_memosight.convert CKPT -o OUT [--dtype float16|bfloat16|float32]
        [-q] [--q-bits N] [--q-group-size N] [--force] [--verify]
        [--gguf FILE [--gguf-type f32|f16|q8_0|q4_0|q4_1]]

CKPT is a Hugging Face ``save_pretrained`` folder (often a Trainer
``checkpoint-N/``) of a Qwen2 or Llama model. OUT is an mlx-lm model folder
(``config.json``, ``model*.safetensors``, tokenizer files) plus
``memosight.json`` when the tokenizer has the MemoSight tokens.

The conversion is a pipeline of steps, so that another output format can be
added beside the MLX folder:

* :func:`read_checkpoint` validates everything it can before anything is
  written (config, tokenizer, every weight file's header);
* :func:`plan_conversion` lays out the output tensors on a lazily built mlx-lm
  model (never evaluated) and checks every shape against ``config.json``;
* :func:`write_mlx_model` streams the tensors one at a time into safetensors
  files whose headers are known from the plan, so memory stays near the largest
  tensor rather than the largest shard;
* :func:`verify_conversion` compares the PyTorch model with the converted one;
* :func:`staged_output` writes into a temporary folder beside OUT and renames
  it at the end, so a failure leaves nothing behind;
* with ``--gguf`` the converted folder is also written as one GGUF file
  (:mod:`mlx_memosight.gguf`); CKPT may then be an MLX folder already.
"""

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .config import (
    CONFIG_FILE,
    ConfigError,
    MemoSightConfig,
    build_config,
    has_memosight_tokens,
)
from .model import normalize_hf_config, read_hf_config

DTYPES = ("float16", "bfloat16", "float32")
# mlx-lm writes weight files of at most 5 GB.
MAX_SHARD_BYTES = 5 << 30
# Most MLX buffer cache kept while streaming tensors.
CACHE_BYTES = 256 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Largest max |logit difference| --verify accepts, as a fraction of the
# largest reference logit (at least 1). float32: 1e-4. float16 keeps 11
# significant bits (unit roundoff 4.9e-4) and bfloat16 8 bits (3.9e-3); every
# op rounds its result again and the errors add up over the layers, so the
# bounds allow about 20 and 13 unit roundoffs. A wrong tensor (transposed,
# misnamed, badly cast) moves logits by far more.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}

_ST_TO_MX = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "F64": mx.float64,
    "I64": mx.int64, "I32": mx.int32, "I16": mx.int16, "I8": mx.int8,
    "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16, "U8": mx.uint8, "BOOL": mx.bool_,
}
_MX_TO_ST = {v: k for k, v in _ST_TO_MX.items()}
_SAME_WIDTH_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
# Which config.json fields set the shape of which tensors (for error messages).
_SHAPE_FIELDS = (
    ("embed_tokens", "vocab_size, hidden_size"),
    ("lm_head", "vocab_size, hidden_size"),
    ("mlp", "hidden_size, intermediate_size"),
    ("self_attn", "hidden_size, num_attention_heads, num_key_value_heads, head_dim"),
    ("norm", "hidden_size"),
)


class ConvertError(Exception):
    """A conversion problem, phrased for the user (one line, naming the file,
    field or flag)."""


# ----------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class WeightFile:
    """One weight file of the checkpoint and the tensors it holds, in order."""

    path: Path
    kind: str  # "safetensors" or "bin"
    tensors: Dict[str, Tuple[tuple, mx.Dtype]]

    def arrays(self, names) -> Iterator[Tuple[str, mx.array]]:
        """Yield ``(name, array)`` for ``names``, one tensor at a time; the
        arrays are loaded lazily (safetensors) or from a memory map (.bin)."""
        if self.kind == "safetensors":
            loaded = mx.load(str(self.path))
            for name in names:
                yield name, loaded.pop(name)
        else:
            state = _torch_load(self.path)
            for name in names:
                yield name, _torch_to_mx(state.pop(name))


@dataclasses.dataclass
class Checkpoint:
    """A validated checkpoint folder."""

    path: Path
    config: dict  # config.json as written
    model_type: str
    files: List[WeightFile]
    tokenizer: object
    memosight: Optional[MemoSightConfig]

    @property
    def tensors(self) -> Dict[str, Tuple[tuple, mx.Dtype, WeightFile]]:
        return {n: (s, d, f) for f in self.files for n, (s, d) in f.tensors.items()}


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def _import_torch(purpose: str, hint: str = ""):
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{purpose} needs PyTorch, which is not installed: pip install torch{hint}")
    return torch


def _torch_load(path: Path) -> dict:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``: tensors
    only, no pickled code is run."""
    torch = _import_torch(f"{path}: reading .bin weights",
                          " (or save the checkpoint as safetensors)")
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        raise ConvertError(
            f"{path}: holds more than tensors, refusing to run its pickle "
            f"({_one_line(e).split('. ')[0]})"
        )
    except Exception as e:
        raise ConvertError(f"{path}: not a readable PyTorch weight file ({_one_line(e)})")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConvertError(f"{path}: not a state dict of tensors")
    return state


def _torch_to_mx(t) -> mx.array:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def _read_safetensors_header(path: Path) -> Dict[str, Tuple[tuple, mx.Dtype]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in _ST_TO_MX:
                    raise ConvertError(f"{path}: tensor {name} has the unsupported dtype {dtype}")
                out[name] = (tuple(sl.get_shape()), _ST_TO_MX[dtype])
            return out
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(f"{path}: not a complete safetensors file ({_one_line(e)})")


def _read_bin_header(path: Path) -> Dict[str, Tuple[tuple, mx.Dtype]]:
    state = _torch_load(path)
    out = {}
    for name, t in state.items():
        dtype = str(t.dtype).replace("torch.", "")
        if dtype == "bool":
            dtype = "bool_"
        if not hasattr(mx, dtype):
            raise ConvertError(f"{path}: tensor {name} has the unsupported dtype {t.dtype}")
        out[name] = (tuple(t.shape), getattr(mx, dtype))
    return out


def _index_files(index: Path) -> List[Path]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{index}: not a valid weight index ({_one_line(e)})")
    files = []
    for name in weight_map.values():
        p = index.parent / name
        if p not in files:
            files.append(p)
    for p in files:
        if not p.exists():
            raise ConvertError(f"{index}: lists {p.name}, which is missing")
    return files


def find_weight_files(path: Path) -> List[WeightFile]:
    """The checkpoint's weight files, preferring safetensors over ``.bin``.
    Optimizer, scheduler, RNG and trainer-state files are never read."""
    index = path / "model.safetensors.index.json"
    bin_index = path / "pytorch_model.bin.index.json"
    if index.exists():
        files, kind = _index_files(index), "safetensors"
    elif (path / "model.safetensors").exists():
        files, kind = [path / "model.safetensors"], "safetensors"
    elif sorted(path.glob("model-*-of-*.safetensors")):
        files, kind = sorted(path.glob("model-*-of-*.safetensors")), "safetensors"
    elif bin_index.exists():
        files, kind = _index_files(bin_index), "bin"
    elif (path / "pytorch_model.bin").exists():
        files, kind = [path / "pytorch_model.bin"], "bin"
    else:
        raise ConvertError(
            f"{path}: no weights found (model.safetensors, model-*-of-*.safetensors with "
            "model.safetensors.index.json, or pytorch_model*.bin)"
        )
    read = _read_safetensors_header if kind == "safetensors" else _read_bin_header
    out, seen = [], {}
    for p in files:
        wf = WeightFile(p, kind, read(p))
        for name in wf.tensors:
            if name in seen:
                raise ConvertError(f"{p}: tensor {name} is also in {seen[name].name}")
            seen[name] = p
        out.append(wf)
    for idx in (index, bin_index):
        if idx.exists() and kind == ("safetensors" if idx is index else "bin"):
            with open(idx) as f:
                listed = set(json.load(f)["weight_map"])
            if listed != set(seen):
                extra = sorted(listed - set(seen)) or sorted(set(seen) - listed)
                raise ConvertError(f"{idx}: the index and the weight files disagree on {extra[0]}")
    return out


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, with its added tokens."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConvertError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
            "save the tokenizer beside the model with tokenizer.save_pretrained"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: cannot load the tokenizer ({_one_line(e)})")


def read_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint folder without loading any weights.

    Raises:
        ConvertError: naming the file or field at fault.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: not a checkpoint folder")
    try:
        config = read_hf_config(path)
    except ConfigError as e:
        raise ConvertError(str(e))
    model_type = config["model_type"]
    cfg_file = path / "config.json"
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise ConvertError(f"{cfg_file}: vocab_size must be a positive integer, not {vocab!r}")
    files = find_weight_files(path)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > vocab:
        raise ConvertError(
            f"{cfg_file}: vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} "
            "tokens (were the embeddings resized after adding the MemoSight tokens?)"
        )
    memosight = None
    if has_memosight_tokens(tokenizer):
        try:
            memosight = build_config(tokenizer, model_type, hf_config=config)
        except ConfigError as e:
            raise ConvertError(f"{path}: {e}")
    return Checkpoint(path, config, model_type, files, tokenizer, memosight)


# ----------------------------------------------------------------------------
# Planning


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
        raise ConvertError(f"{cfg_file}: cannot build a {config['model_type']} model ({_one_line(e)})")


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


# ----------------------------------------------------------------------------
# Writing


class SafetensorsWriter:
    """Writes one safetensors file a tensor at a time.

    The header is written first from the planned names, shapes and dtypes, so
    no tensor has to stay in memory once its bytes are written (a whole-file
    writer such as ``mx.save_safetensors`` holds the entire shard).
    """

    def __init__(self, path: Path, entries, metadata: Optional[dict] = None):
        header = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, shape, dtype in entries:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _MX_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self.pending = list(entries)[::-1]
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, array: mx.array):
        want_name, shape, dtype = self.pending.pop()
        if (name, tuple(array.shape), array.dtype) != (want_name, tuple(shape), dtype):
            raise RuntimeError(
                f"{self.path.name}: expected {want_name} {list(shape)} {dtype}, got "
                f"{name} {list(array.shape)} {array.dtype}"
            )
        if array.dtype.size in _SAME_WIDTH_UINT and array.dtype not in (mx.bool_,):
            array = array.view(_SAME_WIDTH_UINT[array.dtype.size])
        self.file.write(np.ascontiguousarray(np.asarray(array)).data)

    def close(self):
        if self.pending:
            raise RuntimeError(f"{self.path.name}: {len(self.pending)} tensors were not written")
        self.file.close()


def shard_entries(entries, max_bytes: int) -> List[list]:
    """Split the output tensors into files of at most ``max_bytes`` (a larger
    tensor gets a file of its own), as mlx-lm does."""
    shards, size = [], 0
    for e in entries:
        n = _nbytes(e[1], e[2])
        if not shards or size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _convert_tensor(job: TensorJob, x: mx.array) -> List[mx.array]:
    if job.dtype is not None and mx.issubdtype(x.dtype, mx.floating):
        x = x.astype(job.dtype)
    if job.quantize is None:
        return [x]
    group_size, bits, mode = job.quantize
    return list(mx.quantize(x, group_size, bits, mode=mode))[: len(job.outputs)]


def write_weights(ckpt: Checkpoint, plan: Plan, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                  progress: bool = True) -> List[str]:
    """Stream the checkpoint's tensors into ``model*.safetensors`` files and
    write ``model.safetensors.index.json``.

    Returns:
        The weight file names.
    """
    from tqdm import tqdm

    shards = shard_entries(plan.entries, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    owner = {e[0]: i for i, s in enumerate(shards) for e in s}
    by_file: Dict[int, List[TensorJob]] = {}
    for job in plan.jobs:
        by_file.setdefault(id(job.file), []).append(job)
    bar = tqdm(total=len(plan.jobs), unit="tensor", desc="converting", disable=not progress,
               file=sys.stderr)
    current, writer = None, None
    try:
        for wf in ckpt.files:
            jobs = by_file.get(id(wf), [])
            for job, (_, x) in zip(jobs, wf.arrays([j.name for j in jobs])):
                arrays = _convert_tensor(job, x)
                mx.eval(arrays)
                for name, a in zip(job.outputs, arrays):
                    if owner[name] != current:
                        if writer is not None:
                            writer.close()
                        current = owner[name]
                        writer = SafetensorsWriter(out / names[current], shards[current],
                                                   {"format": "mlx"})
                    writer.write(name, a)
                del arrays, x
                # Freed buffers are reused for the next tensors (most share a
                # few sizes); the cache is only emptied when it grows large.
                if mx.get_cache_memory() > CACHE_BYTES:
                    mx.clear_cache()
                bar.update()
        writer.close()
    finally:
        mx.clear_cache()
        bar.close()
        if writer is not None and not writer.file.closed:
            writer.file.close()
    index = {
        "metadata": {"total_size": plan.nbytes},
        "weight_map": {e[0]: names[owner[e[0]]] for e in sorted(plan.entries, key=lambda e: e[0])},
    }
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return names


def write_mlx_model(ckpt: Checkpoint, plan: Plan, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                    progress: bool = True) -> List[str]:
    """Write an mlx-lm model folder (weights, ``config.json``, tokenizer files)
    and ``memosight.json`` into the existing folder ``out``.

    Returns:
        The weight file names.
    """
    from mlx_lm.utils import save_config

    names = write_weights(ckpt, plan, out, max_shard_bytes, progress)
    save_config(dict(plan.config), out / "config.json")
    for f in TOKENIZER_FILES:
        if (ckpt.path / f).exists():
            shutil.copy(ckpt.path / f, out / f)
    if ckpt.memosight is not None:
        ckpt.memosight.save(out)
    return names


@contextmanager
def staged_output(out: Path, force: bool = False):
    """Yield a fresh folder beside ``out``; rename it to ``out`` when the block
    succeeds (replacing an old ``out`` only with ``force``), remove it when the
    block fails. Parent folders created here are removed on failure too."""
    out = Path(out)
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (pass --force to replace it)")
    made = []
    try:
        parent = out.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        for p in reversed(made):
            p.rmdir()
        raise ConvertError(f"{out}: cannot create the output folder ({e.strerror or _one_line(e)})")
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass
        raise


# ----------------------------------------------------------------------------
# Verification

VERIFY_QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
VERIFY_THOUGHTS = (
    "Tom starts with 3 apples.",
    "He buys 4 more apples, so he has 3 + 4 = 7 apples.",
    "The answer is \\boxed{7}.",
)
VERIFY_SYSTEM = "Solve the problem step by step."


@dataclasses.dataclass
class VerifyResult:
    max_diff: float  # converted vs the original with the conversion's rounding
    tolerance: float
    max_diff_original: float  # converted vs the original as saved
    tokens: int
    memosight: bool
    dtype: str

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance

    def summary(self) -> str:
        kind = "MemoSight training sample" if self.memosight else "causal sample"
        line = (f"verify: max |logit difference| {self.max_diff:.3g} on a {self.tokens}-token "
                f"{kind} (tolerance {self.tolerance:.3g} for {self.dtype})")
        if self.max_diff_original != self.max_diff:
            line += (f"; {self.max_diff_original:.3g} against the unrounded original "
                     "(the precision given up by the chosen dtype / quantisation)")
        return line


def verification_sample(tokenizer, memosight: Optional[MemoSightConfig]):
    """One sample as ``(ids, positions, mask)`` numpy arrays: a MemoSight
    training sample (memory, continue and foresight tokens present) when the
    model has the tokens, else a causal sequence."""
    from .layout import Role, build_training_sample, encode_steps

    if memosight is None:
        text = VERIFY_QUESTION + "\n" + "\n\n".join(VERIFY_THOUGHTS)
        ids = np.array(tokenizer.encode(text, add_special_tokens=False), np.int32)
        T = len(ids)
        return ids, np.arange(T, dtype=np.int32), np.tril(np.ones((T, T), bool))
    cfg = memosight
    prompt = tokenizer.encode(cfg.template.render(VERIFY_QUESTION, system=VERIFY_SYSTEM),
                              add_special_tokens=False)
    steps, thought_lens = encode_steps(tokenizer, VERIFY_THOUGHTS)
    s = build_training_sample(prompt, steps, cfg.token_ids, cfg.compression_ratio,
                              offset=max(1, cfg.max_offset), thought_lens=thought_lens)
    roles = set(s.roles.tolist())
    assert {Role.MEMORY, Role.CONTINUE, Role.FORESIGHT} <= roles
    return s.input_ids, s.positions, s.mask()


def _round_like(torch_model, mlx_model):
    """Give the PyTorch model's weights the rounding the conversion applied:
    each tensor cast to its converted dtype, quantised layers quantised and
    dequantised by MLX from the original weights. Returns True when anything
    changed."""
    import torch
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(mlx_model.parameters()))
    modules = dict(mlx_model.named_modules())
    torch_dtypes = {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}
    changed = False
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            prefix = name.rpartition(".")[0]
            if name.endswith(".weight") and f"{prefix}.scales" in params:
                m = modules[prefix]
                w = mx.array(p.detach().numpy()).astype(params[f"{prefix}.scales"].dtype)
                q = mx.quantize(w, m.group_size, m.bits, mode=m.mode)
                w = mx.dequantize(*q, group_size=m.group_size, bits=m.bits, mode=m.mode)
                p.copy_(torch.from_numpy(np.array(w.astype(mx.float32))))
                changed = True
            elif name in params and params[name].dtype in torch_dtypes:
                p.copy_(p.to(torch_dtypes[params[name].dtype]).float())
                changed = True
    return changed


def verify_conversion(ckpt: Checkpoint, out: Path) -> VerifyResult:
    """Run the original PyTorch model and the converted MLX model on one
    sample and compare their logits.

    The PyTorch side runs in float32 with the checkpoint's weights given the
    conversion's rounding (dtype cast, quantisation), so the comparison checks
    the conversion itself; the tolerance covers the MLX side computing in the
    converted dtype.
    """
    torch = _import_torch("--verify")
    from transformers import AutoModelForCausalLM

    from .model import forward, load_model

    mlx_model, _ = load_model(out)
    ids, positions, mask = verification_sample(ckpt.tokenizer, ckpt.memosight)
    try:
        ref = AutoModelForCausalLM.from_pretrained(str(ckpt.path)).float().eval()
    except Exception as e:
        raise ConvertError(f"{ckpt.path}: transformers cannot load the model ({_one_line(e)})")
    additive = torch.zeros((1, 1) + mask.shape)
    additive.masked_fill_(~torch.from_numpy(mask)[None, None], torch.finfo(torch.float32).min)

    def torch_logits():
        with torch.no_grad():
            return ref(input_ids=torch.from_numpy(ids.astype(np.int64))[None],
                       position_ids=torch.from_numpy(positions.astype(np.int64))[None],
                       attention_mask=additive).logits[0].numpy()

    original = torch_logits()
    rounded = torch_logits() if _round_like(ref, mlx_model) else original
    converted = np.array(forward(mlx_model, ids, positions, mx.array(mask))[0].astype(mx.float32))
    compute = str(mlx_model.model.norm.weight.dtype).replace("mlx.core.", "")
    tol = TOLERANCE.get(compute, TOLERANCE["bfloat16"]) * max(1.0, float(np.abs(rounded).max()))
    return VerifyResult(
        max_diff=float(np.abs(converted - rounded).max()),
        tolerance=tol,
        max_diff_original=float(np.abs(converted - original).max()),
        tokens=len(ids),
        memosight=ckpt.memosight is not None,
        dtype=compute,
    )


# ----------------------------------------------------------------------------
# Entry points


def _check_quantization(bits: Optional[int], group_size: Optional[int]):
    """Ask MLX whether it quantises with these settings (mlx-lm's defaults
    stand in for the ones not given)."""
    b, g = bits or 4, group_size or 64
    try:
        mx.eval(mx.quantize(mx.zeros((1, g)), g, b))
    except Exception as e:
        raise ConvertError(f"--q-bits {b} with --q-group-size {g}: MLX cannot quantise with "
                           f"these settings ({_one_line(e)})")


def _raw_config(path: Path) -> dict:
    try:
        with open(path / "config.json") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _check_gguf_request(gguf: Path, gguf_type: Optional[str], force: bool, quantize: bool,
                        q_bits: Optional[int], q_group_size: Optional[int]):
    """Refuse a GGUF request that cannot succeed before anything is converted."""
    from .gguf import GGUF_TYPES

    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ConvertError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if gguf.exists() and not force:
        raise ConvertError(f"{gguf}: already exists (pass --force to replace it)")
    if gguf.is_dir():
        raise ConvertError(f"--gguf {gguf}: is a folder, not a file")
    if not gguf.parent.is_dir():
        raise ConvertError(f"--gguf {gguf}: the folder {gguf.parent} does not exist")
    if quantize:
        bits, group = q_bits or 4, q_group_size or 64
        if gguf_type not in (None, "q4_1") or (bits, group) != (4, 32):
            raise ConvertError(
                f"--gguf-type {gguf_type or 'q4_1'}: -q makes {bits}-bit group-{group} MLX "
                "weights; only 4-bit group-32 weights map to GGUF (q4_1) without requantising "
                "(use -q --q-bits 4 --q-group-size 32, or drop -q and pick --gguf-type)"
            )


def convert(
    ckpt_path,
    out_path,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    force: bool = False,
    verify: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
    log=print,
    gguf=None,
    gguf_type: Optional[str] = None,
) -> dict:
    """Convert a checkpoint folder into an MLX model folder and / or a GGUF file.

    Args:
        ckpt_path: the Hugging Face checkpoint folder.
        out_path: the folder to create.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` (default: the
            checkpoint's).
        quantize, q_bits, q_group_size: as ``mlx_lm.convert``.
        force: replace an existing ``out_path``.
        verify: compare logits with the PyTorch model; fail above the
            tolerance (:data:`TOLERANCE`).
        max_shard_bytes: largest weight file to write.
        log: where progress lines go (notices go to stderr).
        gguf: also write this GGUF file (``out_path`` may then be None).
            ``ckpt_path`` may be an MLX model folder, which is exported as is.
        gguf_type: the GGUF tensor type (:data:`mlx_memosight.gguf.GGUF_TYPES`).

    Returns:
        A summary dict (``out``, ``files``, ``bytes``, ``dtype``,
        ``quantization``, ``memosight``, ``verify``, ``gguf``).

    Raises:
        ConvertError: with a one-line message; nothing is left at ``out_path``
            or ``gguf``.
    """
    ckpt_path = Path(ckpt_path)
    if out_path is None and gguf is None:
        raise ConvertError("-o/--out or --gguf is required")
    if gguf is not None:
        from .gguf import export_gguf, is_mlx_folder

        gguf = Path(gguf)
        _check_gguf_request(gguf, gguf_type, force, quantize, q_bits, q_group_size)
        if is_mlx_folder(ckpt_path):
            extra = [flag for flag, on in (("-o", out_path is not None), ("--dtype", dtype),
                                          ("-q", quantize), ("--verify", verify)) if on]
            if extra:
                raise ConvertError(f"{extra[0]}: {ckpt_path} is already an MLX model folder; "
                                   "only --gguf / --gguf-type apply to it")
            return {"out": None, "gguf": export_gguf(ckpt_path, gguf, gguf_type, force, progress, log)}
        if quantize and (dtype or _checkpoint_dtype(_raw_config(ckpt_path))) == "float32":
            raise ConvertError("--gguf-type q4_1 stores the MLX scales as float16: add --dtype "
                               "float16 to -q (the checkpoint is float32)")
        if out_path is None:
            # The MLX folder the GGUF file is written from lives in a
            # temporary folder beside it.
            with tempfile.TemporaryDirectory(prefix=f".{gguf.name}.mlx-", dir=gguf.parent) as tmp:
                mlx_dir = Path(tmp) / "model"
                summary = convert(ckpt_path, mlx_dir, dtype, quantize, q_bits, q_group_size, force,
                                  verify, max_shard_bytes, progress,
                                  lambda line: line.startswith(f"saved {mlx_dir}") or log(line),
                                  gguf, gguf_type)
            summary["out"] = None
            return summary
    out_path = Path(out_path)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize:
        _check_quantization(q_bits, q_group_size)
    if out_path.exists() and not force:
        raise ConvertError(f"{out_path}: already exists (pass --force to replace it)")
    if out_path.resolve() == ckpt_path.resolve() or out_path.resolve() in ckpt_path.resolve().parents:
        raise ConvertError(f"{out_path}: must not be the checkpoint folder or one that holds it")
    if verify:
        _import_torch("--verify")

    ckpt = read_checkpoint(ckpt_path)
    if ckpt.memosight is None:
        print(f"notice: {ckpt_path} has no MemoSight tokens; converting it as a plain "
              f"{ckpt.model_type} model (no {CONFIG_FILE})", file=sys.stderr)
    plan = plan_conversion(ckpt, dtype, quantize, q_group_size, q_bits)
    result = None
    with staged_output(out_path, force) as tmp:
        try:
            files = write_mlx_model(ckpt, plan, tmp, max_shard_bytes, progress)
        except OSError as e:
            raise ConvertError(f"{out_path}: writing failed ({e.strerror or _one_line(e)})")
        if verify:
            result = verify_conversion(ckpt, tmp)
            log(result.summary())
            if not result.ok:
                raise ConvertError(
                    f"--verify: max |logit difference| {result.max_diff:.3g} is above the "
                    f"tolerance {result.tolerance:.3g} for {result.dtype}; nothing was written"
                )
        exported = export_gguf(tmp, gguf, gguf_type, force, progress, log) if gguf else None
    summary = {
        "out": out_path,
        "files": files,
        "bytes": plan.nbytes,
        "dtype": plan.dtype,
        "quantization": plan.quantization,
        "memosight": ckpt.memosight,
        "verify": result,
        "gguf": exported,
    }
    q = plan.quantization
    what = f"{q['bits']}-bit (group size {q['group_size']})" if q else plan.dtype
    line = (f"saved {out_path}: {ckpt.model_type}, {what}, {len(plan.jobs)} tensors in "
            f"{len(files)} file{'s' if len(files) > 1 else ''}, {plan.nbytes / 1e6:.1f} MB")
    if ckpt.memosight is not None:
        m = ckpt.memosight
        line += (f"; {CONFIG_FILE}: {len(m.token_ids.memory)} memory tokens, compression_ratio "
                 f"{m.compression_ratio}, max_offset {m.max_offset}, template {m.template.name}")
    log(line)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_memosight.convert",
        description="Convert a PyTorch-trained MemoSight checkpoint (a Hugging Face "
        "save_pretrained folder) into an MLX model folder and / or a GGUF file.",
    )
    p.add_argument("checkpoint", help="Checkpoint folder (config.json, weights, tokenizer).")
    p.add_argument("-o", "--out", help="MLX model folder to create.")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="Type of the non-quantized parameters (default: the checkpoint's).")
    p.add_argument("-q", "--quantize", action="store_true", help="Generate a quantized model.")
    p.add_argument("--q-bits", type=int, default=None,
                   help="Bits per weight for quantization (default 4).")
    p.add_argument("--q-group-size", type=int, default=None,
                   help="Group size for quantization (default 64).")
    p.add_argument("--force", action="store_true", help="Replace an existing output folder.")
    p.add_argument("--verify", action="store_true",
                   help="Compare logits with the PyTorch model on a MemoSight sample (needs torch).")
    p.add_argument("--gguf", metavar="FILE",
                   help="Also write a GGUF file (llama.cpp) with the MemoSight metadata; CKPT may "
                   "then be an MLX model folder.")
    p.add_argument("--gguf-type", choices=("f32", "f16", "q8_0", "q4_0", "q4_1"), default=None,
                   help="GGUF tensor type (default: q4_1 for a 4-bit group-32 MLX model, else f16).")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        convert(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            force=args.force,
            verify=args.verify,
            gguf=args.gguf,
            gguf_type=args.gguf_type,
        )
    except (ConvertError, ConfigError) as e:
        print(f"mlx_memosight.convert: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"mlx_memosight.convert: error: {e.filename or args.out or args.gguf}: "
              f"{e.strerror or _one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("mlx_memosight.convert: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
