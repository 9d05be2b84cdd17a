"""Light video decoders (impl/model/decoders.py, impl/model/tae.py): streaming exactness, the
three decode modes, loading the published file layouts, distillation, pipeline and CLI use."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from impl.config import get_preset
from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.model.decoders import DecoderFileError, build_decoder, load_decoder, stream_decoder
from impl.model.tae import TinyDecoder

KINDS = ["wan", "lightvae_p50", "lightvae_p75", "tae"]
TINY_VAE = dataclasses.replace(get_preset("tiny").vae, latents_mean=tuple(0.1 * i for i in range(8)),
                               latents_std=tuple(1.0 + 0.05 * i for i in range(8)))


def _latents(frames: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 8, frames, 4, 4, generator=g, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_cuts_do_not_change_the_frames(kind, dtype):
    module = build_decoder(kind, TINY_VAE, dtype=dtype, seed=0)
    z = _latents(6, dtype=dtype)
    whole = stream_decoder(module).decode_block(z)
    assert whole.shape == (1, 3, 1 + 4 * 5, 64, 64) and whole.abs().max() <= 1
    for cut in (1, 2, 3):
        dec = stream_decoder(module)
        parts = torch.cat([dec.decode_block(z[:, :, i:i + cut]) for i in range(0, 6, cut)], dim=2)
        assert torch.equal(parts, whole), (kind, dtype, cut)


def test_pruned_widths_and_tiny_layout():
    full = build_decoder("wan", TINY_VAE, seed=0)
    p50, p75 = build_decoder("lightvae_p50", TINY_VAE, seed=0), build_decoder("lightvae_p75", TINY_VAE, seed=0)
    out = lambda m: m.state_dict()["decoder.conv_in.weight"].shape[0]  # noqa: E731
    assert (out(full), out(p50), out(p75)) == (32, 16, 8)   # 8 * dim_mult[-1] scaled by 1 - p
    tae = build_decoder("tae", get_preset("wan22_ti2v_5b").vae)
    sd = tae.state_dict()
    assert sd["decoder.1.weight"].shape == (256, 48, 3, 3) and sd["decoder.22.weight"].shape == (12, 64, 3, 3)
    assert sd["decoder.3.conv.0.weight"].shape == (256, 512, 3, 3) and "decoder.8.bias" not in sd
    assert sd["decoder.7.conv.weight"].shape == (256, 256, 1, 1) and sd["decoder.13.conv.weight"].shape == (256, 128, 1, 1)


@pytest.mark.parametrize("mode", ["sync", "device"])
@pytest.mark.parametrize("kind", ["lightvae_p50", "tae"])
def test_each_decoder_in_the_pipeline_and_its_decode_modes(kind, mode):
    cfg = InferenceConfig(dtype="fp32", decoder=kind, vae_mode=mode, vae_device="cpu" if mode == "device" else None)
    ref = build_pipeline(cfg.replace(vae_mode="sync", vae_device=None), "cpu", Weights(text="embedding"))
    res = build_pipeline(cfg, "cpu", Weights(text="embedding")).generate(["a cat"] * 3, seed=1)
    want = ref.generate(["a cat"] * 3, seed=1)
    assert torch.equal(res.frames, want.frames) and res.frames.shape[2] == 1 + 4 * 5


def _mg_lightvae_file(tmp_path, kind: str, nest: str = "gen_model"):
    module = build_decoder(kind, TINY_VAE, seed=3)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd["dynamic_feature_projection_heads.0.weight"] = torch.zeros(2, 2)   # training-only: dropped
    path = tmp_path / f"MG-LightVAE-{kind}.pth"
    torch.save({nest: sd, "step": 100}, path)
    return module, path


def test_loading_mg_lightvae_files(tmp_path):
    module, path = _mg_lightvae_file(tmp_path, "lightvae_p75")
    loaded = load_decoder("lightvae_p75", path, TINY_VAE)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))
    with pytest.raises(DecoderFileError, match=r"MG-LightVAE-lightvae_p75.pth.*pruned at 0.75.*expects 0.5"):
        load_decoder("lightvae_p50", path, TINY_VAE)
    with pytest.raises(DecoderFileError, match="latent channels"):
        load_decoder("lightvae_p75", path, dataclasses.replace(TINY_VAE, z_dim=16, latents_mean=None, latents_std=None))
    _, nested = _mg_lightvae_file(tmp_path, "lightvae_p50", nest="state_dict")
    assert load_decoder("lightvae_p50", nested, TINY_VAE) is not None
    truncated = tmp_path / "broken.pth"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DecoderFileError, match="broken.pth: cannot read"):
        load_decoder("lightvae_p75", truncated, TINY_VAE)


def test_loading_taew2_2_files(tmp_path):
    from safetensors.torch import save_file
    module = build_decoder("tae", TINY_VAE, seed=5)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd["encoder.0.weight"] = torch.zeros(4, 4)    # the encoder half of a taew2_2 file is ignored
    pth, st = tmp_path / "taew2_2.pth", tmp_path / "taew2_2.safetensors"
    torch.save(sd, pth)
    save_file(sd, str(st))
    for path in (pth, st):
        loaded = load_decoder("tae", path, TINY_VAE)
        assert isinstance(loaded, TinyDecoder)
        assert torch.equal(loaded.state_dict()["decoder.1.weight"], module.state_dict()["decoder.1.weight"])
    wide = build_decoder("tae", dataclasses.replace(TINY_VAE, decoder_base_dim=16), seed=0)   # "super" widths
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(DecoderFileError, match="wide.pth.*wrong shape"):
        load_decoder("tae", tmp_path / "wide.pth", TINY_VAE)
    with pytest.raises(DecoderFileError, match="taew2_2"):
        load_decoder("tae", _mg_lightvae_file(tmp_path, "lightvae_p50")[1], TINY_VAE)
    with pytest.raises(DecoderFileError, match="not found"):
        load_decoder("tae", tmp_path / "missing.pth", TINY_VAE)


def test_normalised_latent_tae_decodes_the_dit_latents_as_they_are():
    raw = build_decoder("tae", TINY_VAE, seed=0)
    norm = build_decoder("tae", TINY_VAE, seed=0, latents="normalized")
    z = _latents(2)
    mean = torch.tensor(TINY_VAE.latents_mean).view(1, 8, 1, 1, 1)
    std = torch.tensor(TINY_VAE.latents_std).view(1, 8, 1, 1, 1)
    assert torch.allclose(stream_decoder(raw).decode_block(z), stream_decoder(norm).decode_block(z * std + mean),
                          atol=1e-5)


def test_distillation_moves_a_light_decoder_toward_the_vae():
    from impl.train.decoder_distill import DecoderDistillConfig, distill_decoder, init_pruned_from
    from impl.train.procedural import ProceduralVideoSource
    teacher = build_decoder("wan", TINY_VAE, seed=0)
    student = build_decoder("lightvae_p50", TINY_VAE, seed=1)
    assert init_pruned_from(student, teacher) > 10
    assert torch.equal(student.state_dict()["decoder.conv_in.weight"],
                       teacher.state_dict()["decoder.conv_in.weight"][:16])
    clips = ProceduralVideoSource(2, 1, 64, 64, length=64, seed=0)
    cfg = DecoderDistillConfig(steps=12, batch_size=1, lr=3e-3)
    for s in (student, build_decoder("tae", TINY_VAE, seed=0)):
        log = distill_decoder(s, teacher, clips, cfg, progress=False)
        assert sum(e["loss"] for e in log[-3:]) < sum(e["loss"] for e in log[:3]), type(s).__name__


def test_config_and_cli_errors(tmp_path):
    from impl.config import ConfigError
    with pytest.raises(ConfigError, match="decoder"):
        InferenceConfig(decoder="lightvae")
    with pytest.raises(ConfigError, match="vae_channels_last"):
        InferenceConfig(decoder="tae", vae_channels_last=True)
    with pytest.raises(ConfigError, match="decoder_weights"):
        build_pipeline(InferenceConfig(dtype="fp32"), "cpu", Weights(decoder=tmp_path / "x.pth", text="embedding"))
    from repro.cli import main
    module, path = _mg_lightvae_file(tmp_path, "lightvae_p75")
    out = tmp_path / "v.mp4"
    args = ["generate", "--shot", "a cat::2", "--out", str(out), "--device", "cpu", "--decoder", "lightvae_p75",
            "--decoder-weights", str(path)]
    assert main(args) == 0 and out.is_file()
    assert main([*args[:-1], str(tmp_path / "nope.pth")]) == 2
