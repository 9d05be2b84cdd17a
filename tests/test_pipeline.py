import pytest
import torch

from impl.config import get_preset
from impl.model.dit import CausalWanDiT
from impl.model.text_encoder import TextEncoder
from impl.model.vae import build_vae
from impl.inference.build import pipeline_for_model
from impl.inference.config import InferenceConfig
from impl.pipeline import shot_prompts
from impl.video_io import read_video


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    preset = get_preset("tiny")
    model = CausalWanDiT(preset.dit).eval()
    text = TextEncoder.from_preset(preset.text, seed=0)
    vae = build_vae(preset.vae, seed=0)
    return preset, model, text, vae


def make_pipe(parts, **stream):
    preset, model, text, vae = parts
    preset = preset.replace(stream=stream) if stream else preset
    return pipeline_for_model(model, InferenceConfig(preset=preset, dtype="fp32"),
                              text_embedder=lambda p: text.encode([p]), vae=vae)


def test_shot_prompts_mark_scene_cuts():
    prefix = "The scene transitions. "
    assert shot_prompts([("a", 2), ("b", 1), (prefix + "c", 1)], prefix) == ["a", "a", prefix + "b", prefix + "c"]
    with pytest.raises(ValueError, match="shots\\[1\\]"):
        shot_prompts([("a", 1), ("b", 0)], prefix)


def test_multi_shot_video_to_mp4_with_offsets_pins_and_timings(parts, tmp_path):
    pipe = make_pipe(parts)
    preset = pipe.preset
    prompts = shot_prompts([("a red ball bounces", 3), ("a blue cube slides", 3)], preset.stream.scene_cut_prefix)
    seen = []
    original = pipe.model.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["call"].plan.block, kwargs["frame_positions"].tolist()))
        return original(*args, **kwargs)

    pipe.model.forward = spy
    timings = []
    try:
        result = pipe.generate(prompts, seed=5, video_path=tmp_path / "v.mp4", on_block=timings.append)
    finally:
        del pipe.model.forward
    fpb, phi = preset.stream.frames_per_block, preset.stream.shot_rope_offset
    latent_frames = 6 * fpb
    assert result.latents.shape == (1, preset.dit.in_channels, latent_frames, *preset.latent_hw)
    assert result.frames.shape == (1, 3, preset.raw_frames(latent_frames), preset.video.height, preset.video.width)
    assert read_video(tmp_path / "v.mp4").shape[0] == preset.raw_frames(latent_frames)
    # steps + 1 (re-cache) forwards per block; block 3 opens shot 2: positions jump by phi.
    assert len(seen) == 6 * (preset.stream.steps + 1)
    positions = dict(seen)
    assert positions[2] == list(range(2 * fpb, 3 * fpb))
    assert positions[3] == [p + phi for p in range(3 * fpb, 4 * fpb)]
    assert pipe._cache.pinned_block == 3 and 3 in pipe._cache.resident_blocks()
    assert [t.block for t in timings] == list(range(6))
    assert timings[0].frames == 1 + 4 * (fpb - 1) and all(t.frames == 4 * fpb for t in timings[1:])
    assert all(t.dit_ms > 0 and t.vae_ms > 0 and t.total_ms >= t.dit_ms for t in timings)


def test_generation_is_deterministic_and_seeded(parts):
    pipe = make_pipe(parts)
    a = pipe.generate(["a cat"] * 3, seed=1, decode=False).latents
    b = pipe.generate(["a cat"] * 3, seed=1, decode=False).latents
    c = pipe.generate(["a cat"] * 3, seed=2, decode=False).latents
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = pipe.generate(["a dog"] * 3, seed=1, decode=False).latents
    assert not torch.equal(a, d)


def test_cfg_runs_both_branches_in_one_batch(parts):
    plain = make_pipe(parts).generate(["a cat"] * 2, seed=1, decode=False).latents
    cfg_pipe = make_pipe(parts, guidance_scale=3.0)
    guided = cfg_pipe.generate(["a cat"] * 2, seed=1, decode=False, negative_prompt="blurry").latents
    assert cfg_pipe._cache.k.shape[1] == 2
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)


def test_euler_sampler_and_two_steps_run(parts):
    for stream in ({"sampler": "euler"}, {"steps": 2}):
        out = make_pipe(parts, **stream).generate(["x"] * 2, decode=False).latents
        assert torch.isfinite(out).all()


def test_bad_calls_fail_clearly(parts):
    preset, model, text, _ = parts
    no_vae = pipeline_for_model(model, InferenceConfig(preset=preset, dtype="fp32"),
                                text_embedder=lambda p: text.encode([p]))
    with pytest.raises(ValueError, match="need a VAE"):
        no_vae.generate(["x"], decode=True)
    assert no_vae.generate(["x"]).frames is None   # decode defaults to "if there is a VAE"
    pipe = make_pipe(parts)
    with pytest.raises(ValueError, match="at least one block"):
        pipe.generate([])
    with pytest.raises(ValueError, match="noise"):
        pipe.generate(["x"], noise=torch.randn(1, 8, 3, 4, 4), decode=False)


def test_generate_command_writes_a_multi_shot_mp4(tmp_path):
    from repro.cli import main

    out = tmp_path / "o.mp4"
    assert main(["generate", "--shot", "a red ball::2", "--shot", "a blue cube", "--out", str(out), "--device", "cpu"]) == 0
    preset = get_preset("tiny")
    assert read_video(out).shape[0] == preset.raw_frames(3 * preset.stream.frames_per_block)
    assert main(["generate", "--shot", "x::zero", "--out", str(out)]) == 2


def test_report_command_does_not_import_model_code(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from repro.cli import main; main(['report', '--results', sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.startswith(('impl.model', 'impl.pipeline', 'diffusers', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
