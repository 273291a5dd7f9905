"""``mlx_memosight.convert``: a PyTorch-trained MemoSight checkpoint to an MLX
model folder and / or a GGUF file.

    mlx_memosight.convert CKPT -o OUT [--dtype float16|bfloat16|float32]
        [-q] [--q-bits N] [--q-group-size N] [--force] [--verify]
        [--gguf FILE [--gguf-type f32|f16|q8_0|q4_0|q4_1]]

The steps: :func:`read_checkpoint` validates everything it can before
anything is written; :func:`plan_conversion` lays out the output tensors;
:func:`write_mlx_model` streams them into a folder staged beside OUT and
renamed at the end; :func:`verify_conversion` compares the PyTorch model with
the converted one; with ``gguf`` the folder is also written as one GGUF file
(CKPT may then be an MLX folder already).
"""

import json
import sys
from pathlib import Path
from typing import Optional

from .. import cli
from ..options import ConvertOptions, MemoSightOverrides, add_arguments


from ..errors import one_line
from ..outputs import check_output, scratch_folder, staged_folder
from ..errors import ConvertError

def _check_quantization(bits: Optional[int], group_size: Optional[int]):
    """Ask MLX whether it quantises with these settings (mlx-lm's defaults
    stand in for the ones not given)."""
    b, g = bits or 4, group_size or 64
    import mlx.core as mx

    try:
        mx.eval(mx.quantize(mx.zeros((1, g)), g, b))
    except Exception as e:  # MLX raises ValueError or RuntimeError
        raise ConvertError(f"q_bits={b} with q_group_size={g}: MLX cannot quantise with "
                           f"these settings ({one_line(e)})")


def _raw_config(path: Path) -> dict:
    try:
        with open(path / "config.json") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _check_gguf_request(gguf: Path, gguf_type: Optional[str], force: bool, quantize: bool,
                        q_bits: Optional[int], q_group_size: Optional[int]):
    """Refuse a GGUF request that cannot succeed before anything is converted."""
    check_output(gguf, force, folder=False)
    if not gguf.parent.is_dir():
        raise ConvertError(f"gguf={gguf}: the folder {gguf.parent} does not exist", "gguf")
    if quantize:
        bits, group = q_bits or 4, q_group_size or 64
        if gguf_type not in (None, "q4_1") or (bits, group) != (4, 32):
            raise ConvertError(
                f"gguf_type={gguf_type or 'q4_1'}: quantize=True makes {bits}-bit group-{group} MLX "
                "weights; only 4-bit group-32 weights map to GGUF (q4_1) without requantising "
                "(use quantize=True q_bits=4 q_group_size=32, or drop quantize=True and choose "
                "gguf_type=f16, q8_0 or q4_0)", "gguf_type")


