"""Verifying a conversion: the PyTorch model and the converted MLX model on one
MemoSight training sample (memory, continue and foresight tokens, per-token
positions and the layout's mask), logits compared within a tolerance that
depends on the converted dtype."""

import dataclasses
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..config import MemoSightConfig
from ..errors import one_line
from .checkpoint import Checkpoint, ConvertError, _import_torch

# Largest max |logit difference| --verify accepts, as a fraction of the
# largest reference logit (at least 1). float32: 1e-4. float16 keeps 11
# significant bits (unit roundoff 4.9e-4) and bfloat16 8 bits (3.9e-3); every
# op rounds its result again and the errors add up over the layers, so the
# bounds allow about 20 and 13 unit roundoffs. A wrong tensor (transposed,
# misnamed, badly cast) moves logits by far more.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


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
    from ..layout import Role, build_training_sample, encode_steps

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
    torch = _import_torch("verify=True")
    from transformers import AutoModelForCausalLM

    from ..loading import load_model
    from ..model import forward

    mlx_model, _ = load_model(out)
    ids, positions, mask = verification_sample(ckpt.tokenizer, ckpt.memosight)
    try:
        ref = AutoModelForCausalLM.from_pretrained(str(ckpt.path)).float().eval()
    except Exception as e:
        raise ConvertError(f"{ckpt.path}: transformers cannot load the model ({one_line(e)})")
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
