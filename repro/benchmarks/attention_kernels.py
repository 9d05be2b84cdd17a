"""``attention_kernels``: the KV-cached self-attention kernels at the streaming shapes.

One call attends a block's queries (``queries``, 7040 at 5B size) against ``keys`` resident keys
(28160 = 4 blocks, 35200 = 5), ``heads`` x ``head_dim`` (24 x 128), batch 1, BF16 inputs, for
each backend of :mod:`impl.model.attention_backends`. Measured in one run, against SDPA on the
same inputs:
- ``ms_p50`` (the whole call, FP8 quantization of Q, K, V included) and ``kernel_ms_p50`` (the
  FP8 kernel on operands quantized beforehand; SDPA / FA3 BF16: the same call), CUDA-event
  medians over ``repeats`` calls rotating ``buffers`` input sets (so no call hits a warm L2);
- ``fp8_kv_ms_p50`` (backends that read an FP8 KV cache as stored: ``fa3_fp8``, the
  emulation): K and V arrive as FP8 codes, only Q is quantized in the call -- the streaming
  forward with ``kv_cache: fp8``; with ``fp8_kv_tflops`` and ``fp8_kv_speedup_vs_sdpa``;
- ``tflops`` = 4 M N D H / ``ms_p50``; ``kernel_tflops`` likewise; ``speedup_vs_sdpa``;
- ``sqnr_vs_sdpa_db``: output SQNR against SDPA on random normal inputs;
- with ``source: model``, the per-layer SQNR at the 5B shapes with random weights: the full
  model streams ``warmup_blocks`` blocks through SDPA, then on the next block's first
  denoising forward every layer's attention runs both kernels on the same q, k, v
  (``layer_sqnr_min/median/max_db``; the per-layer values as ``series_layer_sqnr_lNN``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from impl.model.attention_backends import BACKENDS, attention_fn, sdpa, sqnr_db
from impl.model.fp8_scaling import FP8Heads
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import SEED, finish_gpu_run, inference_field, timing_fields
from repro.timing import percentile, time_ms


def _inputs(measure: dict[str, Any], variant: dict[str, Any], device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, d = measure["heads"], measure["head_dim"]

    def rand(n: int) -> torch.Tensor:
        return torch.randn(1, h, n, d, generator=g).to(device, torch.bfloat16)

    return rand(measure["queries"]), rand(variant["keys"]), rand(variant["keys"])


def _model_sqnr(backend: str, measure: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Per-layer SQNR of ``backend`` against SDPA inside the 5B model (random weights)."""
    from impl.inference.build import Weights, build_pipeline
    from impl.inference.config import InferenceConfig
    test_fn = attention_fn(backend, device)
    cfg = InferenceConfig(preset="wan22_ti2v_5b", precision="bf16", steps=2)
    pipe = build_pipeline(cfg, device, Weights(text="embedding", seed=measure["seed"]), decode=False)
    recorded: list[float] = []

    def audit(q, k, v):
        ref = sdpa(q, k, v)
        if len(recorded) < pipe.model.cfg.num_layers:
            recorded.append(sqnr_db(ref, test_fn(q, k, v)))
        return ref

    blocks = measure["warmup_blocks"]
    pipe.generate(["a benchmark prompt"] * blocks, decode=False)   # fills the KV window
    pipe.model.set_attention_backend(audit)
    # One more block: its first forward (the first denoising step) is the audited one.
    pipe.generate(["a benchmark prompt"] * (blocks + 1), decode=False)
    del pipe
    out: dict[str, Any] = {"layer_sqnr_min_db": min(recorded), "layer_sqnr_median_db": statistics.median(recorded),
                           "layer_sqnr_max_db": max(recorded)}
    out.update({f"series_layer_sqnr_l{i:02d}": v for i, v in enumerate(recorded)})
    return out


