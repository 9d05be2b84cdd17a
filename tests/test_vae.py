"""Wan2.2 VAE wrapper: layout, latent normalisation, encoding, streaming decode exactness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from impl.config import get_preset
from impl.model.vae import (
    StreamingDecoder,
    build_vae,
    denormalize_latents,
    encode_video,
    load_vae,
    normalize_latents,
)

F_LATENT = 6


def _cfg():
    return get_preset("tiny").vae


@pytest.fixture(scope="module")
def vae64():
    return build_vae(_cfg(), dtype=torch.float64, seed=0)


@pytest.fixture(scope="module")
def exact_vae64():
    """float64 VAE whose 1x1x1 post_quant_conv has dyadic weights, so that conv is exact
    whatever BLAS blocking diffusers' whole-tensor call uses (see StreamingDecoder docs)."""
    vae = build_vae(_cfg(), dtype=torch.float64, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        conv = vae.post_quant_conv
        conv.weight.copy_(torch.randint(-64, 65, conv.weight.shape, generator=g).double() / 256)
        conv.bias.copy_(torch.randint(-64, 65, conv.bias.shape, generator=g).double() / 256)
    return vae


def _latents(dtype=torch.float64, frames=F_LATENT, dyadic=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    if dyadic:
        return (torch.randint(-96, 97, (1, 8, frames, 4, 4), generator=g).to(dtype) / 32)
    return torch.randn(1, 8, frames, 4, 4, generator=g, dtype=dtype)


def _stream(dec: StreamingDecoder, z: torch.Tensor, sizes: list[int], normalized: bool = False):
    outs, start = [], 0
    for n in sizes:
        expected = dec.frames_for_block(n)
        out = dec.decode_block(z[:, :, start:start + n], normalized=normalized)
        assert out.shape[2] == expected
        outs.append(out)
        start += n
    assert start == z.shape[2]
    return torch.cat(outs, dim=2)


def test_build_vae_layout():
    cfg = _cfg()
    vae = build_vae(cfg, seed=0)
    c = vae.config
    assert c.in_channels == c.out_channels == 12 and c.patch_size == 2 and c.is_residual
    assert c.scale_factor_temporal == 4 and c.scale_factor_spatial == 16
    assert list(c.latents_mean) == [0.0] * cfg.z_dim and list(c.latents_std) == [1.0] * cfg.z_dim
    # Seeded builds are reproducible and leave the global RNG alone.
    state = torch.get_rng_state()
    again = build_vae(cfg, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(vae.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_decoded_frames_are_not_saturated(vae64):
    # Guards the exactness tests below against a trivial all-clamped output.
    out = vae64.decode(_latents()).sample
    assert out.shape == (1, 3, 1 + 4 * (F_LATENT - 1), 64, 64)
    assert (out.abs() < 1).float().mean() > 0.5 and out.std() > 0.05


@pytest.mark.parametrize("sizes", [[2, 2, 2], [1, 3, 2]])
def test_streaming_equals_batch_decode_exact(exact_vae64, sizes):
    z = _latents(dyadic=True)
    full = exact_vae64.decode(z).sample
    dec = StreamingDecoder(exact_vae64)
    streamed = _stream(dec, z, sizes)
    assert streamed.shape == full.shape
    assert torch.equal(streamed, full)
    assert dec.frames_decoded == full.shape[2] and dec.latents_decoded == F_LATENT


def test_streaming_block_partition_invariant_bitwise(vae64):
    # Arbitrary float64 weights and latents: every partition gives the same bits.
    z = _latents()
    dec = StreamingDecoder(vae64)
    ref = _stream(dec, z, [F_LATENT])
    for sizes in ([2, 2, 2], [1, 3, 2], [1, 1, 1, 1, 1, 1], [5, 1]):
        dec.reset()
        assert torch.equal(_stream(dec, z, sizes), ref), sizes
    # ... and vae.decode up to the last ulps of its whole-tensor post_quant_conv.
    full = vae64.decode(z).sample
    assert (ref - full).abs().max().item() < 1e-12


def test_streaming_float32_allclose():
    vae = build_vae(_cfg(), dtype=torch.float32, seed=0)
    z = _latents(torch.float32)
    full = vae.decode(z).sample
    streamed = _stream(StreamingDecoder(vae), z, [1, 3, 2])
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


def test_normalized_input_and_no_mutation():
    cfg = dataclasses.replace(_cfg(), latents_mean=tuple(0.1 * i - 0.3 for i in range(8)),
                              latents_std=tuple(0.5 + 0.25 * i for i in range(8)))
    vae = build_vae(cfg, dtype=torch.float64, seed=0)
    z = _latents(frames=3)
    z_copy = z.clone()
    dec = StreamingDecoder(vae)
    out = _stream(dec, z, [1, 2], normalized=True)
    assert torch.equal(z, z_copy)
    dec.reset()
    raw = denormalize_latents(vae, z)
    assert torch.equal(_stream(dec, raw, [1, 2], normalized=False), out)


def test_reset_starts_new_stream(vae64):
    z = _latents(frames=3)
    dec = StreamingDecoder(vae64)
    first = _stream(dec, z, [2, 1])
    # Without reset the next block continues the stream: 4 frames per latent, not 1 + 4(F-1).
    assert dec.decode_block(z[:, :, :1]).shape[2] == 4
    dec.reset()
    assert dec.frames_decoded == 0
    assert torch.equal(_stream(dec, z, [2, 1]), first)


def test_two_decoders_interleaved_share_one_vae(vae64):
    za, zb = _latents(frames=4, seed=1), _latents(frames=4, seed=2)
    alone_a = _stream(StreamingDecoder(vae64), za, [2, 2])
    alone_b = _stream(StreamingDecoder(vae64), zb, [1, 3])
    da, db = StreamingDecoder(vae64), StreamingDecoder(vae64)
    a0 = da.decode_block(za[:, :, :2], normalized=False)
    b0 = db.decode_block(zb[:, :, :1], normalized=False)
    a1 = da.decode_block(za[:, :, 2:], normalized=False)
    b1 = db.decode_block(zb[:, :, 1:], normalized=False)
    assert torch.equal(torch.cat([a0, a1], 2), alone_a)
    assert torch.equal(torch.cat([b0, b1], 2), alone_b)


def test_wrong_shapes_raise_clear_errors(vae64):
    dec = StreamingDecoder(vae64)
    with pytest.raises(ValueError, match="z_dim"):
        dec.decode_block(torch.randn(1, 4, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank 5"):
        dec.decode_block(torch.randn(8, 2, 4, 4, dtype=torch.float64))
    dec.decode_block(_latents(frames=1))
    with pytest.raises(ValueError, match="changed mid-stream"):
        dec.decode_block(torch.randn(2, 8, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="changed mid-stream"):
        dec.decode_block(torch.randn(1, 8, 1, 2, 4, dtype=torch.float64))


def test_normalize_denormalize_round_trip():
    mean = tuple(float(v) for v in torch.linspace(-1.5, 2.0, 8))
    std = tuple(float(v) for v in torch.linspace(0.3, 3.0, 8))
    vae = build_vae(dataclasses.replace(_cfg(), latents_mean=mean, latents_std=std), seed=0)
    mu = _latents(frames=2)
    z = normalize_latents(vae, mu)
    # Per channel: (mu - mean_c) / std_c.
    assert torch.allclose(z[:, 3], (mu[:, 3] - mean[3]) / std[3])
    assert not torch.allclose(z, mu)
    torch.testing.assert_close(denormalize_latents(vae, z), mu, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="z_dim"):
        normalize_latents(vae, torch.randn(1, 3, 2, 4, 4))


def test_encode_video_shapes_and_errors(vae64):
    g = torch.Generator().manual_seed(5)
    frames = torch.rand(1, 3, 9, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    lat = encode_video(vae64, frames)
    assert lat.shape == (1, 8, 3, 4, 4) and torch.isfinite(lat).all()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_video(vae64, frames[:, :, :8])
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_video(vae64, frames[:, :, :, :40])


def test_load_vae_round_trip_and_missing(tmp_path):
    vae = build_vae(_cfg(), seed=0)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        loaded = load_vae(path)
        for (na, a), (nb, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
            assert na == nb and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="load_vae"):
        load_vae(tmp_path / "nowhere")
