"""Reading a PyTorch-trained checkpoint folder (a Hugging Face ``save_pretrained``
folder, often a Trainer ``checkpoint-N/``) without loading its weights:
``config.json``, the tokenizer and every weight file's header are validated
before anything is written."""

import dataclasses
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx

from ..config import (CONFIG_FILE, ConfigError, MemoSightConfig, has_memosight_tokens, read_json,
                      with_overrides)
from ..errors import ConvertError, one_line
from ..loading import hf_tokenizer, read_hf_config, readable

ST_TO_MX = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "F64": mx.float64,
    "I64": mx.int64, "I32": mx.int32, "I16": mx.int16, "I8": mx.int8,
    "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16, "U8": mx.uint8, "BOOL": mx.bool_,
}




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
            f"({one_line(e).split('. ')[0]})"
        )
    except Exception as e:
        raise ConvertError(f"{path}: not a readable PyTorch weight file ({one_line(e)})")
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

    readable(path, ConvertError)
    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in ST_TO_MX:
                    raise ConvertError(f"{path}: tensor {name} has the unsupported dtype {dtype}")
                out[name] = (tuple(sl.get_shape()), ST_TO_MX[dtype])
            return out
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(f"{path}: not a complete safetensors file ({one_line(e)})")


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


def _weight_map(index: Path) -> Dict[str, str]:
    """An index's tensor -> file map; files must lie beside the index."""
    weight_map = read_json(index, ConvertError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ConvertError(f"{index}: weight_map must map tensor names to file names")
    for name in set(weight_map.values()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise ConvertError(f"{index}: lists the file {name!r}, which is not a file beside it"[:300])
    return weight_map


def _index_files(index: Path) -> List[Path]:
    files = []
    for name in _weight_map(index).values():
        p = index.parent / name
        if p not in files:
            files.append(p)
    for p in files:
        if not p.is_file():
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
            listed = set(_weight_map(idx))
            if listed != set(seen):
                extra = sorted(listed - set(seen)) or sorted(set(seen) - listed)
                raise ConvertError(f"{idx}: the index and the weight files disagree on {extra[0]}")
    return out


def read_checkpoint(path, overrides: Optional[dict] = None, template: Optional[str] = None) -> Checkpoint:
    """Read and validate a checkpoint folder without loading any weights.

    The MemoSight configuration is the folder's own ``memosight.json`` when it
    has one (an MLX folder being converted again keeps it exactly), else built
    from the family defaults and ``config.json``'s extra keys;
    ``overrides`` (``memosight.json`` keys) and ``template`` change it on
    purpose.

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
    try:
        tokenizer = hf_tokenizer(path)
    except ConfigError as e:
        raise ConvertError(str(e))
    if len(tokenizer) > vocab:
        raise ConvertError(
            f"{cfg_file}: vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} "
            "tokens (were the embeddings resized after adding the MemoSight tokens?)"
        )
    memosight = MemoSightConfig.load(path)
    if memosight is not None and max(memosight.token_ids.memory + [memosight.token_ids.eos]) >= len(tokenizer):
        raise ConvertError(f"{path / CONFIG_FILE}: token_ids name ids beyond the tokenizer's "
                           f"{len(tokenizer)} tokens")
    if memosight is not None or has_memosight_tokens(tokenizer):
        try:
            memosight = with_overrides(memosight, tokenizer, model_type, config, template,
                                       **(overrides or {}))
        except ConfigError as e:
            raise ConvertError(f"{path}: {e}")
    elif overrides or template:
        raise ConvertError(f"{path}: the tokenizer has no MemoSight tokens, so MemoSight settings "
                           "cannot apply")
    return Checkpoint(path, config, model_type, files, tokenizer, memosight)
