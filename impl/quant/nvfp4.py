"""The NVFP4 number format: quantize, pack, dequantize (vectorized PyTorch, any device).

Format (docs/nvfp4.md has the derivations):
- elements: FP4 E2M1, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}; code = sign*8 + magnitude index;
  two codes per byte, the even element in the low nibble;
- one FP8 E4M3 block scale ``s`` per 16 contiguous elements of the last dimension (or per
  16x16 tile of a matrix with ``tile_2d``);
- one FP32 decode factor per tensor ``gd = fp32(amax / (Qt * M))`` (``amax`` = max |x| over
  the tensor, or given per row group); a value decodes as ``code * s * gd``.

Every rounding is defined on exact real values, so any correct implementation gives the same
bits (the float64 reference in ``nvfp4_reference.py`` and the Triton kernels agree with this
file bit for bit; tests check it):
- ``s = RN_e4m3_satfinite(bmax / (Qb * gd))`` where ``bmax`` is the block's max |x| and ``Qb``
  the E2M1 value the block max is mapped to (6, or 4 for the 4/6 candidate);
- ``code = RN_e2m1_satfinite(|x| / (s * gd))``, ties to even, sign = IEEE sign bit of x;
  ``s == 0`` or ``gd == 0`` gives code 0;
- 4-over-6 rules pick, per block, the candidate (Qb = 6 or 4) with the smaller block error
  (sum of squared / sum of absolute / max absolute error of the decoded values), ties to 6.
  The errors are exact per element in float64 and summed in a fixed pairwise tree (a
  transpose-symmetric quad tree for 16x16 tiles), so every backend sums in the same order.

Layering: :mod:`impl.quant.nvfp4_format` holds the format's shared names (block size, packing,
scale rules, the :class:`NVFP4Tensor` container, input checks); :mod:`impl.quant.triton_nvfp4`
builds on it alone; this module builds on both and dispatches to Triton on CUDA.
"""

from __future__ import annotations

import functools

import torch

from impl.quant import triton_nvfp4
from impl.quant.nvfp4_format import (E2M1_VALUES, GROUP, SCALE_RULES, NVFP4Tensor, QuantFormatError,
                                     ScaleRule, check_amax, check_input, get_rule, global_decode_scale,
                                     pack_codes, unpack_codes)

# The format's names are re-exported: callers import them from here.
__all__ = ["E2M1_MIDPOINTS", "E2M1_VALUES", "E4M3_MAX", "GROUP", "SCALE_RULES", "NVFP4Tensor",
           "QuantFormatError", "ScaleRule", "dequantize", "dequantize_kv", "e2m1_magnitude_code",
           "e2m1_stochastic_code", "get_rule", "global_decode_scale", "pack_codes", "pairwise_sum16",
           "quadtree_sum16x16", "quantize", "round_to_e4m3", "sqnr_db", "unpack_codes"]

E4M3_MAX = 448.0
# Midpoints between neighbouring E2M1 magnitudes, and whether a tie rounds up (to the even code).
E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                  (3.5, True), (5.0, False))


@functools.lru_cache(maxsize=None)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant table on ``device``, built once per (values, dtype, device): a fresh
    ``torch.tensor(..., device="cuda")`` is a blocking host-to-device copy, i.e. a stream
    synchronisation inside every quantize call. Read-only by convention."""
    return torch.tensor(values, dtype=dtype, device=device)


# ---- rounding helpers (float64, exact) ----

def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round non-negative float64 values to the nearest E4M3 value, ties to even, saturating."""
    _, exp = torch.frexp(v)
    # floor(log2 v) = exp - 1; subnormals (below 2^-6) share the 2^-9 spacing.
    step = torch.ldexp(torch.ones_like(v), (exp - 1).clamp(min=-6) - 3)
    return (torch.round(v / step) * step).clamp(max=E4M3_MAX)  # v/step is exact (power of 2)


def e2m1_magnitude_code(r: torch.Tensor) -> torch.Tensor:
    """Index (0..7) of RN-even-satfinite E2M1(r) for non-negative float64 ratios ``r``."""
    code = torch.zeros(r.shape, dtype=torch.uint8, device=r.device)
    for mid, tie_up in E2M1_MIDPOINTS:
        code += ((r >= mid) if tie_up else (r > mid)).to(torch.uint8)
    return code


