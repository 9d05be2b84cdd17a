"""NVFP4 quantize / dequantize: the PyTorch path on the CPU, the Triton kernels on the GPU."""

import pytest
import torch

from _bench import TARGETS, check, run_benchmark
from impl.quant import nvfp4


def _matrix(target, seed=0):
    rows, cols = target.pick((128, 1024), (7040, 3072))      # 5B: one block's tokens x model width
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(target.device, target.dtype)


def _backend(target):
    return target.pick("torch", "triton")


@pytest.mark.parametrize("rule", ["static_6", "mse"])
@pytest.mark.parametrize("target", TARGETS)
def test_nvfp4_quantize(benchmark, target, rule):
    x = _matrix(target)
    q = run_benchmark(benchmark, target, lambda: nvfp4.quantize(x, rule, backend=_backend(target)),
                      group="nvfp4-quantize", shape=tuple(x.shape), rule=rule, backend=_backend(target))
    rows, cols = x.shape
    assert q.packed.shape == (rows, cols // 2) and q.scales.shape == (rows, cols // 16)
    y = nvfp4.dequantize(q, torch.float32)
    check(y, tuple(x.shape), what="dequantized")
    assert nvfp4.sqnr_db(x.float(), y) > 15.0     # real 4-bit codes, not zeros


@pytest.mark.parametrize("target", TARGETS)
def test_nvfp4_dequantize(benchmark, target):
    x = _matrix(target)
    q = nvfp4.quantize(x, "mse", backend=_backend(target))
    y = run_benchmark(benchmark, target, lambda: nvfp4.dequantize(q, target.dtype), group="nvfp4-dequantize",
                      shape=tuple(x.shape), out_dtype=str(target.dtype))
    check(y, tuple(x.shape))
    assert y.dtype == target.dtype and nvfp4.sqnr_db(x.float(), y.float()) > 15.0
