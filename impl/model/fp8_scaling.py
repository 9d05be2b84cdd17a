"""FP8 (e4m3) scaling shared by the FP8 attention paths: amax-based scales and the cast.

X8 = e4m3(X * 448 / amax|X|), one scale per (batch, head) or per tensor; an all-zero head gets
a finite scale (its codes are 0 and so is its contribution).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0          # largest finite e4m3 value
_AMAX_FLOOR = 1e-12      # an all-zero head gets scale 448 / floor: codes 0, output 0


def fp8_scales(x: torch.Tensor, per_head: bool = True) -> torch.Tensor:
    """Quantization scales 448 / amax, float32: [B, H, 1, 1] per (batch, head), or [1, 1, 1, 1]."""
    dims = (-2, -1) if per_head else (0, 1, 2, 3)
    amax = x.detach().abs().amax(dim=dims, keepdim=True).float().clamp_min(_AMAX_FLOOR)
    return FP8_MAX / amax


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of ``x * scale`` (|x * scale| <= 448 by construction of the scale)."""
    return (x.float() * scale).to(torch.float8_e4m3fn)
