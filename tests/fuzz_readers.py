"""Property-based fuzzing of every reader of files a user hands the project.

``python tests/fuzz_readers.py READER SEEDS N`` feeds ``N`` random and mutated
inputs to one reader (hypothesis, derandomised so that CI sees the same
examples each run) and exits 0 when each one either loads or raises one of
the project's own error types. It runs in a process of its own, under an
address-space limit: a crash of the interpreter (MLX's own readers abort on
some malformed files) or an allocation without bound fails the test that
runs it instead of the whole test session.

Readers: ``gguf`` (load_gguf), ``safetensors`` (the converter's header
reader and the loader's weight-file check), ``jsonl`` (training records, the
reference's and chat), ``memosight`` (memosight.json), ``adapters``
(adapter_config.json with adapters.safetensors), ``eval`` (eval files).
"""

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_memosight.errors import MemoSightError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
EXTREMES = [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 64 - 1]


@st.composite
def mutated_bytes(draw, seed: bytes, hot: int):
    """``seed`` with a few mutations, most of them in its first ``hot``
    bytes (the header): byte flips, 64-bit fields set to extremes,
    truncation, insertion and deletion."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        end = min(len(data), hot) if draw(st.integers(0, 9)) else len(data)
        pos = draw(st.integers(0, max(0, end - 1)))
        op = draw(st.sampled_from(["flip", "u64", "u32", "cut", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op in ("u64", "u32"):
            n = 8 if op == "u64" else 4
            value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * n))
            data[pos:pos + n] = value.to_bytes(n, "little")
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


def file_input(seed: bytes, hot: int):
    return st.one_of(mutated_bytes(seed, hot), st.binary(max_size=64))


@st.composite
def mutated_json(draw, seed):
    """A valid JSON value with parts replaced, removed or added at random."""
    value = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 3))):
        node, path = value, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            k = draw(st.sampled_from(keys))
            path.append((node, k))
            node = node[k]
        if not path:
            continue
        parent, k = path[-1]
        op = draw(st.sampled_from(["replace", "remove", "add"]))
        if op == "replace":
            parent[k] = draw(JSON)
        elif op == "remove":
            del parent[k]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return value


def json_text(seed):
    values = st.one_of(mutated_json(seed), JSON)
    return st.one_of(values.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=40),
                     st.just("[" * 50_000 + "]" * 50_000))


# ----------------------------------------------------------------------------
# The readers, each given the seed folder and a scratch folder


def gguf_reader(seeds: Path, work: Path):
    from mlx_memosight.gguf import load_gguf

    seed = (seeds / "tiny.gguf").read_bytes()
    hot = int((seeds / "tiny.gguf.header").read_text())

    def run(data: bytes):
        path = work / "x.gguf"
        path.write_bytes(data)
        load_gguf(path)

    return file_input(seed, hot), run


def safetensors_reader(seeds: Path, work: Path):
    from mlx_memosight.convert.checkpoint import _read_safetensors_header
    from mlx_memosight.loading import check_weight_files, is_mlx_folder

    seed = (seeds / "model.safetensors").read_bytes()
    hot = 8 + struct.unpack("<Q", seed[:8])[0]
    shutil.copy(seeds / "config.json", work / "config.json")

    def run(data: bytes):
        path = work / "model.safetensors"
        path.write_bytes(data)
        is_mlx_folder(work)
        try:
            check_weight_files([path])
        finally:
            _read_safetensors_header(path)

    return file_input(seed, hot), run


def jsonl_reader(seeds: Path, work: Path):
    from mlx_memosight.datasets import read_jsonl

    records = json.loads((seeds / "records.json").read_text())
    line = st.one_of(st.sampled_from(records).flatmap(json_text), st.binary(max_size=40).map(
        lambda b: b.decode("latin-1")))

    def run(lines):
        path = work / "train.jsonl"
        path.write_bytes(b"\n".join(x.encode("utf-8", "surrogatepass") for x in lines) + b"\n")
        read_jsonl(path, skip_bad_lines=len(lines) % 2 == 0)

    return st.lists(line, min_size=1, max_size=4), run


def memosight_reader(seeds: Path, work: Path):
    from mlx_memosight.config import MemoSightConfig

    seed = json.loads((seeds / "memosight.json").read_text())

    def run(text: str):
        (work / "memosight.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        MemoSightConfig.load(work)

    return json_text(seed), run


def adapters_reader(seeds: Path, work: Path):
    from mlx_memosight.train import read_adapters

    seed = json.loads((seeds / "adapter_config.json").read_text())
    weights = (seeds / "adapters.safetensors").read_bytes()

    def run(args):
        text, data = args
        (work / "adapter_config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        (work / "adapters.safetensors").write_bytes(data)
        read_adapters(work)

    return st.tuples(json_text(seed), st.one_of(st.just(weights), mutated_bytes(weights, 200))), run


def eval_reader(seeds: Path, work: Path):
    from mlx_memosight.scoring import load_items

    seed = json.loads((seeds / "eval.json").read_text())

    def run(text: str):
        path = work / "gsm8k.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        load_items(path)

    return json_text(seed), run


READERS = {"gguf": gguf_reader, "safetensors": safetensors_reader, "jsonl": jsonl_reader,
           "memosight": memosight_reader, "adapters": adapters_reader, "eval": eval_reader}


def main(name: str, seeds: Path, examples: int) -> int:
    import resource

    # about 8 GB of address space: room for MLX, none for a runaway allocation
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    strategy, run = READERS[name](seeds, work)
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=examples, deadline=None, derandomize=(os.environ.get("FUZZ_RANDOM") is None), database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(value):
        try:
            run(value)
            outcomes["loaded"] += 1
        except MemoSightError:
            outcomes["refused"] += 1

    try:
        fuzz()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: {sum(outcomes.values())} inputs, {outcomes['loaded']} loaded, "
          f"{outcomes['refused']} refused with the project's errors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
