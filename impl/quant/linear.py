"""Quantized drop-in replacements for the DiT's block ``nn.Linear`` layers.

Each keeps ``in_features``/``out_features`` and a BF16 bias. With
``QuantConfig.keep_master_weights`` the BF16 weight stays a trainable parameter and is
re-quantized on every forward (training); otherwise it is quantized once and freed, so the
layer holds only the low-precision weight (inference memory).
"""

from __future__ import annotations

import torch
from torch import nn

from impl.memory import module_bytes
from impl.quant import nvfp4
from impl.quant.config import QuantConfig
from impl.quant.fp8 import fp8_matmul, quantize_rowwise
from impl.quant.hadamard import apply_rht


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class QuantLinear(nn.Module):
    """Common part: shapes, bias, master weight (optional), memory accounting."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.cfg = cfg
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=cfg.keep_master_weights)
        self.weight = (nn.Parameter(linear.weight.detach().clone()) if cfg.keep_master_weights else None)

    def _out(self, y2d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y2d = y2d + self.bias.to(y2d.dtype)
        return y2d.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes this layer holds for its weight and bias (parameters and buffers)."""
        return module_bytes(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.cfg.mode}"


# ---- FP8 ----

class _Fp8Matmul(torch.autograd.Function):
    """FP8 forward; straight-through backward on the quantized operands (BF16 GEMMs)."""

    @staticmethod
    def forward(ctx, x2d, weight):
        xq, xs = quantize_rowwise(x2d)
        wq, ws = quantize_rowwise(weight)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.dtype = x2d.dtype
        return fp8_matmul(xq, xs, wq, ws, x2d.dtype)

    @staticmethod
    def backward(ctx, gy):
        xq, xs, wq, ws = ctx.saved_tensors
        w_hat = (wq.float() * ws).to(gy.dtype)
        x_hat = (xq.float() * xs).to(gy.dtype)
        return gy @ w_hat, (gy.t() @ x_hat).to(ctx.dtype)


