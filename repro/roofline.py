"""Roofline for streaming DiT inference: FLOPs per AR block and the FPS floor they imply.

Per forward over one block (T = tokens per block, K = keys attended, d = width, f = FFN width):
- GEMMs per layer: self-attn q,k,v,o 4*2*T*d^2; cross-attn q,o 2*2*T*d^2 (text K/V is cached);
  FFN 2*2*T*d*f.
- Attention per layer: self 4*T*K*d (QK^T and PV), cross 4*T*L*d (L text tokens).
A block costs (steps + 1) forwards (the +1 is the clean re-cache pass), x2 with CFG.
The rates are measured on the device in the same run (:func:`measure_peak_rates`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl.config import Preset
from repro.timing import time_ms

@dataclass(frozen=True)
class BlockFlops:
    gemm: float
    attention: float

    @property
    def total(self) -> float:
        return self.gemm + self.attention


def block_flops(preset: Preset, steps: int, *, cfg: bool = False) -> BlockFlops:
    """FLOPs to generate one steady-state block (KV window full)."""
    d, f, layers = preset.dit.dim, preset.dit.ffn_dim, preset.dit.num_layers
    t = preset.tokens_per_block
    keys = preset.stream.window_blocks * t
    text = preset.text.max_length
    gemm = layers * (6 * 2 * t * d * d + 2 * 2 * t * d * f)
    attn = layers * (4 * t * keys * d + 4 * t * text * d)
    forwards = (steps + 1) * (2 if cfg else 1)
    return BlockFlops(gemm * forwards, attn * forwards)


def roofline_fps(preset: Preset, steps: int, gemm_tflops: float, attn_tflops: float, *, cfg: bool = False) -> float:
    """Best-case DiT-only FPS if every GEMM and attention ran at the given rates."""
    fl = block_flops(preset, steps, cfg=cfg)
    seconds = fl.gemm / (gemm_tflops * 1e12) + fl.attention / (attn_tflops * 1e12)
    frames = preset.vae.temporal_factor * preset.stream.frames_per_block
    return frames / seconds


def _median_ms(fn, device: torch.device) -> float:
    return statistics.median(time_ms(fn, device.type, warmup=1, repeats=10))


def measure_peak_rates(preset: Preset, device: torch.device, dtype: torch.dtype,
                       gemm: str = "dense") -> tuple[float, float]:
    """(GEMM TFLOP/s, attention TFLOP/s) at this preset's block shapes, on random data.

    ``gemm="fp8"`` times the row-scaled FP8 GEMM (``torch._scaled_mm``) on pre-quantized
    operands, where the device has FP8 tensor cores; otherwise a dense ``dtype`` matmul.
    """
    from impl.quant.fp8 import fp8_matmul, has_fp8_tensor_cores, quantize_rowwise
    g = torch.Generator(device=device).manual_seed(0)
    t, d, f = preset.tokens_per_block, preset.dit.dim, preset.dit.ffn_dim
    a = torch.randn(t, d, generator=g, device=device).to(dtype)
    w = torch.randn(f, d, generator=g, device=device).to(dtype)
    if gemm == "fp8" and has_fp8_tensor_cores(device):
        (aq, sa), (wq, sw) = quantize_rowwise(a), quantize_rowwise(w)
        gemm_ms = _median_ms(lambda: fp8_matmul(aq, sa, wq, sw, torch.bfloat16), device)
    else:
        gemm_ms = _median_ms(lambda: a @ w.T, device)
    h, hd = preset.dit.num_heads, preset.dit.head_dim
    keys = preset.stream.window_blocks * t
    q = torch.randn(1, h, t, hd, generator=g, device=device).to(dtype)
    k = torch.randn(1, h, keys, hd, generator=g, device=device).to(dtype)
    v = torch.randn(1, h, keys, hd, generator=g, device=device).to(dtype)
    attn_ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)
    return 2 * t * d * f / (gemm_ms * 1e9), 4 * t * keys * d / (attn_ms * 1e9)
