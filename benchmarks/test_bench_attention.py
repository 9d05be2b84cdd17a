"""One KV-cached self-attention call: SDPA and the FP8 emulation."""

import pytest
import torch

from _bench import TARGETS, check, run_benchmark
from impl.model import attention_backends


def _qkv(target, backend):
    if target.gpu:   # 5B: 24 heads x 128; one block of queries over the 4-block window
        heads, dim, q_len = 24, 128, 7040
        # the emulation materialises float32 [H, T, S] scores several times: one block of keys
        kv_len = 7040 if backend == "fp8_emulated" else 4 * 7040
    else:
        heads, dim, q_len, kv_len = 4, 64, 256, 1024
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, dim, generator=g).to(target.device, target.dtype)
    k, v = (torch.randn(1, heads, kv_len, dim, generator=g).to(target.device, target.dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("backend", ["sdpa", "fp8_emulated"])
@pytest.mark.parametrize("target", TARGETS)
def test_attention(benchmark, target, backend):
    q, k, v = _qkv(target, backend)
    fn = attention_backends.attention_fn(backend, target.device)
    o = run_benchmark(benchmark, target, lambda: fn(q, k, v), group="attention", backend=backend,
                      q_shape=tuple(q.shape), kv_shape=tuple(k.shape))
    check(o, tuple(q.shape))
    assert o.abs().max() > 0
