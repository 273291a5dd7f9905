"""Serving speed: this server against mlx_lm.server, 1, 4 and 8 concurrent clients.

    python examples/bench_server.py [--model M] [--plain-model P] [--clients 1 4 8] [--max-tokens 400]
        [--rounds 3]

Starts ``mlx_memosight.server`` on ``--model`` (default: the demo model) and
``mlx_lm.server`` on ``--plain-model`` (default: the same folder, which mlx-lm
decodes as a plain model) on this machine, and sends each the same prompts
through ``/v1/completions`` (the template's prompt text, greedy, streamed) from
N concurrent clients, one server at a time, the two servers alternating,
``--rounds`` times; the fastest round of each is kept (a round lasts a few
seconds, and this machine's speed moves between runs). Prints, per server and
N: total tokens/s (all clients' tokens over the wall time), median time to
first token, median per-client tokens/s, and the ratio of total tokens/s to
mlx_lm.server's at the same N.

Speed depends on the machine; on a CPU it depends on the BLAS (see README,
Speed on Linux). With a MemoSight folder as the plain model, mlx-lm's output
is not the model's real answer (it decodes without compression), so its token
counts differ; tokens/s stays comparable.
"""

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(port: int, proc, path: str, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server on port {port} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server on port {port} did not answer in {timeout} s")


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    """Stream one completion: time to first token, tokens, seconds."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    tic = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"port {port}: HTTP {r.status}: {r.read()[:200]!r}")
    first, chunks, usage = None, 0, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            usage = d["usage"]
        for ch in d.get("choices") or []:
            if ch.get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - tic
    seconds = time.perf_counter() - tic
    tokens = usage["completion_tokens"] if usage else chunks
    return dict(ttft=first or seconds, tokens=tokens, seconds=seconds)


def run_clients(port: int, prompts, n: int, max_tokens: int) -> dict:
    results = [None] * n

    def client(i):
        results[i] = one_request(port, prompts[i % len(prompts)], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    tokens = sum(r["tokens"] for r in results)
    return dict(total_tps=tokens / wall, ttft=statistics.median(r["ttft"] for r in results),
                client_tps=statistics.median(r["tokens"] / r["seconds"] for r in results), tokens=tokens)


def serve(cmd, port, ready_path):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wait_ready(port, proc, ready_path)
    return proc


def main():
    from mlx_memosight import demo
    from mlx_memosight.backend import describe
    from mlx_memosight.config import MemoSightConfig
    from mlx_memosight.scoring import eval_prompt

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(demo.demo_model_path()))
    p.add_argument("--plain-model", default=None, help="model for mlx_lm.server (default: --model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3, help="runs per server and N, the fastest kept")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    cfg = MemoSightConfig.load(args.model)
    prompts = [cfg.template.render(eval_prompt(x.eval_item())).replace(cfg.template.bos or "", "", 1)
               for x in demo.problems("heldout", max(args.clients))]

    rows = {}
    servers = [("mlx_memosight.server", [sys.executable, "-m", "mlx_memosight.server", "--model", args.model]),
               ("mlx_lm.server", [sys.executable, "-m", "mlx_lm", "server", "--model",
                                  args.plain_model or args.model])]
    procs, ports = [], {}
    try:
        for name, cmd in servers:  # both up, idle while the other is measured
            ports[name] = free_port()
            procs.append(serve(cmd + ["--port", str(ports[name])], ports[name], "/v1/models"))
            run_clients(ports[name], prompts, 1, 20)  # warm-up
        for r in range(args.rounds):
            for n in args.clients:
                for name, _ in servers:
                    row = run_clients(ports[name], prompts, n, args.max_tokens)
                    if (name, n) not in rows or row["total_tps"] > rows[name, n]["total_tps"]:
                        rows[name, n] = row
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    rows = {(name, n): rows[name, n] for name, _ in servers for n in args.clients}

    print(f"device: {describe()}, max_tokens: {args.max_tokens}, prompts: demo held-out problems, "
          f"fastest of {args.rounds} rounds")
    print(f"{'server':22} {'clients':>7} {'tokens':>7} {'total tok/s':>11} {'vs mlx_lm':>9} {'TTFT s':>7} "
          f"{'client tok/s':>12}")
    for (name, n), r in rows.items():
        base = rows.get(("mlx_lm.server", n))
        ratio = f"{r['total_tps'] / base['total_tps']:.2f}x" if base else "-"
        print(f"{name:22} {n:>7} {r['tokens']:>7} {r['total_tps']:>11.1f} {ratio:>9} {r['ttft']:>7.3f} "
              f"{r['client_tps']:>12.1f}")


if __name__ == "__main__":
    main()
