"""SP-aware chunked VAE encoding with a halo (impl/parallel/sp_vae_encode.py, the receptive field
of impl/parallel/vae_receptive_field.py and the impl/parallel/vae_encode.py CLI).

Numerics run in float64 on the tiny preset's VAE (the Wan2.2 layout at 8 base channels: the
same depth and temporal strides as the 5B VAE, hence the same receptive field of 27 latents).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLWan

from impl.config import VAEConfig, get_preset
from impl.model.vae import build_vae, encode_video
from impl.parallel.groups import ParallelConfigError, build_groups, single_process
from impl.parallel.sp_vae_encode import (
    DEFAULT_HALO,
    RawWindow,
    encode_latent_range,
    encode_video_exact,
    frame_independent_quant_conv,
    frames_uint8_to_float,
    gather_latents,
    raw_window,
    sp_encode_video,
    window_table,
)
from impl.parallel.vae_encode import main
from impl.parallel.vae_receptive_field import (
    receptive_field_for_config,
    receptive_field_latents,
    receptive_field_raw_frames,
)
from dist_harness import run_distributed

H, W = 32, 16  # non-square, so a swapped H/W anywhere shows up; latents 2 x 1


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny VAE runs hundreds of small ops per chunk: one thread is fastest and immune to
    # OpenMP oversubscription on a busy CI machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vae(cfg: VAEConfig | None = None):
    return build_vae(cfg or get_preset("tiny").vae, dtype=torch.float64, seed=0)


def _wan21_vae():
    """A Wan2.1-style encoder (plain residual blocks, no patchify) at 8 base channels."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               attn_scales=[], temperal_downsample=[False, True, True],
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return torch.nn.Module.to(vae, dtype=torch.float64).eval()


def _uint8_video(num_latents: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 1 + 4 * (num_latents - 1), H, W, 3), generator=g,
                         dtype=torch.uint8)


@pytest.fixture(scope="module")
def tiny():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    vae = _vae()
    frames = frames_uint8_to_float(_uint8_video(34, seed=1, batch=2), torch.float64)
    yield vae, frames, encode_video_exact(vae, frames)
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- window arithmetic

def test_raw_window_rule():
    assert raw_window(0, 5, 28, 10) == RawWindow(0, 5, 0, 0, 17, drop=0, keep=5)
    assert raw_window(3, 5, 28, 10) == RawWindow(3, 5, 0, 0, 17, drop=3, keep=2)    # a' = 0
    w = raw_window(30, 34, 27, 34)                                                  # a' = 3
    assert (w.halo_start, w.raw_start, w.raw_stop, w.drop, w.keep) == (3, 8, 133, 28, 4)
    assert w.pseudo_prefix and w.raw_frames == 1 + 4 * (w.encoded_latents - 1)
    assert raw_window(4, 5, 0, 5) == RawWindow(4, 5, 4, 12, 17, drop=1, keep=1)     # halo 0
    assert raw_window(1, 2, 0, 2) == RawWindow(1, 2, 1, 0, 5, drop=1, keep=1)       # a'=1: frame 0
    assert raw_window(2, 4, 1, 4, temporal_factor=2) == RawWindow(2, 4, 1, 0, 7, drop=2, keep=2)


@pytest.mark.parametrize("args, match", [
    ((-1, 2, 0, 4), "a: must be an integer >= 0"),
    ((2, 2, 0, 4), r"0 <= a < b <= total_latents=4"),
    ((0, 5, 0, 4), r"0 <= a < b <= total_latents=4"),
    ((0, 2, -1, 4), "halo: must be an integer >= 0"),
    ((0, 2, 1.5, 4), "halo"),
    ((0, 1, 0, 0), "total_latents: must be an integer >= 1"),
])
def test_raw_window_validation(args, match):
    with pytest.raises(ValueError, match=match):
        raw_window(*args)


