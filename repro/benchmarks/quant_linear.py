"""``quant_linear``: one block linear's forward time per precision mode at a given shape.

The layer runs as the model runs it: activation quantization included (FP8 row scales,
NVFP4 1x16 blocks), weights pre-quantized. Each variant also times the BF16 ``nn.Linear``
at the same shape in the same process, so ``speedup_vs_bf16`` compares like with like.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from impl.memory import module_bytes
from impl.quant.apply import make_quant_linear
from impl.quant.config import QuantConfig
from repro.benchmark import Benchmark, FieldSpec, register
from repro.timing import time_ms

MODES = ["bf16", "fp8", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4_te"]


def parse_shape(shape: str) -> tuple[int, int]:
    """``"NxK"`` (out x in features) -> (N, K)."""
    try:
        n, k = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape: expected 'NxK' (out x in features), got {shape!r}") from None
    if n < 16 or k % 16:
        raise ValueError(f"shape: N must be >= 16 and K a multiple of 16 (NVFP4 blocks), got {shape!r}")
    return n, k


def _check(variant: dict[str, Any]) -> None:
    parse_shape(variant["shape"])


def run_quant_linear(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = hardware["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, (n, k) = variant["m"], parse_shape(variant["shape"])
    torch.manual_seed(measure["seed"])
    dense = nn.Linear(k, n, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    layer = dense if variant["mode"] == "bf16" else make_quant_linear(
        dense, variant["mode"], QuantConfig.for_inference(variant["mode"]))

    def timed(module: nn.Module) -> list[float]:
        with torch.no_grad():
            return time_ms(lambda: module(x), device, measure["warmup"], measure["repeats"])

    with torch.no_grad():
        ref, out = dense(x).float(), layer(x).float()
    if not torch.isfinite(out).all():
        raise RuntimeError(f"quant_linear: {variant['mode']} produced non-finite values")
    times, base = timed(layer), timed(dense)
    p50, base_p50 = statistics.median(times), statistics.median(base)
    flops = 2.0 * m * n * k
    return {"tflops": flops / (p50 * 1e-3) / 1e12, "ms_p50": p50, "ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
            "bf16_ms_p50": base_p50, "speedup_vs_bf16": base_p50 / p50,
            "weight_mb": module_bytes(layer) / 1e6, "rel_err_vs_bf16": float((out - ref).norm() / ref.norm())}


QUANT_LINEAR = register(Benchmark(
    name="quant_linear",
    description="Forward time of one quantized block linear (activation quantization included) vs BF16.",
    variant_fields={
        "mode": FieldSpec(str, "bf16", choices=MODES, help="precision mode of the linear"),
        "m": FieldSpec(int, 256, min=1, help="tokens"),
        "shape": FieldSpec(str, "256x256", help="'NxK': out x in features (K a multiple of 16)"),
    },
    measure_fields={
        "warmup": FieldSpec(int, 3, min=0, help="untimed calls first"),
        "repeats": FieldSpec(int, 10, min=1, help="timed calls; the median is reported"),
        "seed": FieldSpec(int, 0, min=0, help="seed of weights and inputs"),
    },
    run=run_quant_linear,
    check_variant=_check,
    table_metrics=["tflops", "ms_p50", "bf16_ms_p50", "speedup_vs_bf16", "weight_mb", "rel_err_vs_bf16"],
    primary_metric="tflops",
    plot="tflops",
))
