import pytest

from impl.config import ConfigError, DiTConfig, StreamConfig, get_preset


def test_5b_preset_sizes():
    p = get_preset("wan22_ti2v_5b")
    assert (p.dit.num_layers, p.dit.dim, p.dit.num_heads, p.dit.head_dim, p.dit.ffn_dim) == (30, 3072, 24, 128, 14336)
    assert p.dit.patch_size == (1, 2, 2) and p.dit.in_channels == 48 and p.vae.z_dim == 48
    assert p.latent_hw == (44, 80) and p.token_grid == (22, 40) and p.tokens_per_frame == 880
    assert p.vae.temporal_factor == 4 and p.vae.spatial_factor == 16
    assert p.raw_frames(96) == 381 and p.raw_frames(8) == 29
    s = p.stream
    assert (s.frames_per_block, s.kv_window_frames, s.sink_frames, s.shot_rope_offset, s.steps) == (8, 32, 8, 8, 4)
    assert (s.window_blocks, s.sink_blocks) == (4, 1)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_test_presets_are_consistent(name):
    p = get_preset(name)
    assert p.dit.in_channels == p.vae.z_dim and p.dit.text_dim == p.text.d_model
    assert p.tokens_per_block == p.tokens_per_frame * p.stream.frames_per_block


@pytest.mark.parametrize("make,field", [
    (lambda: get_preset("nope"), "preset"),
    (lambda: DiTConfig(dim=100, num_heads=3), "DiTConfig.dim"),
    (lambda: DiTConfig(num_layers=0), "DiTConfig.num_layers"),
    (lambda: StreamConfig(sampler="ddim"), "StreamConfig.sampler"),
    (lambda: StreamConfig(kv_window_frames=30), "StreamConfig.kv_window_frames"),
    (lambda: StreamConfig(guidance_scale=0.5), "StreamConfig.guidance_scale"),
    (lambda: get_preset("tiny").replace(stream={"stepz": 2}), "StreamConfig"),
    (lambda: get_preset("tiny").replace(video={"height": 70}), "Preset.video"),
    (lambda: get_preset("tiny").replace(nope={}), "Preset.nope"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(field)