def convert(
    ckpt_path,
    out_path,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    force: bool = False,
    verify: bool = False,
    max_shard_bytes: Optional[int] = None,
    progress: bool = True,
    log=print,
    gguf=None,
    gguf_type: Optional[str] = None,
    overrides: Optional[MemoSightOverrides] = None,
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
        overrides: ``memosight.json`` values chosen on purpose; otherwise the
            checkpoint's own ``memosight.json`` is kept exactly (an MLX folder
            converted again), or the family defaults apply (a PyTorch
            checkpoint, as the reference trains them).

    Returns:
        A summary dict (``out``, ``files``, ``bytes``, ``dtype``,
        ``quantization``, ``memosight``, ``verify``, ``gguf``).

    Raises:
        ConvertError: with a one-line message; nothing is left at ``out_path``
            or ``gguf``.
    """
    from ..backend import cpu_dtype_advice
    from ..config import CONFIG_FILE
    from ..gguf import export_gguf
    from ..loading import is_mlx_folder
    from .checkpoint import _import_torch, read_checkpoint
    from .plan import _checkpoint_dtype, plan_conversion
    from .verify import verify_conversion
    from .writer import MAX_SHARD_BYTES, write_mlx_model

    ConvertOptions(dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                   gguf_type=gguf_type, force=force, verify=verify)
    overrides = overrides or MemoSightOverrides()
    ckpt_path = Path(ckpt_path)
    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
    if out_path is None and gguf is None:
        raise ConvertError("give out_path=FOLDER or gguf=FILE (or both)", "out_path")
    if gguf is not None:
        gguf = Path(gguf)
        _check_gguf_request(gguf, gguf_type, force, quantize, q_bits, q_group_size)
        if is_mlx_folder(ckpt_path):
            extra = [name for name, on in (("out_path", out_path is not None), ("dtype", dtype),
                                           ("quantize", quantize), ("verify", verify)) if on]
            extra += [name for name, value in overrides.to_dict().items() if value is not None]
            if extra:
                raise ConvertError(f"{extra[0]}: {ckpt_path} is already an MLX model folder; "
                                   "only gguf=FILE and gguf_type=TYPE apply to it", extra[0])
            return {"out": None, "gguf": export_gguf(ckpt_path, gguf, gguf_type, force, progress, log)}
        if quantize and (dtype or _checkpoint_dtype(_raw_config(ckpt_path))) == "float32":
            raise ConvertError("gguf_type=q4_1 stores the MLX scales as float16: add dtype=float16 "
                               "to quantize=True (the checkpoint is float32)", "gguf_type")
        if out_path is None:
            # The MLX folder the GGUF file is written from lives in a
            # temporary folder beside it.
            with scratch_folder(gguf.parent, f".{gguf.name}.mlx-") as tmp:
                mlx_dir = Path(tmp) / "model"
                summary = convert(ckpt_path, mlx_dir, dtype, quantize, q_bits, q_group_size, force,
                                  verify, max_shard_bytes, progress,
                                  lambda line: line.startswith(f"saved {mlx_dir}") or log(line),
                                  gguf, gguf_type, overrides)
            summary["out"] = None
            return summary
    out_path = Path(out_path)
    if quantize:
        _check_quantization(q_bits, q_group_size)
    check_output(out_path, force, folder=True)
    if out_path.resolve() == ckpt_path.resolve() or out_path.resolve() in ckpt_path.resolve().parents:
        raise ConvertError(f"{out_path}: must not be the checkpoint folder or one that holds it")
    if verify:
        _import_torch("verify=True")

    ckpt = read_checkpoint(ckpt_path, overrides.values(), overrides.template)
    if ckpt.memosight is None:
        print(f"notice: {ckpt_path} has no MemoSight tokens; converting it as a plain "
              f"{ckpt.model_type} model (no {CONFIG_FILE})", file=sys.stderr)
    plan = plan_conversion(ckpt, dtype, quantize, q_group_size, q_bits)
    advice = cpu_dtype_advice(plan.dtype, plan.quantization is not None, hint=gguf is None)
    if advice:
        print(f"notice: {out_path}: {advice}", file=sys.stderr)
    result = None
    with staged_folder(out_path, force) as tmp:
        try:
            files = write_mlx_model(ckpt, plan, tmp, max_shard_bytes, progress, out_path.name)
        except OSError as e:
            raise ConvertError(f"{out_path}: writing failed ({e.strerror or one_line(e)})")
        if verify:
            result = verify_conversion(ckpt, tmp)
            log(result.summary())
            if not result.ok:
                raise ConvertError(
                    f"verify: max |logit difference| {result.max_diff:.3g} is above the "
                    f"tolerance {result.tolerance:.3g} for {result.dtype}; nothing was written",
                    "verify")
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


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.convert",
        description="Convert a PyTorch-trained MemoSight checkpoint (a Hugging Face "
        "save_pretrained folder) into an MLX model folder and / or a GGUF file.",
    )
    p.add_argument("ckpt_path", metavar="checkpoint", nargs="?",
                   help="checkpoint folder (config.json, weights, tokenizer), or an MLX model "
                   "folder to export with --gguf")
    p.add_argument("--hf-path", help="the checkpoint folder, given as mlx_lm.convert takes it")
    p.add_argument("-o", "--out", "--mlx-path", dest="out_path", help="MLX model folder to create")
    p.add_argument("--gguf", metavar="FILE",
                   help="also write a GGUF file (llama.cpp) with the MemoSight metadata")
    add_arguments(p, ConvertOptions)
    add_arguments(p, MemoSightOverrides)
    return p


def _convert(args):
    if (args.ckpt_path is None) == (args.hf_path is None):
        raise cli.UsageError("give the checkpoint folder once: as the first argument or as --hf-path")
    try:
        convert(args.ckpt_path or args.hf_path, args.out_path, gguf=args.gguf, overrides=MemoSightOverrides.from_args(args),
                **ConvertOptions.from_args(args).to_dict())
    except KeyboardInterrupt:
        raise KeyboardInterrupt("nothing was written")


def main(argv=None):
    cli.run(build_parser(), _convert, argv)
