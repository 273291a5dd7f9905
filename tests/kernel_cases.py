"""Inputs for the kernel tests: realistic MemoSight attention rules from the
layout module, random rules, and the launchers (CPU emulation everywhere,
the real kernels on a Mac)."""

import secrets

import mlx.core as mx
import numpy as np
import pytest

from helpers import random_steps, spec_token_ids
from mlx_memosight import kernels
from mlx_memosight.config import TEMPLATES, MemoSightConfig
from mlx_memosight.layout import NEVER, AttentionRule, PassBuilder, StepState, build_training_sample

IDS = spec_token_ids()

# Kernel against reference, per dtype. The kernel keeps scores, softmax and
# sums in float32 and rounds once at the end; the reference computes in the
# input dtype, so half and bfloat16 tolerances cover the reference's rounding.
TOLERANCE = {
    mx.float32: dict(atol=2e-5, rtol=2e-5),
    mx.float16: dict(atol=4e-3, rtol=4e-3),
    mx.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
# Kernel against float64 attention of the same (rounded) inputs: about one
# rounding of the output.
ORACLE_TOLERANCE = {
    mx.float32: dict(atol=1e-5, rtol=1e-5),
    mx.float16: dict(atol=2e-3, rtol=2e-3),
    mx.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def fresh_seed() -> int:
    return secrets.randbits(32)


def builder() -> PassBuilder:
    return PassBuilder(MemoSightConfig(token_ids=IDS, template=TEMPLATES["qwen"], compression_ratio=3))


def _stack(rules, K):
    """Per-batch rules padded to K keys (padding keys are seen by nobody)."""
    until = np.zeros((len(rules), K), np.int32)
    for i, r in enumerate(rules):
        until[i, : r.num_keys] = r.key_visible_until
    return AttentionRule(
        np.stack([r.query_slot for r in rules]), np.stack([r.query_limit for r in rules]), until
    )


def make_rule(kind: str, rng: np.random.Generator, cache_len: int = None) -> AttentionRule:
    """An attention rule of one decoder pass (or a random one)."""
    b = builder()
    n = cache_len
    if kind == "decode":
        return b.decode(20, 50, n or 47).rule
    if kind == "accelerate":
        return b.decode(20, 90, n or 100, draft_len=3).rule
    if kind == "fused":
        return b.decode(20, 45, n or 45, drafts=[21, 22], draft_len=2).rule
    if kind == "fused_long":
        return b.decode(20, 600, n or 600, drafts=[21, 22, 23], draft_len=2).rule
    if kind == "compress":
        n = n or 37
        return b.compress(StepState(start_slot=n - 17, begin=n - 10), n, draft_len=2).rule
    if kind == "compress_start":
        # the step being compressed starts at slot 0: the span is at the start
        return b.compress(StepState(start_slot=0, begin=0), n or 30, draft_len=2).rule
    if kind == "training":
        # the last queries of a training sample: several finished steps
        # hidden at once, foresight keys seen only by themselves
        steps, lens = random_steps(rng, 3, IDS, min_len=4, max_len=10)
        s = build_training_sample(list(range(3, 9)), steps, IDS, 3, 1, thought_lens=lens)
        q = 24
        return AttentionRule(s.rule.query_slot[-q:], s.rule.query_limit[-q:], s.rule.key_visible_until)
    if kind == "ragged":
        # a batch of two with different cache lengths
        r0 = b.decode(20, 60, 60, drafts=[21, 22], draft_len=2).rule
        r1 = b.decode(20, 33, 33, drafts=[21, 22], draft_len=2).rule
        return _stack([r0, r1], max(r0.num_keys, r1.num_keys))
    if kind == "random":
        K = int(rng.integers(40, 200))
        Q = int(rng.integers(1, 40))
        slot = rng.integers(0, K, size=Q).astype(np.int32)
        limit = rng.integers(0, K + 1, size=Q).astype(np.int32)
        until = rng.integers(0, K + 5, size=K).astype(np.int32)
        until[rng.random(K) < 0.5] = NEVER
        return AttentionRule(slot, limit, until)
    raise ValueError(kind)


def attention_inputs(rng, rule: AttentionRule, dtype, D: int, Hq: int, Hkv: int, batch: int = 1):
    """Queries as mlx-lm hands them over (a transposed view) and keys / values
    as views of longer buffers whose unused entries are NaN."""
    Q = rule.query_slot.shape[-1]
    K = rule.num_keys
    q = mx.array(rng.standard_normal((batch, Q, Hq, D)).astype(np.float32)).astype(dtype)
    q = q.transpose(0, 2, 1, 3)
    cap = K + 37
    bufs = []
    for _ in range(2):
        x = rng.standard_normal((batch, Hkv, cap, D)).astype(np.float32)
        x[:, :, K:] = np.nan
        bufs.append(mx.array(x).astype(dtype))
    mask = kernels.CompactMask.from_rule(rule)
    return q, bufs[0][..., :K, :], bufs[1][..., :K, :], mask


def oracle_attention(q, k, v, scale, mask) -> np.ndarray:
    """Float64 attention with the materialised mask (numpy)."""
    q, k, v = (np.array(x.astype(mx.float32)).astype(np.float64) for x in (q, k, v))
    m = np.array(mask.array)
    if m.ndim == 2:
        m = m[None, None]
    G = q.shape[1] // k.shape[1]
    k = np.repeat(k, G, axis=1)
    v = np.repeat(v, G, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = np.where(m, s, -np.inf)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v)


def as_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def metal_or_skip():
    if not mx.metal.is_available():
        pytest.skip(
            "Metal is not available on this machine (mx.metal.is_available() is False): "
            "the real kernels run only on a Mac with Apple silicon"
        )
    return kernels.metal_launch


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The CPU emulator, with its compiled binaries kept for the session."""
    from metal_emulation.emulator import Emulator, find_compiler

    if find_compiler() is None:
        pytest.skip("no C++ compiler found (set CXX): the CPU emulation of the Metal kernels needs one")
    return Emulator(tmp_path_factory.mktemp("metal-emulation"))


@pytest.fixture(params=["emulated", "metal"])
def launch(request):
    """Runs kernels on the CPU emulator, or on the Apple GPU where there is one."""
    if request.param == "metal":
        return metal_or_skip()
    return request.getfixturevalue("emulator")
