"""This project against mlx-lm at a real model's shape, side by side in one run.

    python examples/bench_scale.py qwen2.5-0.5b-instruct [--layers N] [--sections convert,decode,prefill,passes]

For a random-weight MemoSight checkpoint of the shape (``convert.real_shapes``,
bfloat16, hub-style shards):

* convert: wall time and peak RSS of ``mlx_memosight.convert`` and
  ``mlx_lm.convert``, each in its own process;
* quantize: the same for a quantised conversion (``-q``, 4-bit by
  default), then this project's output loaded by mlx-lm's own ``load`` and
  by this project, each decoding a few greedy tokens (the same tokens);
* decode: tokens/s of mlx-lm's greedy decoding and of this engine in plain
  mode (no drafting, no compression: the same work), for float32, float16,
  bfloat16 and 4-bit weights (float16 scales, and float32 ones: 4bit-f32),
  interleaved;
* prefill: prompt tokens/s of both on a long prompt;
* passes: what a pass of k tokens (k = 1..17) costs relative to a 1-token
  pass, the engine's own host time (building a fused pass) as a share of
  it, and the speed-up full MemoSight would reach at this shape: tokens per
  pass measured on the demo model (README) divided by the cost ratio of its
  pass size. That last figure is a projection, not a measurement;
* train: one LoRA step (rank 8, every layer, Adam) on one reasoning sample of
  N content tokens (``--train-tokens``, about 2N with foresight tokens) with
  the joint loss, against mlx-lm's LoRA step with its default loss on a
  sequence of the same physical length, each in its own process: peak MLX
  memory and tokens/s. MemoSight runs three times: with blockwise attention
  over the keys each block can see (the default past 1024 tokens), blockwise
  over all earlier keys, and with the whole mask (the way it trained
  before), to show what each saves.

Depth can be reduced (``--layers``) where the full model would not fit the
machine's time; the report says so on every table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_convert import run  # noqa: E402

# Tokens per forward pass of full MemoSight on the demo model's 200 held-out
# problems (README, "The demo model": 0.306 passes per token at draft length
# 3 with a foresight set after every prefix, 0.391 at draft length 2 with the
# last set only), and the size of those passes.
DEMO_TOKENS_PER_PASS = {("all", 3): (1 / 0.306, 1 + 3 + 4 * 3), ("last", 2): (1 / 0.391, 1 + 2 + 2)}


def log(*a):
    print(*a, flush=True)


def checkpoint(work: Path, shape: str, layers, shard: str) -> Path:
    from convert.real_shapes import make_real_checkpoint

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        info = make_real_checkpoint(ckpt, shape, layers, "bfloat16", shard)
        log(f"checkpoint: {shape}, {info['config']['num_hidden_layers']} layers, {info['bytes'] / 1e9:.2f} GB "
            f"in {len(info['files'])} shard(s) of at most {shard} ({time.perf_counter() - t:.0f} s to make)")
    return ckpt


def time_tools(work: Path, tools, repeats: int):
    """Run each ``(name, cmd, out)`` ``repeats`` times, the order reversed
    every other round (so that neither tool always reads the checkpoint
    after the other has brought it into the page cache), each output
    removed before its run. Per tool: the fastest run's wall and CPU
    seconds, and the largest peak RSS of its runs."""
    import shutil

    runs = {name: [] for name, _, _ in tools}
    for r in range(repeats):
        for name, cmd, out in (tools if r % 2 == 0 else tools[::-1]):
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(run([str(c) for c in cmd], work / f"{name.replace(' ', '')}.log"))
    return [(name, *min(v)[:2], max(rss for _, _, rss in v)) for name, v in runs.items()]


def conversion_tools(work: Path, ckpt: Path, suffix: str = "", options=()):
    """``(name, command, output folder)`` of this project's converter and of
    ``mlx_lm.convert``, each given ``options``."""
    flag = " -q" if "-q" in options else ""
    return [(f"mlx_memosight.convert{flag}", [sys.executable, "-m", "mlx_memosight.convert", ckpt, "-o",
                                              work / f"ms{suffix}", *options], work / f"ms{suffix}"),
            (f"mlx_lm.convert{flag}", [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", ckpt, "--mlx-path",
                                       work / f"lm{suffix}", *options], work / f"lm{suffix}")]


def bench_convert(work: Path, ckpt: Path, repeats: int = 2):
    largest = max(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    rows = time_tools(work, conversion_tools(work, ckpt), repeats)
    log(f"bfloat16 conversion, fastest of {repeats} runs each (the order alternating)")
    log(f"{'tool':<24}{'wall s':>8}{'CPU s':>8}{'peak RSS GB':>13}{'RSS/shard':>11}")
    for name, wall, cpu, rss in rows:
        log(f"{name:<24}{wall:>8.1f}{cpu:>8.1f}{rss / 1e9:>13.2f}{rss / largest:>10.2f}x")
    log(f"time ratio (ours / mlx_lm): {rows[0][1] / rows[1][1]:.2f}; largest shard {largest / 1e9:.2f} GB")
    return work / "ms"


def bench_quantized(work: Path, ckpt: Path, bits: int, group: int, tokens: int, prompt_tokens: int = 16,
                    repeats: int = 2):
    """Quantised conversions by both tools (wall time, peak RSS; as
    :func:`time_tools` runs them), then this
    project's output loaded by mlx-lm (its own ``load``, no MemoSight code)
    and by this project, each decoding ``tokens`` greedy tokens from one
    prompt of ``prompt_tokens`` tokens."""

    largest = max(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    tools = conversion_tools(work, ckpt, f"-q{bits}", ["-q", "--q-bits", str(bits), "--q-group-size", str(group)])
    rows = [(*row, sum(f.stat().st_size for f in out.glob("*.safetensors")))
            for row, (_, _, out) in zip(time_tools(work, tools, repeats), tools)]
    log(f"{bits}-bit conversion (group {group}) of the bfloat16 checkpoint, fastest of {repeats} runs each")
    log(f"{'tool':<26}{'wall s':>8}{'CPU s':>8}{'peak RSS GB':>13}{'RSS/shard':>11}{'output GB':>11}")
    for name, wall, cpu, rss, size in rows:
        log(f"{name:<26}{wall:>8.1f}{cpu:>8.1f}{rss / 1e9:>13.2f}{rss / largest:>10.2f}x{size / 1e9:>11.2f}")
    log(f"time ratio (ours / mlx_lm): {rows[0][1] / rows[1][1]:.2f}; largest shard {largest / 1e9:.2f} GB")

    if tokens < 1:
        return
    import mlx.core as mx
    from mlx_lm import load as lm_load

    from mlx_memosight.loading import load

    path = work / f"ms-q{bits}"
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(prompt_tokens)]
    decoded = {}
    for who in ("mlx_lm.load", "mlx_memosight"):
        tic = time.perf_counter()
        model = lm_load(str(path))[0] if who == "mlx_lm.load" else load(path)[0]
        loaded = time.perf_counter() - tic
        tic = time.perf_counter()
        if who == "mlx_lm.load":
            from mlx_lm.generate import generate_step

            out = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=tokens)]
        else:
            from mlx_memosight.engine import Engine

            out = [e.token for e in Engine(model, None).generate(prompt, tokens)]
        decoded[who] = out
        log(f"{path.name} in {who}: loaded in {loaded:.1f} s, {len(out)} greedy tokens after {len(prompt)} in "
            f"{time.perf_counter() - tic:.1f} s: {out}")
        del model
    same = decoded["mlx_lm.load"] == decoded["mlx_memosight"]
    log(f"the same tokens from both: {'yes' if same else 'NO'}")


def variants(work: Path, mlx_dir: Path, dtypes):
    """The converted model in each dtype (4bit: group 64, from float16, so
    float16 scales; 4bit-f32: the same with float32 scales, as ``convert -q
    --dtype float32`` writes and as ``generate`` computes a 4-bit model on
    MLX's CPU backend)."""
    from mlx_memosight.convert import convert

    out = {}
    for d in dtypes:
        path = work / f"mlx-{d}"
        if not (path / "config.json").exists():
            if d in ("4bit", "4bit-f32"):
                convert(work / "ckpt", path, dtype="float16" if d == "4bit" else "float32", quantize=True,
                        progress=False, log=lambda *a: None)
            else:
                convert(work / "ckpt", path, dtype=d, progress=False, log=lambda *a: None)
        out[d] = path
    return out


def mlx_lm_decode(model, prompt, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tic, first, count = time.perf_counter(), None, 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n):
        if first is None:
            first = time.perf_counter()
        count += 1
    end = time.perf_counter()
    return (count - 1) / (end - first), len(prompt) / (first - tic)


def engine_decode(model, prompt, n):
    from mlx_memosight.engine import Engine

    e = Engine(model, None, foresight=False, compress=False)
    for _ in e.generate(prompt, n):
        pass
    st = e.stats
    return (st.generated_tokens - 1) / st.generation_time, st.prompt_tps


def bench_decode(paths, n, repeats, note, prompt_tokens=32):
    from mlx_memosight.loading import load

    log(f"decode, {n} tokens after a {prompt_tokens}-token prompt, best of {repeats} interleaved runs{note}")
    log(f"{'weights':<10}{'mlx_lm tok/s':>14}{'engine tok/s':>14}{'ratio':>8}")
    for d, path in paths.items():
        model, _ = load(path)
        prompt = [(7 * i + 11) % 1000 + 100 for i in range(prompt_tokens)]
        mine, theirs = [], []
        for _ in range(repeats):
            theirs.append(mlx_lm_decode(model, prompt, n)[0])
            mine.append(engine_decode(model, prompt, n)[0])
        log(f"{d:<10}{max(theirs):>14.2f}{max(mine):>14.2f}{max(mine) / max(theirs):>7.2f}x")
        del model


def bench_prefill(path, tokens, repeats, note):
    from mlx_memosight.loading import load

    model, _ = load(path)
    prompt = [(7 * i + 11) % 5000 + 100 for i in range(tokens)]
    mine, theirs = [], []
    for _ in range(repeats):
        theirs.append(mlx_lm_decode(model, prompt, 2)[1])
        mine.append(engine_decode(model, prompt, 2)[1])
    log(f"prefill of a {tokens}-token prompt ({path.name}{note}): mlx_lm {max(theirs):.1f} tok/s, engine "
        f"{max(mine):.1f} tok/s, ratio {max(mine) / max(theirs):.2f}x")


def bench_passes(path, note):
    import mlx.core as mx
    import numpy as np

    from mlx_memosight.backend import pass_costs
    from mlx_memosight.config import MemoSightConfig
    from mlx_memosight.kernels import CompactMask
    from mlx_memosight.layout import PassBuilder
    from mlx_memosight.loading import load

    model, _ = load(path)
    sizes = list(range(1, 18))
    costs = pass_costs(model, sizes, cached=256, rounds=5)
    log(f"pass cost relative to a 1-token pass ({path.name}, 256 cached entries{note}; "
        f"1-token pass {costs[1] * 1e3:.1f} ms)")
    log("  k: " + " ".join(f"{k:>5}" for k in sizes))
    log("     " + " ".join(f"{costs[k] / costs[1]:>5.2f}" for k in sizes))
    cfg = MemoSightConfig.load(path)
    builder = PassBuilder(cfg)
    host = []
    for _ in range(50):
        tic = time.perf_counter()
        p = builder.decode(5, 300, 256, drafts=[6, 7, 8], draft_len=3)
        CompactMask.from_rule(p.rule)
        mx.array(p.tokens), mx.array(p.positions)
        host.append(time.perf_counter() - tic)
    h = statistics.median(host)
    log(f"engine host time to lay out a fused pass (16 tokens): {h * 1e3:.2f} ms, "
        f"{h / costs[16]:.1%} of that pass's cost")
    for (sets, g), (tpp, size) in DEMO_TOKENS_PER_PASS.items():
        log(f"projected full-MemoSight speed-up at this shape (foresight sets {sets}, draft length {g}): "
            f"{tpp:.2f} tokens per pass (demo model) / {costs[size] / costs[1]:.2f} (cost of a {size}-token pass) "
            f"= {tpp * costs[1] / costs[size]:.2f}x plain decoding -- a projection, not a measurement")
    return np


def train_sample(path, content_tokens):
    """One MemoSight sample of about ``content_tokens`` reasoning tokens from the
    model's own tokenizer (steps of 60-200 tokens of varied words)."""
    import numpy as np

    from mlx_memosight.config import MemoSightConfig
    from mlx_memosight.datasets import Example, MemoSightDataset
    from mlx_memosight.loading import hf_tokenizer

    tok = hf_tokenizer(path)
    cfg = MemoSightConfig.load(path)
    from bench_train import WORDS as words

    rng = np.random.default_rng(0)
    steps, n = [], 0
    while n < content_tokens:
        k = int(rng.integers(60, 200))
        text = f"Step {len(steps) + 1}: " + " ".join(rng.choice(words, size=k)) + "."
        n += len(tok.encode(text)) + 2
        steps.append(text)
    ex = Example("Tom has 3 apples and buys 5 more each day. How many after a year?", steps)
    ds = MemoSightDataset.from_examples([ex], tok, cfg, max_seq_length=10 ** 6, name="bench")
    return tok, cfg, ds


def train_one(kind, path, content_tokens):
    """One LoRA step in this process; prints a JSON line."""
    import json

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_memosight.layout import Role
    from mlx_memosight.train import attention as blockwise

    tok, cfg, ds = train_sample(path, content_tokens)
    sample = ds.samples[0]
    lora = dict(rank=8, scale=20.0, dropout=0.0)
    if kind == "mlx_lm":
        from mlx_lm.tuner.trainer import default_loss
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load as mlx_lm_load

        model, _ = mlx_lm_load(str(path))
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), lora)
        ids = mx.array(sample.input_ids.tolist() + [0])[None]
        batch, loss = (ids, mx.array([[0, ids.shape[1] - 1]])), default_loss
    else:
        from mlx_memosight.datasets import batch_arrays
        from mlx_memosight.loading import load
        from mlx_memosight.train import memosight_loss, memosight_token_rows, setup_trainable

        if kind == "memosight_mask":
            blockwise.BLOCKWISE_FROM = 10 ** 9  # the mask array at any length, on any device
        model, _ = load(path)
        setup_trainable(model, "lora", -1, lora, memosight_token_rows(tok))
        batch, loss = batch_arrays([sample], 1.0, 1.0), memosight_loss
        if kind == "memosight_all_keys":
            batch = batch[:9]  # without the visible keys per block
    mx.eval(model.parameters(), batch)
    opt = optim.Adam(learning_rate=1e-5)
    step = nn.value_and_grad(model, loss)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    (value, _), grads = step(model, *batch)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state, value)
    secs = time.perf_counter() - tic
    real = int((sample.roles != Role.FORESIGHT).sum())
    print(json.dumps(dict(kind=kind, physical=len(sample), real=real, seconds=secs,
                          peak=mx.get_peak_memory(), loss=value.item())), flush=True)


