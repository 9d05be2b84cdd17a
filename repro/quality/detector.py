"""An attribute detector the harness trains on procedural frames; it scores generated videos.

A small CNN reads one frame (resized to 64x64) and predicts the object's colour, shape, the
background colour and the object's centre. It learns from procedural frames with their exact
ground truth (:meth:`impl.train.procedural.ProceduralVideoSource.truth`), optionally mixed with
the same frames after a VAE round trip, so it also reads the softer frames a decoder produces.
Its penultimate features (``feature_dim``) are the embedding of the Frechet / kernel distances:
a network trained on this data, in place of the Inception/I3D networks that cannot be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from impl.config import require_positive, require_positive_ints
from impl.train.procedural import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES

__all__ = ["DetectorConfig", "AttributeDetector", "Detections", "train_detector", "frame_batches"]

INPUT_SIZE = 64


@dataclass(frozen=True)
class DetectorConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    feature_dim: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "batch_size", "feature_dim")
        require_positive(self, "lr")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Detections:
    """Per-frame outputs: class probabilities, centre [T, 2] (x, y fractions), features [T, D]."""

    color: torch.Tensor
    shape: torch.Tensor
    background: torch.Tensor
    center: torch.Tensor
    features: torch.Tensor


def _prepare(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, 64, 64] in [-1, 1]."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"detector: expected uint8 frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class AttributeDetector(nn.Module):
    def __init__(self, feature_dim: int = 32):
        super().__init__()
        chans = (3, 16, 32, 64, 64)
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):   # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        # Flatten (not pool) the 4x4 map: the centre is read from where activations are.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.LayerNorm(feature_dim))
        self.color = nn.Linear(feature_dim, len(OBJECT_COLORS))
        self.shape = nn.Linear(feature_dim, len(SHAPES))
        self.background = nn.Linear(feature_dim, len(BACKGROUND_COLORS))
        self.center = nn.Linear(feature_dim, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.embed(self.conv(x))
        h = F.silu(f)
        return self.color(h), self.shape(h), self.background(h), torch.sigmoid(self.center(h)), f

    @torch.no_grad()
    def detect(self, frames: torch.Tensor, chunk: int = 256) -> Detections:
        """Run on uint8 frames [T, H, W, 3] (any size; resized to 64x64)."""
        dev = next(self.parameters()).device
        outs = []
        for a in range(0, frames.shape[0], chunk):
            c, s, b, xy, f = self(_prepare(frames[a:a + chunk]).to(dev))
            outs.append((c.softmax(-1), s.softmax(-1), b.softmax(-1), xy, f))
        cat = [torch.cat([o[k] for o in outs]).float().cpu() for k in range(5)]
        return Detections(*cat)


def frame_batches(source, indices: Sequence[int], augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """All frames of clips ``indices`` with per-frame targets: (uint8 frames, targets dict).
    ``augment`` maps a clip's uint8 frames to a same-shaped variant (a VAE round trip)."""
    frames, targets = [], {k: [] for k in ("color", "shape", "background", "center")}
    for i in indices:
        clip = source[i]
        truth = source.truth(i)
        frames.append(clip.frames if augment is None else augment(clip.frames))
        for k in targets:
            targets[k].append(getattr(truth, k))
    return torch.cat(frames), {k: torch.cat(v) for k, v in targets.items()}


def train_detector(frames: torch.Tensor, targets: dict[str, torch.Tensor], cfg: DetectorConfig, *,
                   device: torch.device | str = "cpu", progress: bool = True) -> tuple[AttributeDetector, list[float]]:
    """Fit an :class:`AttributeDetector` on uint8 frames [N, H, W, 3] and their targets."""
    n = frames.shape[0]
    if n < 2:
        raise ValueError(f"train_detector: need at least 2 frames, got {n}")
    for k in ("color", "shape", "background", "center"):
        if k not in targets or targets[k].shape[0] != n:
            raise ValueError(f"train_detector: targets[{k!r}] must have one entry per frame ({n})")
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AttributeDetector(cfg.feature_dim)
    model = model.to(device).train()
    x_all = _prepare(frames)                      # [N, 3, 64, 64], small enough to keep
    t_all = {k: v.to(device) for k, v in targets.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="detector", disable=not progress):
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        x = x_all[idx].to(device)
        # Photometric jitter (brightness/contrast, small noise): generated frames are not exact.
        gain = 1 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=g) - 0.5).to(device)
        x = x * gain + 0.03 * torch.randn(x.shape, generator=g).to(device)
        idx = idx.to(device)
        c, s, b, xy, _ = model(x)
        loss = (F.cross_entropy(c, t_all["color"][idx]) + F.cross_entropy(s, t_all["shape"][idx])
                + F.cross_entropy(b, t_all["background"][idx]) + 20 * F.mse_loss(xy, t_all["center"][idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return model.eval().requires_grad_(False), losses


def accuracy(det: Detections, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-frame accuracy of each class head and the mean centre error (frame fractions)."""
    out = {k: float((getattr(det, k).argmax(-1) == targets[k].cpu()).float().mean())
           for k in ("color", "shape", "background")}
    out["center_err"] = float((det.center - targets["center"].cpu()).norm(dim=-1).mean())
    return out
