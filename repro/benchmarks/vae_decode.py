"""``vae_decode``: the streaming Wan2.2 VAE decoder alone, and where its time goes.

A random-weight decoder (speed does not depend on weight values) of each kind of
:mod:`impl.model.decoders` (the full Wan2.2 VAE, MG-LightVAE pruned by 50% / 75%, the tiny
TAEHV-architecture decoder) decodes one stream of ``warmup_blocks + blocks`` AR blocks of
random normalised latents [1, z_dim, F, h, w] at the preset's latent resolution through its
streaming decoder (the causal state carried across blocks), exactly as the pipeline does.
The warm-up blocks hold the stream's first chunk (fewer frames) and absorb one-time costs
(cuDNN autotuning, compilation); each timed block is timed alone (CUDA events on GPU,
``perf_counter`` on CPU):
- ``decode_fps``: pixel frames / summed time of the timed blocks;
- ``vae_block_ms_p50/p90``, ``ms_per_latent_frame`` (p50 block / latent frames per block);
- ``decode_tflop_per_block``: FLOPs of one steady-state block, counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` on an extra untimed block run eagerly (the
  count is the same with or without compilation or channels-last); ``decode_tflops`` = that
  over the p50 block time;
- a coarse breakdown of one more block, profiled with ``torch.profiler``: the share of the
  summed kernel time per :func:`repro.profile.phase_of` phase (``conv_share``, ...; on CPU the
  self time of aten ops), ``conv_layout_share`` (cuDNN NCHW<->NHWC transforms, part of
  ``conv_share``), ``kernel_busy_fraction`` (summed kernel time / the profiled block's time)
  and the top kernel. With ``compile`` on CPU the generated C++ kernels are not aten ops, so
  the breakdown there only sees what runs outside them;
- ``warmup_s`` (the warm-up blocks' wall time, compilation and autotuning included),
  ``compiled_graphs`` (graphs torch.compile built, one per decoder call signature) and
  ``compiled_graphs_timed`` (built during the timed blocks: should be 0, else they are
  polluted by compilation).

Variants: decoder, dtype, channels-last layout (``StreamingDecoder(channels_last=True)``), cuDNN
autotuning (``cudnn_benchmark``, set only inside the run through ``torch.backends.cudnn.flags``,
so nothing leaks to later variants) and ``torch.compile`` of the decoder module.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from impl.config import get_preset
from impl.model.decoders import build_decoder, stream_decoder
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import finish_gpu_run, inference_field, preset_field
from repro.profile import PHASES, kernel_times_ms, phase_times_ms
from repro.timing import percentile

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_LAYOUT_KERNEL = re.compile(r"nchwtonhwc|nhwctonchw")
_SHARE_PHASES = [name for name, _ in PHASES] + ["other"]


def _compiled_graphs() -> int:
    """Graphs compiled by torch.compile in this process so far (0 without compilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_block(decoder, z: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(ms, pixel frames) of one decode_block; CUDA events on GPU (launches are async)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = decoder.decode_block(z)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out.shape[2]
    t0 = time.perf_counter()
    out = decoder.decode_block(z)
    return (time.perf_counter() - t0) * 1e3, out.shape[2]


def _breakdown(decoder, z: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Kernel-time shares of one profiled block (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        block_ms, _ = _timed_block(decoder, z, device)
    kernels = kernel_times_ms(prof, device.type)
    phases = phase_times_ms(kernels)
    busy = sum(kernels.values())
    out: dict[str, Any] = {f"{p}_share": phases.get(p, 0.0) / busy if busy else None for p in _SHARE_PHASES}
    layout = sum(ms for name, ms in kernels.items() if _LAYOUT_KERNEL.search(name.lower()))
    out["conv_layout_share"] = layout / busy if busy else None
    out["profiled_block_ms"] = block_ms
    out["kernel_busy_fraction"] = busy / block_ms if block_ms > 0 else None
    if kernels:
        name, ms = max(kernels.items(), key=lambda kv: kv[1])
        out["top_kernel"] = name[:120]
        out["top_kernel_share"] = ms / busy
    return out


def run_vae_decode(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    dtype = _DTYPES[variant["dtype"]]
    preset = get_preset(variant["preset"])
    fpb = measure["frames_per_block"] or preset.stream.frames_per_block
    h, w = preset.latent_hw
    n_warm, n_timed = measure["warmup_blocks"], measure["blocks"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    module = build_decoder(variant["decoder"], preset.vae, dtype=dtype, device=device, seed=measure["seed"])
    # torch.compile with static shapes: the first few decoder calls of a stream differ (first
    # chunk, cache filling), each gets its own graph during the warm-up blocks.
    decoder = stream_decoder(module, channels_last=variant["channels_last"], compile=variant["compile"])
    # All latents up front (+2 blocks: profile, FLOP count), so no RNG work is timed.
    graphs0 = _compiled_graphs()
    g = torch.Generator().manual_seed(measure["seed"])
    latents = [torch.randn(1, preset.vae.z_dim, fpb, h, w, generator=g).to(device, dtype)
               for _ in range(n_warm + n_timed + 2)]

    ms: list[float] = []
    frames = 0
    with torch.backends.cudnn.flags(enabled=True, benchmark=variant["cudnn_benchmark"],
                                    deterministic=False, allow_tf32=True):
        t0 = time.perf_counter()
        for z in latents[:n_warm]:
            decoder.decode_block(z)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        graphs = _compiled_graphs()
        for z in latents[n_warm:n_warm + n_timed]:
            block_ms, block_frames = _timed_block(decoder, z, device)
            ms.append(block_ms)
            frames += block_frames
        graphs_timed = _compiled_graphs() - graphs
        # Profile before the eager FLOP-count block: its cache tensors may have other strides
        # than compiled code's, which would make the compiled decoder recompile.
        breakdown = _breakdown(decoder, latents[-2], device)
        # FLOPs of a steady-state block: a second, eager stream past its first chunk.
        counting = stream_decoder(module, channels_last=variant["channels_last"])
        counting.decode_block(latents[-1])
        with FlopCounterMode(display=False) as counter:
            counting.decode_block(latents[-1])
        flop = counter.get_total_flops()
    p50 = statistics.median(ms)
    metrics: dict[str, Any] = {
        "decode_fps": frames / (sum(ms) / 1e3),
        "vae_block_ms_p50": p50,
        "vae_block_ms_p90": percentile(ms, 0.9),
        "ms_per_latent_frame": p50 / fpb,
        "decode_tflop_per_block": flop / 1e12,
        "decode_tflops": flop / (p50 / 1e3) / 1e12,
        "frames_per_block": frames // n_timed,
        "latent_frames_per_block": fpb,
        "latent_hw": f"{h}x{w}",
        "measured_blocks": n_timed,
        "warmup_s": warmup_s,
        "compiled_graphs": graphs - graphs0,
        "compiled_graphs_timed": graphs_timed,
        **breakdown,
    }
    metrics["decoder_params_m"] = sum(p.numel() for p in module.parameters()) / 1e6
    del decoder, counting, module, latents
    return finish_gpu_run(metrics, device)


VAE_DECODE = register(Benchmark(
    name="vae_decode",
    description="Streaming video decode alone (random weights; full Wan2.2 VAE, pruned LightVAE, tiny TAE "
                "decoder): FPS, per-block latency, achieved TFLOP/s and a kernel-time breakdown (conv vs the rest).",
    variant_fields={
        "preset": preset_field(["tiny", "small", "wan22_ti2v_5b"],
                               help="model size preset (VAE layout and video resolution)"),
        "decoder": inference_field("decoder"),
        "dtype": FieldSpec(str, "bf16", choices=list(_DTYPES), help="VAE weights and activations"),
        "channels_last": FieldSpec(bool, False, help="decode in channels_last_3d layout "
                                                     "(StreamingDecoder(channels_last=True))"),
        "cudnn_benchmark": FieldSpec(bool, False, help="cuDNN autotuning of conv algorithms "
                                                       "(torch.backends.cudnn.flags, only inside the run)"),
        "compile": FieldSpec(bool, False, help="torch.compile the VAE decoder module"),
    },
    measure_fields={
        "warmup_blocks": FieldSpec(int, 2, min=1, help="untimed blocks first (the stream's first "
                                                       "chunk, autotuning, compilation)"),
        "blocks": FieldSpec(int, 4, min=1, help="timed blocks"),
        "frames_per_block": FieldSpec(int, 0, min=0, help="latent frames per block; 0 = the "
                                                          "preset's StreamConfig.frames_per_block"),
        "seed": FieldSpec(int, 0, min=0, help="seed of the weights and latents"),
    },
    run=run_vae_decode,
    table_metrics=["decode_fps", "vae_block_ms_p50", "vae_block_ms_p90", "ms_per_latent_frame",
                   "decode_tflop_per_block", "decode_tflops", "conv_share", "peak_mem_gb"],
    primary_metric="decode_fps",
    plot="decode_fps",
))
