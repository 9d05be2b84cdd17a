"""``nvfp4_kernels``: NVFP4 quantize / dequantize bandwidth against a device copy.

Bandwidth counts the fewest bytes each op must move (input read once, output written once):
quantize reads BF16 and writes packed values (0.5 B) + E4M3 scales (1/16 B) per element;
dequantize the reverse. ``copy_gbps`` is a large device-to-device copy measured in the same
process (bytes read + written), and ``fraction_of_copy`` their ratio. Inputs rotate over
several buffers so the L2 cache does not serve repeated calls, and each timing covers
``calls_per_timing`` back-to-back calls (as in the model, where launches queue ahead of the
GPU), so per-call host overhead and launch latency are amortised as they are in a forward.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from impl.quant import nvfp4
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import SEED, timing_fields
from repro.timing import time_ms

OPS = ["quantize", "dequantize", "dequantize_kv"]


def copy_bandwidth_gbps(device: str, nbytes: int, warmup: int, repeats: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = statistics.median(time_ms(lambda: dst.copy_(src), device, warmup, repeats))
    return 2 * nbytes / (t * 1e-3) / 1e9


def run_nvfp4_kernels(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = hardware["device"]
    rows, cols, op, rule = variant["rows"], variant["cols"], variant["op"], variant["rule"]
    if cols % nvfp4.GROUP:
        raise ValueError(f"cols: must be a multiple of {nvfp4.GROUP}, got {cols}")
    torch.manual_seed(measure["seed"])
    inputs = [torch.randn(rows, cols, device=device, dtype=torch.bfloat16) for _ in range(measure["buffers"])]
    elems = rows * cols
    fp4_bytes = elems // 2 + elems // nvfp4.GROUP
    calls = iter(range(1 << 62))

    if op == "quantize":
        fn = lambda: nvfp4.quantize(inputs[next(calls) % len(inputs)], rule)
    else:
        packed = [nvfp4.quantize(x, rule) for x in inputs]
        if op == "dequantize":
            fn = lambda: nvfp4.dequantize(packed[next(calls) % len(packed)], torch.bfloat16)
        else:
            tpb = variant["tokens_per_block"]
            heads = variant["heads"]
            if rows % (heads * tpb):
                raise ValueError(f"rows: {rows} is not whole blocks of {tpb} tokens x {heads} heads")
            tokens = rows // heads
            out = torch.empty(1, heads, tokens, cols, device=device, dtype=torch.bfloat16)
            gd = torch.rand(1, tokens // tpb, device=device, dtype=torch.float32)
            kv = [(p.packed.view(1, heads, tokens, -1), p.scales.view(1, heads, tokens, -1)) for p in packed]

            def fn():
                pk, sc = kv[next(calls) % len(kv)]
                nvfp4.dequantize_kv(out, pk, sc, gd, tpb)
    n = measure["calls_per_timing"]

    def batch():
        for _ in range(n):
            fn()
    t = statistics.median(time_ms(batch, device, measure["warmup"], measure["repeats"])) / n
    moved = elems * 2 + fp4_bytes
    gbps = moved / (t * 1e-3) / 1e9
    copy = copy_bandwidth_gbps(device, measure["copy_mb"] * 2 ** 20, measure["warmup"], measure["repeats"])
    return {"ms_p50": t, "gbps": gbps, "copy_gbps": copy, "fraction_of_copy": gbps / copy,
            "mbytes_moved": moved / 1e6}


NVFP4_KERNELS = register(Benchmark(
    name="nvfp4_kernels",
    description="NVFP4 quantize/dequantize bandwidth (fewest bytes moved) as a fraction of a device copy.",
    variant_fields={
        "op": FieldSpec(str, "quantize", choices=OPS, help="kernel"),
        "rule": FieldSpec(str, "static_6", choices=list(nvfp4.SCALE_RULES), help="scale rule"),
        "rows": FieldSpec(int, 1024, min=1, help="rows (tokens x heads for KV)"),
        "cols": FieldSpec(int, 128, min=16, help="columns (the quantized dimension)"),
        "heads": FieldSpec(int, 24, min=1, help="dequantize_kv: heads"),
        "tokens_per_block": FieldSpec(int, 7040, min=1, help="dequantize_kv: tokens per slot"),
    },
    measure_fields={
        **timing_fields(warmup=3, repeats=20, buffers=4),
        "calls_per_timing": FieldSpec(int, 10, min=1, help="back-to-back calls per timed interval"),
        "copy_mb": FieldSpec(int, 1024, min=1, help="size of the reference copy in MiB"),
        "seed": SEED,
    },
    run=run_nvfp4_kernels,
    table_metrics=["ms_p50", "gbps", "copy_gbps", "fraction_of_copy", "mbytes_moved"],
    primary_metric="gbps",
    plot="fraction_of_copy",
))
