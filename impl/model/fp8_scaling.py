"""FP8 (e4m3) scaling shared by the FP8 attention paths and the FP8 KV cache.

X8 = e4m3(X * 448 / amax|X|), one scale per (batch, head) or per tensor; an all-zero head gets
a finite scale (its codes are 0 and so is its contribution).

:class:`FP8Heads` is what an FP8 operand looks like between the KV cache and a kernel that
takes FP8 directly (FlashAttention-3's FP8 forward): the e4m3 codes and one float32 scale per (batch, head), so
``codes.float() / scale`` is the value (``descale`` = 1 / scale is what FA3 takes).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _saturating_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _per_head_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = fp8_scales(x)
    return to_fp8(x, scale), scale


# On a GPU each quantization runs compiled: one reduction and one fused scale-and-cast kernel
# instead of five eager passes with float32 temporaries (it runs on every attention call).
# torch.compile is lazy: nothing compiles until the first CUDA call; the CPU keeps the eager ops.
_saturating_codes_gpu = torch.compile(_saturating_codes, dynamic=False)
_per_head_codes_gpu = torch.compile(_per_head_codes, dynamic=False)


def to_fp8_saturating(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of ``x * scale`` clamped to +-448: for a scale fixed before ``x`` was seen (the
    FP8 KV cache), where PyTorch's cast would turn an overflow into NaN."""
    return (_saturating_codes_gpu if x.is_cuda else _saturating_codes)(x, scale)


@dataclass(frozen=True)
class FP8Heads:
    """An FP8 attention operand: ``codes`` e4m3 [B, H, S, D] and ``scale`` float32 [B, H, 1, 1]."""

    codes: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, x: torch.Tensor) -> "FP8Heads":
        """Per (batch, head) amax scaling of ``x`` [B, H, S, D] (a scale seen on ``x`` itself)."""
        codes, scale = (_per_head_codes_gpu if x.is_cuda else _per_head_codes)(x.detach())
        return cls(codes, scale)

    @classmethod
    def of(cls, x: "torch.Tensor | FP8Heads") -> "FP8Heads":
        """``x`` as it is if already FP8 (an FP8 KV cache's K/V), else :meth:`quantize`-d."""
        return x if isinstance(x, FP8Heads) else cls.quantize(x)

    @property
    def descale(self) -> torch.Tensor:
        """1 / scale as [B, H] float32: FlashAttention-3's q/k/v_descale."""
        return (1.0 / self.scale).flatten(-3)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.codes.float() / self.scale).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape
