"""Every command against bad input: a non-zero exit, one line naming the file,
field or flag at fault, no traceback, and nothing left behind.

Each case builds its inputs under ``in/`` and points every output under
``out/``; after the command, ``out/`` must be empty. Most cases run the
command in this process through ``main(argv)``; the few that need a process
of their own (another user, a file-size limit) run it as a subprocess.
"""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest

from conftest import ROOT
from helpers import run_command
from train_helpers import make_base_model, make_data

COMMANDS = ("generate", "convert", "lora", "fuse", "evaluate", "bench", "server", "chat")


def command_main(name: str):
    import importlib

    return importlib.import_module(f"mlx_memosight.{name}").main


@dataclass
class Env:
    """Where a case puts its inputs (``ins``) and outputs (``out``), and the
    shared, read-only models it may copy."""

    ins: Path
    out: Path
    shared: dict = field(default_factory=dict)

    def copy(self, name: str, to: str = None) -> Path:
        dst = self.ins / (to or name)
        shutil.copytree(self.shared[name], dst)
        return dst


@dataclass
class Case:
    command: str
    build: Callable[[Env], List]  # -> argv
    expect: List[str]  # substrings of the error line
    runner: str = "inproc"  # or "subprocess", "unprivileged", "file-size-limit"


# ----------------------------------------------------------------------------
# Input makers


def edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d, allow_nan=True))
    return path


def raw_json(path: Path, text: str):
    path.write_text(text)
    return path


