"""The Triton NVFP4 decode kernels, device code only: the dequantizer (``(code * s) * gd`` in
float32, any row layout), the KV-cache dequantizer (strided [B, H, T, D] views, one decode
factor per cache slot) and the weight-only GEMM (W tiles decoded in registers in the main
loop, autotuned). :mod:`impl.quant.triton_nvfp4` launches them and imports this module only
where Triton is importable.
"""

from __future__ import annotations

import triton
import triton.language as tl

from impl.quant.triton_nvfp4_quantize import _row_tile


# ------------------------------------------------------------------ code decoding

@triton.jit
def _decode_e4m3(b):
    """E4M3 (fn) byte as int32 -> float32 value."""
    ex = (b >> 3) & 15
    man = b & 7
    normal = (((ex + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.001953125
    v = tl.where(ex == 0, sub, normal)
    v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    return tl.where((b & 0x80) != 0, -v, v)


@triton.jit
def _decode_e2m1(code):
    """4-bit code (int32, sign in bit 3) -> float32 value (sign kept for zero)."""
    c = code & 7
    mag = tl.where(c >= 2, 0x3F000000 + (c << 22), tl.where(c == 1, 0x3F000000, 0))
    return (mag | ((code & 8) << 28)).to(tl.float32, bitcast=True)


# ------------------------------------------------------------------ dequantize

@triton.jit(do_not_specialize=["R"])
def _nvfp4_dequant_kernel(p_ptr, s_ptr, gd_ptr, out_ptr, R, K,
                          GD_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    NB: tl.constexpr = BLOCK_K // 16
    pid_k = tl.program_id(1)
    rows64, rmask = _row_tile(R, BLOCK_R)
    K2 = K // 2
    KB = K // 16
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    p = tl.load(p_ptr + rows64[:, None] * K2 + pcols[None, :],
                mask=rmask[:, None] & (pcols < K2)[None, :], other=0).to(tl.int32)
    scols = pid_k * NB + tl.arange(0, NB)
    sb = tl.load(s_ptr + rows64[:, None] * KB + scols[None, :],
                 mask=rmask[:, None] & (scols < KB)[None, :], other=0).to(tl.int32)
    code = tl.reshape(tl.join(p & 15, p >> 4), [BLOCK_R, NB, 16])
    v = _decode_e2m1(code) * _decode_e4m3(sb)[:, :, None]
    if GD_MODE == 1:
        v = v * tl.load(gd_ptr)
    elif GD_MODE == 2:
        v = v * tl.load(gd_ptr + rows64, mask=rmask, other=0.0)[:, None, None]
    v = tl.reshape(v, [BLOCK_R, BLOCK_K]).to(out_ptr.dtype.element_ty)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], v,
             mask=rmask[:, None] & (cols < K)[None, :])


@triton.jit(do_not_specialize=["H", "T", "TPB"])
def _nvfp4_dequant_kv_kernel(p_ptr, s_ptr, gd_ptr, out_ptr, H, T, TPB,
                             psb, psh, pst, ssb, ssh, sst, osb, osh, ost, gsb, gss,
                             D: tl.constexpr, BLOCK_T: tl.constexpr):
    NB: tl.constexpr = D // 16
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    t64 = t.to(tl.int64)
    j2 = tl.arange(0, D // 2)
    p = tl.load(p_ptr + b * psb + h * psh + t64[:, None] * pst + j2[None, :],
                mask=tmask[:, None], other=0).to(tl.int32)
    jb = tl.arange(0, NB)
    sb = tl.load(s_ptr + b * ssb + h * ssh + t64[:, None] * sst + jb[None, :],
                 mask=tmask[:, None], other=0).to(tl.int32)
    gd = tl.load(gd_ptr + b * gsb + (t // TPB).to(tl.int64) * gss, mask=tmask, other=0.0)
    code = tl.reshape(tl.join(p & 15, p >> 4), [BLOCK_T, NB, 16])
    v = (_decode_e2m1(code) * _decode_e4m3(sb)[:, :, None]) * gd[:, None, None]
    v = tl.reshape(v, [BLOCK_T, D]).to(out_ptr.dtype.element_ty)
    j = tl.arange(0, D)
    tl.store(out_ptr + b * osb + h * osh + t64[:, None] * ost + j[None, :], v,
             mask=tmask[:, None])


# ------------------------------------------------------------------ weight-only GEMM

@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _wo_mm_kernel(x_ptr, wp_ptr, ws_ptr, gd_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                  M_BUCKET, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rk = tl.arange(0, BLOCK_K)
    rk2 = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 16)
    K2 = K // 2
    KB = K // 16
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    wp_ptrs = wp_ptr + rn.to(tl.int64)[:, None] * K2 + rk2[None, :]
    ws_ptrs = ws_ptr + rn.to(tl.int64)[:, None] * KB + rks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
            p = tl.load(wp_ptrs, mask=nmask[:, None], other=0).to(tl.int32)
            sb = tl.load(ws_ptrs, mask=nmask[:, None], other=0).to(tl.int32)
        else:
            a = tl.load(x_ptrs, mask=mmask[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            p = tl.load(wp_ptrs, mask=nmask[:, None] & ((k0 // 2 + rk2) < K2)[None, :],
                        other=0).to(tl.int32)
            sb = tl.load(ws_ptrs, mask=nmask[:, None] & ((k0 // 16 + rks) < KB)[None, :],
                         other=0).to(tl.int32)
        code = tl.reshape(tl.join(p & 15, p >> 4), [BLOCK_N, BLOCK_K // 16, 16])
        # E2M1 value * 2^-126 straight from the code bits (subnormal for code 1), times
        # s * 2^118: code * s * 2^-8, exact in bf16/fp16; the 2^8 goes back in the epilogue.
        e = (((code & 7) << 22) | ((code & 8) << 28)).to(tl.float32, bitcast=True)
        sw = _decode_e4m3(sb) * 3.3230699894622897e+35                # 2^118
        w = tl.reshape(e * sw[:, :, None], [BLOCK_N, BLOCK_K]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        wp_ptrs += BLOCK_K // 2
        ws_ptrs += BLOCK_K // 16
    acc = (acc * 256.0) * tl.load(gd_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y,
             mask=mmask[:, None] & nmask[None, :])


def _mm_configs():
    C = triton.Config
    big = [
        C({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        C({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        C({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        C({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        C({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]
    small = [
        C({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        C({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        C({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=4),
        C({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=3),
    ]
    return big + small


def _prune_mm(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= 64) == (mb <= 64)]
    return keep or configs


_wo_mm_tuned = triton.autotune(
    configs=_mm_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_mm},
)(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_wo_mm_kernel))
