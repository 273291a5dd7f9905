"""Writing the MLX model folder: tensors stream into safetensors files whose
headers are known from the plan, a few converted ahead of the one being
written, so memory holds those few tensors rather than the largest shard."""

import collections
import itertools
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..config import write_model_card
from ..errors import ConvertError
from ..outputs import release_stream_cache
from .checkpoint import ST_TO_MX, Checkpoint
from .plan import Plan, TensorJob, _nbytes

# mlx-lm writes weight files of at most 5 GB.
MAX_SHARD_BYTES = 5 << 30
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

_MX_TO_ST = {v: k for k, v in ST_TO_MX.items()}
_SAME_WIDTH_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


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
    tensor gets a file of its own), as mlx-lm does.

    mlx-lm's ``make_shards`` does the same for arrays, but takes the limit in
    whole gigabytes (it shifts it by 30 bits); the converter's limit is in
    bytes, and its tests shard tiny models at a few kilobytes."""
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
    if job.dtype is not None and job.dtype != x.dtype and mx.issubdtype(x.dtype, mx.floating):
        x = x.astype(job.dtype)
    if job.quantize is None:
        return [x]
    group_size, bits, mode = job.quantize
    return list(mx.quantize(x, group_size, bits, mode=mode))[: len(job.outputs)]


# elements per finiteness check: its temporaries stay at a few MB whatever the tensor
CHECK_ELEMENTS = 1 << 20
# per float dtype, the exponent bits: a value is NaN or infinite when all are set
_EXPONENT_BITS = {mx.float16: 0x7C00, mx.bfloat16: 0x7F80, mx.float32: 0x7F800000}


def _all_finite(a: mx.array) -> bool:
    """No NaN or inf in ``a``, checked on its raw bits a slice at a time
    (``isfinite`` computes half-precision tensors through float32, with a
    copy several times the tensor's size beside it: at the Qwen2.5-0.5B shape
    the check took 5.7 s of a conversion that way and 0.9 s this way, by
    ``python -m cProfile -s cumtime -m mlx_memosight.convert CKPT -o OUT``)."""
    if a.dtype not in _EXPONENT_BITS:
        return bool(mx.all(mx.isfinite(a)).item())
    exponent = _EXPONENT_BITS[a.dtype]
    bits = np.asarray(a.view(_SAME_WIDTH_UINT[a.dtype.size])).reshape(-1)
    return not any(np.any((bits[i : i + CHECK_ELEMENTS] & exponent) == exponent)
                   for i in range(0, bits.size, CHECK_ELEMENTS))


def _check_finite(wf, job: TensorJob, x: mx.array, arrays: List[mx.array]):
    """Every float value must stay finite: NaN or inf in a checkpoint (or
    values beyond the range of the chosen dtype) would make the model compute
    NaN without a word."""
    mx.eval([x] + arrays)
    floats = [a for a in [x] + [a for a in arrays if a is not x] if mx.issubdtype(a.dtype, mx.floating)]
    for a in floats:
        if not _all_finite(a):
            where = " in the checkpoint" if a is x else " once quantized" if job.quantize else f" once cast to {a.dtype}"
            raise ConvertError(f"{wf.path}: tensor {job.name} holds NaN or infinite values{where}")


_STREAMS: Dict[str, list] = {}


def _conversion_streams() -> Tuple[list, object]:
    """The streams tensors are converted on (two on a CPU, one on a GPU) and
    the one their finished outputs are viewed as bits on; made once per
    process and device (each CPU stream is a thread)."""
    device = mx.default_device()
    key = str(device)
    if key not in _STREAMS:
        _STREAMS[key] = [mx.new_stream(device) for _ in range(3 if device == mx.cpu else 2)]
    *convert, finish = _STREAMS[key]
    return convert, finish


# How far conversion runs ahead of checking and writing: a new tensor is
# queued, then the oldest are written until at most AHEAD_TENSORS remain and
# the input bytes beyond the oldest are at most AHEAD_BYTES (so while one is
# written, up to AHEAD_TENSORS others convert, and a tensor larger than
# AHEAD_BYTES still goes ahead, alone).
AHEAD_TENSORS = 4
AHEAD_BYTES = 512 << 20


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

    convert_streams, finish_stream = _conversion_streams()

    def finish(wf, job, x, arrays):
        nonlocal current, writer
        # the bit views of checking and writing run on a stream of their own:
        # on a conversion stream they would wait behind the tensors queued there
        with mx.stream(finish_stream):
            _check_finite(wf, job, x, arrays)
            for name, a in zip(job.outputs, arrays):
                if owner[name] != current:
                    if writer is not None:
                        writer.close()
                    current = owner[name]
                    writer = SafetensorsWriter(out / names[current], shards[current], {"format": "mlx"})
                writer.write(name, a)
        release_stream_cache()
        bar.update()

    # Conversion runs ahead: while the oldest tensor is checked and written
    # (numpy and file writes, which leave the interpreter lock), the next ones
    # are read and converted, alternating between two CPU streams (MLX runs
    # each stream on a thread of its own), so that two conversions
    # (quantisation is most of the work) run at once and a small tensor does
    # not leave a core idle beside a large one. Neither is the default stream,
    # where the checkpoint's lazy loads run: a load would wait behind a
    # conversion there. Memory holds the tensors in flight (AHEAD_TENSORS,
    # AHEAD_BYTES) and their outputs.
    streams = itertools.cycle(convert_streams)
    ahead: collections.deque = collections.deque()
    ahead_bytes = 0
    try:
        for wf in ckpt.files:
            jobs = by_file.get(id(wf), [])
            for job, (_, x) in zip(jobs, wf.arrays([j.name for j in jobs])):
                with mx.stream(next(streams)):
                    arrays = _convert_tensor(job, x)
                    mx.async_eval([x] + arrays)
                ahead.append((wf, job, x, arrays))
                ahead_bytes += x.nbytes
                del arrays, x
                while len(ahead) > AHEAD_TENSORS or (
                        len(ahead) > 1 and ahead_bytes - ahead[0][2].nbytes > AHEAD_BYTES):
                    ahead_bytes -= ahead[0][2].nbytes
                    finish(*ahead.popleft())
        while ahead:
            finish(*ahead.popleft())
        writer.close()
    finally:
        ahead.clear()
        for stream in convert_streams:  # after an error, conversions queued ahead may still run
            mx.synchronize(stream)
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
                    progress: bool = True, name: Optional[str] = None) -> List[str]:
    """Write an mlx-lm model folder (weights, ``config.json``, tokenizer files)
    and ``memosight.json`` with a model card (``README.md``) into the existing
    folder ``out``, whose final name is ``name``.

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
        write_model_card(out, ckpt.memosight, name)
    return names
