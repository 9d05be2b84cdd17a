import shutil

import pytest
import torch

from impl.config import get_preset
from impl.model.attention import CachedBlock, FullSequence
from impl.model.dit import CausalWanDiT
from impl.model.kv_cache import KVCache
from impl.model.masks import block_visibility_mask

DT = torch.float64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    preset = get_preset("tiny")
    return preset, CausalWanDiT(preset.dit, dtype=DT)


def inputs(preset, num_blocks, seed=1, text_groups=None):
    g = torch.Generator().manual_seed(seed)
    f = num_blocks * preset.stream.frames_per_block
    lh, lw = preset.latent_hw
    x = torch.randn(1, preset.dit.in_channels, f, lh, lw, generator=g, dtype=DT)
    t = torch.rand(1, f, generator=g, dtype=DT) * 1000
    shape = (1, 5, preset.dit.text_dim) if text_groups is None else (1, text_groups, 5, preset.dit.text_dim)
    return x, t, torch.randn(*shape, generator=g, dtype=DT)


def run_cached(model, preset, x, t, contexts, positions, shot_starts=(), noisy_first=True):
    """Block by block through the KV cache; each block first gets a throw-away call (a
    denoising step on other inputs) that the real call must overwrite in place."""
    fpb = preset.stream.frames_per_block
    cache = KVCache(num_layers=preset.dit.num_layers, batch=1, num_heads=preset.dit.num_heads,
                    head_dim=preset.dit.head_dim, tokens_per_block=preset.tokens_per_block,
                    stream=preset.stream, dtype=DT, device="cpu")
    outs, resident = [], []
    for b in range(x.shape[2] // fpb):
        sl = slice(b * fpb, (b + 1) * fpb)
        plan = cache.begin_block(b, shot_start=b == 0 or b in shot_starts)
        if noisy_first:
            model(torch.randn_like(x[:, :, sl]), t[:, sl] * 0.5, contexts[b], frame_positions=positions[sl],
                  call=CachedBlock(cache, plan))
        outs.append(model(x[:, :, sl], t[:, sl], contexts[b], frame_positions=positions[sl],
                          call=CachedBlock(cache, plan)))
        resident.append(cache.resident_blocks())
    return torch.cat(outs, dim=2), resident


def test_matches_diffusers_wan_transformer(tiny):
    diffusers = pytest.importorskip("diffusers")
    preset, model = tiny
    c = preset.dit
    ref = diffusers.WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True, eps=c.eps).to(DT)
    ref.load_state_dict(model.state_dict(), strict=True)  # same parameter names, same shapes
    x, t, text = inputs(preset, 1)
    ours = model(x, t, text)
    theirs = ref(x, t.repeat_interleave(preset.tokens_per_frame, dim=1), text).sample
    # diffusers computes the timestep sinusoid in float32; everything else agrees in float64.
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5


def test_cached_blocks_equal_full_block_causal_forward(tiny):
    preset, model = tiny
    preset = preset.replace(stream={"kv_window_frames": 12})  # 6 slots: nothing evicted over 5 blocks
    x, t, text = inputs(preset, 5)
    ctx = model.encode_text(text)
    full = model(x, t, ctx, call=FullSequence.masked(block_visibility_mask(5, preset.tokens_per_block)))
    cached, resident = run_cached(model, preset, x, t, [ctx] * 5, torch.arange(x.shape[2]))
    assert resident[-1] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)


def test_cached_with_eviction_sink_and_shot_pins_equals_masked_forward(tiny):
    preset, model = tiny  # window 4 blocks, sink 1, multi-shot pinning
    nb, shots = 9, {3, 7}
    x, t, text = inputs(preset, nb, seed=3)
    ctx = model.encode_text(text)
    cached, resident = run_cached(model, preset, x, t, [ctx] * nb, torch.arange(x.shape[2]), shot_starts=shots)
    assert resident[4] == [0, 2, 3, 4] and resident[8] == [0, 6, 7, 8]
    mask = block_visibility_mask(nb, preset.tokens_per_block, visible=lambda i: resident[i])
    full = model(x, t, ctx, call=FullSequence.masked(mask))
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)


def test_history_changes_the_output(tiny):
    """Guards the equivalence tests against passing trivially: block 2 must see block 0."""
    preset, model = tiny
    x, t, text = inputs(preset, 3)
    ctx = model.encode_text(text)
    a, _ = run_cached(model, preset, x, t, [ctx] * 3, torch.arange(x.shape[2]), noisy_first=False)
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    b, _ = run_cached(model, preset, x2, t, [ctx] * 3, torch.arange(x.shape[2]), noisy_first=False)
    fpb = preset.stream.frames_per_block
    assert (a[:, :, 2 * fpb:] - b[:, :, 2 * fpb:]).abs().max() > 1e-6


