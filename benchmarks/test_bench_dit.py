"""One DiT block forward (self-attention through the KV cache, cross-attention, FFN)."""

import dataclasses

import pytest
import torch

from _bench import TARGETS, check, run_benchmark
from impl.config import get_preset
from impl.model.attention import CachedBlock
from impl.model.dit import CausalWanDiT
from impl.model.kv_cache import KVCache


def _one_block_model(target):
    preset = get_preset(target.pick("small", "wan22_ti2v_5b"))    # small: dim 256, 128 tokens per block
    torch.manual_seed(0)
    model = CausalWanDiT(dataclasses.replace(preset.dit, num_layers=1), device=target.device, dtype=target.dtype)
    return preset, model.eval().requires_grad_(False)


@pytest.mark.parametrize("storage", ["bf16", "nvfp4"])
@pytest.mark.parametrize("target", TARGETS)
def test_dit_block_with_kv_cache(benchmark, target, storage):
    preset, model = _one_block_model(target)
    c, fpb = preset.dit, preset.stream.frames_per_block
    (lh, lw), (pt, ph, pw) = preset.latent_hw, c.patch_size
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, c.in_channels, fpb, lh, lw, generator=g).to(target.device, target.dtype)
    text = torch.randn(1, preset.text.max_length, c.text_dim, generator=g).to(target.device, target.dtype)
    cache = KVCache(num_layers=1, batch=1, num_heads=c.num_heads, head_dim=c.head_dim,
                    tokens_per_block=preset.tokens_per_block, stream=preset.stream, dtype=target.dtype,
                    device=target.device, storage=storage)
    block = model.blocks[0]
    with torch.no_grad():
        context = model.encode_text(text)
        x = model.patch_embedding(latents).flatten(2).transpose(1, 2)          # [1, tokens, dim]
        temb, temb6 = model.condition_embedder.time(torch.full((1, fpb), 500.0, device=target.device))
        cos, sin = model.rope.tables(torch.arange(fpb), (lh // ph, lw // pw), torch.float32, target.device)
        plan = None
        for b in range(cache.num_slots):       # fill the window: the timed call attends all of it
            plan = cache.begin_block(b)
            block(x, temb6, context.kv[0], cos, sin, call=CachedBlock(cache, plan), layer=0)

    call = CachedBlock(cache, plan)

    def forward():
        with torch.no_grad():
            return block(x, temb6, context.kv[0], cos, sin, call=call, layer=0)

    y = run_benchmark(benchmark, target, forward, group="dit-block", storage=storage, tokens=tuple(x.shape),
                      attend_tokens=plan.attend_len, dim=c.dim)
    check(y, tuple(x.shape))
    assert not torch.equal(y, x)
