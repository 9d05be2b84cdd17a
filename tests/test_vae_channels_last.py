"""Channels-last streaming VAE decode (impl/model/vae.py) and the ``vae_decode`` benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from impl.config import get_preset
from impl.model.vae import StreamingDecoder, build_vae, vae_to_channels_last
from repro.benchmarks.vae_decode import run_vae_decode
from repro.profile import phase_of
from repro.spec import load_spec

CPU = {"device": "cpu"}
REPO = Path(__file__).resolve().parents[1]


def _vae64():
    return build_vae(get_preset("tiny").vae, dtype=torch.float64, seed=0)


def _latents(blocks: int, per_block: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = get_preset("tiny").latent_hw
    return [torch.randn(1, 8, per_block, h, w, generator=g, dtype=torch.float64) for _ in range(blocks)]


def test_channels_last_decode_matches_default():
    blocks = _latents(3)
    ref_dec = StreamingDecoder(_vae64())
    cl_dec = StreamingDecoder(_vae64(), channels_last=True)
    assert not ref_dec.channels_last and cl_dec.channels_last
    outs = []
    for z in blocks:
        keep = z.clone()
        want = ref_dec.decode_block(z)
        got = cl_dec.decode_block(z)
        assert torch.equal(z, keep)  # input untouched
        assert got.shape == want.shape and got.dtype == want.dtype == torch.float64
        assert got.is_contiguous() and want.is_contiguous()
        assert (got - want).abs().max().item() < 1e-12
        outs.append(got)
    assert cl_dec.frames_decoded == ref_dec.frames_decoded == 1 + 4 * 5
    # Within the channels-last layout the stream is still independent of the block cuts, bit
    # for bit; reset() keeps the layout.
    cl_dec.reset()
    assert cl_dec.channels_last
    z = torch.cat(blocks, dim=2)
    recut = [cl_dec.decode_block(z[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 6))]
    assert torch.equal(torch.cat(recut, dim=2), torch.cat(outs, dim=2))


def test_channels_last_false_leaves_the_vae_alone():
    vae = _vae64()
    before = {n: (p.data_ptr(), p.stride()) for n, p in vae.named_parameters()}
    StreamingDecoder(vae).decode_block(_latents(1)[0])
    assert before == {n: (p.data_ptr(), p.stride()) for n, p in vae.named_parameters()}


def test_vae_to_channels_last_is_idempotent_and_value_preserving():
    vae = _vae64()
    ref = {n: p.detach().clone() for n, p in vae.named_parameters()}
    encoder_before = {n: p.data_ptr() for n, p in vae.encoder.named_parameters()}
    assert vae_to_channels_last(vae) is vae
    convs = [m for m in (*vae.decoder.modules(), vae.post_quant_conv)
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    five_d = [m.weight for m in convs if m.weight.dim() == 5]
    four_d = [m.weight for m in convs if m.weight.dim() == 4]
    assert len(five_d) == 35 and len(four_d) == 5  # 34 causal convs + post_quant_conv; resample/attention
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in five_d)
    assert all(not p.is_contiguous() for p in five_d if p.shape[2:].numel() > 1)  # 1x1x1: both layouts
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    conv_weights = {id(w) for w in five_d + four_d}
    others = [p for p in (*vae.decoder.parameters(), *vae.post_quant_conv.parameters()) if id(p) not in conv_weights]
    assert others and all(p.is_contiguous() for p in others)  # biases, RMS-norm gammas (4-D too)
    assert {n: p.data_ptr() for n, p in vae.encoder.named_parameters()} == encoder_before
    assert all(p.is_contiguous() for p in vae.encoder.parameters())
    for n, p in vae.named_parameters():
        assert torch.equal(p, ref[n]), n
        assert isinstance(p, torch.nn.Parameter)
    after_first = {n: (p.data_ptr(), p.stride()) for n, p in vae.named_parameters()}
    vae_to_channels_last(vae)  # second call: nothing moves
    assert {n: (p.data_ptr(), p.stride()) for n, p in vae.named_parameters()} == after_first


def test_conv_kernels_get_their_own_phase():
    assert phase_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64") == "conv"
    assert phase_of("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>") == "conv"
    assert phase_of("void implicit_convolve_sgemm<float, float, 128, 5, 5>") == "conv"
    assert phase_of("aten::slow_conv3d_forward") == "conv"
    assert phase_of("aten::mkldnn_convolution") == "conv"
    # unchanged: cuDNN attention, GEMMs, inductor's fused kernels, conversions
    assert phase_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert phase_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert phase_of("triton_poi_fused_add_convolution_silu_0") == "norm_elementwise"
    assert phase_of("_nvfp4_convert_kernel") == "quantize"


def test_vae_decode_benchmark_runs_on_cpu():
    variant = {"preset": "tiny", "decoder": "wan", "dtype": "fp32", "channels_last": False, "cudnn_benchmark": True,
               "compile": False}
    measure = {"warmup_blocks": 1, "blocks": 2, "frames_per_block": 1, "seed": 0}
    benchmark_flag = torch.backends.cudnn.benchmark
    m = run_vae_decode(variant, measure, CPU)
    assert torch.backends.cudnn.benchmark == benchmark_flag  # the flags context restored it
    assert m["decode_fps"] > 0 and m["frames_per_block"] == 4 and m["latent_frames_per_block"] == 1
    assert m["vae_block_ms_p90"] >= m["vae_block_ms_p50"] > 0
    assert m["ms_per_latent_frame"] == pytest.approx(m["vae_block_ms_p50"])
    assert m["decode_tflop_per_block"] > 0
    assert m["decode_tflops"] == pytest.approx(m["decode_tflop_per_block"] / (m["vae_block_ms_p50"] / 1e3))
    shares = [v for k, v in m.items() if k.endswith("_share") and k not in ("conv_layout_share", "top_kernel_share")]
    assert sum(shares) == pytest.approx(1.0)
    assert 0.3 < m["conv_share"] <= 1 and 0 <= m["conv_layout_share"] <= m["conv_share"]
    assert m["kernel_busy_fraction"] > 0 and isinstance(m["top_kernel"], str)
    assert "peak_mem_gb" not in m  # CUDA only
    cl = run_vae_decode({**variant, "channels_last": True, "cudnn_benchmark": False}, measure, CPU)
    # FLOPs do not depend on the layout; the frames-per-block default is the preset's.
    assert cl["decode_tflop_per_block"] == pytest.approx(m["decode_tflop_per_block"])
    two = run_vae_decode(variant, {**measure, "frames_per_block": 0, "blocks": 1}, CPU)
    assert two["latent_frames_per_block"] == get_preset("tiny").stream.frames_per_block
    assert two["decode_tflop_per_block"] == pytest.approx(2 * m["decode_tflop_per_block"], rel=1e-6)


def test_vae_decode_spec_expands():
    spec = load_spec(REPO / "experiments" / "vae_decode.yaml")
    cuda = spec.expand("cuda")
    assert len(cuda) == 11 and {v.values["preset"] for v in cuda} == {"wan22_ti2v_5b"}
    assert {v.values["decoder"] for v in cuda} == {"wan", "lightvae_p50", "lightvae_p75", "tae"}
    assert spec.baseline_variant("cuda").values == {"preset": "wan22_ti2v_5b", "decoder": "wan", "dtype": "bf16",
                                                    "channels_last": False, "cudnn_benchmark": False, "compile": False}
    cpu = spec.expand("cpu")
    assert all(v.values["dtype"] == "fp32" and not v.values["compile"] for v in cpu)
