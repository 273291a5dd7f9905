"""Parity of a real model's shape at full depth: what ``tests/test_real_shapes.py``
checks at two layers (and ``tests/test_gguf.py`` on a small model), here on the
whole model.

For a random-weight float32 MemoSight checkpoint of the shape
(``convert.real_shapes``, the family's real tokenizer), converted to MLX in
float32, prints per input (a training sample; the prefill, accelerate, verify,
fused verify-and-draft and compress passes after a causal prefix) the largest
difference of the final hidden states (relative to their largest magnitude)
and of the logits between this project and transformers, against the tests'
tolerance (1e-4). With ``--gguf``, the model is also exported as an f32 GGUF
file, which llama.cpp (llama-cpp-python) loads: its tokenization of the
prompt, its logits on the prompt against MLX's (relative to the largest, within
2e-3: llama.cpp's CPU kernels round some products of an f32 file through
float16) and its greedy continuation token for token against MLX's. Exits 1
when a difference is over its tolerance or a token differs.

    python examples/check_real_shape.py qwen3-0.6b --gguf
    python examples/check_real_shape.py llama-3.2-1b-instruct --layers 8

Memory: the float32 model twice (transformers and MLX), about 2.5 GB per
billion parameters each, and the checkpoint on disk under ``--work``.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TOL = 1e-4
GGUF_TOL = 2e-3  # llama.cpp's logits against MLX's, relative to the largest


def log(*a):
    print(*a, flush=True)


def gguf_check(folder, out: Path, tokens: int) -> bool:
    """Export ``folder`` as f32 GGUF; llama.cpp's logits on the prompt and
    greedy tokens against MLX's. Whether the tokens agree."""
    from llama_cpp import Llama

    from convert import parity
    from gguf_check import greedy_agreement, logits
    from mlx_memosight.gguf import export_gguf

    tic = time.perf_counter()
    export_gguf(folder.path, out, "f32", force=True, progress=False, log=lambda *a: None)
    log(f"f32 GGUF: {out.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - tic:.0f} s")
    cfg, tok = folder.memosight, folder.hf_tokenizer
    ids = tok.encode(cfg.template.render(parity.QUESTION, parity.SYSTEM), add_special_tokens=False)
    llm = Llama(model_path=str(out), n_ctx=len(ids) + tokens + 8, logits_all=True, verbose=False, seed=0)
    same_ids = llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    mine = logits(folder.model, ids)
    diff = np.abs(theirs - mine).max() / max(1.0, np.abs(mine).max())
    agree, n = greedy_agreement(llm, folder.model, folder.tokenizer, ids, tokens)
    log(f"llama.cpp: tokenizes the prompt as transformers: {'yes' if same_ids else 'NO'}; logits on the "
        f"{len(ids)}-token prompt vs MLX: {diff:.1e} of the largest (within {GGUF_TOL:g}: "
        f"{'yes' if diff <= GGUF_TOL else 'NO'}); greedy tokens equal: {agree} of {n}")
    return same_ids and diff <= GGUF_TOL and agree == n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help="a name from convert/shapes.json")
    p.add_argument("--layers", type=int, help="reduce the depth (default: the model's)")
    p.add_argument("--gguf", action="store_true", help="also export f32 GGUF and compare llama.cpp")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared with --gguf")
    p.add_argument("--work", default=None, help="folder for the checkpoint and conversions")
    p.add_argument("--shared", default=None, help="the folder with tokenizers/ (default: ../shared)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from convert import parity
    from convert.real_shapes import SHARED, make_real_checkpoint, shapes
    from mlx_memosight.convert import convert
    from mlx_memosight.loading import load_folder

    if args.shape not in shapes():
        p.error(f"shape: unknown {args.shape!r} (one of {', '.join(shapes())})")
    work = Path(args.work or ROOT / ".work" / f"check_real_shape-{args.shape}-{args.layers or 'full'}")
    work.mkdir(parents=True, exist_ok=True)
    ckpt, mlx_dir = work / "ckpt", work / "mlx-float32"
    if not (ckpt / "config.json").exists():
        tic = time.perf_counter()
        make_real_checkpoint(ckpt, args.shape, args.layers, "float32", shared=Path(args.shared or SHARED))
        log(f"checkpoint made in {time.perf_counter() - tic:.0f} s")
    if not (mlx_dir / "config.json").exists():
        convert(ckpt, mlx_dir, dtype="float32", progress=False, log=lambda *a: None)
    folder = load_folder(mlx_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    a = folder.model.args
    log(f"shape: {args.shape}, {a.num_hidden_layers} layers{' (reduced)' if args.layers else ''}, hidden "
        f"{a.hidden_size}, heads {a.num_attention_heads}:{a.num_key_value_heads}, vocabulary {a.vocab_size}; "
        f"float32")
    log(f"{'input':<12}{'tokens':>7}{'hidden diff (rel)':>19}{'logits diff':>13}{'largest logit':>15}  within {TOL:g}")
    ok = True
    for kind, case in parity.cases(folder.hf_tokenizer, folder.memosight):
        d = parity.differences(*parity.both(hf, folder.model, case))
        good = d["hidden"] <= TOL and d["logits"] <= TOL
        ok &= good
        log(f"{kind:<12}{len(case.ids):>7}{d['hidden']:>19.1e}{d['logits']:>13.1e}{d['largest_logit']:>15.2f}  "
            f"{'yes' if good else 'NO'}")
    del hf
    if args.gguf:
        ok &= gguf_check(folder, work / "model-f32.gguf", args.tokens)
    log("all within tolerance" if ok else "DIFFERENCES over the tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
