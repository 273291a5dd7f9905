"""GGUF check: one MemoSight checkpoint exported at every GGUF type, then MLX,
the file read back by MLX and llama.cpp (llama-cpp-python) side by side.

Makes a PyTorch-trained checkpoint with a real tokenizer
(``convert.make_checkpoint``), converts it to MLX (float32, and float16 4-bit
group-32 for q4_1), exports each GGUF type and prints per type: the file size,
the export time, the largest logit difference between the model read back from
the GGUF file and the MLX model it came from, whether llama.cpp tokenizes the
MemoSight prompt and a mixed test text like the Hugging Face tokenizer, the
largest difference between llama.cpp's logits and MLX's on the same file
(relative to the largest logit), and how many of N greedy tokens agree. The
last line tries llama.cpp on mlx-lm's own GGUF export of the same float model.

    python examples/gguf_check.py --tokenizer ../shared/tokenizers/llama3 --family llama
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def logits(model, ids):
    from mlx_memosight.model import forward

    return np.array(forward(model, ids, 0, "causal")[0].astype(mx.float32))


def greedy_agreement(llm, model, tok, ids, n):
    """``(how many of MLX's greedy tokens llama.cpp's begin with, how many
    MLX made)``: up to ``n`` tokens after ``ids``."""
    from mlx_memosight import generate

    mine = generate(model, tok, ids, max_tokens=n, foresight=False, compress=False).token_ids
    llm.reset()
    theirs = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0) if mine else ():
        theirs.append(t)
        if len(theirs) == len(mine):
            break
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
    return same, len(mine)


def mlx_lm_export_loads(mlx_dir: Path, out: Path) -> str:
    """Whether llama.cpp loads mlx-lm's own GGUF export of the float model."""
    from llama_cpp import Llama
    from mlx.utils import tree_flatten
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.utils import load_model

    model, config = load_model(mlx_dir)
    try:
        convert_to_gguf(mlx_dir, dict(tree_flatten(model.parameters())), config, str(out))
    except Exception as e:
        return f"export fails ({type(e).__name__}: {e})"
    try:
        Llama(model_path=str(out), n_ctx=256, verbose=False)
    except Exception as e:
        return f"llama.cpp cannot load it ({e})"
    return "llama.cpp loads it"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "qwen2"))
    p.add_argument("--family", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    p.add_argument("--work", default=str(ROOT / ".work" / "gguf_check"))
    args = p.parse_args()

    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from convert.make_checkpoint import make_checkpoint
    from mlx_memosight import load
    from mlx_memosight.convert import convert
    from mlx_memosight.gguf import CHECK_TEXT, export_gguf

    work = Path(args.work) / f"{args.family}-{Path(args.tokenizer).name}"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, f32_dir, q4_dir = work / "ckpt", work / "mlx-f32", work / "mlx-q4"
    quiet = lambda *a: None  # noqa: E731
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, family=args.family, tokenizer=args.tokenizer, hidden=args.hidden,
                        layers=args.layers, steps=2)
    if not f32_dir.exists():
        convert(ckpt, f32_dir, dtype="float32", progress=False, log=quiet)
    if not q4_dir.exists():
        convert(ckpt, q4_dir, dtype="float16", quantize=True, q_bits=4, q_group_size=32,
                progress=False, log=quiet)

    hf = AutoTokenizer.from_pretrained(str(ckpt))
    f32_model, tok = load(f32_dir)
    q4_model, _ = load(q4_dir)
    cfg = f32_model.memosight_config
    prompt = cfg.template.render(QUESTION, system="Think step by step.")
    ids = hf.encode(prompt, add_special_tokens=False)
    texts = [prompt, CHECK_TEXT]
    print(f"checkpoint: {args.family}, hidden {args.hidden}, {args.layers} layers, vocab "
          f"{f32_model.args.vocab_size} ({Path(args.tokenizer).name} tokenizer); prompt {len(ids)} tokens")
    print(f"{'type':6} {'MB':>7} {'export s':>8}  {'MLX<-GGUF vs MLX':>17}  {'llama.cpp tokens':>16}  "
          f"{'llama.cpp vs MLX (rel)':>22}  greedy tokens equal")
    for kind in ("f32", "f16", "q8_0", "q4_0", "q4_1"):
        out = work / f"model-{kind}.gguf"
        t0 = time.perf_counter()
        export_gguf(q4_dir if kind == "q4_1" else f32_dir, out, kind, force=True, progress=False, log=quiet)
        seconds = time.perf_counter() - t0
        back, back_tok = load(out)
        if kind == "q4_1":
            ref, ref_name = q4_model, "MLX 4-bit"
        elif kind == "f16":
            ref, ref_name = load(f32_dir)[0], "MLX f16"
            ref.set_dtype(mx.float16)
        else:
            ref, ref_name = f32_model, "MLX f32"
        diff = np.abs(logits(back, ids) - logits(ref, ids)).max()
        llm = Llama(model_path=str(out), n_ctx=1024, logits_all=True, verbose=False, n_threads=2, seed=0)
        same_tokens = all(llm.tokenize(t.encode(), add_bos=False, special=True)
                          == hf.encode(t, add_special_tokens=False) for t in texts)
        llm.eval(ids)
        mine = logits(back, ids)
        rel = np.abs(np.array(llm.scores[: len(ids)]) - mine).max() / max(1.0, np.abs(mine).max())
        same, n = greedy_agreement(llm, back, back_tok, ids, args.tokens)
        print(f"{kind:6} {out.stat().st_size / 1e6:7.2f} {seconds:8.2f}  {diff:9.3g} vs {ref_name:9}"
              f"{'  equal' if same_tokens else '  DIFFER':>18}  {rel:22.2e}  {same}/{n}")
        del llm
    print("mlx_lm.gguf.convert_to_gguf of the float32 model:",
          mlx_lm_export_loads(f32_dir, work / "mlx_lm.gguf"))


if __name__ == "__main__":
    main()
