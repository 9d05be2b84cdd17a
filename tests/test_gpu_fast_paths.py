"""GPU tests (marked gpu, skipped without CUDA) of the fast paths: FP8 attention kernels, CUDA
graphs of the compiled block halves, light decoders on a side stream."""

from __future__ import annotations

import pytest
import torch

from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.model.attention_backends import AttentionBackendError, attention_fn, fp8_emulated, sdpa, sqnr_db
from impl.model.fp8_scaling import FP8Heads

pytestmark = pytest.mark.gpu


def _qkv(m: int, n: int, heads: int = 4, d: int = 128, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, heads, s, d, generator=g, device="cuda").to(torch.bfloat16) for s in (m, n, n)]


@pytest.mark.parametrize("m,n", [(7040 // 8, 7040 // 2), (1000, 3001)])   # 3001: a partial key tile
def test_triton_fp8_attention_accuracy_and_coverage(m, n):
    q, k, v = _qkv(m, n)
    fn = attention_fn("fp8_triton", "cuda")
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)   # dirty the allocator's free blocks
    out = fn(q, k, v)
    assert torch.isfinite(out).all()
    ref = sdpa(q.double(), k.double(), v.double())
    assert sqnr_db(ref, out) > 20                          # FP8 operands on random data
    assert sqnr_db(fp8_emulated(q, k, v), out) > 25        # the same quantization, other summation order
    assert sqnr_db(ref, sdpa(q, k, v)) > sqnr_db(ref, out)  # BF16 stays the more accurate


def test_cudnn_fp8_attention_when_installed():
    try:
        fn = attention_fn("fp8_cudnn", "cuda")
    except AttentionBackendError as exc:
        pytest.skip(str(exc))
    q, k, v = _qkv(880, 7040)
    assert sqnr_db(sdpa(q.double(), k.double(), v.double()), fn(q, k, v)) > 20


def test_fp8_pipeline_and_cuda_graphs_on_the_small_preset():
    base = InferenceConfig(preset="small", dtype="bf16", steps=2)
    prompts = ["a red fox"] * 5
    ref = build_pipeline(base, "cuda", Weights(text="embedding"), decode=False).generate(prompts).latents
    fp8 = build_pipeline(base.replace(attention="fp8_triton"), "cuda", Weights(text="embedding"),
                         decode=False).generate(prompts).latents
    assert sqnr_db(ref, fp8) > 15
    compiled = build_pipeline(base.replace(compile=True), "cuda", Weights(text="embedding"), decode=False)
    graphs = build_pipeline(base.replace(compile=True, cuda_graphs=True), "cuda", Weights(text="embedding"),
                            decode=False)
    a, b = compiled.generate(prompts).latents, graphs.generate(prompts).latents
    assert torch.isfinite(b).all() and sqnr_db(a, b) > 40   # same kernels, replayed as graphs


@pytest.mark.parametrize("decoder", ["lightvae_p75", "tae"])
def test_light_decoders_side_stream_matches_sync(decoder):
    cfg = InferenceConfig(preset="small", dtype="bf16", steps=2, decoder=decoder)
    sync = build_pipeline(cfg, "cuda", Weights(text="embedding")).generate(["a cat"] * 3, seed=2)
    stream = build_pipeline(cfg.replace(vae_mode="stream"), "cuda", Weights(text="embedding")).generate(
        ["a cat"] * 3, seed=2)
    assert torch.equal(sync.latents, stream.latents) and torch.equal(sync.frames, stream.frames)


# ---- FlashAttention-3 (skipped where the fa3-fwd wheel is not installed) ----

def _fa3(name: str):
    try:
        return attention_fn(name, "cuda", head_dim=128)
    except AttentionBackendError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("m,n", [(7040 // 8, 7040 // 2), (1000, 3001)])
def test_fa3_bf16_and_fp8_accuracy(m, n):
    q, k, v = _qkv(m, n)
    ref = sdpa(q.double(), k.double(), v.double())
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)   # dirty the allocator's free blocks
    bf16 = _fa3("fa3")(q, k, v)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == q.shape
    assert sqnr_db(ref, bf16) > 35 and sqnr_db(sdpa(q, k, v), bf16) > 35   # BF16 rounding only
    fp8 = _fa3("fa3_fp8")
    out = fp8(q, k, v)
    assert torch.isfinite(out).all() and out.shape == q.shape
    assert 20 < sqnr_db(ref, out) < sqnr_db(ref, bf16)
    assert sqnr_db(fp8_emulated(q, k, v), out) > 25        # the same quantization of Q, K, V
    # K / V given as FP8 codes (an FP8 KV cache) under the same scales: the same call
    k8, v8 = FP8Heads.quantize(k), FP8Heads.quantize(v)
    assert torch.equal(fp8(q, k8, v8), out)


def test_fa3_fp8_with_fp8_cache_in_the_pipeline():
    _fa3("fa3_fp8")
    base = InferenceConfig(preset="small", dtype="bf16", steps=2)   # head dim 64
    prompts = ["a red fox"] * 5
    w = Weights(text="embedding")
    ref = build_pipeline(base, "cuda", w, decode=False).generate(prompts).latents
    bf16 = build_pipeline(base.replace(attention="fa3"), "cuda", w, decode=False).generate(prompts).latents
    assert sqnr_db(ref, bf16) > 25
    for extra in ({}, {"kv_cache": "fp8"}, {"kv_cache": "fp8", "bf16_attention_steps": "last"}):
        out = build_pipeline(base.replace(attention="fa3_fp8", **extra), "cuda", w, decode=False).generate(prompts).latents
        assert torch.isfinite(out).all() and sqnr_db(ref, out) > 12, extra
    with pytest.raises(AttentionBackendError, match="head dim 16"):
        build_pipeline(InferenceConfig(preset="tiny", attention="fa3"), "cuda")