def truncate(path: Path, keep: int = -1000):
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def safetensors_header(path: Path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path: Path, header: dict, body: bytes, claimed: int = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", claimed if claimed is not None else len(raw)) + raw + body)


def lie_about_offsets(path: Path):
    header, body = safetensors_header(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10 ** 12]
    write_safetensors(path, header, body)


def huge_header_length(path: Path):
    header, body = safetensors_header(path)
    write_safetensors(path, header, body, claimed=2 ** 60)


def first_weight_file(folder: Path) -> Path:
    return sorted(folder.glob("model*.safetensors"))[0]


def rewrite_tensor(folder: Path, name_part: str, change: Callable[[np.ndarray], np.ndarray]):
    """Rewrite one tensor of a safetensors checkpoint (float32) with ``change``."""
    from safetensors.numpy import load_file, save_file

    for f in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(str(f))
        hit = [k for k in tensors if name_part in k]
        if hit:
            tensors[hit[0]] = change(tensors[hit[0]])
            save_file(tensors, str(f), metadata={"format": "pt"})
            return f
    raise AssertionError(name_part)


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------
# The cases

G, C, L, F, E, B, S = "generate", "convert", "lora", "fuse", "evaluate", "bench", "server"


def gen(env, *args, model="mlx"):
    path = env.shared[model] if isinstance(model, str) and model in env.shared else model
    return ["--model", path, "--prompt", "hi", "--max-tokens", 4, *args]


def mlx_copy(env, change=None):
    path = env.copy("mlx", "model")
    if change:
        change(path)
    return path


CASES = {
    # generate: flags (the reported ones first)
    "gen-seed-negative": Case(G, lambda e: gen(e, "--seed", -5, "--temp", 0.7), ["--seed must be at least 0"]),
    "gen-prefill-zero": Case(G, lambda e: gen(e, "--prefill-step-size", 0), ["--prefill-step-size must be at least 1"]),
    "gen-prefill-negative": Case(G, lambda e: gen(e, "--prefill-step-size", -1), ["--prefill-step-size"]),
    "gen-top-p-2": Case(G, lambda e: gen(e, "--top-p", 2), ["--top-p must be greater than 0 and at most 1, got 2"]),
    "gen-top-p-0": Case(G, lambda e: gen(e, "--top-p", 0), ["--top-p must be greater than 0"]),
    "gen-top-p-negative": Case(G, lambda e: gen(e, "--top-p", -1), ["--top-p"]),
    "gen-stats-json-missing-folder": Case(G, lambda e: gen(e, "--stats-json", e.out / "no" / "s.json"),
                                          ["--stats-json", "does not exist"]),
    "gen-stats-json-is-folder": Case(G, lambda e: gen(e, "--stats-json", e.ins), ["--stats-json", "is a folder"]),
    "gen-temp-negative": Case(G, lambda e: gen(e, "--temp", -1), ["--temp must be at least 0"]),
    "gen-penalty-zero": Case(G, lambda e: gen(e, "--repetition-penalty", 0), ["--repetition-penalty must be greater than 0"]),
    "gen-draft-len": Case(G, lambda e: gen(e, "--draft-len", 17), ["--draft-len must be between 0 and 16, got 17"]),
    "gen-max-tokens": Case(G, lambda e: gen(e, "--max-tokens", 0), ["--max-tokens must be at least 1"]),
    "gen-min-p": Case(G, lambda e: gen(e, "--min-p", 1.5), ["--min-p must be between 0 and 1"]),
    "gen-top-k": Case(G, lambda e: gen(e, "--top-k", -3), ["--top-k must be at least 0"]),
    "gen-not-a-number": Case(G, lambda e: gen(e, "--temp", "warm"), ["--temp", "'warm' is not a number"]),
    "gen-bad-choice": Case(G, lambda e: gen(e, "--schedule", "three-pass"), ["--schedule", "invalid choice"]),
    "gen-unknown-flag": Case(G, lambda e: gen(e, "--colour"), ["unrecognized arguments: --colour"]),
    "gen-empty-prompt": Case(G, lambda e: ["--model", e.shared["mlx"], "--prompt", "   "], ["the prompt is empty"]),
    "gen-prompt-past-context": Case(G, lambda e: ["--model", e.shared["mlx"], "--raw-prompt", "--prompt",
                                                  "count " * 3000], ["the prompt has", "context is 2048"]),
    # generate: model folders
    "gen-model-missing": Case(G, lambda e: gen(e, model=e.ins / "nowhere"), ["nowhere: no such file or folder"]),
    "gen-model-symlink-loop": Case(G, lambda e: gen(e, model=_loop(e.ins / "loop")), ["loop: a symbolic link"]),
    "gen-model-empty-folder": Case(G, lambda e: gen(e, model=_mkdir(e.ins / "empty")), ["config.json: file not found"]),
    "gen-config-not-json": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: raw_json(p / "config.json", "{oops"))),
                                ["config.json: not valid JSON"]),
    "gen-config-latin1": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: (p / "config.json").write_bytes(
        b'{"model_type": "qwen2", "name": "caf\xe9"}'))), ["config.json: not UTF-8"]),
    "gen-config-nan": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: edit_json(p / "config.json", rms_norm_eps=float("nan")))),
                           ["config.json: rms_norm_eps is NaN or infinite"]),
    "gen-config-inf": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: edit_json(p / "config.json", rope_theta=float("inf")))),
                           ["config.json: rope_theta is NaN or infinite"]),
    "gen-config-model-type": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: edit_json(p / "config.json", model_type="mistral"))),
                                  ["model_type 'mistral' is not supported"]),
    "gen-config-not-object": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: raw_json(p / "config.json", "[1, 2]"))),
                                  ["config.json: expected a JSON object, found list"]),
    "gen-weights-truncated": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: truncate(first_weight_file(p)))),
                                  ["model.safetensors: not a complete safetensors file"]),
    "gen-weights-lying-offsets": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: lie_about_offsets(first_weight_file(p)))),
                                      ["model.safetensors: not a complete safetensors file"]),
    "gen-weights-huge-header": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: huge_header_length(first_weight_file(p)))),
                                    ["model.safetensors: not a complete safetensors file"]),
    "gen-weights-missing": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: first_weight_file(p).unlink())),
                                ["no model*.safetensors weights"]),
    "gen-weights-nan": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: rewrite_tensor(
        p, "embed_tokens", lambda w: np.full_like(w, np.nan)))), ["NaN or infinite logits"]),
    "gen-weights-wrong-shape": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: rewrite_tensor(
        p, "norm.weight", lambda w: w[:3]))), ["mlx-lm cannot load the model"]),
    "gen-unknown-rope-scaling": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: edit_json(
        p / "config.json", rope_scaling={"rope_type": "wibble", "factor": 2.0}))), ["mlx-lm cannot load the model", "wibble"]),
    "gen-tokenizer-corrupt": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: raw_json(p / "tokenizer.json", "{"))),
                                  ["cannot load the tokenizer"]),
    "gen-memosight-not-json": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: raw_json(p / "memosight.json", "{,}"))),
                                   ["memosight.json: not valid JSON"]),
    "gen-memosight-ratio": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: edit_json(p / "memosight.json", compression_ratio=0))),
                                ["memosight.json: compression_ratio must be an integer >= 1, not 0"]),
    "gen-memosight-ids-beyond-vocab": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: _ids_beyond(p))),
                                           ["memosight.json: token_ids name ids beyond the model's vocabulary"]),
    "gen-memosight-template": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: _bad_template(p))),
                                   ["memosight.json: template.prompt is not a template"]),
    "gen-memosight-newer": Case(G, lambda e: gen(e, model=mlx_copy(e, lambda p: edit_json(p / "memosight.json", format_version=99))),
                                ["format_version 99 is newer"]),
    "gen-gguf-truncated": Case(G, lambda e: gen(e, model=truncate(_copy_file(e, "gguf"), 5000)), ["truncated"]),
    "gen-gguf-not-gguf": Case(G, lambda e: gen(e, model=raw_json(e.ins / "x.gguf", "hello")), ["not a GGUF file"]),
    "gen-adapters-missing": Case(G, lambda e: gen(e, "--adapter-path", e.ins / "no-adapters"),
                                 ["adapter_config.json: file not found"]),
    "gen-adapters-on-gguf": Case(G, lambda e: gen(e, "--adapter-path", e.shared["adapters"], model=e.shared["gguf"]),
                                 ["--adapter-path", "not a GGUF file"]),
    # convert
    "conv-missing-checkpoint": Case(C, lambda e: [e.ins / "nowhere", "-o", e.out / "m"], ["nowhere: not a checkpoint folder"]),
    "conv-missing-config": Case(C, lambda e: [_ckpt(e, lambda p: (p / "config.json").unlink()), "-o", e.out / "m"],
                                ["config.json: file not found"]),
    "conv-model-type": Case(C, lambda e: [_ckpt(e, lambda p: edit_json(p / "config.json", model_type="mistral")), "-o", e.out / "m"],
                            ["model_type 'mistral' is not supported"]),
    "conv-config-nan": Case(C, lambda e: [_ckpt(e, lambda p: edit_json(p / "config.json", rms_norm_eps=float("nan"))), "-o", e.out / "m"],
                            ["config.json: rms_norm_eps is NaN or infinite"]),
    "conv-config-latin1": Case(C, lambda e: [_ckpt(e, lambda p: (p / "config.json").write_bytes(b"{\"x\": \"\xff\"}")), "-o", e.out / "m"],
                               ["config.json: not UTF-8"]),
    "conv-truncated-shard": Case(C, lambda e: [_ckpt(e, lambda p: truncate(first_weight_file(p))), "-o", e.out / "m"],
                                 ["not a complete safetensors file"]),
    "conv-lying-offsets": Case(C, lambda e: [_ckpt(e, lambda p: lie_about_offsets(first_weight_file(p))), "-o", e.out / "m"],
                               ["not a complete safetensors file"]),
    "conv-huge-header": Case(C, lambda e: [_ckpt(e, lambda p: huge_header_length(first_weight_file(p))), "-o", e.out / "m"],
                             ["not a complete safetensors file"]),
    "conv-shape-vs-config": Case(C, lambda e: [_ckpt(e, lambda p: edit_json(p / "config.json", intermediate_size=96)), "-o", e.out / "m"],
                                 ["has shape", "intermediate_size"]),
    "conv-zero-length-tensor": Case(C, lambda e: [_ckpt(e, lambda p: rewrite_tensor(p, "mlp.up_proj", lambda w: w[:0])), "-o", e.out / "m"],
                                    ["up_proj.weight has shape [0, "]),
    "conv-nan-weights": Case(C, lambda e: [_ckpt(e, lambda p: rewrite_tensor(p, "mlp.down_proj", lambda w: w * np.nan)), "-o", e.out / "m"],
                             ["down_proj.weight holds NaN or infinite values in the checkpoint"]),
    "conv-beyond-float16": Case(C, lambda e: [_ckpt(e, lambda p: rewrite_tensor(p, "mlp.down_proj", lambda w: w * 1e6)), "-o", e.out / "m",
                                              "--dtype", "float16"], ["down_proj.weight holds NaN or infinite values once cast"]),
    "conv-vocab-below-tokenizer": Case(C, lambda e: [_ckpt(e, lambda p: edit_json(p / "config.json", vocab_size=300)), "-o", e.out / "m"],
                                       ["vocab_size 300 is smaller than the tokenizer's"]),
    "conv-index-missing-shard": Case(C, lambda e: [_ckpt(e, _index_names("model-00009-of-00009.safetensors")), "-o", e.out / "m"],
                                     ["model.safetensors.index.json: lists model-00009-of-00009.safetensors, which is missing"]),
    "conv-index-escapes-folder": Case(C, lambda e: [_ckpt(e, _index_names("../../etc/passwd")), "-o", e.out / "m"],
                                      ["which is not a file beside it"]),
    "conv-tokenizer-corrupt": Case(C, lambda e: [_ckpt(e, lambda p: raw_json(p / "tokenizer.json", "[")), "-o", e.out / "m"],
                                   ["cannot load the tokenizer"]),
    "conv-memosight-not-json": Case(C, lambda e: [_ckpt(e, lambda p: raw_json(p / "memosight.json", "nope")), "-o", e.out / "m"],
                                    ["memosight.json: not valid JSON"]),
    "conv-out-exists": Case(C, lambda e: [e.shared["ckpt"], "-o", _mkfile(e.out / "m" / "x")], ["already exists (--force replaces it)"]),
    "conv-out-holds-checkpoint": Case(C, lambda e: [_ckpt(e), "-o", e.ins, "--force"], ["must not be the checkpoint folder"]),
    "conv-q-bits": Case(C, lambda e: [e.shared["ckpt"], "-o", e.out / "m", "-q", "--q-bits", 7], ["--q-bits 7 with --q-group-size 64"]),
    "conv-gguf-missing-folder": Case(C, lambda e: [e.shared["ckpt"], "--gguf", e.out / "no" / "m.gguf"], ["--gguf", "does not exist"]),
    "conv-gguf-type": Case(C, lambda e: [e.shared["ckpt"], "--gguf", e.out / "m.gguf", "--gguf-type", "q5_k"], ["--gguf-type", "invalid choice"]),
    "conv-dtype": Case(C, lambda e: [e.shared["ckpt"], "-o", e.out / "m", "--dtype", "float8"], ["--dtype", "invalid choice"]),
    "conv-two-checkpoints": Case(C, lambda e: [e.shared["ckpt"], "--hf-path", e.shared["ckpt"], "-o", e.out / "m"],
                                 ["give the checkpoint folder once"]),
    "conv-no-output": Case(C, lambda e: [e.shared["ckpt"]], ["give --out FOLDER or --gguf FILE"]),
    "conv-override-range": Case(C, lambda e: [e.shared["ckpt"], "-o", e.out / "m", "--compression-ratio", 0],
                                ["--compression-ratio must be at least 1"]),
    "conv-override-plain": Case(C, lambda e: [e.shared["plain_ckpt"], "-o", e.out / "m", "--compression-ratio", 4],
                                ["no MemoSight tokens"]),
    "conv-qwen3-without-qk-norms": Case(C, lambda e: [_ckpt(e, lambda p: _drop_tensors(p, "_norm.weight", "self_attn"), "qwen3_ckpt"),
                                                      "-o", e.out / "m"], ["lack the tensor", "self_attn.q_norm.weight", "config.json implies"]),
    "conv-unknown-rope-scaling": Case(C, lambda e: [_ckpt(e, lambda p: edit_json(p / "config.json", rope_scaling={"rope_type": "wibble", "factor": 2.0})),
                                                    "-o", e.out / "m"], ["cannot build a qwen2 model", "wibble"]),
    "conv-embedding-short": Case(C, lambda e: [_ckpt(e, lambda p: rewrite_tensor(p, "embed_tokens", lambda w: w[:500])), "-o", e.out / "m"],
                                 ["embed_tokens.weight has shape [500, ", "vocab_size"]),
    "conv-disk-full": Case(C, lambda e: [e.shared["ckpt"], "-o", e.out / "m"], ["writing failed (No space left on device)"],
                           runner="disk-full"),
    "conv-file-size-limit": Case(C, lambda e: [e.shared["ckpt"], "-o", e.out / "m"], ["writing failed (File too large)"],
                                 runner="file-size-limit"),
    "conv-unwritable-out": Case(C, lambda e: [_ckpt(e), "-o", e.out / "m"], ["cannot create the output folder"],
                                runner="unprivileged"),
    # server: refused before it loads or listens
    "server-port-negative": Case(S, lambda e: ["--port", -1], ["--port must be between 0 and 65535, got -1"]),
    "server-port-huge": Case(S, lambda e: ["--port", 70000], ["--port must be between 0 and 65535"]),
    "server-port-text": Case(S, lambda e: ["--port", "http"], ["--port", "'http' is not an integer"]),
    "server-max-queue-zero": Case(S, lambda e: ["--max-queue", 0], ["--max-queue must be at least 1"]),
    "server-batch-size-zero": Case(S, lambda e: ["--batch-size", 0], ["--batch-size must be between 1 and 256, got 0"]),
    "server-decode-concurrency-huge": Case(S, lambda e: ["--decode-concurrency", 1000], ["--batch-size must be between 1 and 256"]),
    "server-model-missing": Case(S, lambda e: ["--model", e.ins / "nowhere"], ["nowhere: no such file or folder"]),
    "server-bad-split": Case(S, lambda e: ["--reasoning-split", "half"], ["--reasoning-split", "invalid choice"]),
    "chat-model-missing": Case("chat", lambda e: ["--model", e.ins / "nowhere"], ["nowhere: no such file or folder"]),
    "chat-top-p-2": Case("chat", lambda e: ["--top-p", 2], ["--top-p must be greater than 0 and at most 1, got 2"]),
    # lora
    "lora-data-missing": Case(L, lambda e: _lora(e, data=e.ins / "nodata"), ["--data", "nodata: no such file or folder"]),
    "lora-bad-json-line": Case(L, lambda e: _lora(e, data=_data(e, ['{"question": oops}'])), ["train.jsonl:1: not valid JSON"]),
    "lora-control-char": Case(L, lambda e: _lora(e, data=_data(e, ['{"question": "a\x01b"}'])),
                              ["train.jsonl:1: not valid JSON (Invalid control character at column"]),
    "lora-not-utf8": Case(L, lambda e: _lora(e, data=_data(e, [b'{"question": "\xff"}'])), ["train.jsonl:1: not UTF-8"]),
    "lora-missing-field": Case(L, lambda e: _lora(e, data=_data(e, ['{"question": "Q"}'])),
                               ["train.jsonl:1: missing field 'thoughts_list' or 'gt_output'"]),
    "lora-deep-nesting": Case(L, lambda e: _lora(e, data=_data(e, [deep_json()])), ["train.jsonl:1: nested too deeply"]),
    "lora-batch-size": Case(L, lambda e: _lora(e, "--batch-size", 0), ["--batch-size must be at least 1"]),
    "lora-accumulation": Case(L, lambda e: _lora(e, "--iters", 3, "--grad-accumulation-steps", 2),
                              ["--iters 3 must be a multiple of --grad-accumulation-steps 2"]),
    "lora-learning-rate": Case(L, lambda e: _lora(e, "--learning-rate", -1), ["--learning-rate must be greater than 0"]),
    "lora-dropout": Case(L, lambda e: _lora(e, "--lora-dropout", 1.5), ["--lora-dropout must be between 0 and 0.99"]),
    "lora-num-layers-zero": Case(L, lambda e: _lora(e, "--num-layers", 0), ["--num-layers must be -1 (all) or at least 1"]),
    "lora-num-layers-too-many": Case(L, lambda e: _lora(e, "--num-layers", 99), ["--num-layers 99: the model has only 2 layers"]),
    "lora-fine-tune-type": Case(L, lambda e: _lora(e, "--fine-tune-type", "qlora"), ["--fine-tune-type", "invalid choice"]),
    "lora-nothing-to-do": Case(L, lambda e: [x for x in _lora(e) if x != "--train"], ["nothing to do"]),
    "lora-model-missing": Case(L, lambda e: _lora(e, model=e.ins / "nomodel"), ["nomodel: no such file or folder"]),
    "lora-resume-missing": Case(L, lambda e: _lora(e, "--resume-adapter-file", e.ins / "a.safetensors"),
                                ["--resume-adapter-file", "a.safetensors: file not found"]),
    "lora-config-unknown-key": Case(L, lambda e: _lora(e, "-c", _yaml(e, "colour: blue\n")), ["--config", "unknown setting 'colour'"]),
    "lora-config-not-yaml": Case(L, lambda e: _lora(e, "-c", _yaml(e, "a: [1, 2\n")), ["--config", "not valid YAML"]),
    "lora-config-missing": Case(L, lambda e: _lora(e, "-c", e.ins / "none.yaml"), ["--config", "No such file"]),
    "lora-config-wrong-type": Case(L, lambda e: _lora(e, "-c", _yaml(e, "steps_per_report: soon\n")), ["--steps-per-report", "'soon' is not an integer"]),
    "lora-save-base-exists": Case(L, lambda e: _lora(e, "--save-base", _mkfile(e.out / "base" / "x")),
                                  ["already exists (--force replaces it)"]),
    # fuse
    "fuse-adapters-missing": Case(F, lambda e: _fuse(e, adapters=e.ins / "none"), ["adapter_config.json: file not found"]),
    "fuse-config-not-json": Case(F, lambda e: _fuse(e, adapters=_adapters(e, lambda p: raw_json(p / "adapter_config.json", "{"))),
                                 ["adapter_config.json: not valid JSON"]),
    "fuse-not-memosight": Case(F, lambda e: _fuse(e, adapters=_adapters(e, lambda p: _drop_key(p / "adapter_config.json", "memosight"))),
                               ["not MemoSight adapters"]),
    "fuse-adapters-truncated": Case(F, lambda e: _fuse(e, adapters=_adapters(e, lambda p: truncate(p / "adapters.safetensors"))),
                                    ["adapters.safetensors: not a complete safetensors file"]),
    "fuse-adapters-weights-missing": Case(F, lambda e: _fuse(e, adapters=_adapters(e, lambda p: (p / "adapters.safetensors").unlink())),
                                          ["adapters.safetensors: file not found"]),
    "fuse-other-model": Case(F, lambda e: _fuse(e, model=e.shared["other_base"]), ["--adapter-path", "adapters of another model"]),
    "fuse-save-path-exists": Case(F, lambda e: _fuse(e, save=_mkfile(e.out / "fused" / "x")), ["already exists (--force replaces it)"]),
    "fuse-model-missing": Case(F, lambda e: _fuse(e, model=e.ins / "nomodel"), ["nomodel: no such file or folder"]),
    # evaluate
    "eval-list-of-numbers": Case(E, lambda e: ["--data", raw_json(e.ins / "d.json", "[1, 2, 3]")],
                                 ["d.json: item 0: expected an object with 'question', found int"]),
    "eval-no-answer": Case(E, lambda e: ["--data", raw_json(e.ins / "d.jsonl", '{"question": "2+2?"}\n')],
                           ["d.jsonl:1: no 'answer'"]),
    "eval-bad-kind": Case(E, lambda e: ["--data", raw_json(e.ins / "d.jsonl", '{"question": "q", "answer": "1", "kind": "x"}\n')],
                          ["d.jsonl:1: 'kind' must be one of"]),
    "eval-not-utf8": Case(E, lambda e: ["--data", _bytes(e.ins / "d.json", b'{"q": "\xff"}')], ["d.json: not UTF-8"]),
    "eval-data-missing": Case(E, lambda e: ["--data", e.ins / "none.json"], ["none.json: file not found"]),
    "eval-limit": Case(E, lambda e: ["--data", e.shared["heldout"], "--limit", 0], ["--limit must be at least 1"]),
    "eval-batch-size": Case(E, lambda e: ["--data", e.shared["heldout"], "--batch-size", 0],
                            ["--batch-size must be between 1 and 256, got 0"]),
    "eval-max-tokens": Case(E, lambda e: ["--data", e.shared["heldout"], "--max-tokens", 0], ["--max-tokens must be at least 1"]),
    "eval-out-missing-folder": Case(E, lambda e: ["--data", e.shared["heldout"], "--out", e.out / "no" / "r.jsonl"],
                                    ["--out", "does not exist"]),
    "eval-subject-not-list": Case(E, lambda e: ["--data", raw_json(e.ins / "d.json", '{"math": 3}')],
                                  ["subject 'math' is not a list of items"]),
    # bench
    "bench-repeats": Case(B, lambda e: ["--prompt", "hi", "--repeats", 0], ["--repeats must be at least 1"]),
    "bench-batch-size": Case(B, lambda e: ["--prompt", "hi", "--batch-size", 4, 0], ["--batch-size must be between 1 and 256, got 0"]),
    "bench-batch-size-repeats": Case(B, lambda e: ["--prompt", "hi", "--batch-size", 4, "--repeats", 2],
                                     ["--repeats applies to the per-prompt bench, not with --batch-size"]),
    "bench-list-of-numbers": Case(B, lambda e: ["--data", raw_json(e.ins / "d.json", "[1]")], ["d.json: item 0: expected an object"]),
    "bench-max-tokens": Case(B, lambda e: ["--prompt", "hi", "--max-tokens", 0], ["--max-tokens must be at least 1"]),
    "bench-prompt-and-data": Case(B, lambda e: ["--prompt", "hi", "--data", e.shared["heldout"]], ["not allowed with argument"]),
    "bench-out-is-file": Case(B, lambda e: ["--prompt", "hi", "--out", _bytes(e.ins / "f", b"x")], ["--out", "is a file, not a folder"]),
    "bench-model-missing": Case(B, lambda e: ["--model", e.ins / "nomodel", "--prompt", "hi"], ["nomodel: no such file or folder"]),
}


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def _mkfile(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("mine")
    return p.parent


def _bytes(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _loop(p: Path) -> Path:
    os.symlink(p.name + "-b", p)
    os.symlink(p.name, p.parent / (p.name + "-b"))
    return p


def _copy_file(e: Env, name: str) -> Path:
    dst = e.ins / Path(e.shared[name]).name
    shutil.copy(e.shared[name], dst)
    return dst


def _ids_beyond(p: Path):
    d = json.loads((p / "memosight.json").read_text())
    d["token_ids"]["eos"] = 10 ** 6
    (p / "memosight.json").write_text(json.dumps(d))


def _bad_template(p: Path):
    d = json.loads((p / "memosight.json").read_text())
    d["template"] = dict(d["template"], prompt="{question} {answer}") if isinstance(d["template"], dict) \
        else {"name": "x", "prompt": "{question} {answer}", "eos": "<|im_end|>"}
    (p / "memosight.json").write_text(json.dumps(d))


def _drop_key(path: Path, key: str):
    d = json.loads(path.read_text())
    d.pop(key)
    path.write_text(json.dumps(d))


def _ckpt(e: Env, change=None, which: str = "ckpt") -> Path:
    p = e.copy(which, "ckpt")
    if change:
        change(p)
    return p


def _drop_tensors(folder: Path, *parts):
    """Remove the tensors whose names hold every one of ``parts`` from a
    single-file safetensors checkpoint."""
    from safetensors.numpy import load_file, save_file

    f = folder / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(f)).items() if not all(p in k for p in parts)}
    save_file(tensors, str(f), metadata={"format": "pt"})


