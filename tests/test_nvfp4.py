"""NVFP4 format: the vectorized quantizer against the float64 reference, error bounds, rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from impl import modes
from impl.quant import nvfp4, triton_nvfp4
from impl.quant.hadamard import apply_rht, rht_matrix
from impl.quant.nvfp4 import QuantFormatError, ScaleRule
from impl.quant.nvfp4_reference import dequantize_reference, e4m3_table, quantize_reference
from impl.quant.nvfp4_theory import expected_sqnr_gaussian

RULES = ["static_6", "static_4", "mse", "mae", "abs_max"]


def hard_input(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Gaussian rows at mixed scales, plus blocks of exact zeros, tiny values, outliers, -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g) * 2)
    x[0, :16] = 0.0
    x[0, 16:32] *= 1e-7                        # block scale underflows to E4M3 subnormals / 0
    x[-1, 3] = 50.0 * x.abs().max()            # outlier sets the tensor scale
    x[1, 5] = -0.0
    return x.to(dtype)


def assert_matches_reference(x, rule, **kw):
    q = nvfp4.quantize(x, rule, backend="torch", **kw)
    ref_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    codes, scales, gd = quantize_reference(x.float().numpy(), rule, **ref_kw)
    np.testing.assert_array_equal(q.codes().numpy(), codes)
    np.testing.assert_array_equal(q.scales.float().double().numpy(), scales)
    np.testing.assert_array_equal(q.global_scale.numpy(), gd)
    return q


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_bit_exact_vs_reference_1d(rule, seed):
    g = torch.Generator().manual_seed(100 + seed)
    rows, cols = int(torch.randint(2, 12, (1,), generator=g)), 16 * int(torch.randint(1, 9, (1,), generator=g))
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_reference(hard_input(rows, cols, seed, dtype), rule)


@pytest.mark.parametrize("rule", RULES)
def test_fast_path_bit_exact_vs_reference_2d_tiles(rule):
    for seed in range(2):
        assert_matches_reference(hard_input(32, 48, seed), rule, tile_2d=True)


@pytest.mark.parametrize("rule", ["static_6", "mse"])
def test_per_row_group_amax_and_stochastic_rounding_match_reference(rule):
    x = hard_input(24, 64, 7).reshape(2, 3, 4, 64)
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert_matches_reference(x, rule, amax=amax)
    u = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_matches_reference(x, rule, amax=amax, uniform=u)


def test_exact_midpoints_round_to_even():
    # gd = amax / (6 * 448) = 1 and the block max is 6, so s = 1 and x / (s * gd) = x exactly.
    amax = torch.tensor(6.0 * 448.0)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 5.9, 0.24, 0.26, 4.9, 5.1,
                         -0.25, -0.75, 6.0])
    q = nvfp4.quantize(mids, "static_6", amax=amax)
    assert float(q.scales.float()[0]) == 1.0
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.0, 0.5, 4.0, 6.0, -0.0, -1.0, 6.0]
    assert nvfp4.dequantize(q).tolist() == expected
    assert_matches_reference(mids, "static_6", amax=amax)


def test_e4m3_scale_rounding_ties_and_saturation():
    table = torch.tensor(e4m3_table())
    assert table[-1] == 448.0 and table[1] == 2.0 ** -9
    # midpoints between neighbours round to the even mantissa
    mids = (table[1:] + table[:-1]) / 2
    got = nvfp4.round_to_e4m3(mids.double())
    idx = torch.arange(1, len(table))
    expect = torch.where(idx % 2 == 0, table[1:], table[:-1])  # the even index of each pair
    assert torch.equal(got.float(), expect.float())
    assert nvfp4.round_to_e4m3(torch.tensor([1e6, 0.0], dtype=torch.float64)).tolist() == [448.0, 0.0]
    # same as torch's float32 -> e4m3 cast wherever the float32 value is exact
    v = torch.rand(10000, dtype=torch.float64) * 500
    v32 = v.float().double()
    assert torch.equal(nvfp4.round_to_e4m3(v32).float(), v32.float().clamp(max=448).to(torch.float8_e4m3fn).float())


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = nvfp4.pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(nvfp4.unpack_codes(packed), codes)


def test_dequantize_matches_reference_decode():
    x = hard_input(8, 64, 3)
    q = nvfp4.quantize(x, "mse")
    codes, scales, gd = quantize_reference(x.numpy(), "mse")
    ref = dequantize_reference(codes, scales, gd)
    np.testing.assert_allclose(nvfp4.dequantize(q).double().numpy(), ref, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("rule", ["static_6", "static_4"])
def test_gaussian_sqnr_matches_theory(rule):
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    measured = nvfp4.sqnr_db(x, nvfp4.dequantize(nvfp4.quantize(x, rule)))
    predicted = expected_sqnr_gaussian(float(x.abs().max()), rule, m_points=4000)
    assert abs(measured - predicted) < 0.3, (measured, predicted)
    assert 19.5 < measured < 21.0


def test_four_over_six_never_worse_than_its_six_candidate_per_block():
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 2
    six_same_tensor_scale = ScaleRule("six_m256", 6.0, 256.0, (6.0,), None)

    def block_err(q, p):
        e = (nvfp4.dequantize(q).double() - x.double()).unflatten(-1, (-1, 16))
        return e.pow(p).abs().sum(-1) if p else e.abs().amax(-1)
    base = nvfp4.quantize(x, six_same_tensor_scale)
    for rule, p in (("mse", 2), ("mae", 1), ("abs_max", 0)):
        q = nvfp4.quantize(x, rule)
        assert (block_err(q, p) <= block_err(base, p) + 1e-12).all()
        assert (q.scales.float() != base.scales.float()).any()   # some blocks took Qb = 4
    # In aggregate 4-over-6 also beats the standard static_6 (M = 448) on Gaussian data.
    mse = lambda q: float((nvfp4.dequantize(q) - x).pow(2).mean())
    assert mse(nvfp4.quantize(x, "mse")) < mse(nvfp4.quantize(x, "static_6"))


@pytest.mark.parametrize("rule", RULES)
def test_transposed_tiles_quantize_identically(rule):
    w = hard_input(48, 64, 5)
    a = nvfp4.dequantize(nvfp4.quantize(w, rule, tile_2d=True))
    b = nvfp4.dequantize(nvfp4.quantize(w.t().contiguous(), rule, tile_2d=True))
    assert torch.equal(a.t(), b)


def test_stochastic_rounding_is_unbiased_within_a_block():
    row = torch.linspace(-5.9, 5.9, 64)
    row[::16] = 6.0                                    # every block max is 6: s = 1, no clipping
    x = row.repeat(4000, 1)
    amax = torch.tensor(6.0 * 448.0)
    q = nvfp4.quantize(x, "static_6", amax=amax, uniform=torch.rand(x.shape, dtype=torch.float64))
    mean = nvfp4.dequantize(q).mean(0)
    assert (q.scales.float() == 1.0).all()
    assert torch.allclose(mean, x[0], atol=0.05)        # grid spacing is 0.5 to 2
    rn = nvfp4.dequantize(nvfp4.quantize(x[:1], "static_6", amax=amax))[0]
    assert (mean - x[0]).abs().mean() < (rn - x[0]).abs().mean()


def test_rht_is_orthogonal_and_preserves_products():
    h = rht_matrix(torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=torch.float64), atol=1e-15)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, dtype=torch.float64, generator=g), torch.randn(5, 64, dtype=torch.float64, generator=g)
    assert torch.allclose(apply_rht(a) @ apply_rht(b).T, a @ b.T, atol=1e-12)
    a32 = a.float()
    assert torch.allclose(apply_rht(a32) @ apply_rht(b.float()).T, a32 @ b.float().T, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        apply_rht(torch.randn(3, 20))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(QuantFormatError, match="multiple of 16"):
        nvfp4.quantize(torch.randn(4, 20))
    with pytest.raises(QuantFormatError, match="unknown rule"):
        nvfp4.quantize(torch.randn(4, 16), "static_5")
    with pytest.raises(QuantFormatError, match="16x16 tiles"):
        nvfp4.quantize(torch.randn(8, 32), tile_2d=True)
    with pytest.raises(QuantFormatError, match="floating-point"):
        nvfp4.quantize(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(QuantFormatError, match="amax"):
        nvfp4.quantize(torch.randn(4, 16), amax=torch.ones(3))
    with pytest.raises(QuantFormatError, match="backend"):
        nvfp4.quantize(torch.randn(4, 16), backend="cuda")
    with pytest.raises(QuantFormatError, match="Triton backend"):
        nvfp4.quantize(torch.randn(4, 16), backend="triton")


def test_zero_tensor_and_memory_layout():
    q = nvfp4.quantize(torch.zeros(4, 32))
    assert nvfp4.dequantize(q).abs().sum() == 0 and q.global_scale == 0
    x = torch.randn(128, 256)
    q = nvfp4.quantize(x)
    assert q.packed.shape == (128, 128) and q.scales.shape == (128, 16)
    assert q.nbytes == 128 * 256 // 2 + 128 * 16 + 4           # 4.5 bits per element + one fp32


def test_cross_check_against_torchao():
    """torchao's NVFP4 (static 6/448, two-level scaling) packs and scales like ours.

    torchao rounds in float32 steps (block max / 6, then / tensor scale, then a reciprocal
    multiply) where we round exactly once, and clamps block scales to the smallest normal
    E4M3 (2^-6) where we allow subnormals; so a small fraction of blocks may differ.
    """
    mod = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 3
    ours = nvfp4.quantize(x, "static_6")
    theirs = mod.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=mod.per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(theirs.per_tensor_scale.float().reshape(()), ours.global_scale)
    scales_equal = (theirs.scale.reshape(ours.scales.shape).float() == ours.scales.float()).float().mean()
    packed_equal = (theirs.qdata.view(torch.uint8).reshape(ours.packed.shape) == ours.packed).float().mean()
    assert scales_equal > 0.99 and packed_equal > 0.99, (scales_equal, packed_equal)
    step = (ours.scales.float() * ours.global_scale).repeat_interleave(16, -1)
    assert ((nvfp4.dequantize(theirs, torch.float32) - nvfp4.dequantize(ours)).abs() <= 2 * step + 1e-12).all()


@pytest.mark.parametrize("tile_2d,stochastic", [(False, False), (True, False), (False, True)])
def test_chunked_torch_quantize_is_bit_identical(monkeypatch, tile_2d, stochastic):
    """Large tensors are quantized in row chunks under the whole tensor's scale: same bits."""
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) if stochastic else None
    whole = nvfp4.quantize(x, "mse", tile_2d=tile_2d, uniform=u, backend="torch")
    monkeypatch.setattr(nvfp4, "_CHUNK_ELEMENTS", 16 * 64)   # 16-row chunks
    chunked = nvfp4.quantize(x, "mse", tile_2d=tile_2d, uniform=u, backend="torch")
    assert torch.equal(chunked.packed, whole.packed)
    assert torch.equal(chunked.scales.view(torch.uint8), whole.scales.view(torch.uint8))
    assert torch.equal(chunked.global_scale, whole.global_scale)