def run_attention_kernels(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    backend = variant["attention"]
    fn = attention_fn(backend, device)     # clear error if this machine cannot run it
    if variant["source"] == "model":
        if device.type != "cuda":
            raise ValueError("source: 'model' streams the 5B model and needs a CUDA device")
        return finish_gpu_run(_model_sqnr(backend, measure, device), device)
    sets = [_inputs(measure, variant, device, measure["seed"] + i) for i in range(measure["buffers"])]
    it = iter(range(10**9))

    def call(f):
        return lambda: f(*sets[next(it) % len(sets)])

    dev = device.type
    ms = time_ms(call(fn), dev, measure["warmup"], measure["repeats"])
    ref_ms = time_ms(call(sdpa), dev, measure["warmup"], measure["repeats"])
    kernel_ms = ms
    cached_ms = None
    if backend == "fp8_triton":
        from impl.model.fp8_attention import fp8_attention_quantized, quantize_qkv
        pre = [quantize_qkv(*s) for s in sets]
        kernel_ms = time_ms(lambda: fp8_attention_quantized(*pre[next(it) % len(pre)]), dev,
                            measure["warmup"], measure["repeats"])
    if BACKENDS[backend].takes_fp8_kv:
        # K/V as an FP8 KV cache holds them (quantized when their block was written): the call
        # quantizes only Q, as the streaming forward does with kv_cache='fp8'.
        cached = [(q_, FP8Heads.quantize(k_), FP8Heads.quantize(v_)) for q_, k_, v_ in sets]
        cached_ms = time_ms(lambda: fn(*cached[next(it) % len(cached)]), dev, measure["warmup"], measure["repeats"])
        if backend == "fa3_fp8":
            q8 = [(FP8Heads.quantize(q_), k_, v_) for q_, k_, v_ in cached]
            kernel_ms = time_ms(lambda: fn(*q8[next(it) % len(q8)]), dev, measure["warmup"], measure["repeats"])
        del cached
    q, k, v = sets[0]
    flop = 4.0 * q.shape[2] * k.shape[2] * q.shape[3] * q.shape[1]
    p50, k50, r50 = statistics.median(ms), statistics.median(kernel_ms), statistics.median(ref_ms)
    metrics = {
        "ms_p50": p50, "ms_p90": percentile(ms, 0.9), "kernel_ms_p50": k50, "sdpa_ms_p50": r50,
        "tflops": flop / (p50 / 1e3) / 1e12, "kernel_tflops": flop / (k50 / 1e3) / 1e12,
        "sdpa_tflops": flop / (r50 / 1e3) / 1e12, "speedup_vs_sdpa": r50 / p50,
        "sqnr_vs_sdpa_db": sqnr_db(sdpa(q, k, v), fn(q, k, v)),
    }
    if cached_ms is not None:
        c50 = statistics.median(cached_ms)
        metrics.update({"fp8_kv_ms_p50": c50, "fp8_kv_tflops": flop / (c50 / 1e3) / 1e12,
                        "fp8_kv_speedup_vs_sdpa": r50 / c50})
    metrics = {k_: (None if isinstance(v_, float) and not math.isfinite(v_) else v_) for k_, v_ in metrics.items()}
    del sets, q, k, v
    return finish_gpu_run(metrics, device)


ATTENTION_KERNELS = register(Benchmark(
    name="attention_kernels",
    description="KV-cached self-attention kernels (SDPA, FlashAttention-3 BF16 / FP8, FP8 Triton, FP8 cuDNN, FP8 "
                "emulated) at the streaming "
                "shapes: time, TFLOP/s and speedup against SDPA in the same run, output SQNR against SDPA on "
                "random inputs, and per-layer SQNR inside the 5B model with random weights.",
    variant_fields={
        "attention": inference_field("attention"),
        "keys": FieldSpec(int, 28160, min=1, help="resident keys attended (28160 = 4 blocks of 7040 tokens)"),
        "source": FieldSpec(str, "random", choices=["random", "model"],
                            help="random normal q, k, v, or the 5B model's own (random weights; per-layer SQNR)"),
    },
    measure_fields={
        "queries": FieldSpec(int, 7040, min=1, help="queries per call (one block's tokens)"),
        "heads": FieldSpec(int, 24, min=1, help="attention heads"),
        "head_dim": FieldSpec(int, 128, min=16, help="head dimension"),
        **timing_fields(warmup=5, repeats=20, buffers=3),
        "warmup_blocks": FieldSpec(int, 4, min=1, help="source model: blocks streamed before the audited one"),
        "seed": SEED,
    },
    run=run_attention_kernels,
    table_metrics=["ms_p50", "kernel_ms_p50", "fp8_kv_ms_p50", "sdpa_ms_p50", "tflops", "kernel_tflops",
                   "fp8_kv_tflops", "speedup_vs_sdpa", "fp8_kv_speedup_vs_sdpa", "sqnr_vs_sdpa_db",
                   "layer_sqnr_min_db", "layer_sqnr_median_db"],
    primary_metric="speedup_vs_sdpa",
    plot="tflops",
))