def _index_names(name: str):
    def change(p: Path):
        index = p / "model.safetensors.index.json"
        d = json.loads(index.read_text())
        first = next(iter(d["weight_map"]))
        d["weight_map"][first] = name
        index.write_text(json.dumps(d))
    return change


def _data(e: Env, lines) -> Path:
    folder = e.ins / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(b"".join(
        (x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return folder


def _yaml(e: Env, text: str) -> Path:
    p = e.ins / "config.yaml"
    p.write_text(text)
    return p


def _lora(e: Env, *args, model=None, data=None):
    return ["--model", model or e.shared["base"], "--data", data or e.shared["data"], "--train", "--iters", 2,
            "--batch-size", 2, "--adapter-path", e.out / "adapters", *args]


def _adapters(e: Env, change) -> Path:
    p = e.copy("adapters")
    change(p)
    return p


def _fuse(e: Env, model=None, adapters=None, save=None):
    return ["--model", model or e.shared["base"], "--adapter-path", adapters or e.shared["adapters"],
            "--save-path", save or e.out / "fused"]


# ----------------------------------------------------------------------------
# Shared inputs (made once, never written to by the cases)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from convert.make_checkpoint import make_checkpoint
    from helpers import shipped_reasoner
    from mlx_memosight import demo
    from mlx_memosight.gguf import export_gguf
    from mlx_memosight.lora import main as lora_main

    root = tmp_path_factory.mktemp("shared")
    reasoner = shipped_reasoner("qwen2")
    d = {"mlx": reasoner[0]}
    ckpt = make_checkpoint(root / "ckpt", family="qwen2", steps=1, max_shard_size="100KB")["path"]
    d["ckpt"] = ckpt
    d["qwen3_ckpt"] = make_checkpoint(root / "qwen3_ckpt", family="qwen3", steps=1)["path"]
    d["plain_ckpt"] = make_checkpoint(root / "plain_ckpt", family="qwen2", steps=1, memosight=False)["path"]
    d["base"] = make_base_model(root / "base")
    d["other_base"] = make_base_model(root / "other", seed=1)
    d["data"] = make_data(root / "data", n_train=4, n_valid=2)
    d["heldout"] = demo.write_jsonl(root / "heldout.jsonl", demo.heldout_items(2))
    export_gguf(reasoner[0], root / "r.gguf", "f16", progress=False, log=lambda *a: None)
    d["gguf"] = root / "r.gguf"
    lora_main([str(x) for x in ["--model", d["base"], "--data", d["data"], "--train", "--iters", 1,
                                 "--batch-size", 2, "--adapter-path", root / "adapters"]])
    d["adapters"] = root / "adapters"
    return d


def _error_line(stderr: str, command: str) -> str:
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith(f"mlx_memosight.{command}: error: ")]
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1, stderr
    return errors[0]


# As root, the unprivileged case drops to the user nobody inside the process,
# once the imports are done: the interpreter may live where nobody can read
# (a pyenv under /root), and root itself may write anywhere.
DROP_PRIVILEGES = """
import encodings.utf_8_sig, os, sys
import mlx_lm.models.llama, mlx_lm.models.qwen2, mlx_lm.utils, tqdm
from mlx_memosight import backend, config, gguf, loading, model
from mlx_memosight.convert import checkpoint, command, plan, verify, writer
from mlx_memosight.loading import hf_tokenizer
hf_tokenizer(sys.argv[1])
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
"""


def _subprocess(case: Case, argv, env: Env):
    code = f"import sys; from mlx_memosight.{case.command} import main; main(sys.argv[1:])"
    kw = dict(capture_output=True, text=True, timeout=300, cwd=ROOT)
    if case.runner == "file-size-limit":
        import resource

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

        kw["preexec_fn"] = limit
    elif case.runner == "unprivileged":
        env.out.chmod(0o555)  # only root may write there
        for p in [env.ins, *env.ins.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        code = DROP_PRIVILEGES + code
    try:
        r = subprocess.run([sys.executable, "-c", code] + [str(a) for a in argv], **kw)
    finally:
        env.out.chmod(0o755)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, shared, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    # the unprivileged case runs as another user, who must be able to read its inputs
    root = world_readable_dir() if case.runner == "unprivileged" else tmp_path
    try:
        check_case(case, Env(root / "in", root / "out", shared), capsys, monkeypatch)
    finally:
        if root != tmp_path:
            shutil.rmtree(root, ignore_errors=True)


def check_case(case: Case, env: Env, capsys, monkeypatch):
    env.ins.mkdir()
    env.out.mkdir()
    argv = case.build(env)
    before = sorted(p.relative_to(env.out) for p in env.out.rglob("*"))
    if case.runner == "inproc":
        code, out, err = run_command(command_main(case.command), argv, capsys)
    elif case.runner == "disk-full":
        from mlx_memosight.convert import writer

        def full(self, name, array):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(writer.SafetensorsWriter, "write", full)
        code, out, err = run_command(command_main(case.command), argv, capsys)
    else:
        code, out, err = _subprocess(case, argv, env)
    assert code == 1, (code, err)
    line = _error_line(err, case.command)
    for text in case.expect:
        assert text in line, line
    after = sorted(p.relative_to(env.out) for p in env.out.rglob("*"))
    assert after == before, f"left behind: {set(after) - set(before)}"


def world_readable_dir() -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="bad-input-"))
    path.chmod(0o755)
    return path


def test_the_matrix_covers_every_command_with_fifty_cases():
    by = {}
    for case in CASES.values():
        by[case.command] = by.get(case.command, 0) + 1
    assert set(by) == set(COMMANDS) and len(CASES) >= 50, by
