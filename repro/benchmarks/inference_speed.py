"""``inference_speed``: streaming generation FPS of the causal DiT (+ streaming VAE decode).

One video of ``warmup_blocks + blocks`` AR blocks is generated with random weights (speed does
not depend on weight values). The first ``warmup_blocks`` fill the KV window and absorb
one-time costs; the rest are measured:
- ``dit_fps``: pixel frames / DiT time (denoising steps + re-cache), CUDA-event timed;
- ``e2e_fps``: pixel frames / wall time from the end of the warm-up blocks to the last frame
  delivered (VAE decode, host copies and the final drain of async decodes included);
- ``roofline_fraction``: dit_fps over the roofline FPS at GEMM/attention rates measured in
  the same run at this preset's shapes (:mod:`repro.roofline`).
The text encoder is not run: prompts are encoded once before streaming and never count
toward FPS, so a fixed random embedding stands in for it.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from impl.config import get_preset
from impl.model.dit import CausalWanDiT
from impl.model.vae import build_vae
from impl.pipeline import BlockTiming, StreamingPipeline
from impl.precision import compute_dtype
from impl.memory import module_bytes
from impl.quant.apply import block_linear_bytes, quantize_model
from impl.quant.config import QuantConfig
from repro.benchmark import Benchmark, FieldSpec, register
from repro.roofline import measure_peak_rates, roofline_fps
from repro.timing import percentile


PRECISIONS = ["bf16", "fp32", "fp8", "nvfp4", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4_te"]


def _vae_device(mode: str, device: torch.device) -> str | None:
    """``device`` mode decodes on a second GPU when there is one, else on the CPU."""
    if mode != "device":
        return None
    return "cuda:1" if device.type == "cuda" and torch.cuda.device_count() > 1 else "cpu"


def _check(variant: dict[str, Any]) -> None:
    if variant["precision"] == "fp32" and variant["kv_cache"] == "nvfp4":
        raise ValueError("kv_cache: nvfp4 storage is measured against a bf16 model; use precision bf16 or a quantized mode")


def run_inference_speed(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    precision = variant["precision"]
    dtype = compute_dtype("fp32" if precision == "fp32" else "bf16")
    if variant["vae_mode"] == "stream" and device.type != "cuda":
        raise ValueError("vae_mode: 'stream' needs a CUDA device")
    preset = get_preset(variant["preset"]).replace(
        stream={"steps": variant["steps"], "guidance_scale": variant["guidance_scale"],
                "vae_mode": variant["vae_mode"], "vae_device": _vae_device(variant["vae_mode"], device)})
    torch.manual_seed(measure["seed"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = CausalWanDiT(preset.dit, device=device, dtype=dtype).eval()
    quant = None
    if precision not in ("bf16", "fp32"):
        quant = quantize_model(model, QuantConfig.for_inference(precision))
    if variant["compile"]:
        model.compile_hot_path()  # compiled during the warm-up blocks
    vae = build_vae(preset.vae, dtype=dtype, device=device) if measure["decode"] else None
    g = torch.Generator().manual_seed(measure["seed"])
    text = torch.randn(1, preset.text.max_length, preset.dit.text_dim, generator=g).to(device, dtype)
    pipe = StreamingPipeline(model, preset, text_embedder=lambda prompt: text, vae=vae, device=device,
                             kv_cache=variant["kv_cache"])

    timings: list[BlockTiming] = []
    n_blocks = measure["warmup_blocks"] + measure["blocks"]
    wall0 = time.perf_counter()
    pipe.generate(["a benchmark prompt"] * n_blocks, seed=measure["seed"], decode=measure["decode"],
                  on_block=timings.append)
    wall = time.perf_counter() - wall0
    warm, steady = timings[:measure["warmup_blocks"]], timings[measure["warmup_blocks"]:]
    frames = preset.vae.temporal_factor * preset.stream.frames_per_block  # per steady-state block
    dit_ms = [t.dit_ms for t in steady]
    total_ms = [t.total_ms for t in steady]
    # End to end: from the end of the warm-up blocks' DiT loop to the last frame delivered
    # (async decodes of the last blocks drain inside generate, so they count).
    e2e_s = wall - sum(t.total_ms for t in warm) / 1e3
    gemm_kind = "fp8" if precision == "fp8" else "dense"
    gemm_tflops, attn_tflops = measure_peak_rates(preset, device, dtype, gemm=gemm_kind)
    roof = roofline_fps(preset, variant["steps"], gemm_tflops, attn_tflops, cfg=variant["guidance_scale"] > 1)
    dit_fps = frames * len(steady) / (sum(dit_ms) / 1e3)
    cache = pipe.cache_for(1)
    metrics = {
        "dit_fps": dit_fps,
        "e2e_fps": frames * len(steady) / e2e_s,
        "block_ms_p50": statistics.median(total_ms),
        "block_ms_p90": percentile(total_ms, 0.9),
        "dit_block_ms_p50": statistics.median(dit_ms),
        "dit_block_ms_p90": percentile(dit_ms, 0.9),
        "vae_block_ms_p50": statistics.median(t.vae_ms for t in steady),
        "roofline_fps": roof,
        "roofline_fraction": dit_fps / roof,
        "roofline_gemm": gemm_kind,
        "gemm_tflops_measured": gemm_tflops,
        "attn_tflops_measured": attn_tflops,
        "weight_mem_gb": module_bytes(model) / 1e9,
        "block_linear_weight_gb": (quant.weight_bytes_after if quant else block_linear_bytes(model)) / 1e9,
        "kv_mem_gb": cache.memory_bytes() / 1e9,
        "kv_workspace_gb": cache.workspace_bytes() / 1e9,
        "frames_per_block": frames,
        "measured_blocks": len(steady),
        "linear_mode": quant.mode if quant else precision,
    }
    if device.type == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del pipe, model, vae, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return metrics


INFERENCE_SPEED = register(Benchmark(
    name="inference_speed",
    description="Streaming block-AR generation FPS (DiT-only and end to end with VAE decode) with random weights.",
    variant_fields={
        "preset": FieldSpec(str, "tiny", choices=["tiny", "small", "wan22_ti2v_5b"], help="model size preset"),
        "precision": FieldSpec(str, "bf16", choices=PRECISIONS,
                               help="block linears: bf16/fp32 dense, fp8 W8A8, or an NVFP4 mode (impl.quant)"),
        "steps": FieldSpec(int, 4, choices=[1, 2, 3, 4, 8], help="denoising steps per block (UniPC)"),
        "kv_cache": FieldSpec(str, "bf16", choices=["bf16", "nvfp4"], help="KV-cache storage"),
        "vae_mode": FieldSpec(str, "sync", choices=["sync", "stream", "device"],
                              help="VAE decoding: in the loop, a side CUDA stream, or another device"),
        "compile": FieldSpec(bool, False, help="torch.compile the DiT blocks' pure halves (CausalWanDiT.compile_hot_path)"),
        "guidance_scale": FieldSpec(float, 1.0, min=1.0, help="CFG scale; 1.0 = no CFG"),
    },
    measure_fields={
        "warmup_blocks": FieldSpec(int, 4, min=1, help="blocks generated before timing (fills the KV window)"),
        "blocks": FieldSpec(int, 8, min=1, help="timed blocks"),
        "decode": FieldSpec(bool, True, help="decode each block with the streaming VAE"),
        "seed": FieldSpec(int, 0, min=0, help="seed of weights, noise and text embedding"),
    },
    run=run_inference_speed,
    check_variant=_check,
    table_metrics=["dit_fps", "e2e_fps", "roofline_fps", "roofline_fraction", "block_ms_p50", "block_ms_p90",
                   "vae_block_ms_p50", "peak_mem_gb", "weight_mem_gb", "block_linear_weight_gb", "kv_mem_gb"],
    primary_metric="e2e_fps",
    plot="e2e_fps",
))
