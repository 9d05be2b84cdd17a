"""Procedural multi-shot videos with known ground truth: the data of the quality proxy.

Every shot shows one object (a circle, square or triangle in one of six colours) moving at
constant speed left, right, up or down and bouncing off the frame's edges, over a plain,
gradient or striped background of one of four colours. Its caption is generated from those
attributes: ``"A red circle moves left over a striped grey background."`` A scene cut (on
the first raw frame of a block, so every AR block lies inside one shot) draws a new scene,
and that block's prompt starts with the pipeline's scene-cut prefix, exactly as
:func:`impl.pipeline.shot_prompts` writes multi-shot prompts at inference.

Item ``i`` depends only on ``(seed, i)``; clips may have any number of latent frames, since
every frame is rendered analytically (no simulation state). :meth:`ProceduralVideoSource.truth`
returns the per-frame ground truth (attribute classes, object centre, direction of motion),
and :func:`caption_attributes` recovers a caption's attributes, so generated videos can be
scored against their prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from impl.config import ConfigError, StreamConfig
from impl.train.captions import Shot, block_prompts_for_shots
from impl.train.samples import VideoClip
from impl.train.synthetic import MultiShotClipSource

__all__ = ["OBJECT_COLORS", "BACKGROUND_COLORS", "SHAPES", "DIRECTIONS", "STYLES", "Scene", "FrameTruth",
           "ProceduralVideoSource", "caption_attributes", "render_scene"]

# Well separated in RGB, so colour survives a small VAE.
OBJECT_COLORS = {
    "red": (0.92, 0.15, 0.12), "green": (0.15, 0.82, 0.22), "blue": (0.2, 0.45, 1.0),
    "yellow": (0.97, 0.88, 0.12), "white": (0.96, 0.96, 0.96), "magenta": (0.9, 0.2, 0.85),
}
BACKGROUND_COLORS = {
    "black": (0.06, 0.06, 0.08), "grey": (0.45, 0.45, 0.45), "navy": (0.08, 0.1, 0.32),
    "brown": (0.38, 0.22, 0.1),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
STYLES = ("plain", "gradient", "striped")

_CAPTION = re.compile(r"an? (?P<color>\w+) (?P<shape>\w+) moves (?P<direction>\w+) over an? "
                      r"(?:(?P<style>gradient|striped) )?(?P<background>\w+) background")


@dataclass(frozen=True)
class Scene:
    """One shot's attributes and motion; positions are fractions of the frame (x right, y down)."""

    color: str
    shape: str
    background: str
    style: str
    direction: str
    speed: float            # frame fractions per raw frame
    radius: float           # frame fractions (of the shorter side)
    start: tuple[float, float]

    @property
    def caption(self) -> str:
        bg = self.background if self.style == "plain" else f"{self.style} {self.background}"
        return f"A {self.color} {self.shape} moves {self.direction} over a {bg} background."

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "background": self.background,
                "direction": self.direction, "style": self.style}

    def center(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, sign) at shot-relative raw frames ``t``: the object moves along its axis and
        reflects off the edges (a triangle wave); ``sign`` is +1 while it moves in the caption's
        direction and -1 after an odd number of bounces."""
        dx, dy = DIRECTIONS[self.direction]
        lo, hi = self.radius, 1.0 - self.radius
        span = hi - lo
        along = self.start[0] if dx else self.start[1]
        step = dx if dx else dy
        u = torch.remainder(along - lo + step * self.speed * t, 2 * span)
        pos = lo + torch.where(u <= span, u, 2 * span - u)
        # In the first half of the period the object moves the caption's way, for either sign
        # of ``step`` (u runs forward or backward from the start).
        sign = torch.where(u <= span, 1.0, -1.0)
        fixed = torch.full_like(pos, self.start[1] if dx else self.start[0])
        return (pos, fixed, sign) if dx else (fixed, pos, sign)


def caption_attributes(caption: str) -> dict[str, str]:
    """Attributes of a procedural caption (a scene-cut prefix is allowed); ValueError otherwise."""
    m = _CAPTION.search(caption.lower())
    if m is None:
        raise ValueError(f"caption_attributes: not a procedural caption: {caption!r}")
    out = {k: m.group(k) for k in ("color", "shape", "direction", "background")}
    out["style"] = m.group("style") or "plain"
    for key, allowed in (("color", OBJECT_COLORS), ("shape", SHAPES), ("direction", DIRECTIONS),
                         ("background", BACKGROUND_COLORS)):
        if out[key] not in allowed:
            raise ValueError(f"caption_attributes: unknown {key} {out[key]!r} in {caption!r}; "
                             f"allowed: {sorted(allowed)}")
    return out


def _shape_distance(shape: str, px: torch.Tensor, py: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (frame fractions, negative inside) to a shape of size ``r`` at the origin."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":   # half-side 0.85 r: about the circle's area
        return torch.maximum(px.abs(), py.abs()) - 0.85 * r
    # Upward equilateral triangle with circumradius 1.25 r, as the max over its three edges.
    s3 = 3 ** 0.5
    rr = 1.25 * r
    e1 = py - rr / 2                                  # bottom edge
    e2 = (s3 * px - py) / 2 - rr / 2                  # right edge
    e3 = (-s3 * px - py) / 2 - rr / 2                 # left edge
    return torch.maximum(e1, torch.maximum(e2, e3))


def render_scene(scene: Scene, t0: int, t1: int, height: int, width: int) -> torch.Tensor:
    """uint8 [t1 - t0, height, width, 3]: shot-relative raw frames ``t0 .. t1 - 1``."""
    side = min(height, width)
    ys = ((torch.arange(height, dtype=torch.float32) + 0.5) / side).view(1, height, 1)
    xs = ((torch.arange(width, dtype=torch.float32) + 0.5) / side).view(1, 1, width)
    t = torch.arange(t0, t1, dtype=torch.float32)
    cx, cy, _ = scene.center(t)
    # Centres are fractions of each axis; distances are in units of the shorter side.
    px = xs - (cx * width / side).view(-1, 1, 1)
    py = ys - (cy * height / side).view(-1, 1, 1)
    dist = _shape_distance(scene.shape, px, py, scene.radius)
    alpha = (0.5 - dist * side).clamp(0.0, 1.0).unsqueeze(-1)      # 1-pixel antialiased edge
    bg = torch.tensor(BACKGROUND_COLORS[scene.background]).view(1, 1, 1, 3)
    yy = ys.view(1, height, 1, 1) * side / height
    if scene.style == "gradient":
        bg = bg * (0.7 + 0.6 * yy)
    elif scene.style == "striped":
        bg = bg * (1.0 + 0.35 * torch.sign(torch.sin(2 * np.pi * 6 * yy)))
    bg = bg.clamp(0.0, 1.0).expand(len(t), height, width, 3)
    fg = torch.tensor(OBJECT_COLORS[scene.color]).view(1, 1, 1, 3)
    img = bg * (1 - alpha) + fg * alpha
    return (img * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class FrameTruth:
    """Per raw frame ground truth of a clip: class indices (into the module's tables), object
    centre [T, 2] (x, y frame fractions), unit motion direction [T, 2] after bounces, shot index."""

    color: torch.Tensor
    shape: torch.Tensor
    background: torch.Tensor
    center: torch.Tensor
    motion: torch.Tensor
    shot: torch.Tensor


class ProceduralVideoSource(MultiShotClipSource):
    """Deterministic procedural clips with the interface of
    :class:`impl.train.video_folder.VideoFolderDataset`.

    ``shots_per_clip`` scenes per clip, cut at the first raw frame of randomly chosen blocks.
    """

    def __init__(self, num_latent_frames: int, frames_per_block: int, height: int, width: int, *,
                 length: int, seed: int = 0, shots_per_clip: int = 1, temporal_factor: int = 4,
                 scene_cut_prefix: str = StreamConfig.scene_cut_prefix) -> None:
        owner = "ProceduralVideoSource"
        super().__init__(owner, num_latent_frames, frames_per_block, height, width, length=length, seed=seed,
                         shots_per_clip=shots_per_clip, temporal_factor=temporal_factor)
        if min(height, width) < 16:
            raise ConfigError(f"{owner}.height/width: need at least 16 pixels, got {height}x{width}")
        if not isinstance(scene_cut_prefix, str):
            raise ConfigError(f"{owner}.scene_cut_prefix: must be a string, got {scene_cut_prefix!r}")
        self.scene_cut_prefix = scene_cut_prefix

    def _plan(self, index: int) -> tuple[list[int], list[Scene]]:
        _, g = self._item(index)
        cut_blocks = self._cut_blocks(g)

        def pick(options, exclude=None):
            options = [o for o in options if o != exclude]
            return options[int(torch.randint(len(options), (1,), generator=g))]

        scenes: list[Scene] = []
        for _ in cut_blocks:
            prev = scenes[-1] if scenes else None
            r = torch.rand(4, generator=g).tolist()
            radius = 0.12 + 0.06 * r[0]
            scenes.append(Scene(
                color=pick(list(OBJECT_COLORS), prev.color if prev else None),
                shape=pick(list(SHAPES)),
                background=pick(list(BACKGROUND_COLORS), prev.background if prev else None),
                style=pick(list(STYLES)),
                direction=pick(list(DIRECTIONS)),
                speed=0.012 + 0.018 * r[1],
                radius=radius,
                start=(radius + (1 - 2 * radius) * r[2], radius + (1 - 2 * radius) * r[3])))
        return cut_blocks, scenes

    def scenes(self, index: int) -> list[Scene]:
        """The scenes of item ``index``, one per shot."""
        return self._plan(index)[1]

    def shots(self, index: int) -> list[Shot]:
        """The shots (raw frame starts and captions, cut prefix included) of item ``index``."""
        cut_blocks, scenes = self._plan(index)
        out = []
        for k, (j, scene) in enumerate(zip(cut_blocks, scenes)):
            caption = scene.caption if k == 0 else self.scene_cut_prefix + scene.caption
            out.append(Shot(self.geometry.block_start_frame(j), caption))
        return out

    def block_prompts(self, index: int) -> list[str]:
        """One prompt per AR block: the shot's caption, with the cut prefix on the cut block only."""
        shots = self.shots(index)
        prompts = block_prompts_for_shots(shots, self.num_latent_frames, self.frames_per_block, 0,
                                          self.temporal_factor)
        # Only the block that opens a shot carries the prefix (the pipeline's convention).
        return [p if b == 0 or p != prompts[b - 1] else p.removeprefix(self.scene_cut_prefix)
                for b, p in enumerate(prompts)]

    def _bounds(self, index: int) -> tuple[list[int], list[Scene]]:
        cut_blocks, scenes = self._plan(index)
        return self.geometry.shot_bounds(cut_blocks), scenes

    def __getitem__(self, index: int) -> VideoClip:
        bounds, scenes = self._bounds(index)
        frames = self._render_shots(bounds, lambda k, a, b: render_scene(scenes[k], a - bounds[k], b - bounds[k],
                                                                         self.height, self.width))
        return VideoClip(frames, self.block_prompts(index), f"procedural-{self.seed}-{int(index):06d}", 0)

    def truth(self, index: int) -> FrameTruth:
        """Ground truth of every raw frame of item ``index``."""
        bounds, scenes = self._bounds(index)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("color", "shape", "background", "center",
                                                                 "motion", "shot")}
        for k, scene in enumerate(scenes):
            n = bounds[k + 1] - bounds[k]
            cx, cy, sign = scene.center(torch.arange(n, dtype=torch.float32))
            d = torch.tensor(DIRECTIONS[scene.direction])
            for key, value in (("color", list(OBJECT_COLORS).index(scene.color)),
                               ("shape", SHAPES.index(scene.shape)),
                               ("background", list(BACKGROUND_COLORS).index(scene.background)),
                               ("shot", k)):
                parts[key].append(torch.full((n,), value, dtype=torch.long))
            parts["center"].append(torch.stack([cx, cy], dim=1))
            parts["motion"].append(sign.view(-1, 1) * d.view(1, 2))
        return FrameTruth(**{k: torch.cat(v) for k, v in parts.items()})

    def describe(self) -> dict[str, Any]:
        return {"kind": "procedural", "seed": self.seed, "length": self.length,
                "shots_per_clip": self.shots_per_clip, "frames": self.num_latent_frames}