def test_scale_rules_are_the_mode_vocabulary():
    assert tuple(nvfp4.SCALE_RULES) == modes.choices(modes.ScaleRule)
    assert RULES == list(modes.choices(modes.ScaleRule))


def test_triton_kernels_build_on_the_format_module_alone():
    """No import circle: the kernels module needs nvfp4_format, never the PyTorch quantizer."""
    code = ("import sys, impl.quant.triton_nvfp4; "
            "assert 'impl.quant.nvfp4' not in sys.modules, 'triton_nvfp4 imported impl.quant.nvfp4'; "
            "assert 'impl.quant.nvfp4_format' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_kernel_tuning_is_explicit_and_validated():
    assert not hasattr(triton_nvfp4, "TUNE")
    assert triton_nvfp4.QuantTuning().shape(64) == (32, 64, 4)
    assert triton_nvfp4.QuantTuning().shape(3072) == (16, 128, 4)
    assert triton_nvfp4.QuantTuning(block_k=256, elems=4096, warps=8).shape(3072) == (16, 256, 8)
    assert triton_nvfp4.DequantTuning().shape(96) == (64, 128, 8)
    assert triton_nvfp4.KVDequantTuning().shape(128) == (16, 4)
    with pytest.raises(QuantFormatError, match="block_k"):
        triton_nvfp4.QuantTuning(block_k=8)
    with pytest.raises(QuantFormatError, match="warps"):
        triton_nvfp4.DequantTuning(warps=3)
    with pytest.raises(QuantFormatError, match="block_t"):
        triton_nvfp4.KVDequantTuning(block_t=0)
