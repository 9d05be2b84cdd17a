"""GPU tests of the Triton NVFP4 kernels (impl/quant/triton_nvfp4.py).

The quantizer must equal the PyTorch path (``nvfp4.quantize(..., backend="torch")``) bit for bit
(packed bytes, scales, global scale) for every rule, per-tensor and per-row-group amax; the dequantizers must equal the
torch expressions bit for bit; the weight-only GEMM is checked against an fp32 matmul.
Data is built to hit the hard cases on purpose: exact E2M1 midpoints, exact E4M3 midpoints,
4-over-6 error ties, blocks far below the tensor amax, exact zeros and -0.0, outliers, tiny
(subnormal) inputs, saturation (amax below the data), amax = 0 row groups.
Outputs are poisoned (NaN / 0xFF) before the kernels run, to catch elements left unwritten.
"""

from __future__ import annotations

import os

import pytest
import torch

from impl.quant import nvfp4 as Q
from impl.quant import triton_nvfp4 as T
from impl.quant.nvfp4_reference import e4m3_table

pytestmark = pytest.mark.gpu

# Local debugging only: NVFP4_TRITON_TEST_DEVICE=cpu with TRITON_INTERPRET=1.
DEV = os.environ.get("NVFP4_TRITON_TEST_DEVICE", "cuda")
RULES = sorted(Q.SCALE_RULES)
E2M1_MIDS = torch.tensor([m for m, _ in Q.E2M1_MIDPOINTS], dtype=torch.float64)


@pytest.fixture(autouse=True)
def _need_triton():
    if not T.available():
        pytest.skip("triton is not importable")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poison_allocator() -> None:
    """Fill freed cached device memory with 0xFF so fresh torch.empty results start dirty."""
    if DEV == "cuda":
        junk = [torch.empty(n, dtype=torch.uint8, device=DEV).fill_(0xFF)
                for n in [64 << 20] + [1 << 19] * 8 + [1 << 12] * 64]
        del junk


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same(ref: Q.NVFP4Tensor, got: Q.NVFP4Tensor, what: str) -> None:
    assert got.packed.shape == ref.packed.shape and got.scales.shape == ref.scales.shape, what
    assert got.packed.dtype == torch.uint8 and got.scales.dtype == torch.float8_e4m3fn, what
    assert got.rule == ref.rule, what
    bad_p = (got.packed != ref.packed)
    bad_s = (_bits(got.scales) != _bits(ref.scales))
    assert not bad_p.any(), f"{what}: {int(bad_p.sum())} packed bytes differ, first at {bad_p.nonzero()[:4].tolist()}"
    assert not bad_s.any(), f"{what}: {int(bad_s.sum())} scales differ, first at {bad_s.nonzero()[:4].tolist()}"
    assert got.global_scale.shape == ref.global_scale.shape, what
    assert torch.equal(_bits(got.global_scale.float().cpu()), _bits(ref.global_scale.float().cpu())), what


def _check(x: torch.Tensor, rule: str, amax: torch.Tensor | None = None, what: str = "") -> Q.NVFP4Tensor:
    r = Q.get_rule(rule)
    ref = Q.quantize(x, r, amax=amax, backend="torch")
    _poison_allocator()
    got = T.quantize(x, r, amax=amax)
    _assert_same(ref, got, f"{what} rule={rule} dtype={x.dtype} shape={tuple(x.shape)}")
    return ref


# ---------------------------------------------------------------- data

