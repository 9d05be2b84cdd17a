"""NVFP4 on Triton (1x16 blocks, round-to-nearest), the launch side: quantize, dequantize, the
KV-cache dequantize and a weight-only NVFP4 GEMM. The kernels are device code of their own:
:mod:`impl.quant.triton_nvfp4_quantize` and :mod:`impl.quant.triton_nvfp4_decode`.

The quantizer agrees with the PyTorch path of :func:`impl.quant.nvfp4.quantize` (``backend="torch"``)
bit for bit (packed bytes, scales, global scale) for every scale rule; the tests in
``tests/test_triton_nvfp4.py`` check it. This module and its kernels build on
:mod:`impl.quant.nvfp4_format` only (``impl.quant.nvfp4`` dispatches here, not the other way round). Launch shapes are
arguments of each call (:class:`QuantTuning`, :class:`DequantTuning`, :class:`KVDequantTuning`,
the GEMM's ``config``), never module state, so a benchmark sweep cannot leak into other calls.
How each rounding is made exact without a division is told in the quantize kernels; this module
holds the tunings, input checks, output allocation, launches and the torch fallback of
``dequantize_kv``.

Non-finite inputs (NaN / inf in ``x``) are not part of the bit-exact contract.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from impl.quant.nvfp4_format import (E2M1_VALUES, GROUP, NVFP4Tensor, QuantFormatError, ScaleRule,
                                     check_amax, check_input, get_rule, global_decode_scale,
                                     unpack_codes)

try:  # Triton is optional: on a CPU-only machine this module imports and supports() is False.
    import triton
    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    _HAVE_TRITON = False

if _HAVE_TRITON:
    from impl.quant.triton_nvfp4_decode import (_nvfp4_dequant_kernel, _nvfp4_dequant_kv_kernel, _wo_mm_kernel,
                                                _wo_mm_tuned)
    from impl.quant.triton_nvfp4_quantize import _nvfp4_quant_kernel, _nvfp4_quant_kernel_2d

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ERR_CODE = {None: 0, "mse": 1, "mae": 2, "abs_max": 3}
# The kernels switch whole tiles to the float64 paths below gd = 2^-90 (spelled
# 8.077935669463161e-28 there).


def _check_pow2(owner: str, minimum: int = 1, **values: int | None) -> None:
    """tl.arange needs power-of-two extents: reject a bad launch shape before compiling."""
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or v < minimum or v & (v - 1)):
            raise QuantFormatError(f"{owner}.{name}: must be a power of two >= {minimum}, got {v!r}")


@dataclass(frozen=True)
class _RowTiles:
    """Launch shape of a row-tiled kernel: tiles of ``elems // block_k`` rows x ``block_k``
    columns (``block_k`` None: the kernel's default for the row length, ``default_block_k``)."""

    block_k: int | None = None
    elems: int = 2048
    warps: int = 4

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_pow2(owner, elems=self.elems, warps=self.warps)
        _check_pow2(owner, GROUP, block_k=self.block_k)

    def default_block_k(self, K: int) -> int:
        raise NotImplementedError

    def shape(self, K: int) -> tuple[int, int, int]:
        """(rows per tile, block_k, warps) for a last dimension of ``K``."""
        bk = self.block_k or self.default_block_k(K)
        return max(1, self.elems // bk), bk, self.warps


@dataclass(frozen=True)
class QuantTuning(_RowTiles):
    """Launch shape of the quantize kernel (2048 elements, 4 warps; block_k 64 for K <= 64,
    else 128). With 16-bit inputs the default puts one block of 16 (two 8-element halves) on a
    thread."""

    def default_block_k(self, K: int) -> int:
        return 64 if K <= 64 else 128


@dataclass(frozen=True)
class DequantTuning(_RowTiles):
    """Launch shape of the generic dequantize kernel (8192 elements, 8 warps; block_k the next
    power of two >= K, at most 512)."""

    elems: int = 8192
    warps: int = 8

    def default_block_k(self, K: int) -> int:
        return min(512, _next_pow2(K))


@dataclass(frozen=True)
class KVDequantTuning:
    """Launch shape of the KV-cache dequantize kernel: ``block_t`` tokens of one (batch, head)."""

    block_t: int | None = None   # None: 2048 elements per program
    warps: int = 4

    def __post_init__(self) -> None:
        _check_pow2("KVDequantTuning", block_t=self.block_t, warps=self.warps)

    def shape(self, D: int) -> tuple[int, int]:
        """(tokens per program, warps) for a head dim of ``D``."""
        return self.block_t or max(1, 2048 // D), self.warps


def available() -> bool:
    return _HAVE_TRITON


def supports(x: torch.Tensor, *, tile_2d: bool = False, stochastic: bool = False) -> bool:
    """True where :func:`quantize` applies: Triton, a CUDA tensor of bf16/fp16/fp32, 1x16 blocks,
    round-to-nearest."""
    return (_HAVE_TRITON and isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in _DTYPES
            and not tile_2d and not stochastic)


def _need_triton() -> None:
    if not _HAVE_TRITON:
        raise QuantFormatError("NVFP4 Triton kernels: triton is not importable on this machine")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dev_ok(t: torch.Tensor) -> bool:
    """CUDA tensors; CPU tensors too under the Triton interpreter (local testing only)."""
    return t.is_cuda or _interpret()


def _launch_opts() -> dict:
    # The interpreter (TRITON_INTERPRET=1, local testing) takes no compile options.
    return {} if _interpret() else {"enable_fp_fusion": False}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------- host wrappers

def _rows_gd(gd: torch.Tensor, lead: tuple, device) -> torch.Tensor:
    """A per-row-group decode factor expanded to one float32 per row (flattened lead dims)."""
    return gd.to(device=device, dtype=torch.float32).expand(*lead, 1).reshape(-1).contiguous()


def quantize(x: torch.Tensor, rule: str | ScaleRule = "static_6", *,
             amax: torch.Tensor | None = None, tuning: QuantTuning = QuantTuning()) -> NVFP4Tensor:
    """NVFP4-quantize ``x [..., K]`` (1x16 blocks, round-to-nearest); bit-identical to
    ``impl.quant.nvfp4.quantize(..., backend="torch")``. ``amax``: scalar, or broadcastable to
    ``[..., 1]``. ``tuning``: the launch shape (any valid one gives the same bits)."""
    _need_triton()
    r = get_rule(rule)
    check_input(x)
    if x.dtype not in _DTYPES or not _dev_ok(x):
        raise QuantFormatError(f"NVFP4 Triton quantize: needs a CUDA tensor of {_DTYPES}, "
                               f"got {x.dtype} on {x.device}")
    x = x.detach()
    if amax is None:
        if x.numel() == 0:
            amax = x.abs().amax()            # raises like the torch path
        mn, mx = torch.aminmax(x)
        amax = torch.maximum(mn.abs(), mx.abs()).float()
    check_amax(amax, x)
    gd = global_decode_scale(amax.float(), r)
    return _quantize_launch(x, r, gd, tuning)


def _quantize_launch(x: torch.Tensor, r: ScaleRule, gd: torch.Tensor, tuning: QuantTuning) -> NVFP4Tensor:
    K = x.shape[-1]
    lead = tuple(x.shape[:-1])
    xc = x.contiguous().view(-1, K)
    R = xc.shape[0]
    packed = torch.empty((*lead, K // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*lead, K // GROUP), dtype=torch.float8_e4m3fn, device=x.device)
    if gd.dim() == 0:
        gd_arg, per_row = gd.to(device=x.device, dtype=torch.float32).reshape(1), False
    else:
        gd_arg, per_row = _rows_gd(gd, lead, x.device), True
    err = _ERR_CODE[r.error]
    qb0 = float(r.candidates[0])
    qb1 = float(r.candidates[1]) if len(r.candidates) > 1 else qb0
    if R > 0:
        br, bk, nw = tuning.shape(K)
        grid = (triton.cdiv(R, br), triton.cdiv(K, bk))
        kernel = _nvfp4_quant_kernel if xc.element_size() == 2 else _nvfp4_quant_kernel_2d
        kernel[grid](xc, gd_arg, packed.view(-1, K // 2),
                     scales.view(torch.uint8).view(-1, K // GROUP), R, K,
                     GD_PER_ROW=per_row, ERR=err, QB0=qb0, QB1=qb1,
                     BLOCK_R=br, BLOCK_K=bk, num_warps=nw, **_launch_opts())
    return NVFP4Tensor(packed, scales, gd.float(), r.name)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16, *, with_global: bool = True,
               out: torch.Tensor | None = None, tuning: DequantTuning = DequantTuning()) -> torch.Tensor:
    """``(code * s) * gd`` in float32, cast to ``dtype``: bit-identical to the PyTorch path of
    ``impl.quant.nvfp4.dequantize``. ``out``: optional preallocated result of ``t.shape``."""
    _need_triton()
    packed, scales = t.packed, t.scales
    if packed.dtype != torch.uint8 or scales.dtype != torch.float8_e4m3fn or not _dev_ok(packed):
        raise QuantFormatError("NVFP4 Triton dequantize: needs CUDA uint8 packed and float8_e4m3fn scales")
    if dtype not in _DTYPES:
        raise QuantFormatError(f"NVFP4 Triton dequantize: dtype must be one of {_DTYPES}, got {dtype}")
    shape = t.shape
    K = shape[-1]
    lead = tuple(shape[:-1])
    if tuple(scales.shape) != (*lead, K // GROUP):
        raise QuantFormatError(f"NVFP4 Triton dequantize: scales {tuple(scales.shape)} do not match "
                               f"packed {tuple(packed.shape)}")
    if out is not None:
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != packed.device:
            raise QuantFormatError(f"NVFP4 Triton dequantize: out must be {dtype} of shape {tuple(shape)}")
    dst = out if (out is not None and out.is_contiguous()) else torch.empty(shape, dtype=dtype, device=packed.device)
    R = packed.numel() // max(1, K // 2)
    gd = t.global_scale
    if not with_global:
        mode, gd_arg = 0, torch.ones(1, dtype=torch.float32, device=packed.device)
    elif gd.numel() == 1:
        mode, gd_arg = 1, gd.to(device=packed.device, dtype=torch.float32).reshape(1)
    else:
        mode, gd_arg = 2, _rows_gd(gd, lead, packed.device)
    if R > 0 and K > 0:
        br, bk, nw = tuning.shape(K)
        grid = (triton.cdiv(R, br), triton.cdiv(K, bk))
        _nvfp4_dequant_kernel[grid](packed.contiguous().view(-1, K // 2),
                                    scales.contiguous().view(torch.uint8).view(-1, K // GROUP),
                                    gd_arg, dst.view(-1, K), R, K, GD_MODE=mode, BLOCK_R=br,
                                    BLOCK_K=bk, num_warps=nw, **_launch_opts())
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


def dequantize_kv(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, gd: torch.Tensor,
                  tokens_per_block: int, *, tuning: KVDequantTuning = KVDequantTuning()) -> torch.Tensor:
    """Decode an NVFP4 KV cache into ``out``.

    packed uint8 [B, H, T, D/2], scales float8_e4m3fn [B, H, T, D/16] (strided views allowed; the
    last dim contiguous), gd float32 [B, num_slots] (token t uses ``gd[b, t // tokens_per_block]``),
    out [B, H, T, D] (bf16/fp16/fp32, may be a strided view). Value ``(code * s) * gd`` in float32.
    """
    _need_triton()
    B, H, T, D2 = packed.shape
    D = 2 * D2
    if tuple(scales.shape) != (B, H, T, D // GROUP) or tuple(out.shape) != (B, H, T, D):
        raise QuantFormatError(f"NVFP4 dequantize_kv: shapes packed {tuple(packed.shape)}, scales "
                               f"{tuple(scales.shape)}, out {tuple(out.shape)} do not agree")
    if packed.dtype != torch.uint8 or scales.dtype != torch.float8_e4m3fn or out.dtype not in _DTYPES:
        raise QuantFormatError("NVFP4 dequantize_kv: packed uint8, scales float8_e4m3fn, out bf16/fp16/fp32")
    if gd.dim() != 2 or gd.shape[0] != B:
        raise QuantFormatError(f"NVFP4 dequantize_kv: gd must be [B, num_slots], got {tuple(gd.shape)}")
    if B * H * T == 0:
        return out
    nb = D // GROUP
    if nb & (nb - 1) or packed.stride(-1) != 1 or scales.stride(-1) != 1 or out.stride(-1) != 1:
        # unusual head dims or layouts: the same arithmetic in torch
        mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
        vals = torch.cat([mags, -mags])[unpack_codes(packed).long()]
        vals = vals.unflatten(-1, (-1, GROUP)) * scales.float().unsqueeze(-1)
        slot = torch.arange(T, device=packed.device) // tokens_per_block
        g = gd.float()[:, slot][:, None, :, None, None]
        out.copy_((vals * g).flatten(-2))
        return out
    gd32 = gd if gd.dtype == torch.float32 else gd.float()
    bt, nw = tuning.shape(D)
    grid = (triton.cdiv(T, bt), B * H)
    _nvfp4_dequant_kv_kernel[grid](packed, scales.view(torch.uint8), gd32, out, H, T, int(tokens_per_block),
                                   packed.stride(0), packed.stride(1), packed.stride(2),
                                   scales.stride(0), scales.stride(1), scales.stride(2),
                                   out.stride(0), out.stride(1), out.stride(2),
                                   gd32.stride(0), gd32.stride(1),
                                   D=D, BLOCK_T=bt, num_warps=nw, **_launch_opts())
    return out


def weight_only_matmul(x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None, *,
                       config: dict | None = None) -> torch.Tensor:
    """``y = x @ dequant(w)^T (+ bias)``: x bf16/fp16 [..., K], w NVFP4 [N, K] with a scalar
    global scale. W tiles are decoded in registers in the GEMM's main loop (``code * s * 2^-8``,
    exact in bf16/fp16), the fp32 accumulator is multiplied by ``2^8 * gd`` in the epilogue. ``config``: fixed tile config
    (``BLOCK_M/N/K``, ``GROUP_M``, ``num_warps``, ``num_stages``) instead of autotuning."""
    _need_triton()
    if x.dtype not in (torch.bfloat16, torch.float16) or not _dev_ok(x):
        raise QuantFormatError(f"NVFP4 weight_only_matmul: x must be CUDA bf16/fp16, got {x.dtype}")
    N, K = w.shape[0], w.shape[-1]
    if len(w.shape) != 2 or x.shape[-1] != K:
        raise QuantFormatError(f"NVFP4 weight_only_matmul: x {tuple(x.shape)} and w {tuple(w.shape)} "
                               f"do not agree")
    if w.global_scale.numel() != 1:
        raise QuantFormatError("NVFP4 weight_only_matmul: w needs a scalar global scale")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*lead, N)
    gd = w.global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
    wp = w.packed.contiguous()
    ws = w.scales.contiguous().view(torch.uint8)
    b = bias.contiguous() if bias is not None else gd
    mb = min(8192, max(16, _next_pow2(M)))
    args = (x2, wp, ws, gd, b, y, M, N, K, x2.stride(0), y.stride(0), mb)
    if config is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _wo_mm_tuned[grid](*args, HAS_BIAS=bias is not None)
    else:
        cfg = dict(config)
        nw, ns = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        extra = {} if _interpret() else {"num_warps": nw, "num_stages": ns}
        _wo_mm_kernel[grid](*args, HAS_BIAS=bias is not None, EVEN_K=K % cfg["BLOCK_K"] == 0,
                            **cfg, **extra)
    return y.view(*lead, N)
