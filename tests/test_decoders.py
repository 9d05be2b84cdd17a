"""Light video decoders (impl/model/decoders.py, impl/model/tae.py): streaming exactness, the
three decode modes, loading the published file layouts, distillation, pipeline and CLI use."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from impl.config import ConfigError, get_preset
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


def test_raw_latent_tae_maps_the_dit_latents_back_first():
    raw = build_decoder("tae", TINY_VAE, seed=0, latents="raw")
    norm = build_decoder("tae", TINY_VAE, seed=0)   # the default: latents as they are
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
    with pytest.raises(ConfigError, match="vae_channels_last"):   # before any model is built
        build_pipeline(InferenceConfig(decoder="tae", vae_channels_last=True), "cpu", Weights(text="embedding"))
    with pytest.raises(ConfigError, match="decoder_weights"):
        build_pipeline(InferenceConfig(dtype="fp32"), "cpu", Weights(decoder=tmp_path / "x.pth", text="embedding"))
    from repro.cli import main
    module, path = _mg_lightvae_file(tmp_path, "lightvae_p75")
    out = tmp_path / "v.mp4"
    args = ["generate", "--shot", "a cat::2", "--out", str(out), "--device", "cpu", "--decoder", "lightvae_p75",
            "--decoder-weights", str(path)]
    assert main(args) == 0 and out.is_file()
    assert main([*args[:-1], str(tmp_path / "nope.pth")]) == 2


# ---- published decoder files by default (issue 25): files built here in the published layouts

P48 = get_preset("tiny").replace(vae={"z_dim": 48}, dit={"in_channels": 48, "out_channels": 48})  # Wan2.2's latent size


def _vae_folder(tmp_path, vae_cfg):
    """A VAE folder as --weights / Weights.vae give it (only its config.json is read here)."""
    from impl.model.vae import build_vae
    folder = tmp_path / "pipe" / "vae"
    build_vae(vae_cfg, seed=0).save_config(folder)
    return tmp_path / "pipe"


def _taew2_2_file(tmp_path, vae_cfg=TINY_VAE):
    module = build_decoder("tae", vae_cfg, seed=5)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd["encoder.0.weight"] = torch.zeros(4, 4)
    from safetensors.torch import save_file
    path = tmp_path / "taew2_2.safetensors"
    save_file(sd, str(path))
    return path


def test_published_taew2_2_file_decodes_the_dit_latents_as_they_are(tmp_path):
    # TAEHV applies no latent scale or shift: by default the file sees the DiT's latents unchanged,
    # also when a real VAE's statistics are loaded (here a folder with non-identity ones).
    from impl.inference.build import build_video_decoder
    from repro.cli import build_parser
    folder, path = _vae_folder(tmp_path, TINY_VAE), _taew2_2_file(tmp_path)
    cfg = InferenceConfig(dtype="fp32", decoder="tae")
    module = build_video_decoder(cfg, "cpu", Weights(vae=folder, decoder=path))
    z = _latents(3, seed=2)
    frames, _ = module.run(list(z.unbind(2)), [])
    assert torch.equal(stream_decoder(module).decode_block(z), torch.stack(frames[3:], dim=2) * 2 - 1)
    # --decoder-latents raw is still there for a file trained on raw latents: z * std + mean first.
    raw = build_video_decoder(cfg, "cpu", Weights(vae=folder, decoder=path, decoder_latents="raw"))
    mean = torch.tensor(TINY_VAE.latents_mean).view(1, 8, 1, 1, 1)
    std = torch.tensor(TINY_VAE.latents_std).view(1, 8, 1, 1, 1)
    frames, _ = raw.run(list((z * std + mean).unbind(2)), [])
    torch.testing.assert_close(stream_decoder(raw).decode_block(z), torch.stack(frames[3:], dim=2) * 2 - 1)
    args = build_parser().parse_args(["generate", "--shot", "a", "--out", "v.mp4", "--decoder", "tae",
                                      "--decoder-weights", str(path)])
    assert args.decoder_latents == "normalized" and Weights().decoder_latents == "normalized"


def test_lightvae_file_without_a_vae_folder_uses_the_published_wan22_statistics(tmp_path):
    from impl.inference.build import build_video_decoder
    from impl.model.decoders import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, with_latent_stats
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == 48 and min(WAN22_LATENTS_STD) > 0
    module = build_decoder("lightvae_p75", P48.vae, seed=3)
    path = tmp_path / "MG-LightVAE_v2.pth"
    torch.save({"gen_model": module.state_dict()}, path)
    cfg = InferenceConfig(preset=P48, dtype="fp32", decoder="lightvae_p75")
    loaded = build_video_decoder(cfg, "cpu", Weights(decoder=path))   # no --weights, no VAE folder
    assert tuple(loaded.config.latents_mean) == WAN22_LATENTS_MEAN
    assert tuple(loaded.config.latents_std) == WAN22_LATENTS_STD
    z = torch.randn(1, 48, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(WAN22_LATENTS_MEAN).view(1, 48, 1, 1, 1), torch.tensor(WAN22_LATENTS_STD).view(1, 48, 1, 1, 1)
    want = loaded.decode(z * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(stream_decoder(loaded).decode_block(z), want, atol=1e-5, rtol=1e-5)
    # A VAE folder's own statistics win; a preset of another latent size keeps its own (identity).
    other = dataclasses.replace(P48.vae, latents_mean=tuple(0.01 * i for i in range(48)), latents_std=(2.0,) * 48)
    from_folder = build_video_decoder(cfg, "cpu", Weights(vae=_vae_folder(tmp_path, other), decoder=path))
    assert tuple(from_folder.config.latents_std) == (2.0,) * 48
    assert with_latent_stats(get_preset("tiny").vae).latents_mean is None


NESTINGS = [(), ("state_dict",), ("gen_model",), ("generator",), ("state_dict", "gen_model"),
            ("gen_model", "generator"), ("state_dict", "generator"), ("state_dict", "gen_model", "generator")]


@pytest.mark.parametrize("nesting", NESTINGS, ids=["/".join(n) or "plain" for n in NESTINGS])
def test_read_weight_file_unwraps_state_dict_then_gen_model_then_generator(tmp_path, nesting):
    from impl.model.decoders import read_weight_file
    module = build_decoder("lightvae_p50", TINY_VAE, seed=3)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    obj = {**sd, "dynamic_feature_projection_heads.0.weight": torch.zeros(2)}
    for key in reversed(nesting):   # the innermost level last; each level with a sibling entry
        obj = {key: obj, "epoch": torch.tensor(3)} if key != "state_dict" else {key: obj, "step": 100}
    path = tmp_path / "MG-LightVAE.pth"
    torch.save(obj, path)
    got = read_weight_file(path)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert load_decoder("lightvae_p50", path, TINY_VAE) is not None


def test_read_weight_file_follows_the_public_order_of_nestings(tmp_path):
    from impl.model.decoders import read_weight_file
    sd = build_decoder("lightvae_p50", TINY_VAE, seed=3).state_dict()
    path = tmp_path / "reversed.pth"
    torch.save({"generator": {"state_dict": sd}}, path)   # state_dict inside generator: not a public layout
    with pytest.raises(DecoderFileError, match="reversed.pth: not a state dict of tensors"):
        read_weight_file(path)


def test_first_chunk_upsampling_behaviours_match_their_formulas():
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    from impl.model.vae import TimeConvFirstChunkResample
    torch.manual_seed(0)
    skip = WanResample(4, "upsample3d", upsample_out_dim=4).double()
    drop = TimeConvFirstChunkResample(4, "upsample3d", upsample_out_dim=4).double()
    drop.load_state_dict(skip.state_dict())
    x = [torch.randn(1, 4, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    zero = torch.zeros_like(x[0])

    def time_conv(history):   # the (3, 1, 1) conv over three frames; its 8 channels are 2 frames of 4
        y = F.conv3d(torch.cat(history, dim=2), skip.time_conv.weight, skip.time_conv.bias)
        return [y[:, :4], y[:, 4:]]

    def spatial(frames):      # the per-frame 2x upsample + conv
        return torch.stack([skip.resample(f[:, :, 0]) for f in frames], dim=2)

    def stream(module):
        cache = [None]
        return [module(xi, feat_cache=cache, feat_idx=[0]) for xi in x]

    out = stream(skip)   # LightX2V / Wan2.2 / diffusers: the first frame skips the time conv
    assert torch.equal(out[0], spatial([x[0]]))
    torch.testing.assert_close(out[1], spatial(time_conv([zero, zero, x[1]])))
    torch.testing.assert_close(out[2], spatial(time_conv([zero, x[1], x[2]])))
    out = stream(drop)   # Matrix-Game-3: time conv with zero history, its first frame dropped
    torch.testing.assert_close(out[0], spatial(time_conv([zero, zero, x[0]])[1:]))
    torch.testing.assert_close(out[1], spatial(time_conv([zero, x[0], x[1]])))
    torch.testing.assert_close(out[2], spatial(time_conv([x[0], x[1], x[2]])))


def test_lightvae_first_chunk_option_in_the_decoder_and_its_file(tmp_path):
    from impl.config import ConfigError
    from impl.model.vae import first_chunk_upsampling
    default = build_decoder("lightvae_p50", TINY_VAE, seed=0)
    mg3 = build_decoder("lightvae_p50", TINY_VAE, seed=0, first_chunk="time_conv_drop_first")
    assert (first_chunk_upsampling(default), first_chunk_upsampling(mg3)) == ("skip_time_conv", "time_conv_drop_first")
    assert list(default.state_dict()) == list(mg3.state_dict())   # the same file layout
    z = _latents(4)
    whole = stream_decoder(mg3).decode_block(z)
    dec = stream_decoder(mg3)
    assert torch.equal(torch.cat([dec.decode_block(z[:, :, i:i + 1]) for i in range(4)], dim=2), whole)
    torch.testing.assert_close(whole, mg3.decode(z * torch.tensor(TINY_VAE.latents_std).view(1, 8, 1, 1, 1)
                                                 + torch.tensor(TINY_VAE.latents_mean).view(1, 8, 1, 1, 1)
                                                 ).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert whole.shape == stream_decoder(default).decode_block(z).shape
    assert not torch.allclose(whole[:, :, 0], stream_decoder(default).decode_block(z)[:, :, 0])
    _, path = _mg_lightvae_file(tmp_path, "lightvae_p50")
    loaded = load_decoder("lightvae_p50", path, TINY_VAE, first_chunk="time_conv_drop_first")
    assert first_chunk_upsampling(loaded) == "time_conv_drop_first"
    with pytest.raises(ConfigError, match="lightvae_first_chunk"):
        Weights(lightvae_first_chunk="drop")
    with pytest.raises(ConfigError, match="lightvae_first_chunk.*not of decoder 'tae'"):
        build_pipeline(InferenceConfig(dtype="fp32", decoder="tae"), "cpu",
                       Weights(lightvae_first_chunk="time_conv_drop_first", text="embedding"))


def test_cli_flags_of_the_published_decoder_files(tmp_path, capsys):
    from repro.cli import main
    _, path = _mg_lightvae_file(tmp_path, "lightvae_p75")
    out = tmp_path / "v.mp4"
    base = ["generate", "--shot", "a cat::2", "--out", str(out), "--device", "cpu"]
    assert main([*base, "--decoder", "lightvae_p75", "--decoder-weights", str(path),
                 "--lightvae-first-chunk", "time_conv_drop_first"]) == 0 and out.is_file()
    assert main([*base, "--decoder", "tae", "--decoder-weights", str(_taew2_2_file(tmp_path)),
                 "--lightvae-first-chunk", "time_conv_drop_first"]) == 2
    assert "lightvae_first_chunk" in capsys.readouterr().err


def test_readme_paragraph_on_published_decoder_files_uses_real_flags():
    import re
    from pathlib import Path

    import argparse

    from repro.generate import add_arguments
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "Using the published decoder files" in readme
    section = readme.split("Using the published decoder files", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    generate = argparse.ArgumentParser()
    add_arguments(generate)
    known = {s for action in generate._actions for s in action.option_strings}
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", section))
    assert {"--decoder", "--decoder-weights", "--weights"} <= flags and flags <= known, flags - known


def test_decoder_registry_and_the_vocabulary_agree():
    from impl.model.decoders import DECODERS, decoder_kind
    from impl.modes import Decoder, choices
    assert tuple(DECODERS) == choices(Decoder)
    assert all(entry.name == name for name, entry in DECODERS.items())
    with pytest.raises(ConfigError, match="unknown decoder 'lightvae'; allowed: wan, lightvae_p50"):
        decoder_kind("lightvae")


def test_channels_last_rule_holds_for_a_built_tiny_decoder_too():
    tae = build_decoder("tae", TINY_VAE, seed=0)
    with pytest.raises(ConfigError, match="vae_channels_last: decoder 'tae'"):
        stream_decoder(tae, channels_last=True)
    stream_decoder(build_decoder("lightvae_p50", TINY_VAE, seed=0), channels_last=True)