def e2m1_stochastic_code(r: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding: round up with probability (r - lo) / (hi - lo); saturating at 6."""
    grid = _constant(E2M1_VALUES, torch.float64, r.device)
    lo = (torch.searchsorted(grid, r.contiguous(), right=True) - 1).clamp(max=7)
    hi = (lo + 1).clamp(max=7)
    g_lo, g_hi = grid[lo], grid[hi]
    span = torch.where(hi > lo, g_hi - g_lo, torch.ones_like(g_lo))
    up = (hi > lo) & (uniform < (r - g_lo) / span)
    return (lo + up.long()).to(torch.uint8)


def pairwise_sum16(e: torch.Tensor) -> torch.Tensor:
    """Sum the last dim (16) in a fixed pairwise tree: ((e0+e1)+(e2+e3))+..."""
    while e.shape[-1] > 1:
        e = e[..., 0::2] + e[..., 1::2]
    return e[..., 0]


def quadtree_sum16x16(e: torch.Tensor) -> torch.Tensor:
    """Sum [..., 16, 16] tiles in a transpose-symmetric tree: each 2x2 as (a00+a11)+(a01+a10)."""
    while e.shape[-1] > 1:
        e = (e[..., 0::2, 0::2] + e[..., 1::2, 1::2]) + (e[..., 0::2, 1::2] + e[..., 1::2, 0::2])
    return e[..., 0, 0]


# ---- quantize / dequantize ----

def quantize(x: torch.Tensor, rule: str | ScaleRule = "static_6", *, amax: torch.Tensor | None = None,
             tile_2d: bool = False, uniform: torch.Tensor | None = None,
             backend: str = "auto") -> NVFP4Tensor:
    """Quantize ``x [..., K]`` along its last dimension.

    amax: the tensor scale's max |x|; default over the whole tensor. A tensor broadcastable to
      ``[..., 1]`` gives one decode factor per row group (e.g. per KV-cache slot).
    tile_2d: one scale per 16x16 tile of a 2-D matrix (so ``x`` and ``x.T`` quantize alike).
    uniform: float64 U[0, 1) of x's shape for stochastic rounding of the elements (the block
      scale is still chosen with round-to-nearest).
    backend: "torch", "triton" (CUDA; 1x16, round-to-nearest) or "auto" (Triton when it applies).
    """
    r = get_rule(rule)
    check_input(x, tile_2d=tile_2d)
    if backend not in ("auto", "torch", "triton"):
        raise QuantFormatError(f"NVFP4 quantize: backend must be auto|torch|triton, got {backend!r}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        usable = triton_nvfp4.supports(x, tile_2d=tile_2d, stochastic=uniform is not None)
        if backend == "triton" and not usable:
            raise QuantFormatError("NVFP4 quantize: the Triton backend needs a CUDA tensor, Triton, "
                                   "1x16 blocks and round-to-nearest")
        if usable:
            return triton_nvfp4.quantize(x, r, amax=amax)
    return _quantize_torch(x, r, amax=amax, tile_2d=tile_2d, uniform=uniform)


# The PyTorch path computes in float64 with several full-size temporaries; above this many
# elements it quantizes row chunks under the whole tensor's amax (bit-identical: every block
# depends only on its own values and the tensor scale), so a training-size activation
# gradient needs a few GB less, not tens of GB more.
_CHUNK_ELEMENTS = 1 << 24


def _quantize_torch(x: torch.Tensor, r: ScaleRule, *, amax: torch.Tensor | None, tile_2d: bool,
                    uniform: torch.Tensor | None) -> NVFP4Tensor:
    if amax is None:
        amax = x.detach().abs().amax().float()
    check_amax(amax, x, tile_2d=tile_2d)
    k = x.shape[-1]
    rows = x.numel() // k
    chunk_rows = max(GROUP, _CHUNK_ELEMENTS // k // GROUP * GROUP)
    if amax.dim() > 0 or rows <= chunk_rows:
        return _quantize_rows(x, r, amax=amax, tile_2d=tile_2d, uniform=uniform)
    if uniform is not None and uniform.shape != x.shape:
        raise QuantFormatError(f"NVFP4 quantize: uniform must have x's shape {tuple(x.shape)}, "
                               f"got {tuple(uniform.shape)}")
    x2 = x.reshape(rows, k)
    u2 = None if uniform is None else uniform.reshape(rows, k)
    parts = [_quantize_rows(x2[i:i + chunk_rows], r, amax=amax, tile_2d=tile_2d,
                            uniform=None if u2 is None else u2[i:i + chunk_rows])
             for i in range(0, rows, chunk_rows)]
    lead = x.shape[:-1]
    return NVFP4Tensor(torch.cat([p.packed for p in parts]).reshape(*lead, k // 2),
                       torch.cat([p.scales for p in parts]).reshape(*lead, k // GROUP),
                       parts[0].global_scale, r.name)


def _quantize_rows(x: torch.Tensor, r: ScaleRule, *, amax: torch.Tensor, tile_2d: bool,
                   uniform: torch.Tensor | None) -> NVFP4Tensor:
    amax = amax.float()
    gd = global_decode_scale(amax, r)                              # fp32, broadcastable
    xd = x.detach().double()
    blocks = xd.unflatten(-1, (-1, GROUP))                         # [..., K/16, 16]
    gd_b = gd.double()
    if gd_b.dim() > 0:
        gd_b = gd_b.unsqueeze(-1)                                  # per row group -> [..., 1, 1]
    if tile_2d:
        tiles = xd.unflatten(0, (-1, GROUP)).unflatten(-1, (-1, GROUP)).transpose(1, 2)  # [R/16, C/16, 16, 16]
        bmax = tiles.abs().amax(dim=(-1, -2))                      # [R/16, C/16]
        bmax = bmax.repeat_interleave(GROUP, dim=0)                # [R, C/16]
    else:
        bmax = blocks.abs().amax(dim=-1)                           # [..., K/16]
    gd_s = gd_b.squeeze(-1) if gd_b.dim() > 0 else gd_b
    best_s, best_code, best_err = None, None, None
    for qb in r.candidates:
        s = torch.where(gd_s > 0, round_to_e4m3(bmax / (qb * gd_s)), torch.zeros_like(bmax))
        step = (s.unsqueeze(-1) * gd_b)                            # exact product in float64
        ratio = torch.where(step > 0, blocks.abs() / step, torch.zeros_like(blocks))
        code = e2m1_magnitude_code(ratio)
        if r.error is not None:
            err = _block_error(blocks, code, s, gd_b, r.error, tile_2d)
            if best_err is None:
                best_s, best_code, best_err = s, code, err
            else:
                better = err < best_err                            # strict: ties keep Qb = 6
                best_s = torch.where(better, s, best_s)
                best_code = torch.where(better.unsqueeze(-1), code, best_code)
                best_err = torch.where(better, err, best_err)
        else:
            best_s, best_code = s, code
    if uniform is not None:
        if uniform.shape != x.shape:
            raise QuantFormatError(f"NVFP4 quantize: uniform must have x's shape {tuple(x.shape)}, "
                                   f"got {tuple(uniform.shape)}")
        step = best_s.unsqueeze(-1) * gd_b
        ratio = torch.where(step > 0, blocks.abs() / step, torch.zeros_like(blocks))
        best_code = e2m1_stochastic_code(ratio, uniform.double().unflatten(-1, (-1, GROUP)).to(x.device))
    sign = torch.signbit(blocks).to(torch.uint8) << 3
    codes = (best_code | sign).flatten(-2)
    return NVFP4Tensor(pack_codes(codes), best_s.float().to(torch.float8_e4m3fn), gd.float(), r.name)


def _block_error(blocks: torch.Tensor, code: torch.Tensor, s: torch.Tensor, gd_b: torch.Tensor,
                 kind: str, tile_2d: bool) -> torch.Tensor:
    """Per-block (or per-tile, repeated over its rows) error of the decoded values, in float64."""
    mag = _constant(E2M1_VALUES, torch.float64, blocks.device)[code.long()]
    # (mag * s) has <= 6 significant bits, times gd (24 bits): exact, and so is the difference.
    e = blocks.abs() - (mag * s.unsqueeze(-1)) * gd_b
    e = e * e if kind == "mse" else e.abs()
    if tile_2d:
        tiles = e.unflatten(0, (-1, GROUP)).transpose(1, 2)        # [R/16, C/16, 16 rows, 16 cols]
        err = tiles.abs().amax(dim=(-1, -2)) if kind == "abs_max" else quadtree_sum16x16(tiles)
        return err.repeat_interleave(GROUP, dim=0)
    return e.amax(dim=-1) if kind == "abs_max" else pairwise_sum16(e)


def _code_values(device: torch.device) -> torch.Tensor:
    mags = _constant(E2M1_VALUES, torch.float32, torch.device(device))
    return torch.cat([mags, -mags])


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32, *, with_global: bool = True) -> torch.Tensor:
    """Decode to ``dtype``. ``code * s`` is exact in bf16; the global factor is applied in fp32.

    On CUDA the Triton kernel does it (bit-identical, about 20x the bandwidth of these ops)."""
    if t.packed.is_cuda and dtype in (torch.bfloat16, torch.float16, torch.float32):
        if triton_nvfp4.available():
            return triton_nvfp4.dequantize(t, dtype, with_global=with_global)
    vals = _code_values(t.packed.device)[unpack_codes(t.packed).long()]  # [..., K] fp32
    vals = vals.unflatten(-1, (-1, GROUP)) * t.scales.float().unsqueeze(-1)
    if with_global:
        gd = t.global_scale
        vals = vals * (gd.unsqueeze(-1) if gd.dim() > 0 else gd)
    return vals.flatten(-2).to(dtype)


def dequantize_kv(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, gd: torch.Tensor,
                  tokens_per_block: int) -> None:
    """Decode a KV cache's tokens [0, T) into ``out`` [B, H, T, D]; packed [B, H, T, D/2] and
    scales [B, H, T, D/16] (strided views allowed), gd [B, slots]: token t uses gd[b, t // tpb].
    On CUDA one Triton kernel does it; elsewhere :func:`dequantize` with per-token scales."""
    if out.is_cuda:
        triton_nvfp4.dequantize_kv(out, packed, scales, gd, tokens_per_block)
        return
    per_token = gd.repeat_interleave(tokens_per_block, dim=1)[:, None, :packed.shape[2], None]  # [B, 1, T, 1]
    out.copy_(dequantize(NVFP4Tensor(packed, scales, per_token, ""), out.dtype))


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    x, xq = x.double(), xq.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - xq).pow(2).sum()))
