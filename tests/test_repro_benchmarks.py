"""The benchmark run functions on CPU at tiny size (metrics present, sane, errors clear)."""

from __future__ import annotations

import pytest

from repro.benchmarks.inference_speed import run_inference_speed
from repro.benchmarks.nvfp4_kernels import run_nvfp4_kernels
from repro.benchmarks.quant_linear import parse_shape, run_quant_linear
from repro.profile import phase_of

CPU = {"device": "cpu"}


def test_inference_speed_quantized_modes_run_and_report_memory():
    variant = {"preset": "tiny", "precision": "nvfp4_weight_only", "steps": 2, "kv_cache": "nvfp4",
               "vae_mode": "device", "compile": False, "guidance_scale": 1.0}
    m = run_inference_speed(variant, {"warmup_blocks": 1, "blocks": 2, "decode": True, "seed": 0, "repeats": 3}, CPU)
    assert m["dit_fps"] > 0 and m["e2e_fps"] > 0 and m["measured_blocks"] == 2
    assert m["linear_mode"] == "nvfp4_weight_only"
    # the median of three timed videos, with their spread and a busy flag read from it
    assert m["repeats_used"] == 3 and m["dit_fps_min"] <= m["dit_fps"] <= m["dit_fps_max"]
    assert m["e2e_fps_min"] <= m["e2e_fps"] <= m["e2e_fps_max"] and isinstance(m["busy"], bool)
    assert m["busy"] == bool(m["busy_metrics"])
    bf16 = run_inference_speed({**variant, "precision": "bf16", "kv_cache": "bf16", "vae_mode": "sync"},
                               {"warmup_blocks": 1, "blocks": 1, "decode": False, "seed": 0, "repeats": 1}, CPU)
    assert m["block_linear_weight_gb"] < bf16["block_linear_weight_gb"] / 3
    assert m["kv_mem_gb"] < bf16["kv_mem_gb"] / 3 and m["kv_workspace_gb"] > 0 == bf16["kv_workspace_gb"]
    with pytest.raises(ValueError, match="stream"):
        run_inference_speed({**variant, "vae_mode": "stream"}, {"warmup_blocks": 1, "blocks": 1,
                                                                "decode": True, "seed": 0, "repeats": 1}, CPU)


def test_quant_linear_and_kernel_benchmarks():
    m = run_quant_linear({"mode": "nvfp4_emulated", "m": 32, "shape": "64x128"},
                         {"warmup": 0, "repeats": 1, "seed": 0}, CPU)
    assert 0 < m["rel_err_vs_bf16"] < 0.3 and m["weight_mb"] < 64 * 128 * 4 / 1e6 / 3
    assert parse_shape("14336x3072") == (14336, 3072)
    with pytest.raises(ValueError, match="multiple of 16"):
        parse_shape("64x100")
    k = run_nvfp4_kernels({"op": "dequantize_kv", "rule": "mse", "rows": 256, "cols": 64, "heads": 4,
                           "tokens_per_block": 32}, {"warmup": 0, "repeats": 1, "buffers": 1, "copy_mb": 1, "calls_per_timing": 2,
                                                     "seed": 0}, CPU)
    assert k["gbps"] > 0 and k["fraction_of_copy"] > 0


def test_profile_phase_names():
    assert phase_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert phase_of("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert phase_of("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert phase_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert phase_of("_nvfp4_quant_kernel") == "quantize"
    assert phase_of("void at::native::vectorized_elementwise_kernel<4>") == "norm_elementwise"
    assert phase_of("Memcpy HtoD (Pinned -> Device)") == "memcpy"
    assert phase_of("aten::addmm") == "gemm"
