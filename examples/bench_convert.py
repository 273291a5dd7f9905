"""Converter benchmark: ``mlx_memosight.convert`` and ``mlx_lm.convert`` side by side.

Makes one PyTorch-trained MemoSight checkpoint (``convert.make_checkpoint``,
float32, 1.2 GB by default), converts it with both tools, each in its
own subprocess, and prints the wall time, the peak resident memory of each
process (``os.wait4``), the time ratio and the peak memory as a multiple of the
largest checkpoint shard. Both outputs are then compared tensor by tensor.

    python examples/bench_convert.py [--work .work/bench_convert] [--repeats 2]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Starts a command and writes its exit code, wall and CPU seconds and
# ru_maxrss to a file. A process's ru_maxrss on Linux starts from its parent's
# peak (exec keeps the high-water mark of the address space it replaces, which
# subprocess's vfork shares with the parent), so a command started straight
# from a large process (bench_scale holds models) would report that process's
# peak; this small one in between is the parent whose peak is counted in
# (about 10 MB).
_MEASURE = (
    "import os, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "p.returncode = os.waitstatus_to_exitcode(status)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(f'{p.returncode} {time.perf_counter() - t0} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}')\n"
)


def run(cmd, log: Path):
    """Run ``cmd``; return (wall seconds, CPU seconds, peak RSS bytes) of that
    process alone."""
    measured = log.with_suffix(".usage")
    measured.unlink(missing_ok=True)
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(measured)] + [str(c) for c in cmd], cwd=ROOT,
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode or not measured.exists():
        sys.exit(f"{' '.join(map(str, cmd))} could not be measured (exit {r.returncode}); see {log}")
    code, wall, cpu, maxrss = measured.read_text().split()
    measured.unlink()
    if int(code):
        sys.exit(f"{' '.join(map(str, cmd))} failed (exit {code}); see {log}")
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = int(maxrss) * (1 if sys.platform == "darwin" else 1024)
    return float(wall), float(cpu), rss


def weight_files(path: Path):
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))


def same_weights(a: Path, b: Path) -> bool:
    import mlx.core as mx

    wa, wb = {}, {}
    for f in weight_files(a):
        wa.update(mx.load(str(f)))
    for f in weight_files(b):
        wb.update(mx.load(str(f)))
    if set(wa) != set(wb):
        return False
    return all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item() for k in wa)


def _matches(ckpt: Path, args) -> bool:
    try:
        c = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (c.get("hidden_size"), c.get("num_hidden_layers"), c.get("intermediate_size")) == (
        args.hidden, args.layers, args.intermediate)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / ".work" / "bench_convert"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--max-shard-size", default=None,
                   help="Shard the checkpoint (default: one file, as save_pretrained writes it).")
    p.add_argument("--repeats", type=int, default=2, help="Runs of each tool (alternating).")
    p.add_argument("--regenerate", action="store_true", help="Make the checkpoint again.")
    args = p.parse_args()

    work = Path(args.work)
    ckpt = work / "checkpoint"
    if ckpt.exists() and (args.regenerate or not _matches(ckpt, args)):
        shutil.rmtree(ckpt)
    if not (ckpt / "config.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "convert.make_checkpoint", "-o", str(ckpt),
               "--family", "qwen2", "--tokenizer", "bpe", "--hidden", str(args.hidden),
               "--intermediate", str(args.intermediate), "--layers", str(args.layers),
               "--heads", str(args.heads), "--kv-heads", str(args.heads // 4), "--steps", "1"]
        if args.max_shard_size:
            cmd += ["--max-shard-size", args.max_shard_size]
        print("making the checkpoint:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    files = weight_files(ckpt)
    total = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in files)
    config = json.loads((ckpt / "config.json").read_text())

    tools = {
        "mlx_memosight.convert": lambda out: [sys.executable, "-m", "mlx_memosight.convert",
                                              str(ckpt), "-o", str(out)],
        "mlx_lm.convert": lambda out: [sys.executable, "-m", "mlx_lm", "convert",
                                       "--hf-path", str(ckpt), "--mlx-path", str(out)],
    }
    times = {t: [] for t in tools}
    cpu = {t: [] for t in tools}
    peaks = {t: [] for t in tools}
    outs = {t: work / ("out-" + t.split(".")[0]) for t in tools}
    order = list(tools)
    # One untimed run each first (page cache, bytecode), then alternating runs.
    for r in range(-1, args.repeats):
        for tool in (order if r % 2 == 0 else order[::-1]):
            if outs[tool].exists():
                shutil.rmtree(outs[tool])
            wall, cpu_s, rss = run(tools[tool](outs[tool]), work / f"{tool}.log")
            if r >= 0:
                times[tool].append(wall)
                cpu[tool].append(cpu_s)
                peaks[tool].append(rss)

    ours, theirs = "mlx_memosight.convert", "mlx_lm.convert"
    print(f"checkpoint: qwen2, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
          f"vocab {config['vocab_size']}, float32, {len(files)} weight file(s), "
          f"{total / 1e6:.1f} MB; largest shard {largest / 1e6:.1f} MB")
    print(f"{'tool':<23}{'wall s':>8}{'CPU s':>7}{'peak RSS MB':>13}{'RSS/shard':>11}"
          "  wall s of each run")
    for tool in tools:
        peak = max(peaks[tool])
        runs = " ".join(f"{t:.2f}" for t in times[tool])
        print(f"{tool:<23}{statistics.median(times[tool]):>8.2f}{statistics.median(cpu[tool]):>7.2f}"
              f"{peak / 1e6:>13.1f}{peak / largest:>11.2f}  {runs}")
    ratio = statistics.median(times[ours]) / statistics.median(times[theirs])
    cpu_ratio = statistics.median(cpu[ours]) / statistics.median(cpu[theirs])
    print(f"time ratio (mlx_memosight / mlx_lm, median wall): {ratio:.2f}  (goal <= 1.0); "
          f"CPU time ratio: {cpu_ratio:.2f}")
    print(f"peak RSS of mlx_memosight.convert: {max(peaks[ours]) / largest:.2f}x the largest shard "
          f"(goal <= 1.5x); mlx_lm.convert: {max(peaks[theirs]) / largest:.2f}x")
    print(f"same weights in both outputs: {same_weights(outs[ours], outs[theirs])}")


if __name__ == "__main__":
    main()