def test_per_block_prompts_in_one_forward_equal_cached_prompts(tiny):
    preset, model = tiny
    preset = preset.replace(stream={"kv_window_frames": 12})
    nb = 3
    x, t, text = inputs(preset, nb, text_groups=nb)
    full = model(x, t, text, call=FullSequence.masked(block_visibility_mask(nb, preset.tokens_per_block)))
    contexts = [model.encode_text(text[:, i]) for i in range(nb)]
    cached, _ = run_cached(model, preset, x, t, contexts, torch.arange(x.shape[2]))
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)
    # And the prompts really matter: one prompt for every block gives another result.
    single = model(x, t, text[:, 0], call=FullSequence.masked(block_visibility_mask(nb, preset.tokens_per_block)))
    assert (single - full).abs().max() > 1e-6


def test_shot_rope_offset_shifts_temporal_positions(tiny):
    preset, model = tiny
    x, t, text = inputs(preset, 1)
    base = model(x, t, text)
    same = model(x, t, text, frame_positions=torch.arange(x.shape[2]))
    shifted = model(x, t, text, frame_positions=torch.arange(x.shape[2]) + preset.stream.shot_rope_offset)
    torch.testing.assert_close(base, same)
    # One block alone attends only itself, so a uniform shift is invisible (RoPE is relative) ...
    torch.testing.assert_close(base, shifted, rtol=1e-10, atol=1e-10)
    # ... but a gap between blocks is not.
    x2, t2, _ = inputs(preset, 2)
    f = x2.shape[2]
    mask = FullSequence.masked(block_visibility_mask(2, preset.tokens_per_block))
    pos = torch.arange(f)
    gap = pos + torch.where(pos >= f // 2, preset.stream.shot_rope_offset, 0)
    assert (model(x2, t2, text, call=mask) - model(x2, t2, text, frame_positions=gap, call=mask)).abs().max() > 1e-6


def test_bad_inputs_give_clear_errors(tiny):
    preset, model = tiny
    x, t, text = inputs(preset, 1)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:, :1], text)
    with pytest.raises(ValueError, match="latents"):
        model(x[:, :3], t, text)
    with pytest.raises(ValueError, match="encode_text"):
        model(x, t, text[..., :3])


def test_5b_preset_has_the_published_size():
    preset = get_preset("wan22_ti2v_5b")
    model = CausalWanDiT(preset.dit, device="meta", dtype=torch.bfloat16)
    block_linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")]
    outer_linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not name.startswith("blocks.")]
    assert len(block_linears) == 300 and len(outer_linears) == 6
    quantizable = sum(m.weight.numel() for m in block_linears)
    assert abs(quantizable / 1e9 - 4.908) < 0.005          # code study 5.5: 4.908 B quantized weights
    total = sum(p.numel() for p in model.parameters())
    assert 4.9e9 < total < 5.1e9
    assert preset.tokens_per_frame == 880 and preset.tokens_per_block == 7040
    assert preset.dit.rope_split == (44, 42, 42)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile (inductor) needs a C compiler on the CPU")
def test_compiled_hot_path_matches_eager_and_compiles_once():
    import torch._dynamo
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = CausalWanDiT(preset.dit, device="cpu", dtype=torch.float32)
    ctx = model.encode_text(torch.randn(1, 8, preset.dit.text_dim))
    fpb = preset.stream.frames_per_block

    def stream(m):
        cache = KVCache(num_layers=preset.dit.num_layers, batch=1, num_heads=preset.dit.num_heads,
                        head_dim=preset.dit.head_dim, tokens_per_block=preset.tokens_per_block,
                        stream=preset.stream, dtype=torch.float32, device="cpu")
        g = torch.Generator().manual_seed(1)
        outs = []
        for b in range(6):  # past the window: eviction and every slot position
            x = torch.randn(1, preset.dit.in_channels, fpb, *preset.latent_hw, generator=g)
            with torch.no_grad():
                outs.append(m(x, torch.full((1, fpb), 700.0), ctx, frame_positions=torch.arange(fpb) + b * fpb,
                              call=CachedBlock(cache, cache.begin_block(b))))
        return torch.cat(outs, 2)

    ref = stream(model)
    torch._dynamo.reset()
    model.compile_hot_path()
    out = stream(model)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2   # one per half, all layers
