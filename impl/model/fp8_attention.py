"""FP8 attention forward in Triton: FlashAttention-style online softmax on e4m3 tensor cores.

Non-causal, unmasked attention over the KV cache's resident keys, as the streaming forward
needs: q [B, H, M, D] attends k, v [B, H, N, D] (M = a block's tokens, N = every resident
block's). Scaling (see :mod:`impl.model.attention_backends`): Q, K, V are quantized to e4m3
with one amax scale per (batch, head); S = Q K^T is formed in float32 and rescaled; the
probabilities of each key tile, exp2 against the running row max (so in [0, 1]), are
quantized as e4m3(448 P) for the P V product; the output is divided by the row sum (from the
unquantized P) and by the scales in float32.

V is quantized into a [B, H, D, N] layout (keys contiguous), the operand order FP8 tensor
cores want for P V (both operands of an FP8 wgmma must be contiguous along the reduction).
"""

from __future__ import annotations

import math

import torch

from impl.model.fp8_scaling import FP8_MAX, fp8_scales, to_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: check_backend() says what is missing before this is used
    triton = None

_LOG2E = 1.4426950408889634

if triton is not None:
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 4), (64, 128, 4, 3))]

    @triton.autotune(configs=_CONFIGS, key=["N_CTX_K", "HEAD_DIM"])
    @triton.jit
    def _fp8_attn_fwd(Q, K, VT, O, QK_SCALE, O_SCALE,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vd, stride_ob, stride_oh, stride_om,
                      H, N_CTX_Q, N_CTX_K,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m[:, None] < N_CTX_Q
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok, other=0.0)
        qk_scale = tl.load(QK_SCALE + pid_bh)       # sm_scale * log2(e) / (q_scale * k_scale)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = VT + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start in range(0, N_CTX_K, BLOCK_N):
            n = start + offs_n
            key_ok = n < N_CTX_K
            kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=key_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_d[None, :] * stride_vd + n[:, None], mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, kt) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)
            m_i = m_new
        o = acc / l_i[:, None] * tl.load(O_SCALE + pid_bh)    # 1 / (448 * v_scale)
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q8, k8, v8 in [B, H, D, N], qk_scale [B H], o_scale [B H]) for :func:`fp8_attention_quantized`."""
    sq, sk, sv = fp8_scales(q), fp8_scales(k), fp8_scales(v)
    q8, k8 = to_fp8(q, sq).contiguous(), to_fp8(k, sk).contiguous()
    vt8 = to_fp8(v.transpose(-1, -2), sv).contiguous()
    qk_scale = (_LOG2E / math.sqrt(q.shape[-1]) / (sq * sk)).reshape(-1).contiguous()
    o_scale = (1.0 / (FP8_MAX * sv)).reshape(-1).contiguous()
    return q8, k8, vt8, qk_scale, o_scale


def fp8_attention_quantized(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qk_scale: torch.Tensor,
                            o_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The kernel on already quantized operands (e4m3; ``vt8`` is V^T [B, H, D, N])."""
    b, h, m, d = q8.shape
    n = k8.shape[2]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"fp8_attention: head_dim must be a power of two in [16, 256], got {d}")
    o = torch.empty((b, h, m, d), dtype=out_dtype, device=q8.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), b * h)  # noqa: E731
    _fp8_attn_fwd[grid](q8, k8, vt8, o, qk_scale, o_scale,
                        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
                        vt8.stride(0), vt8.stride(1), vt8.stride(2), o.stride(0), o.stride(1), o.stride(2),
                        h, m, n, HEAD_DIM=d)
    return o


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with FP8 operands; q [B, H, M, D], k, v [B, H, N, D]."""
    return fp8_attention_quantized(*quantize_qkv(q, k, v), out_dtype=q.dtype)
