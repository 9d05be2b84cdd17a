"""Weight-free video quality metrics, in pure torch (CPU or CUDA; no scipy / scikit-image).

Video convention: a tensor ``[T, H, W, 3]`` (frames, height, width, RGB) of dtype uint8, or of
a floating dtype holding values on the same 0..255 scale (float values are not rescaled or
clamped: pass ``[0, 1]`` or ``[-1, 1]`` data through :func:`to_uint8_video` first). NumPy arrays
are accepted too. Pixel metrics are accumulated in float64 and processed a few frames at a time,
so long 720p videos need neither a float copy of the whole video nor lose precision; every metric
returns a Python float.

Metrics:

- :func:`temporal_flickering`: VBench's temporal flickering, ``(255 - MAD) / 255`` with MAD the
  mean absolute difference of consecutive frames (static video = 1.0).
- :func:`motion_smoothness`: a weight-free stand-in for VBench's motion smoothness: VBench drops
  the odd frames and re-creates them with the AMT frame-interpolation network; here each odd
  frame is re-created by linear interpolation (the mean of its two even neighbours).
- :func:`psnr`, :func:`ssim`: fidelity of a video against a reference (e.g. an optimized variant
  against the BF16 output from the same noise).
- :func:`frechet_distance`, :func:`kernel_distance`: FID/FVD- and KID-style distances between two
  feature sets (features of any network, e.g. one the harness trains itself).
- :func:`blockwise`: apply any of the video metrics per consecutive block of frames (drift curves).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "to_uint8_video",
    "frame_differences",
    "temporal_flickering",
    "interpolation_errors",
    "motion_smoothness",
    "psnr",
    "ssim",
    "frechet_distance",
    "kernel_distance",
    "blockwise",
]

# float64 elements one working chunk may hold (128 MiB): bounds memory on long high-res videos.
_CHUNK_ELEMENTS = 1 << 24

# Gaussian SSIM window as in Wang et al. 2004 and scikit-image's gaussian_weights=True.
_SSIM_SIGMA = 1.5
_SSIM_WIN = 11
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


# --------------------------------------------------------------------------- input handling


def to_uint8_video(frames: torch.Tensor) -> torch.Tensor:
    """Decoded pipeline frames -> uint8 video ``[T, H, W, 3]`` on the same device.

    ``frames`` are floats in [-1, 1] laid out ``[3, T, H, W]`` or ``[1, 3, T, H, W]`` (what the VAE
    decoder returns). Values map by ``round((clamp(x, -1, 1) + 1) * 127.5)``, the same mapping
    as ``impl.video_io.frames_to_uint8``, so metrics see exactly the pixels written to MP4.
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"to_uint8_video: frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dim() == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"to_uint8_video: a 5-D tensor must have batch size 1, got shape "
                             f"{tuple(frames.shape)}")
        frames = frames[0]
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"to_uint8_video: expected [3, T, H, W] or [1, 3, T, H, W], got "
                         f"{tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"to_uint8_video: expected floats in [-1, 1], got dtype {frames.dtype}")
    x = ((frames.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def _check_video(video: torch.Tensor | np.ndarray, name: str = "video",
                 min_frames: int = 1) -> torch.Tensor:
    """Validate a ``[T, H, W, 3]`` uint8/float video and return it as a tensor (not copied)."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array [T, H, W, 3], got "
                        f"{type(video).__name__}")
    if video.dtype != torch.uint8 and not video.is_floating_point():
        raise ValueError(f"{name}: expected dtype uint8 or a floating dtype with values in [0, 255], "
                         f"got {video.dtype}")
    if video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [T, H, W, 3] (RGB frames), got {tuple(video.shape)}")
    if video.shape[1] == 0 or video.shape[2] == 0:
        raise ValueError(f"{name}: frames must be non-empty, got shape {tuple(video.shape)}")
    if video.shape[0] < min_frames:
        raise ValueError(f"{name}: needs at least {min_frames} frames, got {video.shape[0]}")
    if video.is_floating_point() and not bool(torch.isfinite(video).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return video.detach()


def _check_pair(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two videos of equal shape; ``b`` is moved to ``a``'s device."""
    a, b = _check_video(a, "a"), _check_video(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def _check_data_range(data_range: float) -> float:
    if not isinstance(data_range, (int, float)) or not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    return float(data_range)


def _frames_per_chunk(video: torch.Tensor, copies: int = 1) -> int:
    """How many frames fit one working chunk when ``copies`` float64 frame-sized buffers are live."""
    per_frame = video.shape[1] * video.shape[2] * video.shape[3] * copies
    return max(1, _CHUNK_ELEMENTS // per_frame)


# --------------------------------------------------------------------------- temporal metrics


def frame_differences(video: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mean absolute difference of each pair of consecutive frames: float64 tensor ``[T - 1]``.

    ``d[t] = mean over (h, w, c) of |video[t + 1] - video[t]|``, on the 0..255 scale.
    """
    v = _check_video(video, min_frames=2)
    step = _frames_per_chunk(v, copies=2)
    out = []
    for s in range(0, v.shape[0] - 1, step):
        x = v[s:s + step + 1].to(torch.float64)  # chunks overlap by one frame: no pair is lost
        out.append((x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3)))
    return torch.cat(out)


def temporal_flickering(video: torch.Tensor | np.ndarray) -> float:
    """VBench temporal flickering: ``(255 - MAD) / 255`` in [0, 1], higher = steadier.

    ``MAD`` is the mean over consecutive frame pairs of their mean absolute pixel difference
    (:func:`frame_differences`), as in VBench's ``temporal_flickering.py``. A static video
    scores exactly 1.0. VBench applies it to videos of static scenes, where any frame-to-frame
    change is flicker; on moving content it also counts real motion.
    """
    mad = frame_differences(video).mean().item()
    return (255.0 - mad) / 255.0


def interpolation_errors(video: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Error of re-creating each odd frame from its even neighbours: float64 tensor ``[K]``.

    For ``k = 0 .. K - 1`` with ``K = (T - 1) // 2`` (every odd frame that has a following even
    frame): ``e[k] = mean over (h, w, c) of |video[2k + 1] - (video[2k] + video[2k + 2]) / 2|``.
    """
    v = _check_video(video, min_frames=3)
    n = (v.shape[0] - 1) // 2
    step = max(1, _frames_per_chunk(v, copies=3) // 2)
    out = []
    for k0 in range(0, n, step):
        k1 = min(n, k0 + step)
        x = v[2 * k0:2 * k1 + 1].to(torch.float64)  # frames 2k0 .. 2k1 inclusive
        prev, mid, nxt = x[0:-1:2], x[1::2], x[2::2]
        out.append((mid - 0.5 * (prev + nxt)).abs().mean(dim=(1, 2, 3)))
    return torch.cat(out)


def motion_smoothness(video: torch.Tensor | np.ndarray) -> float:
    """Pixel-space proxy of VBench motion smoothness: ``(255 - MAE) / 255`` in [0, 1].

    VBench (``motion_smoothness.py``) keeps the even frames, re-creates every odd frame with the
    AMT-S frame-interpolation network, and scores ``(255 - mean |original - interpolated|) / 255``
    over the odd frames. This stand-in needs no weights: the interpolator is the linear blend
    ``(frame[2k] + frame[2k + 2]) / 2`` (see :func:`interpolation_errors`), kept in float rather
    than rounded to uint8. It is exactly 1.0 for a static video and for any per-pixel
    constant-velocity change (linear fades); jerky, shuffled or flickering frames score lower.
    Unlike AMT it does not follow motion, so any moving edge costs something: compare scores of
    videos with similar content and speed, not against VBench's published numbers.
    """
    mae = interpolation_errors(video).mean().item()
    return (255.0 - mae) / 255.0


# --------------------------------------------------------------------------- fidelity metrics


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray,
         data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole video: ``10 log10(R^2 / MSE)``.

    ``MSE`` is the mean squared difference over all frames, pixels and channels (one MSE for the
    video, not an average of per-frame PSNRs). Identical inputs give ``inf``.
    """
    a, b = _check_pair(a, b)
    r = _check_data_range(data_range)
    step = _frames_per_chunk(a, copies=2)
    total = 0.0
    for s in range(0, a.shape[0], step):
        d = a[s:s + step].to(torch.float64) - b[s:s + step].to(torch.float64)
        total += float(d.square().sum())
    mse = total / a.numel()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """Normalized 1-D Gaussian (sigma 1.5, 11 taps): scipy's gaussian_filter kernel at truncate=3.5."""
    x = torch.arange(_SSIM_WIN, dtype=torch.float64, device=device) - (_SSIM_WIN - 1) / 2
    g = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def _ssim_map_means(x: torch.Tensor, y: torch.Tensor, c1: float, c2: float) -> torch.Tensor:
    """Mean SSIM map value of each image in ``x``, ``y`` (float64 ``[N, H, W]``): ``[N]``."""
    n = x.shape[0]
    g = _gaussian_window(x.device)
    # Five local statistics per image, filtered together as channels of one separable conv.
    stats = torch.stack([x, y, x * x, y * y, x * y], dim=1).reshape(n * 5, 1, *x.shape[1:])
    stats = F.conv2d(stats, g.view(1, 1, 1, -1))  # along W, valid region only
    stats = F.conv2d(stats, g.view(1, 1, -1, 1))  # along H
    ux, uy, uxx, uyy, uxy = stats.reshape(n, 5, *stats.shape[2:]).unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy  # population (co)variances
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2))


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray,
         data_range: float = 255.0) -> float:
    """Mean structural similarity (Wang et al. 2004) of two videos, in [-1, 1] (1 = identical).

    Per frame and channel: local means ``ux, uy``, variances ``vx, vy`` and covariance ``vxy``
    under an 11x11 Gaussian window (sigma 1.5, population statistics), ``C1 = (0.01 R)^2``,
    ``C2 = (0.03 R)^2``, ``S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2))``,
    averaged over the window positions that lie fully inside the frame; the result is the mean
    over frames and channels. This equals scikit-image's ``structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R,
    channel_axis=-1)`` averaged over frames. Frames must be at least 11x11.
    """
    a, b = _check_pair(a, b)
    r = _check_data_range(data_range)
    t, h, w, _ = a.shape
    if h < _SSIM_WIN or w < _SSIM_WIN:
        raise ValueError(f"ssim: frames must be at least {_SSIM_WIN}x{_SSIM_WIN}, got {h}x{w}")
    c1, c2 = (_SSIM_K1 * r) ** 2, (_SSIM_K2 * r) ** 2
    step = _frames_per_chunk(a, copies=12)  # 5 stacked statistics, their conv outputs, the map
    total = 0.0
    for s in range(0, t, step):
        # [t, H, W, 3] -> [t * 3, H, W]: each channel of each frame is one grey image.
        x = a[s:s + step].to(torch.float64).permute(0, 3, 1, 2).reshape(-1, h, w)
        y = b[s:s + step].to(torch.float64).permute(0, 3, 1, 2).reshape(-1, h, w)
        total += float(_ssim_map_means(x, y, c1, c2).sum())
    return total / (t * 3)


# --------------------------------------------------------------------------- feature distances


def _check_features(feats: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validate an ``[N, D]`` feature set (N >= 2); return it as float64 on the CPU."""
    if isinstance(feats, np.ndarray):
        feats = torch.from_numpy(feats)
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array [N, D], got "
                        f"{type(feats).__name__}")
    if feats.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D feature matrix [N, D], got shape {tuple(feats.shape)}")
    if feats.is_complex() or feats.dtype == torch.bool:
        raise ValueError(f"{name}: expected real-valued features, got dtype {feats.dtype}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples to estimate a covariance, got "
                         f"{feats.shape[0]}")
    if feats.shape[1] < 1:
        raise ValueError(f"{name}: feature dimension must be >= 1, got shape {tuple(feats.shape)}")
    # Features are small ([N, D] with D <= a few thousand): float64 on the CPU keeps the
    # eigendecompositions accurate and the result independent of the device.
    x = feats.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _check_feature_pair(feats_a, feats_b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _check_features(feats_a, "feats_a"), _check_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension D, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    return a, b


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    w, v = torch.linalg.eigh(0.5 * (m + m.T))
    # Rank-deficient covariances (N <= D) have zero eigenvalues that round to tiny negatives.
    return (v * w.clamp_min(0.0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID / FVD formula).

    ``d = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr( (S_a^1/2 S_b S_a^1/2)^1/2 )`` with
    ``mu`` the sample means and ``S`` the unbiased sample covariances (``N - 1``, as
    ``numpy.cov``) of ``[N, D]`` features; the sets may differ in ``N``. The cross term is
    computed from symmetric PSD square roots (eigendecompositions in float64), which stay
    well-defined for rank-deficient covariances (``N <= D``), unlike ``scipy.linalg.sqrtm`` on
    ``S_a S_b``. Rounding can leave a result of about ``-1e-12`` for identical sets; it is
    returned as 0.0.
    """
    a, b = _check_feature_pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T, correction=1), torch.cov(b.T, correction=1)
    if cov_a.dim() == 0:  # torch.cov returns a scalar for D == 1
        cov_a, cov_b = cov_a.view(1, 1), cov_b.view(1, 1)
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eig = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0.0)
    d = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * eig.sqrt().sum())
    return max(d, 0.0)


def _kernel_sum(x: torch.Tensor, y: torch.Tensor, gamma: float, coef: float, degree: int,
                rows: int = 2048) -> float:
    """Sum of all entries of the polynomial kernel matrix ``(gamma x y^T + coef)^degree``."""
    total = 0.0
    for s in range(0, x.shape[0], rows):  # row blocks bound memory at rows x len(y)
        total += float(((x[s:s + rows] @ y.T) * gamma + coef).pow(degree).sum())
    return total


def kernel_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray,
                    degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Unbiased squared MMD with a polynomial kernel (the KID estimator), on ``[N, D]`` features.

    ``k(x, y) = (gamma <x, y> + coef)^degree`` with ``gamma = 1 / D`` by default (KID uses degree 3,
    coef 1). For ``m`` samples ``x`` and ``n`` samples ``y`` (each >= 2):
    ``MMD^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
    - 2 sum_{i,j} k(x_i, y_j) / (mn)``. The estimate is unbiased, so it fluctuates around 0
    (and can be slightly negative) when both sets come from one distribution. Computed over
    all pairs (no subsets), in float64 on the CPU.
    """
    a, b = _check_feature_pair(feats_a, feats_b)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    if gamma is None:
        gamma = 1.0 / a.shape[1]
    if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0 (or None for 1 / D), got {gamma!r}")
    if not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
    m, n = a.shape[0], b.shape[0]

    def diag_sum(x: torch.Tensor) -> float:
        return float(((x * x).sum(1) * gamma + coef).pow(degree).sum())

    k_aa = (_kernel_sum(a, a, gamma, coef, degree) - diag_sum(a)) / (m * (m - 1))
    k_bb = (_kernel_sum(b, b, gamma, coef, degree) - diag_sum(b)) / (n * (n - 1))
    k_ab = _kernel_sum(a, b, gamma, coef, degree) / (m * n)
    return k_aa + k_bb - 2.0 * k_ab


# --------------------------------------------------------------------------- per-block use


def blockwise(video: torch.Tensor | np.ndarray, frames_per_block: int,
              fn: Callable[..., float], *, reference: torch.Tensor | np.ndarray | None = None,
              drop_last: bool = False) -> list[float]:
    """Apply a metric to consecutive blocks of frames: ``[fn(video[0:n]), fn(video[n:2n]), ...]``.

    With ``reference`` (same shape as ``video``), ``fn`` gets the matching block of both:
    ``fn(video[i:i+n], reference[i:i+n])``, e.g. ``blockwise(v, 32, psnr, reference=bf16)`` for a
    per-block fidelity drift curve. The last block may be shorter than ``frames_per_block``
    (``fn`` must accept it; e.g. flickering needs 2 frames) unless ``drop_last`` is set.
    Pairs that straddle a block boundary are not seen by any block.
    """
    v = _check_video(video)
    if isinstance(frames_per_block, bool) or not isinstance(frames_per_block, int) or frames_per_block < 1:
        raise ValueError(f"frames_per_block must be an integer >= 1, got {frames_per_block!r}")
    ref = None
    if reference is not None:
        v, ref = _check_pair(v, reference)
    t = v.shape[0]
    stop = t - t % frames_per_block if drop_last else t
    out = []
    for s in range(0, stop, frames_per_block):
        block = v[s:s + frames_per_block]
        out.append(float(fn(block) if ref is None else fn(block, ref[s:s + frames_per_block])))
    return out