def test_window_table_f96_sp4_h28():
    table = [(w.latent_start, w.latent_stop, w.halo_start, w.raw_start, w.raw_stop, w.raw_frames,
              w.drop) for w in window_table(96, 4, 28)]
    assert table == [(0, 24, 0, 0, 93, 93, 0),
                     (24, 48, 0, 0, 189, 189, 24),
                     (48, 72, 20, 76, 285, 209, 29),
                     (72, 96, 44, 172, 381, 209, 29)]
    assert window_table(96, 4) == window_table(96, 4, DEFAULT_HALO) and DEFAULT_HALO == 28
    with pytest.raises(ParallelConfigError, match="num_latents=10 is not divisible by sp_size=4"):
        window_table(10, 4)
    with pytest.raises(ParallelConfigError, match="sp_size"):
        window_table(8, 0)


def test_cli_prints_the_table(capsys):
    assert main(["--latents", "96", "--sp", "4", "--halo", "28"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [["0", "[0,24)", "0", "[0,93)", "93", "0"],
                    ["1", "[24,48)", "0", "[0,189)", "189", "24"],
                    ["2", "[48,72)", "20", "[76,285)", "209", "29"],
                    ["3", "[72,96)", "44", "[172,381)", "209", "29"]]
    assert main(["--latents", "8", "--sp", "2", "--halo", "1", "--json"]) == 0
    assert '"drop": 2' in capsys.readouterr().out  # rank 1: a=4, halo start 3, pseudo prefix
    with pytest.raises(SystemExit):
        main(["--latents", "10", "--sp", "4"])


# --------------------------------------------------------------------------- receptive field

def test_receptive_field_tiny_and_full_5b():
    assert receptive_field_latents(_vae()) == 27
    assert receptive_field_raw_frames(_vae()) == 112
    assert receptive_field_latents(_vae().encoder) == 27
    assert receptive_field_for_config(get_preset("wan22_ti2v_5b").vae) == 27  # meta device
    assert DEFAULT_HALO == 27 + 1


def test_receptive_field_rejects_non_4x_temporal_vae():
    cfg = dataclasses.replace(get_preset("tiny").vae, temporal_downsample=(False, False, True))
    with pytest.raises(ValueError, match="temporal downsampling must be 4x"):
        receptive_field_for_config(cfg)


# The analytic walk must give the exact boundary for other layouts too, not just 27.
_LAYOUTS = {
    "wan22": (lambda: _vae(), 27),
    "wan22_1_res_block": (lambda: _vae(dataclasses.replace(get_preset("tiny").vae,
                                                           num_res_blocks=1)), 19),
    "wan22_early_temporal_down": (lambda: _vae(dataclasses.replace(
        get_preset("tiny").vae, temporal_downsample=(True, True, False))), 33),
    "wan21_plain_blocks": (_wan21_vae, 27),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_receptive_field_is_the_exact_halo_boundary(layout):
    build, expected = _LAYOUTS[layout]
    vae = build()
    rf = receptive_field_latents(vae)
    assert rf == expected
    f = rf + 4
    frames = frames_uint8_to_float(_uint8_video(f, seed=2), torch.float64)
    ref = encode_video_exact(vae, frames)
    a, b = f - 3, f  # halo start a - rf = 1 > 0: a pseudo-prefix window
    assert torch.equal(encode_latent_range(vae, frames, a, b, rf), ref[:, :, a:b])
    below = encode_latent_range(vae, frames, a, b, rf - 1)
    assert (below[:, :, 0] - ref[:, :, a]).abs().max() > 1e-12  # far above rounding noise
    assert torch.equal(below[:, :, 1:], ref[:, :, a + 1:b])  # only the first kept latent differs


# --------------------------------------------------------------------------- local encoding

@pytest.mark.parametrize("a, b, halo", [
    (0, 34, 0),    # whole video
    (0, 6, 0),     # a = 0: no halo needed
    (3, 9, 27),    # a' = 0
    (28, 31, 27),  # a' = 1: pseudo prefix is raw frame 0
    (30, 34, 27),  # a' = 3, halo == receptive field
    (33, 34, 28),  # default halo, one latent
    (20, 34, 40),  # halo larger than the start
])
def test_encode_latent_range_is_bit_exact_at_or_above_the_receptive_field(tiny, a, b, halo):
    vae, frames, ref = tiny
    z = encode_latent_range(vae, frames, a, b, halo)
    assert z.shape == (2, 8, b - a, H // 16, W // 16) and z.dtype == torch.float64
    assert torch.equal(z, ref[:, :, a:b])


def test_below_the_receptive_field_only_the_first_latents_differ(tiny):
    vae, frames, ref = tiny
    a, b = 30, 34
    errors = []
    for halo in (24, 26):
        z = encode_latent_range(vae, frames, a, b, halo)
        n_bad = 27 - halo
        assert torch.equal(z[:, :, n_bad:], ref[:, :, a + n_bad:b])
        assert all(not torch.equal(z[:, :, i], ref[:, :, a + i]) for i in range(n_bad))
        errors.append((z[:, :, 0] - ref[:, :, a]).abs().max().item())
    assert errors[0] > errors[1] > 0  # decays with the halo


def test_plain_encode_video_matches_up_to_the_quant_conv_ulp(tiny):
    # encode_video runs quant_conv (1x1x1) on the whole tensor; its GEMM may round the last ulp
    # differently per length, which frame_independent_quant_conv removes.
    vae, frames, ref = tiny
    assert torch.allclose(encode_video(vae, frames), ref, rtol=0, atol=1e-13)
    z = encode_latent_range(vae, frames, 30, 34, 27, exact=False)
    assert torch.allclose(z, ref[:, :, 30:34], rtol=0, atol=1e-13)
    with frame_independent_quant_conv(vae):
        with pytest.raises(RuntimeError, match="already patched"):
            with frame_independent_quant_conv(vae):
                pass
    assert "forward" not in vae.quant_conv.__dict__  # restored


def test_encode_latent_range_errors(tiny):
    vae, frames, _ = tiny
    with pytest.raises(ValueError, match="1 \\+ 4\\(F-1\\)"):
        encode_latent_range(vae, frames[:, :, :-1], 0, 2, 0)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        encode_latent_range(vae, frames[:, :2], 0, 2, 0)
    with pytest.raises(ValueError, match="floating point"):
        encode_latent_range(vae, frames.to(torch.uint8), 0, 2, 0)
    with pytest.raises(ValueError, match="total_latents=34"):
        encode_latent_range(vae, frames, 30, 35, 27)
    with pytest.raises(ValueError, match="halo"):
        encode_latent_range(vae, frames, 30, 34, -1)
    with pytest.raises(ValueError, match=r"uint8 video \[B, T, H, W, 3\]"):
        frames_uint8_to_float(frames, torch.float64)


def test_frames_uint8_to_float_layout_and_range():
    u8 = _uint8_video(2, seed=3)
    x = frames_uint8_to_float(u8, torch.float64)
    assert x.shape == (1, 3, 5, H, W)
    assert torch.equal(x[0, 2, 4, 31, 15], u8[0, 4, 31, 15, 2].double() / 127.5 - 1)
    full = frames_uint8_to_float(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2, 1)
                                 .expand(1, 1, 1, 2, 3), torch.float32)
    assert full.min().item() == -1.0 and full.max().item() == 1.0
    half = frames_uint8_to_float(u8, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, frames_uint8_to_float(u8, torch.float32).to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        frames_uint8_to_float(u8, torch.int32)


def test_sp_encode_video_single_process():
    vae = _vae()
    u8 = _uint8_video(6, seed=4)
    groups = single_process()
    z = sp_encode_video(vae, u8, groups, 6)
    assert torch.equal(z, encode_video_exact(vae, frames_uint8_to_float(u8, torch.float64)))
    assert gather_latents(z, groups) is z
    with pytest.raises(ValueError, match="needs 1 \\+ 4\\(F-1\\) = 25 raw frames, got T=21"):
        sp_encode_video(vae, u8, groups, 7)
    with pytest.raises(ValueError, match="uint8 video"):
        sp_encode_video(vae, None, groups, 6)
    with pytest.raises(ValueError, match="uint8 video"):
        sp_encode_video(vae, frames_uint8_to_float(u8, torch.float64), groups, 6)
    with pytest.raises(ValueError, match="multiples of 16"):
        sp_encode_video(vae, u8[:, :, :24], groups, 6)


# --------------------------------------------------------------------------- distributed
#
# One spawn of 4 gloo processes (importing torch + diffusers dominates the cost) covers one SP
# group of 4, then two SP groups of 2 (dp = 2, roots at global ranks 0 and 2), then the errors.

def _sp_case(vae, groups, num_latents, halo, seed):
    """This rank's chunk and the gathered latents; on the SP root also the expected chunks:
    slices of the full encode when halo >= receptive field, else local windowed encodes."""
    video = _uint8_video(num_latents, seed) if groups.is_sp_root else None
    chunk = sp_encode_video(vae, video, groups, num_latents, halo)
    full = gather_latents(chunk, groups)
    out = {"chunk": chunk, "full": full}
    if groups.is_sp_root:
        frames = frames_uint8_to_float(video, torch.float64)
        out["ref"] = encode_video_exact(vae, frames)
        local = num_latents // groups.sp_size
        ranges = [(r * local, (r + 1) * local) for r in range(groups.sp_size)]
        out["expected"] = ([out["ref"][:, :, a:b] for a, b in ranges]
                           if halo >= receptive_field_latents(vae) else
                           [encode_latent_range(vae, frames, a, b, halo) for a, b in ranges])
    return out


def _error_cases(vae, groups):
    rank, out = groups.sp_rank, {}
    # The root's video does not fit num_latents: every rank raises, nobody hangs.
    bad = _uint8_video(4, seed=6)[:, :-1] if rank == 0 else None
    with pytest.raises(ValueError) as err:
        sp_encode_video(vae, bad, groups, 4, 1)
    out["bad_root"] = str(err.value)
    with pytest.raises(ParallelConfigError, match="num_latents=5 is not divisible by sp_size=2"):
        sp_encode_video(vae, bad, groups, 5, 1)
    # A non-root rank that passes frames: it receives its window (no hang), then raises.
    video = _uint8_video(4, seed=6)
    if rank == 0:
        out["extra"] = tuple(sp_encode_video(vae, video, groups, 4, 1).shape)
    else:
        with pytest.raises(ValueError, match="only the SP root"):
            sp_encode_video(vae, video, groups, 4, 1)
    # Ranks that disagree on num_latents: the non-root raises after receiving.
    if rank == 0:
        sp_encode_video(vae, video, groups, 4, 1)
    else:
        with pytest.raises(ValueError, match="all SP ranks must agree"):
            sp_encode_video(vae, None, groups, 6, 1)
    return out


def _worker(rank, world):
    vae = _vae()
    sp4 = _sp_case(vae, build_groups(4), 40, 27, seed=7)  # rank 3: halo start 3 > 0, exact
    g2 = build_groups(2)
    sp2 = _sp_case(vae, g2, 8, 2, seed=8 + g2.dp_rank)   # halo 2 < 27: rank 1 has a pseudo prefix
    return {"sp4": sp4, "sp2": sp2, "errors": _error_cases(vae, g2)}


def _check_chunks(results, sp, num_latents):
    local = num_latents // sp
    for root in range(0, len(results), sp):
        expected = results[root]["expected"]
        for r in range(sp):
            got = results[root + r]
            assert got["chunk"].shape == (1, 8, local, H // 16, W // 16)
            assert torch.equal(got["chunk"], expected[r]), f"SP rank {r} of the group at {root}"
            assert torch.equal(got["full"], torch.cat(expected, dim=2))


def test_sp_encode_video_on_four_and_two_rank_groups():
    out = run_distributed(_worker, 4)
    sp4 = [o["sp4"] for o in out]
    _check_chunks(sp4, 4, 40)
    assert torch.equal(sp4[0]["full"], sp4[0]["ref"])  # exact: halo 27 = receptive field
    sp2 = [o["sp2"] for o in out]
    _check_chunks(sp2, 2, 8)
    for root in (0, 2):
        ref = sp2[root]["ref"]
        assert torch.equal(sp2[root]["chunk"], ref[:, :, :4])          # a = 0: no halo needed
        assert not torch.equal(sp2[root + 1]["chunk"], ref[:, :, 4:])  # halo 2 is too short
    assert not torch.equal(sp2[0]["ref"], sp2[2]["ref"])  # each SP group encoded its own video
    for root in (0, 2):
        errs = [out[root]["errors"], out[root + 1]["errors"]]
        assert "T=12" in errs[0]["bad_root"] and "rejected its frames" in errs[1]["bad_root"]
        assert errs[0]["extra"] == (1, 8, 2, 2, 1)
