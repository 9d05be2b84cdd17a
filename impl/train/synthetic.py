"""Synthetic data sources: deterministic stand-ins for a video folder or for encoded latents.

- :class:`SyntheticVideoSource` (``--data synthetic-video``): multi-shot raw clips (drifting
  colour waves and a moving blob, with captions that describe them) that go through the VAE
  and text encoder like real video;
- :class:`SyntheticLatentSource` (``--data synthetic-latents``): random latents and text
  states, no VAE or text encoder (speed runs at full model size).

:class:`MultiShotClipSource` is what every procedural clip source shares (this module's and
:class:`impl.train.procedural.ProceduralVideoSource`): the clip geometry, the length, the
seed, and scene cuts on the first raw frame of randomly chosen blocks, so every AR block lies
within one shot. Item ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from impl.config import ConfigError
from impl.train.captions import Shot, block_prompts_for_shots
from impl.train.clip_geometry import ClipGeometry, GeometryAttributes
from impl.train.data_util import check_index, check_int, seeded_generator
from impl.train.samples import LatentSample, VideoClip

__all__ = ["MultiShotClipSource", "SyntheticVideoSource", "SyntheticLatentSource", "pick_cut_blocks"]

_RENDER_CHUNK = 16   # raw frames rendered at a time: bounds the float working memory


def pick_cut_blocks(g: torch.Generator, n_blocks: int, n_shots: int) -> list[int]:
    """The blocks that open a shot: block 0 and ``n_shots - 1`` distinct others, increasing."""
    if n_shots == 1:
        return [0]
    chosen = (torch.randperm(n_blocks - 1, generator=g)[:n_shots - 1] + 1).sort().values.tolist()
    return [0] + chosen


def _check_shots_per_clip(owner: str, shots_per_clip: int, n_blocks: int) -> int:
    check_int(shots_per_clip, f"{owner}.shots_per_clip", 1)
    if shots_per_clip > n_blocks:
        raise ConfigError(f"{owner}.shots_per_clip: at most the number of blocks "
                          f"({n_blocks}), got {shots_per_clip}")
    return int(shots_per_clip)


class MultiShotClipSource(GeometryAttributes):
    """Base of the deterministic multi-shot raw-clip sources (see the module docstring).

    :meth:`set_epoch` is accepted for interface compatibility and changes nothing.
    """

    def __init__(self, owner: str, num_latent_frames: int, frames_per_block: int, height: int, width: int, *,
                 length: int, seed: int, shots_per_clip: int, temporal_factor: int) -> None:
        self.geometry = ClipGeometry(num_latent_frames, frames_per_block, height, width, temporal_factor,
                                     owner=owner)
        self.seed = check_int(seed, f"{owner}.seed", 0)
        self.length = check_int(length, f"{owner}.length", 1)
        self.n_blocks = self.geometry.num_blocks
        self.shots_per_clip = _check_shots_per_clip(owner, shots_per_clip, self.n_blocks)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int(epoch, f"{type(self).__name__}.set_epoch(epoch)", 0)

    def _item(self, index: int) -> tuple[int, torch.Generator]:
        """Item ``index`` as a position, and the generator all its random choices draw from
        (in a fixed order)."""
        i = check_index(index, len(self), type(self).__name__)
        return i, seeded_generator(self.seed, i)

    def _cut_blocks(self, g: torch.Generator) -> list[int]:
        return pick_cut_blocks(g, self.n_blocks, self.shots_per_clip)

    def _render_shots(self, bounds: list[int], render: Callable[[int, int, int], torch.Tensor]) -> torch.Tensor:
        """uint8 [num_raw_frames, H, W, 3]: shot ``k`` covers raw frames ``[bounds[k], bounds[k+1])``
        and ``render(k, a, b)`` draws its (clip-relative) frames ``a .. b - 1``."""
        frames = torch.empty(self.num_raw_frames, self.height, self.width, 3, dtype=torch.uint8)
        for k in range(len(bounds) - 1):
            for a in range(bounds[k], bounds[k + 1], _RENDER_CHUNK):
                b = min(a + _RENDER_CHUNK, bounds[k + 1])
                frames[a:b] = render(k, a, b)
        return frames


_PALETTE = {
    "red": (0.85, 0.2, 0.2), "orange": (0.9, 0.55, 0.15), "yellow": (0.9, 0.85, 0.25),
    "green": (0.25, 0.7, 0.3), "teal": (0.2, 0.65, 0.65), "blue": (0.2, 0.35, 0.85),
    "purple": (0.55, 0.3, 0.75), "pink": (0.9, 0.5, 0.7), "grey": (0.55, 0.55, 0.55),
    "white": (0.92, 0.92, 0.92),
}
_DIRECTIONS = ("right", "down and to the right", "down", "down and to the left", "left",
               "up and to the left", "up", "up and to the right")
_TEXTURES = ("soft", "wide", "rippling", "gentle", "bold")


def _direction_word(dx: float, dy: float) -> str:
    angle = float(np.arctan2(dy, dx)) % (2 * np.pi)
    return _DIRECTIONS[int(round(angle / (np.pi / 4))) % 8]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class SyntheticVideoSource(MultiShotClipSource):
    """Deterministic synthetic clips with the interface of
    :class:`impl.train.video_folder.VideoFolderDataset`.

    Each shot is a smooth drifting sinusoidal colour gradient with a moving soft blob (so VAE
    encodings have structure, unlike pure noise) and a caption describing it.
    """

    def __init__(self, num_latent_frames: int, frames_per_block: int, height: int, width: int, *,
                 length: int, seed: int = 0, shots_per_clip: int = 1, temporal_factor: int = 4) -> None:
        super().__init__("SyntheticVideoSource", num_latent_frames, frames_per_block, height, width,
                         length=length, seed=seed, shots_per_clip=shots_per_clip, temporal_factor=temporal_factor)

    def shots(self, index: int) -> list[Shot]:
        """The shots (raw frame starts and captions) of item ``index``."""
        return self._plan(self._item(index)[1])[0]

    def _plan(self, g: torch.Generator) -> tuple[list[Shot], list[dict[str, Any]]]:
        cut_blocks = self._cut_blocks(g)
        names = list(_PALETTE)
        shots, params = [], []
        prev_base = None
        for j in cut_blocks:
            choices = [n for n in names if n != prev_base]
            base = choices[int(torch.randint(len(choices), (1,), generator=g))]
            blob = [n for n in names if n != base][int(torch.randint(len(names) - 1, (1,), generator=g))]
            prev_base = base
            r = torch.rand(11, generator=g).tolist()
            theta = 2 * np.pi * r[0]
            speed = 0.02 + 0.05 * r[1]                       # cycles per frame
            blob_v = (0.04 * (2 * r[2] - 1), 0.04 * (2 * r[3] - 1))  # frame widths per frame
            p = dict(base=torch.tensor(_PALETTE[base]), blob=torch.tensor(_PALETTE[blob]),
                     theta=theta, freq=0.6 + 1.4 * r[4], speed=speed,
                     phase=torch.tensor(r[5:8]) * 2 * np.pi, amp=0.12 + 0.12 * r[8],
                     blob_c=(r[9], 1 - r[9]), blob_v=blob_v, blob_r=0.12 + 0.1 * r[10])
            texture = _TEXTURES[int(torch.randint(len(_TEXTURES), (1,), generator=g))]
            caption = (f"{texture.capitalize()} {base} waves drift "
                       f"{_direction_word(np.cos(theta), np.sin(theta))} while {_article(blob)} {blob} glow moves "
                       f"{_direction_word(*blob_v)}.")
            shots.append(Shot(self.geometry.block_start_frame(j), caption))
            params.append(p)
        return shots, params

    def _render(self, p: dict[str, Any], t0: int, t1: int) -> torch.Tensor:
        h, w = self.height, self.width
        y = torch.linspace(0, 1, h).view(1, h, 1)
        x = torch.linspace(0, 1, w).view(1, 1, w)
        u = x * np.cos(p["theta"]) + y * np.sin(p["theta"])             # [1, h, w]
        t = torch.arange(t0, t1, dtype=torch.float32).view(-1, 1, 1)    # [T, 1, 1]
        arg = 2 * np.pi * (p["freq"] * u - p["speed"] * t)              # [T, h, w]
        img = p["base"].view(1, 1, 1, 3) + p["amp"] * torch.sin(arg.unsqueeze(-1) + p["phase"])
        # blob bouncing inside the frame (triangle wave keeps the centre in [0, 1])
        cx = 1 - (1 - (p["blob_c"][0] + p["blob_v"][0] * t) % 2).abs()
        cy = 1 - (1 - (p["blob_c"][1] + p["blob_v"][1] * t) % 2).abs()
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        weight = (0.7 * torch.exp(-d2 / (2 * p["blob_r"] ** 2))).unsqueeze(-1)
        img = img * (1 - weight) + p["blob"].view(1, 1, 1, 3) * weight
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)

    def __getitem__(self, index: int) -> VideoClip:
        i, g = self._item(index)
        shots, params = self._plan(g)
        bounds = [s.start_frame for s in shots] + [self.num_raw_frames]
        frames = self._render_shots(bounds, lambda k, a, b: self._render(params[k], a, b))
        prompts = block_prompts_for_shots(shots, self.num_latent_frames, self.frames_per_block, 0,
                                          self.temporal_factor)
        return VideoClip(frames, prompts, f"synthetic-{self.seed}-{i:06d}", 0)


class SyntheticLatentSource:
    """Pre-encoded stand-ins (no VAE, no text encoder) for speed benchmarks at full model size.

    Item ``i`` is a :class:`LatentSample` drawn from ``(seed, i)``: latents ~ N(0, 1) of shape
    [C, F, h, w] and text embeddings [n_blocks, text_len, text_dim] ~ N(0, 1), identical for the
    blocks of one shot (``shots_per_clip`` shots, cuts at random block boundaries). Values are
    drawn in float32 and cast to ``dtype``, so every dtype sees the same numbers.
    """

    def __init__(self, latent_channels: int, num_latent_frames: int, latent_height: int,
                 latent_width: int, text_len: int, text_dim: int, *, frames_per_block: int,
                 length: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                 shots_per_clip: int = 1) -> None:
        owner = "SyntheticLatentSource"
        for name, value in (("latent_channels", latent_channels), ("latent_height", latent_height),
                            ("latent_width", latent_width), ("text_len", text_len),
                            ("text_dim", text_dim)):
            check_int(value, f"{owner}.{name}", 1)
        # Latent frames only (temporal factor 1): the blocks and the frame count checks.
        self.n_blocks = ClipGeometry(num_latent_frames, frames_per_block, latent_height, latent_width, 1,
                                     owner=owner).num_blocks
        self.seed = check_int(seed, f"{owner}.seed", 0)
        self.length = check_int(length, f"{owner}.length", 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"{owner}.dtype: must be a floating torch.dtype, got {dtype!r}")
        self.shots_per_clip = _check_shots_per_clip(owner, shots_per_clip, self.n_blocks)
        self.latent_shape = (latent_channels, num_latent_frames, latent_height, latent_width)
        self.text_len, self.text_dim = text_len, text_dim
        self.frames_per_block = frames_per_block
        self.dtype = dtype
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Accepted for interface compatibility; items do not depend on the epoch."""
        self.epoch = check_int(epoch, "SyntheticLatentSource.set_epoch(epoch)", 0)

    def __getitem__(self, index: int) -> LatentSample:
        i = check_index(index, len(self), "SyntheticLatentSource")
        g = seeded_generator(self.seed, i)
        cuts = pick_cut_blocks(g, self.n_blocks, self.shots_per_clip)
        latents = torch.randn(self.latent_shape, generator=g)
        shot_text = torch.randn(len(cuts), self.text_len, self.text_dim, generator=g)
        shot_of_block = [sum(1 for c in cuts if c <= j) - 1 for j in range(self.n_blocks)]
        text = shot_text[shot_of_block]
        prompts = [f"synthetic latent sample {self.seed}-{i}, shot {k}" for k in shot_of_block]
        return LatentSample(latents.to(self.dtype), text.to(self.dtype), prompts,
                            f"synthetic-latent-{self.seed}-{i:06d}")
