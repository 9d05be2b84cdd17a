"""Weight-free quality metrics on inputs with known answers, and the VBench adapter without VBench."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.quality import metrics as qm
from repro.quality import vbench_adapter as va

REPO = Path(__file__).resolve().parents[1]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_video(t: int = 3, h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    """Random smooth float frames [T, H, W, 3] in [30, 225]: structure for SSIM to see."""
    coarse = torch.rand(t, 3, h // 4, w // 4, generator=_gen(seed), dtype=torch.float64)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (30 + 195 * x).permute(0, 2, 3, 1).contiguous()


def _moving_square(t: int = 16, size: int = 32, side: int = 6) -> torch.Tensor:
    v = torch.zeros(t, size, size, 3, dtype=torch.uint8)
    for i in range(t):
        v[i, 10:10 + side, 2 + i:2 + i + side] = 200  # 1 pixel per frame to the right
    return v


# --------------------------------------------------------------------------- conversion


def test_to_uint8_video_values_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).repeat(3, 2, 1, 1)  # [3, T=2, 1, 4]
    x[1] = -x[1]
    u = qm.to_uint8_video(x)
    assert u.shape == (2, 1, 4, 3) and u.dtype == torch.uint8
    assert u[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert u[0, 0, :, 1].tolist() == [255, 128, 0, 0]  # channel 1 is the negated ramp
    assert torch.equal(qm.to_uint8_video(x.unsqueeze(0)), u)
    with pytest.raises(ValueError, match="3, T, H, W"):
        qm.to_uint8_video(torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="batch size 1"):
        qm.to_uint8_video(torch.zeros(2, 3, 1, 2, 2))
    with pytest.raises(ValueError, match="floats"):
        qm.to_uint8_video(torch.zeros(3, 1, 2, 2, dtype=torch.uint8))


# --------------------------------------------------------------------------- temporal metrics


def test_static_video_scores_exactly_one():
    frame = torch.randint(0, 256, (1, 12, 10, 3), generator=_gen(1), dtype=torch.uint8)
    v = frame.repeat(7, 1, 1, 1)
    assert qm.temporal_flickering(v) == 1.0
    assert qm.motion_smoothness(v) == 1.0
    assert qm.temporal_flickering(v.float()) == 1.0


def test_flicker_of_known_constant_difference():
    v = torch.full((6, 8, 8, 3), 100, dtype=torch.uint8)
    v[1::2] = 110  # every consecutive pair differs by exactly 10 everywhere
    assert torch.equal(qm.frame_differences(v), torch.full((5,), 10.0, dtype=torch.float64))
    assert qm.temporal_flickering(v) == (255.0 - 10.0) / 255.0
    # Each odd frame (110) is re-created as the mean of two 100s: error 10.
    assert qm.motion_smoothness(v) == (255.0 - 10.0) / 255.0


def test_linear_fade_is_perfectly_smooth():
    t = torch.arange(9, dtype=torch.float64).view(9, 1, 1, 1)
    v = (10 + 7 * t).expand(9, 6, 5, 3).to(torch.uint8)  # constant velocity, 7 levels per frame
    assert qm.motion_smoothness(v) == 1.0
    assert qm.temporal_flickering(v) == (255.0 - 7.0) / 255.0
    # Even number of frames: the last odd frame has no right neighbour and is not scored.
    assert qm.interpolation_errors(v[:8]).shape == (3,)
    assert qm.interpolation_errors(v[:3]).shape == (1,)


def test_shuffled_moving_square_is_less_smooth_and_flickers_more():
    v = _moving_square()
    shuffled = v[torch.randperm(v.shape[0], generator=_gen(3))]
    assert qm.motion_smoothness(v) > qm.motion_smoothness(shuffled)
    assert qm.temporal_flickering(v) > qm.temporal_flickering(shuffled)
    assert 0.0 < qm.motion_smoothness(shuffled) < qm.motion_smoothness(v) < 1.0


def test_chunking_does_not_change_results(monkeypatch):
    v = torch.randint(0, 256, (11, 16, 12, 3), generator=_gen(4), dtype=torch.uint8)
    ref = torch.randint(0, 256, (11, 16, 12, 3), generator=_gen(5), dtype=torch.uint8)
    whole = (qm.frame_differences(v), qm.interpolation_errors(v), qm.psnr(v, ref), qm.ssim(v, ref))
    monkeypatch.setattr(qm, "_CHUNK_ELEMENTS", 1)  # one frame per working chunk
    chunked = (qm.frame_differences(v), qm.interpolation_errors(v), qm.psnr(v, ref), qm.ssim(v, ref))
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert whole[2] == pytest.approx(chunked[2], rel=1e-12)
    assert whole[3] == pytest.approx(chunked[3], rel=1e-12)


# --------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_and_known_offset():
    a = torch.randint(0, 200, (3, 8, 8, 3), generator=_gen(6), dtype=torch.uint8)
    assert qm.psnr(a, a) == math.inf
    b = a + 5  # no overflow: a < 200
    assert qm.psnr(a, b) == pytest.approx(10 * math.log10(255.0 ** 2 / 25.0), abs=1e-12)
    assert qm.psnr(a.double() / 255, b.double() / 255, data_range=1.0) == pytest.approx(
        20 * math.log10(51.0), abs=1e-9)


def _ssim_reference(x: np.ndarray, y: np.ndarray, r: float = 255.0) -> float:
    """Explicit weighted sums over every 11x11 window fully inside one 2-D image."""
    k = np.arange(11) - 5.0
    g = np.exp(-k ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_explicit_window_sums():
    a = _smooth_video(t=2, h=16, w=14, seed=7)
    noise = torch.randn(a.shape, generator=_gen(8), dtype=torch.float64) * 12
    b = (a + noise).clamp(0, 255)
    expected = np.mean([_ssim_reference(a[f, :, :, c].numpy(), b[f, :, :, c].numpy())
                        for f in range(2) for c in range(3)])
    assert qm.ssim(a, b) == pytest.approx(expected, abs=1e-10)


def test_ssim_identity_noise_and_shift():
    a = _smooth_video(seed=9)
    assert qm.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(a.shape, generator=_gen(10), dtype=torch.float64)
    s_small, s_large = qm.ssim(a, a + 3 * noise), qm.ssim(a, a + 20 * noise)
    assert 1.0 > s_small > s_large
    assert qm.ssim(a, a + 25.0) < 1.0  # the luminance term sees a constant shift
    assert qm.ssim(a, a + 25.0) == pytest.approx(qm.ssim(a + 25.0, a), abs=1e-12)


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    a = _smooth_video(t=2, h=32, w=28, seed=11).round().to(torch.uint8)
    b = (a.double() + torch.randn(a.shape, generator=_gen(12), dtype=torch.float64) * 10) \
        .clamp(0, 255).round().to(torch.uint8)
    expected = np.mean([metrics.structural_similarity(
        a[f].numpy(), b[f].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=255, channel_axis=-1) for f in range(2)])
    assert qm.ssim(a, b) == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- feature distances


def _exact_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean and unbiased sample covariance are exactly mean and cov."""
    z = torch.randn(n, mean.numel(), generator=_gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample cov -> identity
    return z @ torch.linalg.cholesky(cov).T + mean


def test_frechet_identical_sets_is_zero():
    x = torch.randn(300, 16, generator=_gen(13))
    assert qm.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    expected = float((mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum())
    a = _exact_moments(50, mu1.double(), torch.diag(s1).double(), seed=14)
    b = _exact_moments(70, mu2.double(), torch.diag(s2).double(), seed=15)
    assert qm.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # Large independent samples: the estimate converges to the population value.
    big_a = mu1 + s1.sqrt() * torch.randn(40000, 4, generator=_gen(16))
    big_b = mu2 + s2.sqrt() * torch.randn(40000, 4, generator=_gen(17))
    assert qm.frechet_distance(big_a, big_b) == pytest.approx(expected, rel=0.03)


def test_frechet_full_covariances_and_symmetry():
    g = _gen(18)
    m1, m2 = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    c1, c2 = m1 @ m1.T + 0.1 * torch.eye(5, dtype=torch.float64), m2 @ m2.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    # tr sqrt(C1^1/2 C2 C1^1/2) = sum of square roots of the (real, >= 0) eigenvalues of C1 C2.
    cross = torch.linalg.eigvals(c1 @ c2).real.clamp_min(0).sqrt().sum()
    expected = float((mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * cross)
    a, b = _exact_moments(40, mu1, c1, seed=19), _exact_moments(60, mu2, c2, seed=20)
    assert qm.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert qm.frechet_distance(b, a) == pytest.approx(qm.frechet_distance(a, b), rel=1e-10)


def test_frechet_rank_deficient_and_one_dimensional():
    a = torch.randn(5, 64, generator=_gen(21))  # N < D: singular covariances
    b = torch.randn(7, 64, generator=_gen(22)) + 0.5
    d = qm.frechet_distance(a, b)
    assert math.isfinite(d) and d > 0
    assert qm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    x = torch.tensor([[0.0], [2.0]])  # D = 1: mean 1, variance 2
    y = torch.tensor([[3.0], [5.0]])  # mean 4, variance 2
    assert qm.frechet_distance(x, y) == pytest.approx(9.0, abs=1e-12)


def test_kernel_distance_hand_computed():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])
    # Linear kernel k = x*y: within-x off-diagonal 0, within-y (2*3*2)/2 = 6, cross 2*(2+3)/4 = 2.5.
    assert qm.kernel_distance(x, y, degree=1, gamma=1.0, coef=0.0) == pytest.approx(3.5, abs=1e-12)


def test_kernel_distance_same_vs_shifted_distribution():
    a = torch.randn(400, 8, generator=_gen(23))
    b = torch.randn(300, 8, generator=_gen(24))
    same = qm.kernel_distance(a, b)
    shifted = qm.kernel_distance(a, b + 1.0)
    assert abs(same) < 0.05
    assert shifted > 0.5 and shifted > 20 * abs(same)
    assert qm.kernel_distance(b + 1.0, a) == pytest.approx(shifted, rel=1e-10)
    assert math.isfinite(qm.kernel_distance(a[:2], b[:2]))  # two samples each is enough


# --------------------------------------------------------------------------- blockwise


def test_blockwise_splits_consecutive_blocks():
    v = torch.zeros(10, 4, 4, 3, dtype=torch.uint8)
    v[4:8] = 50  # the second block is static at another level
    v[9] = 255
    assert qm.blockwise(v, 4, qm.temporal_flickering) == [1.0, 1.0, 0.0]
    assert qm.blockwise(v, 4, qm.temporal_flickering, drop_last=True) == [1.0, 1.0]
    ref = v.clone()
    ref[0] = 10
    assert qm.blockwise(v, 4, qm.psnr, reference=ref) == pytest.approx(
        [10 * math.log10(255.0 ** 2 / 25.0), math.inf, math.inf])
    assert qm.blockwise(v, 4, lambda block: block.shape[0]) == [4, 4, 2]


# --------------------------------------------------------------------------- validation


def test_input_validation_errors():
    good = torch.zeros(4, 12, 12, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        qm.temporal_flickering(torch.zeros(4, 12, 12))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        qm.temporal_flickering(torch.zeros(4, 12, 12, 4))
    with pytest.raises(ValueError, match="dtype uint8 or a floating"):
        qm.temporal_flickering(torch.zeros(4, 12, 12, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        qm.temporal_flickering(torch.full((4, 12, 12, 3), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        qm.temporal_flickering([[1, 2, 3]])
    with pytest.raises(ValueError, match="at least 2 frames"):
        qm.temporal_flickering(good[:1])
    with pytest.raises(ValueError, match="at least 3 frames"):
        qm.motion_smoothness(good[:2])
    with pytest.raises(ValueError, match="same shape"):
        qm.psnr(good, good[:3])
    with pytest.raises(ValueError, match="data_range"):
        qm.psnr(good, good, data_range=0)
    with pytest.raises(ValueError, match="at least 11x11"):
        qm.ssim(good[:, :10], good[:, :10])
    with pytest.raises(ValueError, match="frames_per_block"):
        qm.blockwise(good, 0, qm.temporal_flickering)
    assert qm.temporal_flickering(good.numpy()) == 1.0  # numpy arrays are accepted

    f = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        qm.frechet_distance(f[:1], f)
    with pytest.raises(ValueError, match="same feature dimension"):
        qm.frechet_distance(f, torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"2-D feature matrix"):
        qm.frechet_distance(torch.zeros(5), f)
    with pytest.raises(ValueError, match="NaN"):
        qm.kernel_distance(torch.full((3, 3), float("inf")), f)
    with pytest.raises(ValueError, match="at least 2 samples"):
        qm.kernel_distance(f, f[:1])
    with pytest.raises(ValueError, match="degree"):
        qm.kernel_distance(f, f, degree=0)
    with pytest.raises(ValueError, match="gamma"):
        qm.kernel_distance(f, f, gamma=-1.0)


@pytest.mark.gpu
def test_metrics_agree_on_cuda():
    v = _smooth_video(t=5, h=32, w=24, seed=25).round().to(torch.uint8)
    w = _smooth_video(t=5, h=32, w=24, seed=26)
    for fn in (qm.temporal_flickering, qm.motion_smoothness):
        assert fn(v.cuda()) == pytest.approx(fn(v), rel=1e-12)
    assert qm.psnr(v.cuda(), w.cuda()) == pytest.approx(qm.psnr(v, w), rel=1e-12)
    assert qm.ssim(v.cuda(), w.cuda()) == pytest.approx(qm.ssim(v, w), rel=1e-9)


# --------------------------------------------------------------------------- VBench adapter

needs_no_vbench = pytest.mark.skipif(importlib.util.find_spec("vbench") is not None,
                                     reason="vbench is installed here; these check the message without it")


@needs_no_vbench
def test_vbench_status_names_what_is_missing(tmp_path):
    status = va.vbench_status(cache_dir=tmp_path, dimensions=["temporal_flickering", "motion_smoothness"])
    assert not status.available
    assert any("'vbench'" in m and "pip install vbench" in m for m in status.missing)
    amt = tmp_path / "amt_model" / "amt-s.pth"
    assert any(str(amt) in m and "motion_smoothness" in m for m in status.missing)
    assert "pip install vbench" in status.message and str(tmp_path) in status.message
    assert "VBENCH_CACHE_DIR" in status.message

    amt.parent.mkdir(parents=True)
    amt.write_bytes(b"x")  # present weights are no longer reported
    status = va.vbench_status(cache_dir=tmp_path, dimensions=["temporal_flickering", "motion_smoothness"])
    assert not status.available and not any(str(amt) in m for m in status.missing)


def test_vbench_dimension_validation():
    assert va.vbench_status(dimensions="temporal_flickering", check_import=False).dimensions == (
        "temporal_flickering",)
    with pytest.raises(ValueError, match="unknown VBench dimension 'sharpness'"):
        va.vbench_status(dimensions=["sharpness"])
    with pytest.raises(ValueError, match="prompt suite"):
        va.evaluate_vbench("videos", ["color"], "out")
    assert set(va.QUALITY_DIMENSIONS) < set(va.STANDARD_DIMENSIONS)


@needs_no_vbench
def test_evaluate_vbench_raises_unavailable(tmp_path):
    with pytest.raises(va.VBenchUnavailable, match="pip install vbench"):
        va.evaluate_vbench(tmp_path, ["temporal_flickering"], tmp_path / "out", device="cpu",
                           cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


@needs_no_vbench
def test_cli_check_and_evaluate_exit_2(tmp_path, capsys):
    assert va.main(["--check", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "VBench cannot run" in err and "pip install vbench" in err
    assert va.main(["--videos", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--dimensions", "temporal_flickering", "--cache-dir", str(tmp_path)]) == 2
    assert "pip install vbench" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        va.main(["--help"])
    assert exc.value.code == 0 and "--dimensions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        va.main(["--check", "--dimensions", "nope"])
    assert exc.value.code == 2

    proc = subprocess.run([sys.executable, "-m", "repro.quality.vbench_adapter", "--check",
                           "--cache-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "pip install vbench" in proc.stderr


def test_video_filename_follows_vbench_convention():
    assert va.video_filename("a cat runs on grass", 0) == "a cat runs on grass-0.mp4"
    assert va.video_filename("day/night\tcycle", 3) == "day night cycle-3.mp4"
    assert va.video_filename("..hidden", 0) == "hidden-0.mp4"
    name = va.video_filename("é" * 300, 1)
    assert len(name.encode()) <= 180 + len("-1.mp4") and name.endswith("-1.mp4")
    assert va._prompt_from_filename(va.video_filename("launch 2024", 2)) == "launch 2024"
    with pytest.raises(ValueError, match="empty file name"):
        va.video_filename(" / ", 0)


def test_write_videos_readable_mp4(tmp_path):
    from impl.video_io import read_video

    long_prompt = "a long prompt, " * 20 + "the end"
    videos = {"a red square/moves": _moving_square(t=5, size=32),
              long_prompt: torch.full((3, 16, 24, 3), 90, dtype=torch.uint8)}
    paths = va.write_videos(videos, tmp_path / "v", fps=8)
    assert paths["a red square/moves"].name == "a red square moves-0.mp4"
    for prompt, path in paths.items():
        back = read_video(path)
        assert back.shape == videos[prompt].shape and back.dtype == torch.uint8
        assert (back.float() - videos[prompt].float()).abs().mean() < 3.0  # lossy but close
    prompts = json.loads((tmp_path / "v" / va.PROMPTS_FILE).read_text())
    assert prompts == {p.name: prompt for prompt, p in paths.items()}
    assert sorted(os.listdir(tmp_path / "v")) == sorted([*prompts, va.PROMPTS_FILE])

    with pytest.raises(ValueError, match="uint8 tensor"):
        va.write_videos({"x": torch.zeros(2, 16, 16, 3)}, tmp_path / "w")
    with pytest.raises(ValueError, match="both map to file name"):
        va.write_videos({"a/b": videos[long_prompt], "a b": videos[long_prompt]}, tmp_path / "w")


def test_read_vbench_results(tmp_path):
    path = tmp_path / "r_eval_results.json"
    path.write_text(json.dumps({
        "subject_consistency": [0.953, [{"video_path": "a-0.mp4", "video_results": 0.95}]],
        "dynamic_degree": [0.5, [{"video_path": "a-0.mp4", "video_results": True}]],
    }))
    assert va.read_vbench_results(path) == {"subject_consistency": 0.953, "dynamic_degree": 0.5}
    assert va.read_vbench_results(path, ["dynamic_degree"]) == {"dynamic_degree": 0.5}
    with pytest.raises(ValueError, match="no result for dimension 'imaging_quality'"):
        va.read_vbench_results(path, ["imaging_quality"])
    with pytest.raises(FileNotFoundError, match="no results file"):
        va.read_vbench_results(tmp_path / "missing.json")


_FAKE_VBENCH = '''
import json, os
from . import utils

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.device, self.full_info_dir, self.output_path = str(device), full_info_dir, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False,
                 read_frame=False, mode="vbench_standard", **kwargs):
        call = dict(videos_path=videos_path, name=name, prompt_list=prompt_list,
                    dimension_list=dimension_list, local=local, mode=mode, device=self.device,
                    cache_dir=utils.CACHE_DIR, kwargs=kwargs)
        with open(os.path.join(self.output_path, "fake_call.json"), "w") as f:
            json.dump(call, f)
        results = {d: [0.5 + i / 10, [{"video_path": "x", "video_results": 0.5}]]
                   for i, d in enumerate(dimension_list)}
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w") as f:
            json.dump(results, f)
'''


def test_evaluate_vbench_drives_the_vbench_api(tmp_path):
    """End to end against a stand-in `vbench` package (in a child process, so fake modules
    never leak into this one): status passes, VBench gets custom_input mode, local weights, the
    cache folder and full prompts, and the scores come back from its result file."""
    fakes = tmp_path / "fakes"
    pkg = fakes / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FAKE_VBENCH)
    (pkg / "utils.py").write_text("import os\nCACHE_DIR = os.environ.get('VBENCH_CACHE_DIR')\n")
    for dim in ("temporal_flickering", "motion_smoothness"):
        (pkg / f"{dim}.py").write_text("")
    for mod in ("decord", "PIL", "torchvision", "tqdm", "cv2", "omegaconf"):
        if importlib.util.find_spec(mod) is None:
            (fakes / mod).mkdir()
            (fakes / mod / "__init__.py").write_text("")
    cache = tmp_path / "cache"
    (cache / "amt_model").mkdir(parents=True)
    (cache / "amt_model" / "amt-s.pth").write_bytes(b"x")
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a cat-0.mp4", "a dog-0.mp4"):
        (videos / name).write_bytes(b"not decoded by the stand-in")
    (videos / va.PROMPTS_FILE).write_text(json.dumps({"a cat-0.mp4": "a cat, the full prompt"}))

    script = ("import json, sys\nfrom repro.quality.vbench_adapter import evaluate_vbench\n"
              "print(json.dumps(evaluate_vbench(sys.argv[1], 'temporal_flickering,motion_smoothness', "
              "sys.argv[2], device='cpu', cache_dir=sys.argv[3])))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fakes), str(REPO)]))
    env.pop("VBENCH_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", script, str(videos), str(tmp_path / "out"), str(cache)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"temporal_flickering": 0.5,
                                                                 "motion_smoothness": 0.6}
    call = json.loads((tmp_path / "out" / "fake_call.json").read_text())
    assert call["mode"] == "custom_input" and call["local"] is True and call["device"] == "cpu"
    assert call["cache_dir"] == str(cache)
    assert call["dimension_list"] == ["temporal_flickering", "motion_smoothness"]
    assert call["prompt_list"] == {"a cat-0.mp4": "a cat, the full prompt", "a dog-0.mp4": "a dog"}
