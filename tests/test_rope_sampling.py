import numpy as np
import pytest
import torch

from impl.config import DiTConfig, get_preset
from impl.model.rope import Rope3D, apply_rope
from impl.sampling import EulerSampler, UniPCSampler, make_sampler, official_sigmas, official_timesteps


def test_rope_tables_match_diffusers():
    diffusers_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    cfg = get_preset("wan22_ti2v_5b").dit
    ref = diffusers_wan.WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, max_seq_len=1024)
    f, gh, gw = 3, 5, 7
    ref_cos, ref_sin = ref(torch.zeros(1, 48, f, gh * 2, gw * 2))
    cos, sin = Rope3D(cfg).tables(torch.arange(f), (gh, gw), torch.float64, "cpu")
    # diffusers hands its float64 tables back as float32.
    torch.testing.assert_close(cos, ref_cos[0, :, 0, 0::2].double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0, :, 0, 1::2].double(), rtol=0, atol=1e-6)


def test_rope_is_relative_in_time_and_unbounded():
    cfg = DiTConfig(num_layers=1, dim=64, num_heads=2, ffn_dim=64, text_dim=8)
    rope = Rope3D(cfg)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2 * 4, 2, cfg.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2 * 4, 2, cfg.head_dim, generator=g, dtype=torch.float64)

    def scores(start):
        cos, sin = rope.tables(torch.arange(start, start + 2), (2, 2), torch.float64, "cpu")
        return torch.einsum("bshd,bthd->bhst", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    # Shifting every position (e.g. a shot offset, or frames past 1024) keeps q.k unchanged.
    torch.testing.assert_close(scores(0), scores(5000), rtol=1e-9, atol=1e-9)
    cos, sin = rope.tables(torch.arange(2), (2, 2), torch.float64, "cpu")
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_official_step_lists():
    assert official_timesteps(4) == [999, 937, 833, 624]
    assert official_timesteps(2) == [999, 833]
    np.testing.assert_allclose(official_sigmas(4), [0.99979984, 0.93726545, 0.83305537, 0.62468734, 0.0], atol=1e-8)
    # What the DiT sees from each sampler is the release's list (not diffusers' 625).
    assert UniPCSampler(4).timesteps == [999, 937, 833, 624]
    assert UniPCSampler(2).timesteps == [999, 833]
    assert EulerSampler(4).timesteps == [999, 937, 833, 624]
    np.testing.assert_allclose(UniPCSampler(4).scheduler.sigmas.numpy(), official_sigmas(4), atol=1e-6)


@pytest.mark.parametrize("kind", ["unipc", "euler"])
@pytest.mark.parametrize("steps", [4, 2])
def test_samplers_recover_x0_under_the_exact_flow(kind, steps):
    """For one data point the true flow velocity is eps - x0; both samplers must land on x0."""
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(1, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    sampler = make_sampler(kind, steps)
    sigma0 = official_sigmas(steps)[0]
    x = (1 - sigma0) * x0 + sigma0 * eps
    for t in sampler.timesteps:
        x = sampler.step(eps - x0, t, x)
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


def test_each_sampler_is_fresh_and_bad_kinds_fail():
    a, b = make_sampler("unipc", 4), make_sampler("unipc", 4)
    assert a.scheduler is not b.scheduler
    with pytest.raises(ValueError, match="allowed"):
        make_sampler("ddim", 4)
    with pytest.raises(ValueError, match="steps"):
        official_timesteps(0)
    euler = EulerSampler(2)
    with pytest.raises(ValueError, match="expected timestep"):
        euler.step(torch.zeros(1), 833, torch.zeros(1))
