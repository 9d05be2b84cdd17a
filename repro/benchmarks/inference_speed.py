"""``inference_speed``: streaming generation FPS of the causal DiT (+ streaming VAE decode).

One video of ``warmup_blocks + blocks`` AR blocks is generated with random weights (speed does
not depend on weight values). The first ``warmup_blocks`` fill the KV window and absorb
one-time costs; the rest are measured:
- ``dit_fps``: pixel frames / DiT time (denoising steps + re-cache), CUDA-event timed;
- ``e2e_fps``: pixel frames / wall time of whole blocks, VAE decode and host copy included;
- ``roofline_fraction``: dit_fps over the roofline FPS at GEMM/attention rates measured in
  the same run at this preset's shapes (:mod:`repro.roofline`).
The text encoder is not run: prompts are encoded once before streaming and never count
toward FPS, so a fixed random embedding stands in for it.
"""

from __future__ import annotations

import gc
import statistics
from typing import Any

import torch

from impl.config import get_preset
from impl.model.dit import CausalWanDiT
from impl.model.vae import build_vae
from impl.pipeline import BlockTiming, StreamingPipeline
from impl.precision import COMPUTE_DTYPES, compute_dtype
from repro.benchmark import Benchmark, FieldSpec, register
from repro.roofline import measure_peak_rates, roofline_fps


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_inference_speed(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    dtype = compute_dtype(variant["precision"])
    preset = get_preset(variant["preset"]).replace(
        stream={"steps": variant["steps"], "guidance_scale": variant["guidance_scale"]})
    torch.manual_seed(measure["seed"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = CausalWanDiT(preset.dit, device=device, dtype=dtype).eval()
    vae = build_vae(preset.vae, dtype=dtype, device=device) if measure["decode"] else None
    g = torch.Generator().manual_seed(measure["seed"])
    text = torch.randn(1, preset.text.max_length, preset.dit.text_dim, generator=g).to(device, dtype)
    pipe = StreamingPipeline(model, preset, text_embedder=lambda prompt: text, vae=vae, device=device)

    timings: list[BlockTiming] = []
    n_blocks = measure["warmup_blocks"] + measure["blocks"]
    pipe.generate(["a benchmark prompt"] * n_blocks, seed=measure["seed"], decode=measure["decode"],
                  on_block=timings.append)
    steady = timings[measure["warmup_blocks"]:]
    frames = preset.vae.temporal_factor * preset.stream.frames_per_block  # per steady-state block
    dit_ms = [t.dit_ms for t in steady]
    total_ms = [t.total_ms for t in steady]
    gemm_tflops, attn_tflops = measure_peak_rates(preset, device, dtype)
    roof = roofline_fps(preset, variant["steps"], gemm_tflops, attn_tflops, cfg=variant["guidance_scale"] > 1)
    dit_fps = frames * len(steady) / (sum(dit_ms) / 1e3)
    metrics = {
        "dit_fps": dit_fps,
        "e2e_fps": frames * len(steady) / (sum(total_ms) / 1e3),
        "block_ms_p50": statistics.median(total_ms),
        "block_ms_p90": _percentile(total_ms, 0.9),
        "dit_block_ms_p50": statistics.median(dit_ms),
        "vae_block_ms_p50": statistics.median(t.vae_ms for t in steady),
        "roofline_fps": roof,
        "roofline_fraction": dit_fps / roof,
        "gemm_tflops_measured": gemm_tflops,
        "attn_tflops_measured": attn_tflops,
        "weight_mem_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
        "kv_mem_gb": pipe.cache_for(1).memory_bytes() / 1e9,
        "frames_per_block": frames,
        "measured_blocks": len(steady),
    }
    if device.type == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del pipe, model, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return metrics


INFERENCE_SPEED = register(Benchmark(
    name="inference_speed",
    description="Streaming block-AR generation FPS (DiT-only and end to end with VAE decode) with random weights.",
    variant_fields={
        "preset": FieldSpec(str, "tiny", choices=["tiny", "small", "wan22_ti2v_5b"], help="model size preset"),
        "precision": FieldSpec(str, "bf16", choices=list(COMPUTE_DTYPES), help="weights and activations dtype"),
        "steps": FieldSpec(int, 4, choices=[1, 2, 3, 4, 8], help="denoising steps per block (UniPC)"),
        "kv_cache": FieldSpec(str, "bf16", choices=["bf16"], help="KV-cache storage (nvfp4 comes with the NVFP4 issue)"),
        "vae_mode": FieldSpec(str, "sync", choices=["sync"], help="VAE decoding mode (stream/device come later)"),
        "compile": FieldSpec(bool, False, choices=[False], help="torch.compile of the DiT (comes later)"),
        "guidance_scale": FieldSpec(float, 1.0, min=1.0, help="CFG scale; 1.0 = no CFG"),
    },
    measure_fields={
        "warmup_blocks": FieldSpec(int, 4, min=1, help="blocks generated before timing (fills the KV window)"),
        "blocks": FieldSpec(int, 8, min=1, help="timed blocks"),
        "decode": FieldSpec(bool, True, help="decode each block with the streaming VAE"),
        "seed": FieldSpec(int, 0, min=0, help="seed of weights, noise and text embedding"),
    },
    run=run_inference_speed,
    table_metrics=["dit_fps", "e2e_fps", "roofline_fps", "roofline_fraction", "block_ms_p50", "block_ms_p90",
                   "vae_block_ms_p50", "peak_mem_gb", "weight_mem_gb", "kv_mem_gb"],
    primary_metric="e2e_fps",
    plot="e2e_fps",
))
