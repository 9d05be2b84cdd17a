"""FP8 KV cache (kv_cache='fp8'), the attention-backend registry, FA3 requirements and
bf16_attention_steps, on the CPU (the FP8 numerics through the emulation)."""

from __future__ import annotations

import pytest
import torch

from impl import modes
from impl.config import StreamConfig
from impl.errors import ConfigError
from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.model import attention_backends as ab
from impl.model.fp8_scaling import FP8_MAX, FP8Heads
from impl.model.kv_cache import FP8_KV_HEADROOM, KVCache


def _cache(storage: str, tpb: int = 8, heads: int = 2, d: int = 16) -> KVCache:
    stream = StreamConfig(frames_per_block=1, kv_window_frames=3, sink_frames=1, multi_shot_sink=False)
    return KVCache(num_layers=2, batch=1, num_heads=heads, head_dim=d, tokens_per_block=tpb, stream=stream,
                   dtype=torch.float32, device="cpu", storage=storage)


def _block(seed: int, scale: float = 1.0, tpb: int = 8, heads: int = 2, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(1, heads, tpb, d, generator=g)


def test_registry_and_vocabulary_agree():
    assert tuple(ab.BACKENDS) == modes.choices(modes.AttentionBackend)
    for entry in ab.BACKENDS.values():
        assert entry.precise in ("sdpa", "fa3") and not ab.BACKENDS[entry.precise].takes_fp8_kv


def test_fp8_cache_stores_codes_under_fixed_per_head_scales():
    cache = _cache("fp8")
    k0, v0 = _block(0), _block(1, 3.0)
    plan = cache.begin_block(0)
    cache.write(0, plan, k0, v0)
    k8, v8 = cache.read(0, plan)
    assert isinstance(k8, FP8Heads) and k8.codes.dtype == torch.float8_e4m3fn and k8.shape == k0.shape
    # the first block's amax maps to 448 / headroom, per head
    assert torch.allclose(k8.codes.float().abs().amax(dim=(-2, -1)), torch.full((1, 2), FP8_MAX / FP8_KV_HEADROOM))
    for ref, got in ((k0, k8), (v0, v8)):   # e4m3: 3 mantissa bits -> relative error <= 2^-4 in range
        err = (got.dequantize(torch.float32) - ref).abs()
        assert float((err / ref.abs().clamp_min(ref.abs().amax() / 64)).max()) <= 2 ** -4
    # a later block reuses the scales (one descale per head for the whole window) and saturates
    # instead of turning an overflow into NaN
    plan = cache.begin_block(1)
    cache.write(0, plan, 10 * FP8_KV_HEADROOM * k0, v0)
    k8b, _ = cache.read(0, plan)
    assert torch.equal(k8b.scale, k8.scale) and k8b.shape[2] == 2 * k0.shape[2]
    assert k8b.codes.float().isfinite().all() and float(k8b.codes.float().abs().max()) == FP8_MAX
    # reset forgets the scales: a new video scales from its own first block (reads are views)
    first = k8.scale.clone()
    cache.reset()
    plan = cache.begin_block(0)
    cache.write(0, plan, 2 * k0, v0)
    assert torch.allclose(cache.read(0, plan)[0].scale, first / 2)


def test_fp8_cache_memory_is_half_of_bf16():
    bf16 = KVCache(num_layers=2, batch=1, num_heads=2, head_dim=16, tokens_per_block=8,
                   stream=StreamConfig(frames_per_block=1, kv_window_frames=3, sink_frames=1, multi_shot_sink=False),
                   dtype=torch.bfloat16, device="cpu")
    fp8 = _cache("fp8")
    scales = 2 * 2 * 1 * 2 * 4   # layers x (K, V) x batch x heads x float32
    assert fp8.memory_bytes() == bf16.memory_bytes() // 2 + scales
    assert fp8.slot_bytes() == bf16.slot_bytes() // 2 and fp8.workspace_bytes() == 0


def test_emulated_fp8_attention_reads_fp8_cache_codes_as_stored():
    q, k, v = _block(2, tpb=4), _block(3, tpb=12), _block(4, tpb=12)
    k8, v8 = FP8Heads.quantize(k), FP8Heads.quantize(v)
    # dynamic per-head scales from the tensors themselves: the same as quantizing inside the call
    assert torch.equal(ab.fp8_emulated(q, k8, v8), ab.fp8_emulated(q, k, v))
    # a backend that does not take FP8 K/V gets them dequantized
    sdpa = ab.attention_fn("sdpa", "cpu")
    assert torch.equal(sdpa(q, k8, v8), ab.sdpa(q, k8.dequantize(q.dtype), v8.dequantize(q.dtype)))


def test_pipeline_with_fp8_cache():
    cfg = InferenceConfig(dtype="fp32", steps=2)
    prompts = ["a red ball"] * 4
    weights = Weights(text="embedding")
    ref = build_pipeline(cfg, "cpu", weights, decode=False).generate(prompts).latents
    runs = {}
    for attention in ("sdpa", "fp8_emulated"):
        pipe = build_pipeline(cfg.replace(kv_cache="fp8", attention=attention), "cpu", weights, decode=False)
        runs[attention] = pipe.generate(prompts).latents
        assert pipe._cache.memory_bytes() < 0.6 * build_pipeline(cfg, "cpu", weights, decode=False).cache_for(1).memory_bytes()
    for out in runs.values():
        assert not torch.equal(ref, out) and ab.sqnr_db(ref, out) > 10
    # FP8 storage alone (BF16 compute over dequantized K/V) stays closer than FP8 compute on top
    assert ab.sqnr_db(ref, runs["sdpa"]) > ab.sqnr_db(ref, runs["fp8_emulated"])


def test_bf16_attention_steps_switch_the_kernel_per_step():
    cfg = InferenceConfig(dtype="fp32", steps=2, attention="fp8_emulated", bf16_attention_steps="-1")
    pipe = build_pipeline(cfg, "cpu", Weights(text="embedding"), decode=False)
    calls = {True: 0, False: 0}

    def counting(precise):
        fn = pipe._attention[precise]

        def call(q, k, v):
            calls[precise] += 1
            return fn(q, k, v)
        return call
    pipe._attention = {p: counting(p) for p in (False, True)}
    pipe.generate(["a red ball"] * 2)
    layers = pipe.model.cfg.num_layers
    # per block: step 0 FP8, step 1 (the last) BF16, re-cache pass FP8
    assert calls == {True: 2 * layers, False: 2 * 2 * layers}
    assert cfg.bf16_attention_step_indices() == {1} == cfg.replace(bf16_attention_steps="last").bf16_attention_step_indices()
    assert cfg.replace(bf16_attention_steps="first,last").bf16_attention_step_indices() == {0, 1}
    with pytest.raises(ConfigError, match="outside the 2 denoising steps"):
        cfg.replace(bf16_attention_steps="2")


def test_fa3_requirements_fail_clearly(monkeypatch):
    with pytest.raises(ab.AttentionBackendError, match="head dim 32 is not supported by FlashAttention-3"):
        ab.check_backend("fa3_fp8", "cpu", head_dim=32)
    if not torch.cuda.is_available():
        with pytest.raises(ab.AttentionBackendError, match="attention='fa3': needs a CUDA GPU"):
            ab.check_backend("fa3", "cpu", head_dim=128)
        with pytest.raises(ConfigError, match="fa3_fp8"):
            build_pipeline(InferenceConfig(attention="fa3_fp8"), "cpu")
    monkeypatch.setattr(ab, "FA3_MODULES", ("no_such_fa3_module",))
    with pytest.raises(ab.AttentionBackendError, match="pip install fa3-fwd==0.0.3"):
        ab._fa3_module()