class Fp8Linear(QuantLinear):
    def __init__(self, linear: nn.Linear, cfg: QuantConfig):
        super().__init__(linear, cfg)
        if self.weight is None:
            wq, ws = quantize_rowwise(linear.weight)
            self.register_buffer("weight_fp8", wq)
            self.register_buffer("weight_scale", ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = _flat(x)
        if self.weight is not None:
            return self._out(_Fp8Matmul.apply(x2d, self.weight), x)
        xq, xs = quantize_rowwise(x2d)
        return self._out(fp8_matmul(xq, xs, self.weight_fp8, self.weight_scale, x.dtype), x)


# ---- NVFP4 ----

def nvfp4_matmul(a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor) -> torch.Tensor:
    """``a @ b^T`` as an NVFP4 tensor-core GEMM computes it: the block-scaled values
    ``code * s`` (exact in BF16) multiplied with float32 accumulation, then the two global
    factors applied once to the float32 result. a [M, K], b [N, K] -> float32 [M, N]."""
    if a.packed.device.type == "cuda":
        acc = torch.mm(nvfp4.dequantize(a, torch.bfloat16, with_global=False),
                       nvfp4.dequantize(b, torch.bfloat16, with_global=False).t(), out_dtype=torch.float32)
    else:
        acc = (nvfp4.dequantize(a, torch.float32, with_global=False)
               @ nvfp4.dequantize(b, torch.float32, with_global=False).t())
    return acc * (a.global_scale * b.global_scale)


def _uniform_like(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape, dtype=torch.float64, device=x.device)


def _pad_last16(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % nvfp4.GROUP
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


class _NVFP4Matmul(torch.autograd.Function):
    """W4A4 forward with master weights; backward straight-through, optionally with the
    gradient GEMMs in NVFP4 as in the release's trainer (stochastic rounding on gradients,
    RHT on both weight-gradient operands)."""

    @staticmethod
    def forward(ctx, x2d, weight, cfg: QuantConfig):
        xq = nvfp4.quantize(x2d, cfg.activation_rule)
        wq = nvfp4.quantize(weight, cfg.weight_rule, tile_2d=cfg.weight_2d)
        ctx.cfg, ctx.xq, ctx.wq = cfg, xq, wq   # x is kept packed (4.5 bits per element)
        ctx.save_for_backward(weight)
        return nvfp4_matmul(xq, wq).to(x2d.dtype)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        cfg, x_hat = ctx.cfg, nvfp4.dequantize(ctx.xq, torch.float32)
        if not cfg.quantize_grads:
            w_hat = nvfp4.dequantize(ctx.wq, torch.float32)
            gy32 = gy.float()
            return (gy32 @ w_hat).to(gy.dtype), (gy32.t() @ x_hat).to(weight.dtype), None
        # dgrad: gx = gy @ W reduces over N, so W^T is quantized along N (with 16x16 tiles
        # that gives exactly the forward's values, transposed).
        wtq = nvfp4.quantize(weight.detach().t().contiguous(), cfg.weight_rule, tile_2d=cfg.weight_2d)
        gq = nvfp4.quantize(gy, cfg.grad_rule, uniform=_uniform_like(gy))
        gx = nvfp4_matmul(gq, wtq)
        # wgrad: reduce over the M tokens (padded to 16 with zeros, which add nothing).
        gy_t = apply_rht(_pad_last16(gy.float().t().contiguous()))
        x_t = apply_rht(_pad_last16(x_hat.t().contiguous()))
        gw = nvfp4_matmul(nvfp4.quantize(gy_t, cfg.grad_rule, uniform=_uniform_like(gy_t)),
                          nvfp4.quantize(x_t, cfg.activation_rule))
        return gx.to(gy.dtype), gw.to(weight.dtype), None


class NVFP4EmulatedLinear(QuantLinear):
    """Exact NVFP4 W4A4 numerics on any device (the weight is held packed when frozen)."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig):
        super().__init__(linear, cfg)
        if self.weight is None:
            _register_packed(self, nvfp4.quantize(linear.weight.detach(), cfg.weight_rule,
                                                  tile_2d=cfg.weight_2d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = _flat(x)
        if self.weight is not None:
            return self._out(_NVFP4Matmul.apply(x2d, self.weight, self.cfg), x)
        xq = nvfp4.quantize(x2d, self.cfg.activation_rule)
        return self._out(nvfp4_matmul(xq, _packed_weight(self)), x)


# Measured on an H100 (tests/docs: docs/nvfp4.md): the fused Triton GEMM reaches ~310 TFLOP/s at
# M = 7040, while dequantizing into a transient BF16 weight (2.3 TB/s) + cuBLAS reaches ~650;
# at M = 16 the fused kernel is as fast. So many-token calls take the dequantize path.
FUSED_MAX_TOKENS = 64


class NVFP4WeightOnlyLinear(QuantLinear):
    """Packed 4-bit weights, BF16 activations. On CUDA: up to ``FUSED_MAX_TOKENS`` rows, a
    Triton GEMM dequantizes the weight tiles in its prologue (the BF16 weight never exists in
    memory); above it, the weight is dequantized into a transient BF16 tensor for cuBLAS (one
    layer at a time). Elsewhere: dequantize and matmul."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig):
        super().__init__(linear, cfg)
        _register_packed(self, nvfp4.quantize(linear.weight.detach(), cfg.weight_rule,
                                              tile_2d=cfg.weight_2d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = _flat(x)
        wq = _packed_weight(self)
        if x.device.type == "cuda" and x2d.shape[0] <= FUSED_MAX_TOKENS:
            from impl.quant import triton_nvfp4
            y = triton_nvfp4.weight_only_matmul(x2d.to(torch.bfloat16), wq)
        elif x.device.type == "cuda":
            w = nvfp4.dequantize(wq, torch.bfloat16, with_global=False)  # code * s: exact in BF16
            y = torch.mm(x2d.to(torch.bfloat16), w.t(), out_dtype=torch.float32) * wq.global_scale
        else:
            y = (x2d.float() @ nvfp4.dequantize(wq, torch.float32, with_global=False).t()) * wq.global_scale
        return self._out(y, x)


def _register_packed(layer: nn.Module, t: nvfp4.NVFP4Tensor) -> None:
    layer.register_buffer("weight_packed", t.packed)
    layer.register_buffer("weight_scales", t.scales)
    layer.register_buffer("weight_global_scale", t.global_scale)
    layer.scale_rule = t.rule


def _packed_weight(layer: nn.Module) -> nvfp4.NVFP4Tensor:
    return nvfp4.NVFP4Tensor(layer.weight_packed, layer.weight_scales, layer.weight_global_scale,
                             layer.scale_rule)


def nvfp4_linear_from_packed(t: nvfp4.NVFP4Tensor, bias: torch.Tensor | None, cfg: QuantConfig) -> QuantLinear:
    """An NVFP4 layer (``cfg.mode``: ``nvfp4_weight_only`` or ``nvfp4_emulated``, frozen) that
    holds the already-quantized weight ``t`` [out, in] as it is: no re-quantization, so the
    codes and scales stay bit for bit those of ``t`` (a pre-quantized checkpoint's,
    impl/quant/release_nvfp4.py, or another layer's). ``bias``: [out] or None."""
    classes = {"nvfp4_weight_only": NVFP4WeightOnlyLinear, "nvfp4_emulated": NVFP4EmulatedLinear}
    if cfg.mode not in classes or cfg.keep_master_weights:
        raise ValueError(f"nvfp4_linear_from_packed: needs mode nvfp4_weight_only or nvfp4_emulated without master "
                         f"weights, got mode {cfg.mode!r}, keep_master_weights={cfg.keep_master_weights}")
    if t.packed.dim() != 2 or t.global_scale.numel() != 1:
        raise ValueError(f"nvfp4_linear_from_packed: need a 2-D weight with one tensor scale, got packed "
                         f"{tuple(t.packed.shape)}, tensor scale {tuple(t.global_scale.shape)}")
    out_features, in_features = t.shape
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"nvfp4_linear_from_packed: bias shape {tuple(bias.shape)}, expected ({out_features},)")
    cls = classes[cfg.mode]
    layer = cls.__new__(cls)
    # The common part only (shapes, bias): the subclass constructors would quantize a weight.
    QuantLinear.__init__(layer, _LinearShape(in_features, out_features, bias), cfg)
    _register_packed(layer, nvfp4.NVFP4Tensor(t.packed, t.scales, t.global_scale.reshape(()), t.rule))
    return layer


class _LinearShape:
    """What :class:`QuantLinear` reads of an ``nn.Linear`` (no master weight)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        self.in_features, self.out_features, self.bias, self.weight = in_features, out_features, bias, None
