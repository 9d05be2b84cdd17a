"""Row-wise FP8 (E4M3) quantization and the W8A8 GEMM.

Weights get one scale per output row, activations one per token row, both ``amax / 448``;
the GEMM is ``torch._scaled_mm`` on GPUs with FP8 tensor cores (compute capability >= 8.9)
and an exact emulation elsewhere (dequantize, float32 matmul).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with x ~= q * scale."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq * xs) @ (wq * ws)^T`` with float32 accumulation; xq [M, K], wq [N, K]."""
    if has_fp8_tensor_cores(xq.device) and xq.shape[0] % 16 == 0:
        # _scaled_mm wants the second operand column-major: wq.t() of a row-major [N, K] is.
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=out_dtype)
    return ((xq.float() * xs) @ (wq.float() * ws).t()).to(out_dtype)
