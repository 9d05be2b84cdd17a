"""``gemm_throughput``: dense matmul TFLOP/s at given shapes, for roofline numbers."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from repro.benchmark import Benchmark, FieldSpec, register
from repro.timing import time_ms

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_gemm(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    m, n, k = variant["m"], variant["n"], variant["k"]
    dtype = _DTYPES[variant["dtype"]]
    device = hardware["device"]
    gen = torch.Generator(device=device).manual_seed(measure["seed"])
    # Random normal inputs: zeros can hit fast paths and would overstate throughput.
    a = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(k, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)

    def fn() -> None:
        torch.matmul(a, b, out=out)

    times = time_ms(fn, device, measure["warmup"], measure["repeats"])
    if not torch.isfinite(out).all():
        raise RuntimeError(f"gemm produced non-finite values for m={m} n={n} k={k} {variant['dtype']}")
    p50 = statistics.median(times)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    flops = 2.0 * m * n * k
    return {"tflops": flops / (p50 * 1e-3) / 1e12, "ms_p50": p50, "ms_p90": p90,
            "gflop": flops / 1e9}


GEMM = register(Benchmark(
    name="gemm_throughput",
    description="Dense matmul (m x k) @ (k x n) throughput in TFLOP/s on the current device.",
    variant_fields={
        "m": FieldSpec(int, 256, min=1, help="rows of A and of the output (tokens)"),
        "n": FieldSpec(int, 256, min=1, help="columns of B and of the output (out features)"),
        "k": FieldSpec(int, 256, min=1, help="reduction dimension (in features)"),
        "dtype": FieldSpec(str, "float32", choices=list(_DTYPES), help="input/output dtype"),
    },
    measure_fields={
        "warmup": FieldSpec(int, 3, min=0, help="untimed calls before timing"),
        "repeats": FieldSpec(int, 10, min=1, help="timed calls; the median is reported"),
        "seed": FieldSpec(int, 0, min=0, help="seed of the random normal inputs"),
    },
    run=run_gemm,
    table_metrics=["tflops", "ms_p50", "ms_p90"],
    primary_metric="tflops",
    plot="tflops",
))
