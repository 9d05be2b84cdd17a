"""``inference_speed``: streaming generation FPS of the causal DiT (+ streaming VAE decode).

One video of ``warmup_blocks + blocks`` AR blocks is generated with random weights (speed does
not depend on weight values). The first ``warmup_blocks`` fill the KV window and absorb
one-time costs; the rest are measured:
- ``dit_fps``: pixel frames / DiT time (denoising steps + re-cache), CUDA-event timed;
- ``e2e_fps``: pixel frames / wall time from the end of the warm-up blocks' DiT loop to the last
  frame delivered (VAE decode, host copies and the final drain of async decodes included);
- ``roofline_fraction``: dit_fps over the roofline FPS at GEMM/attention rates measured in
  the same run at this preset's shapes (:mod:`repro.roofline`).

The video is generated ``repeats`` times (each with its own warm-up blocks) on one pipeline; every
speed figure is the median over the repeats, with ``<figure>_min`` / ``<figure>_max`` beside
the FPS and block times. ``busy`` flags a run whose repeats spread by more than
:data:`repro.stats.BUSY_SPREAD` of their median, or whose p90 block time exceeds 3x the p50:
something else was running, and ``busy_metrics`` names the figures that showed it.
The text encoder is not run: prompts are encoded once before streaming and never count
toward FPS, so a fixed random embedding stands in for it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.memory import module_bytes
from impl.pipeline import BlockTiming
from impl.quant.apply import block_linear_bytes, resolve_mode
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import SPEED_PRESETS, finish_gpu_run, inference_fields, preset_field, stream_fields, vae_device_for
from repro.roofline import measure_peak_rates, roofline_fps
from repro.stats import is_busy, repeat_summary
from repro.timing import percentile


def run_inference_speed(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    cfg = InferenceConfig.from_variant(variant, vae_device=vae_device_for(variant["vae_mode"], device))
    preset = cfg.stream_preset
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # Random weights, a fixed random embedding per prompt (the encoder runs once per prompt
    # before streaming and never counts toward FPS); compiled during the warm-up blocks.
    pipe = build_pipeline(cfg, device, Weights(text="embedding", seed=measure["seed"]), decode=measure["decode"])
    model = pipe.model

    frames = preset.vae.temporal_factor * preset.stream.frames_per_block  # per steady-state block
    runs = [_timed_run(pipe, measure, frames) for _ in range(measure["repeats"])]
    gemm_kind = "fp8" if cfg.precision == "fp8" else "dense"
    gemm_tflops, attn_tflops = measure_peak_rates(preset, device, model.dtype, gemm=gemm_kind)
    roof = roofline_fps(preset, variant["steps"], gemm_tflops, attn_tflops, cfg=variant["guidance_scale"] > 1)
    cache = pipe.cache_for(1)
    metrics: dict[str, Any] = {}
    for name in runs[0]:
        values = [r[name] for r in runs]
        spread = repeat_summary(values)
        metrics[name] = spread["median"]
        if name in _SPREAD_FIGURES:
            metrics[f"{name}_min"], metrics[f"{name}_max"] = spread["min"], spread["max"]
    dit_fps = metrics["dit_fps"]
    busy = [n for n in ("dit_fps", "e2e_fps", "block_ms_p50") if is_busy([r[n] for r in runs])]
    busy += [f"{n}_p90" for n in ("block_ms", "dit_block_ms")
             if any(r[f"{n}_p90"] > 3 * r[f"{n}_p50"] for r in runs)]
    metrics.update({
        "repeats_used": len(runs),
        "busy": bool(busy),
        "busy_metrics": ", ".join(busy),
        "roofline_fps": roof,
        "roofline_fraction": dit_fps / roof,
        "roofline_gemm": gemm_kind,
        "gemm_tflops_measured": gemm_tflops,
        "attn_tflops_measured": attn_tflops,
        "weight_mem_gb": module_bytes(model) / 1e9,
        "block_linear_weight_gb": block_linear_bytes(model) / 1e9,
        "kv_mem_gb": cache.memory_bytes() / 1e9,
        "kv_workspace_gb": cache.workspace_bytes() / 1e9,
        "frames_per_block": frames,
        "measured_blocks": measure["blocks"],
        "linear_mode": resolve_mode(cfg.precision, device),
    })
    del pipe, model, cache
    return finish_gpu_run(metrics, device)


# Figures recorded with their spread over the repeats (``_min`` / ``_max``).
_SPREAD_FIGURES = ("dit_fps", "e2e_fps", "block_ms_p50", "dit_block_ms_p50")


def _timed_run(pipe, measure: dict[str, Any], frames: int) -> dict[str, float]:
    """One video of ``warmup_blocks + blocks`` blocks; the speed figures of its timed blocks."""
    timings: list[BlockTiming] = []
    n_blocks = measure["warmup_blocks"] + measure["blocks"]
    pipe.generate(["a benchmark prompt"] * n_blocks, seed=measure["seed"], decode=measure["decode"],
                  on_block=timings.append)
    done = time.perf_counter()
    warm, steady = timings[:measure["warmup_blocks"]], timings[measure["warmup_blocks"]:]
    dit_ms = [t.dit_ms for t in steady]
    total_ms = [t.total_ms for t in steady]
    # End to end: from the moment the DiT loop finished the last warm-up block to the last
    # frame delivered (async decodes of the last blocks drain inside generate, so they count;
    # set-up before the first block, e.g. compiling the decoder, does not).
    e2e_s = done - warm[-1].loop_end_s
    return {
        "dit_fps": frames * len(steady) / (sum(dit_ms) / 1e3),
        "e2e_fps": frames * len(steady) / e2e_s,
        "block_ms_p50": statistics.median(total_ms),
        "block_ms_p90": percentile(total_ms, 0.9),
        "dit_block_ms_p50": statistics.median(dit_ms),
        "dit_block_ms_p90": percentile(dit_ms, 0.9),
        "vae_block_ms_p50": statistics.median(t.vae_ms for t in steady),
    }


INFERENCE_SPEED = register(Benchmark(
    name="inference_speed",
    description="Streaming block-AR generation FPS (DiT-only and end to end with VAE decode) with random weights.",
    variant_fields={
        "preset": preset_field(SPEED_PRESETS),
        **inference_fields("dtype", "precision", "steps", "kv_cache", "vae_mode", "decoder", "vae_channels_last",
                           "vae_compile", "attention", "bf16_attention_steps", "frame_format", "compile",
                           "cuda_graphs", "guidance_scale"),
    },
    measure_fields={
        **stream_fields(min_warmup=1),   # the first timed block's end-to-end clock starts at a warm-up block's end
        "repeats": FieldSpec(int, 3, min=1, help="videos generated and timed (each with its warm-up); figures "
                             "are medians over them, with _min/_max and a busy flag from their spread"),
    },
    run=run_inference_speed,
    table_metrics=["dit_fps", "dit_fps_min", "dit_fps_max", "e2e_fps", "e2e_fps_min", "e2e_fps_max", "busy",
                   "roofline_fps", "roofline_fraction", "block_ms_p50", "block_ms_p90",
                   "vae_block_ms_p50", "peak_mem_gb", "weight_mem_gb", "block_linear_weight_gb", "kv_mem_gb"],
    primary_metric="e2e_fps",
    plot="e2e_fps",
))
