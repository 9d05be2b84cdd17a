"""One streamed decoder block (8 latent frames on the 5B preset) per decoder kind.

On the GPU 3 fixed rounds: the 5B Wan2.2 decoder takes 1-2 s a block on an H100."""

import dataclasses

import pytest
import torch

from _bench import TARGETS, check, run_benchmark
from impl.config import get_preset
from impl.model.decoders import build_decoder, stream_decoder


@pytest.mark.parametrize("kind", ["wan", "lightvae_p75", "tae"])
@pytest.mark.parametrize("target", TARGETS)
def test_decoder_block(benchmark, target, kind):
    preset = get_preset(target.pick("tiny", "wan22_ti2v_5b"))
    z = preset.vae.z_dim
    vae = dataclasses.replace(preset.vae, latents_mean=tuple(0.01 * i for i in range(z)),
                              latents_std=tuple(1.0 + 0.01 * i for i in range(z)))
    module = build_decoder(kind, vae, dtype=target.dtype, device=target.device, seed=0)
    frames = preset.stream.frames_per_block
    lh, lw = preset.latent_hw
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, z, frames, lh, lw, generator=g).to(target.device, target.dtype)
    decoder = stream_decoder(module)

    def decode():
        with torch.no_grad():
            return decoder.decode_block(latents)    # a later block of one stream: 4 F frames

    out = run_benchmark(benchmark, target, decode, group="decoder", rounds=target.pick(None, 3), kind=kind,
                        latents=tuple(latents.shape))
    check(out, (1, 3, 4 * frames, preset.video.height, preset.video.width))
    assert out.abs().max() <= 1.0