def random_hard(shape, seed: int, dtype) -> torch.Tensor:
    """Normal data with per-block magnitudes over 2^-24..2^6 (blocks of tiny values next to
    large ones), exact zeros, -0.0 and a few 1000x outliers."""
    g = _gen(seed)
    K = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    e = torch.randint(-24, 7, (*shape[:-1], K // 16), generator=g).double()
    x = x * torch.exp2(e).repeat_interleave(16, -1)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    x[u < 0.08] = 0.0
    x[(u >= 0.08) & (u < 0.10)] = -0.0
    x[u > 0.995] *= 1000.0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype).to(DEV)


def tie_data(rows: int, K: int, seed: int, dtype, rule: str):
    """Blocks built on exact midpoints for a power-of-two decode factor gd = 2^k.

    kind 0: block max Qb*s (s an E4M3 value, Qb the rule's first candidate), elements m*s*gd for
      E2M1 values and midpoints m;
    kind 1: block max Qb*(s + s_next)/2: the block scale sits on an E4M3 midpoint;
    kind 2: block max 4*s and elements <= 3.5*s: the 4-candidate's midpoints;
    kind 3: s a power of two, elements in {0, 1.5, 3, 6}*s: both 4/6 candidates exact (error tie).
    A fifth of the elements are then nudged one ulp up or down. Returns (x, amax).
    """
    r = Q.get_rule(rule)
    g = _gen(seed)
    k = int(torch.randint(-8, 1, (1,), generator=g))
    gd = 2.0 ** k
    amax = torch.tensor(r.tensor_q * r.max_scale * gd, dtype=torch.float32)
    e4 = torch.from_numpy(e4m3_table()).double()
    pos = e4[(e4 >= 2.0 ** -6) & (e4 <= 64.0)]
    nb = K // 16
    idx = torch.randint(0, len(pos) - 1, (rows, nb), generator=g)
    s_t, s_next = pos[idx], pos[idx + 1]
    p2 = torch.exp2(torch.randint(-5, 6, (rows, nb), generator=g).double())
    kind = torch.randint(0, 4, (rows, nb), generator=g)
    mult = torch.tensor([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5], dtype=torch.float64)
    m = mult[torch.randint(0, len(mult), (rows, nb, 16), generator=g)]
    m = torch.where((kind == 2)[..., None], m.clamp(max=3.5), m)
    m3 = torch.tensor([0.0, 1.5, 3.0, 6.0], dtype=torch.float64)[torch.randint(0, 4, (rows, nb, 16), generator=g)]
    m = torch.where((kind == 3)[..., None], m3, m)
    q0 = r.candidates[0]
    m = torch.where((kind <= 1)[..., None], m.clamp(max=q0 - 0.5), m)     # keep the block max on top
    s = torch.where(kind == 3, p2, s_t)
    top = torch.where(kind == 1, q0 * (s_t + s_next) / 2,
                      torch.where(kind == 2, 4.0 * s_t, torch.where(kind == 3, 6.0 * p2, q0 * s_t)))
    x = m * s[..., None]
    where = torch.randint(0, 16, (rows, nb, 1), generator=g)
    x.scatter_(-1, where, top[..., None])
    x = x * gd
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
    x = (x * sign).reshape(rows, K)
    xd = x.to(dtype)
    assert torch.equal(xd.double(), x), "tie data must be exact in the dtype"
    # nudge: one ulp towards or away from zero (bit pattern +-1 on non-zero values)
    b = _bits(xd).clone()
    u = torch.rand(x.shape, generator=g)
    step = torch.where(u < 0.1, 1, torch.where(u < 0.2, -1, 0)).to(b.dtype)
    step = torch.where(xd == 0, torch.zeros_like(step), step)
    xd = (b + step).view(dtype)
    return xd.to(DEV), amax.to(DEV)


# ---------------------------------------------------------------- quantize

SHAPES = [((7, 48), 11), ((33, 128), 12), ((4, 6, 80), 13), ((65, 272), 14), ((2, 3, 5, 64), 15), ((1, 16), 16)]


@pytest.mark.parametrize("amax_mode", ["tensor", "row", "group"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rule", RULES)
def test_quantize_random_bit_exact(rule, dtype, amax_mode):
    if dtype == torch.float16 and rule not in ("static_6", "mse"):
        pytest.skip("fp16 covered on two rules (compile time)")
    for shape, seed in SHAPES:
        x = random_hard(shape, seed, dtype)
        amax = None
        if amax_mode == "row":
            g = _gen(seed + 100)
            f = torch.rand((*shape[:-1], 1), generator=g).to(DEV) + 0.5    # 0.5..1.5: saturating rows too
            amax = x.abs().amax(-1, keepdim=True).float() * f
            amax.view(-1)[0] = 0.0                                           # an amax = 0 row
        elif amax_mode == "group":
            lead = (shape[0],) + (1,) * (len(shape) - 1)
            amax = x.abs().reshape(shape[0], -1).amax(-1).float().reshape(lead)
            if shape[0] > 1:
                amax.view(-1)[1] *= 0.25
        _check(x, rule, amax, f"random amax={amax_mode} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rule", RULES)
def test_quantize_midpoints_bit_exact(rule, dtype):
    r = Q.get_rule(rule)
    for rows, K, seed in ((64, 128, 1), (37, 272, 2), (128, 48, 3)):
        x, amax = tie_data(rows, K, seed, dtype, rule)
        ref = _check(x, rule, amax, f"ties seed={seed}")
        # the data really sits on midpoints: E2M1 ties of the chosen scale, E4M3 ties of the block scale
        gd = float(ref.global_scale)
        s = ref.scales.double().to(DEV)
        ratio = x.double().abs().unflatten(-1, (-1, 16)) / (s[..., None] * gd)
        on_mid = torch.isin(ratio, E2M1_MIDS.to(DEV)) & (s[..., None] > 0)
        assert on_mid.float().mean() > 0.03, f"too few E2M1 ties ({float(on_mid.float().mean()):.4f})"
        bmax = x.double().abs().unflatten(-1, (-1, 16)).amax(-1)
        e4 = torch.from_numpy(e4m3_table()).double().to(DEV)
        mids = (e4[1:] + e4[:-1]) / 2
        q = bmax / (r.candidates[0] * gd)
        assert torch.isin(q, mids).any(), "no block scale on an E4M3 midpoint"


@pytest.mark.parametrize("rule", RULES)
def test_quantize_tiny_and_mixed_row_groups(rule):
    # subnormal-range data: the whole-tile float64 element path (gd < 2^-90)
    for dtype in (torch.float32, torch.bfloat16):
        x = random_hard((40, 128), 21, torch.float32) * 2.0 ** -110
        x = x.to(dtype)
        _check(x, rule, None, "tiny")
        # per-row decode factors mixing tiny, normal, zero and saturating rows in one tile
        amax = x.abs().amax(-1, keepdim=True).float()
        amax[0::4] *= 2.0 ** 100
        amax[1::4] = 0.0
        amax[2::4] *= 0.3
        xm = x.clone()
        xm[0::4] *= 2.0 ** 100
        _check(xm, rule, amax, "mixed rows")
    # fp32 subnormal inputs mixed with normal values (FTZ must not change anything)
    x = random_hard((16, 64), 22, torch.float32)
    x[:, :16] = torch.randn(16, 16, generator=_gen(5)).to(DEV) * 2.0 ** -135
    _check(x, rule, None, "subnormal x")
    _check(x, rule, torch.tensor(2.0 ** -120, device=DEV), "subnormal x, tiny amax")


@pytest.mark.parametrize("rule", ["static_6", "mse"])
def test_quantize_noncontiguous_and_scalar_amax(rule):
    base = random_hard((96, 160), 31, torch.bfloat16)
    _check(base[:, 16:144], rule, None, "column slice")
    _check(base.t()[:64], rule, None, "transposed")
    _check(base[::3], rule, torch.tensor(3.0, device=DEV), "row stride, given amax")
    _check(base, rule, torch.tensor(0.0, device=DEV), "amax 0")


def test_dispatch_and_supports():
    x = random_hard((8, 64), 41, torch.bfloat16)
    assert T.supports(x, tile_2d=False, stochastic=False) == (DEV == "cuda")
    assert not T.supports(x, tile_2d=True, stochastic=False)
    assert not T.supports(x, tile_2d=False, stochastic=True)
    assert not T.supports(x.cpu(), tile_2d=False, stochastic=False)
    assert not T.supports(x.double(), tile_2d=False, stochastic=False)
    if DEV == "cuda":
        a = Q.quantize(x, "mae", backend="triton")
        b = Q.quantize(x, "mae", backend="torch")
        _assert_same(b, a, "dispatch")


# ---------------------------------------------------------------- dequantize

@pytest.mark.parametrize("gd_mode", ["tensor", "row", "group"])
@pytest.mark.parametrize("rule", ["static_6", "mse"])
def test_dequantize_bit_exact(rule, gd_mode):
    shape = (3, 10, 96)
    x = random_hard(shape, 51, torch.float32)
    amax = None
    if gd_mode == "row":
        amax = x.abs().amax(-1, keepdim=True).float()
        amax[0, 0] = 2.0 ** -115      # tiny decode factors: subnormal results
    elif gd_mode == "group":
        amax = x.abs().amax((1, 2), keepdim=True).float()
    t = Q.quantize(x, rule, amax=amax, backend="torch")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for wg in (True, False):
            ref = Q.dequantize(t, dtype, with_global=wg)
            _poison_allocator()
            got = T.dequantize(t, dtype, with_global=wg)
            assert got.shape == ref.shape and got.dtype == dtype
            assert torch.equal(_bits(got), _bits(ref)), f"{dtype} with_global={wg}"
            out = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
            res = T.dequantize(t, dtype, with_global=wg, out=out)
            assert res is out and torch.equal(_bits(out), _bits(ref))
    # a strided out (written through a copy) and the tile_2d layout
    big = torch.full((3, 10, 128), float("nan"), dtype=torch.bfloat16, device=DEV)
    T.dequantize(t, torch.bfloat16, out=big[..., :96])
    assert torch.equal(_bits(big[..., :96]), _bits(Q.dequantize(t, torch.bfloat16)))
    assert big[..., 96:].isnan().all()
    x2 = random_hard((32, 64), 52, torch.float32)
    t2 = Q.quantize(x2, rule, tile_2d=True, backend="torch")
    assert torch.equal(_bits(T.dequantize(t2, torch.float32)), _bits(Q.dequantize(t2, torch.float32)))


# ---------------------------------------------------------------- KV-cache dequantize

def _kv_ref(packed, scales, gd, tpb, dtype):
    mags = torch.tensor(Q.E2M1_VALUES, dtype=torch.float32, device=packed.device)
    tab = torch.cat([mags, -mags])
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    v = tab[codes].unflatten(-1, (-1, 16)) * scales.float()[..., None]
    slot = torch.arange(packed.shape[2], device=packed.device) // tpb
    return (v * gd.float()[:, slot][:, None, :, None, None]).flatten(-2).to(dtype)


@pytest.mark.parametrize("D,tpb,dtype", [(128, 16, torch.bfloat16), (64, 7, torch.bfloat16),
                                         (128, 1, torch.float32), (256, 32, torch.float16)])
def test_dequantize_kv_strided(D, tpb, dtype):
    g = _gen(D + tpb)
    B, Hb, Tmax, H, Tn = 2, 6, 200, 3, 157
    pbuf = torch.randint(0, 256, (B, Hb, Tmax, D // 2), generator=g, dtype=torch.uint8).to(DEV)
    sbytes = torch.randint(0, 0x7F, (B, Hb, Tmax, D // 16), generator=g, dtype=torch.uint8)  # all finite E4M3
    sbuf = sbytes.to(DEV).view(torch.float8_e4m3fn)
    slots = (Tmax + tpb - 1) // tpb
    gd = (torch.rand(B, slots, generator=g) * 1e-2).to(DEV)
    gd[0, 0] = 2.0 ** -130             # subnormal products
    gd[1, 1] = 0.0
    # views over the head dim (every other head) and a token prefix
    packed = pbuf[:, 1::2, :Tn]
    scales = sbuf[:, 1::2, :Tn]
    obuf = torch.full((B, H + 1, Tmax + 5, D), float("nan"), dtype=dtype, device=DEV)
    out = obuf[:, 1:, :Tn]
    res = T.dequantize_kv(out, packed, scales, gd, tpb)
    assert res is out
    ref = _kv_ref(packed, scales, gd, tpb, dtype)
    assert torch.equal(_bits(out), _bits(ref))
    assert obuf[:, :1].isnan().all() and obuf[:, 1:, Tn:].isnan().all(), "wrote outside the view"
    # contiguous buffers and a strided gd view
    gd2 = torch.rand(B, 2 * slots, generator=g).to(DEV)[:, ::2]
    p2, s2 = packed.contiguous(), scales.contiguous()
    out2 = torch.full((B, H, Tn, D), float("nan"), dtype=dtype, device=DEV)
    T.dequantize_kv(out2, p2, s2, gd2, tpb)
    assert torch.equal(_bits(out2), _bits(_kv_ref(p2, s2, gd2, tpb, dtype)))


def test_dequantize_kv_roundtrip_quantize():
    # the KV-cache use: per-slot amax ([B,1,1,1] decode factor) quantize, then decode
    B, H, Tn, D = 2, 4, 48, 128
    x = random_hard((B, H, Tn, D), 61, torch.bfloat16)
    amax = x.abs().amax((1, 2, 3), keepdim=True).float()
    t = T.quantize(x, "static_6", amax=amax)
    gd = t.global_scale.reshape(B, 1)
    out = torch.full((B, H, Tn, D), float("nan"), dtype=torch.bfloat16, device=DEV)
    T.dequantize_kv(out, t.packed, t.scales, gd, Tn)
    assert torch.equal(_bits(out), _bits(Q.dequantize(t, torch.bfloat16)))


def test_launch_tuning_does_not_change_bits():
    """Tuning is per call and only changes the launch shape, never the result."""
    x = random_hard((70, 256), 71, torch.bfloat16)
    ref = Q.quantize(x, "mse", backend="torch")
    for tune in (T.QuantTuning(block_k=64, elems=4096, warps=8), T.QuantTuning(block_k=256, elems=2048, warps=4)):
        _assert_same(ref, T.quantize(x, "mse", tuning=tune), f"quantize {tune}")
    want = Q.dequantize(ref, torch.bfloat16)
    for tune in (T.DequantTuning(elems=4096, warps=4), T.DequantTuning(block_k=64, elems=16384, warps=8)):
        assert torch.equal(_bits(T.dequantize(ref, torch.bfloat16, tuning=tune)), _bits(want)), tune
    B, H, Tn, D = 2, 3, 40, 128
    t = T.quantize(random_hard((B, H, Tn, D), 72, torch.bfloat16), "static_6",
                   amax=torch.tensor(3.0, device=DEV))
    gd = t.global_scale.reshape(1, 1).expand(B, 1).contiguous()
    want = Q.dequantize(t, torch.bfloat16)
    for tune in (T.KVDequantTuning(), T.KVDequantTuning(block_t=8, warps=2), T.KVDequantTuning(block_t=32, warps=8)):
        out = torch.full((B, H, Tn, D), float("nan"), dtype=torch.bfloat16, device=DEV)
        T.dequantize_kv(out, t.packed, t.scales, gd, Tn, tuning=tune)
        assert torch.equal(_bits(out), _bits(want)), tune


# ---------------------------------------------------------------- weight-only GEMM

MM_SMALL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
MM_BIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@pytest.mark.parametrize("M,N,K,bias,cfg", [(1, 64, 128, False, MM_SMALL), (16, 96, 160, True, MM_SMALL),
                                            (37, 256, 512, False, MM_BIG), (300, 384, 1040, True, MM_BIG),
                                            (1000, 512, 3072, False, None)])
def test_weight_only_matmul(M, N, K, bias, cfg):
    g = _gen(M + N + K)
    W = (torch.randn(N, K, generator=g) * torch.exp2(torch.randint(-3, 3, (N, 1), generator=g).float())).to(DEV)
    w = T.quantize(W, "mse")
    x = torch.randn(M, K, generator=g).to(DEV).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    _poison_allocator()
    y = T.weight_only_matmul(x, w, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    ref = x.float() @ Q.dequantize(w, torch.float32).T + (b if bias else 0.0)
    assert torch.isfinite(y).all()
    tol = 1e-2 * ref.abs().amax() + 1e-6
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=float(tol))
    # leading dims flatten
    y3 = T.weight_only_matmul(x.reshape(1, M, K), w, b, config=cfg)
    assert y3.shape == (1, M, N) and torch.equal(y3.reshape(M, N), y)


def test_weight_only_matmul_rejects_row_scales():
    W = torch.randn(64, 64, generator=_gen(7)).to(DEV)
    w = T.quantize(W, "static_6", amax=W.abs().amax(-1, keepdim=True))
    with pytest.raises(Q.QuantFormatError):
        T.weight_only_matmul(torch.randn(4, 64, device=DEV, dtype=torch.bfloat16), w)