TRAINERS = ("mlx_lm", "memosight", "memosight_all_keys", "memosight_mask")


def bench_train(path, tokens_list, note, trainers=TRAINERS):
    import json
    import subprocess

    log(f"LoRA step (rank 8, every layer, Adam; {path.name}{note}): one sample, each trainer in its own process")
    log(f"{'content tokens':>15}{'physical':>10}{'trainer':>26}{'peak GB':>9}{'vs mlx_lm':>10}{'tokens/s':>10}")
    for n in tokens_list:
        rows = {}
        for kind in trainers:
            out = subprocess.run([sys.executable, __file__, "--train-one", kind, str(path), str(n)],
                                 capture_output=True, text=True)
            if out.returncode:
                log(f"{n:>15}{'':>10}{kind:>26}  failed (exit {out.returncode}): "
                    f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        base = rows.get("mlx_lm")
        for kind, r in rows.items():
            # mlx-lm trains on every physical token; MemoSight's tokens/s counts real tokens
            toks = r["physical"] if kind == "mlx_lm" else r["real"]
            ratio = f"{r['peak'] / base['peak']:.2f}x" if base else "-"
            log(f"{n:>15}{r['physical']:>10}{kind:>26}{r['peak'] / 1e9:>9.2f}{ratio:>10}"
                f"{toks / r['seconds']:>10.1f}")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--train-one":
        return train_one(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help="a name from convert/shapes.json")
    p.add_argument("--layers", type=int, help="reduce the depth (default: the model's)")
    p.add_argument("--prefill-layers", type=int, help="depth for the prefill section (default: --layers)")
    p.add_argument("--work", default=None, help="folder for the checkpoint and conversions")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--sections", default="convert,decode,prefill,passes",
                   help="any of convert, quantize, decode, prefill, passes, train")
    p.add_argument("--convert-repeats", type=int, default=2,
                   help="runs of each conversion tool, the order alternating (the fastest is reported)")
    p.add_argument("--q-bits", type=int, default=4, help="bits of the quantize section")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--q-tokens", type=int, default=2, help="tokens the quantized model decodes (0: none)")
    p.add_argument("--q-prompt-tokens", type=int, default=16, help="the prompt it decodes them after")
    p.add_argument("--dtypes", default="float32,float16,bfloat16,4bit,4bit-f32")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--decode-prompt-tokens", type=int, default=32,
                   help="the prompt the decode section decodes after (4-bit weights with float16 scales "
                        "take seconds per token position on MLX's CPU backend: keep it short there)")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-tokens", default="2048,4096", help="content tokens of the training samples")
    p.add_argument("--trainers", default=",".join(TRAINERS),
                   help=f"the train section's rows, any of {', '.join(TRAINERS)}")
    p.add_argument("--train-dtype", default="bfloat16" if sys.platform == "darwin" else "float32",
                   help="weights the LoRA steps train on (default: float32 off macOS, where MLX's CPU "
                        "backend multiplies bfloat16 matrices several times slower)")
    args = p.parse_args()
    unknown = sorted(set(args.trainers.split(",")) - set(TRAINERS))
    if unknown:
        p.error(f"--trainers: unknown {', '.join(unknown)} (any of {', '.join(TRAINERS)})")
    from mlx_memosight.backend import describe

    sections = args.sections.split(",")
    work = Path(args.work or ROOT / ".work" / f"bench_scale-{args.shape}-{args.layers or 'full'}")
    work.mkdir(parents=True, exist_ok=True)
    note = f", depth reduced to {args.layers} layers" if args.layers else ""
    log(f"shape: {args.shape}{note}; device: {describe()}")
    ckpt = checkpoint(work, args.shape, args.layers, args.max_shard_size)
    if "convert" in sections:
        bench_convert(work, ckpt, args.convert_repeats)
    if "quantize" in sections:
        bench_quantized(work, ckpt, args.q_bits, args.q_group_size, args.q_tokens, args.q_prompt_tokens,
                        args.convert_repeats)
    paths = variants(work, ckpt, args.dtypes.split(",")) if {"decode", "passes"} & set(sections) else {}
    if "decode" in sections:
        bench_decode(paths, args.decode_tokens, args.repeats, note, args.decode_prompt_tokens)
    if "prefill" in sections:
        layers = args.prefill_layers or args.layers
        pwork = work if layers == args.layers else ROOT / ".work" / f"bench_scale-{args.shape}-{layers}"
        pwork.mkdir(parents=True, exist_ok=True)
        checkpoint(pwork, args.shape, layers, args.max_shard_size)
        pp = variants(pwork, pwork / "ckpt", ["bfloat16"])["bfloat16"]
        bench_prefill(pp, args.prompt_tokens, args.repeats, f", {layers} layers" if layers else "")
    if "passes" in sections:
        bench_passes(paths.get("bfloat16") or next(iter(paths.values())), note)
    if "train" in sections:
        tpath = variants(work, ckpt, [args.train_dtype])[args.train_dtype]
        bench_train(tpath, [int(n) for n in args.train_tokens.split(",")], note, args.trainers.split(","))


if __name__ == "__main__":
    main()
