"""NVFP4 storage mode of the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from impl.config import ConfigError, StreamConfig, get_preset
from impl.model.attention import CachedBlock
from impl.model.dit import CausalWanDiT
from impl.model.kv_cache import BF16Store, KVCache, NVFP4Slots, NVFP4Store, kv_amax, quantize_kv
from impl.quant import nvfp4
from impl.quant.nvfp4 import QuantFormatError

STREAM = StreamConfig(frames_per_block=1, kv_window_frames=4, sink_frames=1)
TPB, H, D = 32, 2, 32


def cache(storage: str, batch: int = 2, device="cpu") -> KVCache:
    return KVCache(num_layers=2, batch=batch, num_heads=H, head_dim=D, tokens_per_block=TPB,
                   stream=STREAM, dtype=torch.float32, device=device, storage=storage)


def kv(seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 30.0])[:batch].view(batch, 1, 1, 1)  # batch rows get own scales
    return (torch.randn(batch, H, TPB, D, generator=g) * scale, torch.randn(batch, H, TPB, D, generator=g))


def fake_quant_per_batch(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    return nvfp4.dequantize(nvfp4.quantize(x, "mse", amax=amax), x.dtype)


def test_attention_over_nvfp4_cache_equals_attention_over_dequantized_bf16_cache():
    fp4, ref = cache("nvfp4"), cache("bf16")
    q = torch.randn(2, H, TPB, D)
    for block in range(7):                             # fills, then evicts (window 4, sink 1)
        k, v = kv(block)
        for c in (fp4, ref):
            plan = c.begin_block(block)
            assert plan == fp4.begin_block(block) if c is ref else True
        plan = fp4.begin_block(block)
        # denoising step: attention only; current block fresh, history from storage
        fp4.write(0, plan.attention_only(), k + 1.0, v)
        ref.write(0, plan, k + 1.0, v)
        k_fp4, v_fp4 = fp4.read(0, plan.attention_only())
        k_ref, v_ref = ref.read(0, plan)
        assert torch.equal(k_fp4, k_ref) and torch.equal(v_fp4, v_ref)
        assert torch.equal(F.scaled_dot_product_attention(q, k_fp4, v_fp4),
                           F.scaled_dot_product_attention(q, k_ref, v_ref))
        # commit pass: the BF16 reference stores what NVFP4 storage will hand back later
        fp4.write(0, plan, k, v)
        ref.write(0, plan, k, v)
        k_fp4, _ = fp4.read(0, plan)
        k_ref, _ = ref.read(0, plan)
        assert torch.equal(k_fp4, k_ref)
        lo, hi = plan.write_range
        ref.k[0, :, :, lo:hi] = fake_quant_per_batch(k)
        ref.v[0, :, :, lo:hi] = fake_quant_per_batch(v)


def test_history_is_quantized_and_close():
    c = cache("nvfp4")
    k0, v0 = kv(0)
    c.write(1, c.begin_block(0), k0, v0)
    k1, v1 = kv(1)
    plan = c.begin_block(1)
    c.write(1, plan, k1, v1)
    k, v = c.read(1, plan)
    hist = k[:, :, :TPB]
    assert not torch.equal(hist, k0)
    assert torch.equal(hist, fake_quant_per_batch(k0))
    assert nvfp4.sqnr_db(k0, hist) > 18
    assert torch.equal(k[:, :, TPB:2 * TPB], k1)        # current block stays full precision


def test_memory_accounting_at_5b_size():
    p = get_preset("wan22_ti2v_5b")
    kw = dict(num_layers=30, batch=1, num_heads=24, head_dim=128, tokens_per_block=p.tokens_per_block,
              stream=p.stream, dtype=torch.bfloat16, device="meta")
    bf16, fp4 = KVCache(**kw), KVCache(**kw, storage="nvfp4")
    assert round(bf16.slot_bytes() / 1e6, 2) == 43.25
    assert fp4.slot_bytes() == 7040 * 24 * (64 + 8) + 4
    assert round(fp4.slot_bytes() / 1e6, 2) == 12.17
    assert fp4.memory_bytes() == 30 * 2 * 4 * fp4.slot_bytes()
    assert round(fp4.memory_bytes() / 1e9, 2) == 2.92 and round(bf16.memory_bytes() / 1e9, 2) == 10.38
    assert fp4.workspace_bytes() == 2 * 4 * 7040 * 24 * 128 * 2   # one layer's BF16 window, K and V


def test_cached_generation_with_nvfp4_kv_stays_close_to_bf16():
    p = get_preset("tiny")
    torch.manual_seed(0)
    model = CausalWanDiT(p.dit, device="cpu", dtype=torch.float32)
    ctx = model.encode_text(torch.randn(1, 8, p.dit.text_dim))
    outs = {}
    for storage in ("bf16", "nvfp4"):
        c = KVCache(num_layers=p.dit.num_layers, batch=1, num_heads=p.dit.num_heads, head_dim=p.dit.head_dim,
                    tokens_per_block=p.tokens_per_block, stream=p.stream, dtype=torch.float32, device="cpu",
                    storage=storage)
        g = torch.Generator().manual_seed(1)
        fpb = p.stream.frames_per_block
        res = []
        for b in range(6):
            plan = c.begin_block(b)
            x = torch.randn(1, p.dit.in_channels, fpb, *p.latent_hw, generator=g)
            pos = torch.arange(fpb) + b * fpb
            with torch.no_grad():
                y = model(x, torch.full((1, fpb), 700.0), ctx, frame_positions=pos,
                          call=CachedBlock(c, plan.attention_only()))
                model(x, torch.zeros(1, fpb), ctx, frame_positions=pos, call=CachedBlock(c, plan))
            res.append(y)
        outs[storage] = torch.cat(res, dim=2)
    assert torch.equal(outs["bf16"][:, :, :2], outs["nvfp4"][:, :, :2])   # block 0 has no history
    rel = float((outs["nvfp4"] - outs["bf16"]).norm() / outs["bf16"].norm())
    assert 0 < rel < 0.05, rel


def test_bad_storage_and_shapes_give_clear_errors():
    with pytest.raises(ConfigError, match="kv_cache"):
        cache("int8")
    with pytest.raises(ConfigError, match="kv_rule"):
        KVCache(num_layers=1, batch=1, num_heads=1, head_dim=32, tokens_per_block=4, stream=STREAM,
                dtype=torch.float32, device="cpu", storage="nvfp4", kv_rule="nope")
    with pytest.raises(QuantFormatError, match="head_dim"):
        KVCache(num_layers=1, batch=1, num_heads=1, head_dim=24, tokens_per_block=4, stream=STREAM,
                dtype=torch.float32, device="cpu", storage="nvfp4")
    c = cache("nvfp4")
    with pytest.raises(RuntimeError, match="write"):
        c.read(0, c.begin_block(0))


def test_storage_is_chosen_once_and_exposed_through_the_store():
    bf16, fp4 = cache("bf16"), cache("nvfp4")
    assert isinstance(bf16.store, BF16Store) and bf16.k is bf16.store.k and bf16.k.dtype == torch.float32
    assert isinstance(fp4.store, NVFP4Store) and isinstance(fp4.k, NVFP4Slots) and isinstance(fp4.v, NVFP4Slots)
    assert fp4.k.packed.shape == (2, 2, H, 4 * TPB, D // 2) and fp4.k.global_scale.shape == (2, 2, 4)
    k, v = kv(3)
    amax = kv_amax(k, v)
    codes = (quantize_kv(k, amax[0], "mse"), quantize_kv(v, amax[1], "mse"))
    with pytest.raises(ValueError, match="codes"):
        bf16.write(0, bf16.begin_block(0), k, v, codes)
    # pre-quantized codes are stored as they are: the same bytes as quantizing in write()
    other = cache("nvfp4")
    fp4.write(1, fp4.begin_block(0), k, v, codes)
    other.write(1, other.begin_block(0), k, v)
    for name in ("k", "v"):
        mine, ref = getattr(fp4, name), getattr(other, name)
        assert torch.equal(mine.packed, ref.packed) and torch.equal(mine.global_scale, ref.global_scale)
        assert torch.equal(mine.scales.view(torch.uint8), ref.scales.view(torch.uint8))
