"""The frame arithmetic of a training clip, in one place for every data source.

A training sample is a clip of ``F`` latent frames. The Wan2.2 VAE is causal with temporal
factor ``tf`` (4), so the clip needs exactly ``1 + tf (F - 1)`` raw frames: latent 0 encodes
raw frame 0 alone and latent ``l >= 1`` encodes raw frames ``1 + tf (l - 1) .. tf l``.
Training groups the latents into AR blocks of ``frames_per_block`` latents; block ``j`` covers
latents ``[j fpb, (j + 1) fpb)`` and starts at raw frame ``latent_to_raw_frame(j fpb)``, which
is where scene cuts of multi-shot clips fall and which raw frame picks a block's caption.
Frames of another size are scaled to cover ``height x width`` and centre-cropped.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from impl.config import ConfigError, raw_frames_for_latents
from impl.train.data_util import check_int

__all__ = ["ClipGeometry", "GeometryAttributes", "latent_to_raw_frame", "resize_center_crop"]


def latent_to_raw_frame(latent_index: int, temporal_factor: int = 4) -> int:
    """First raw frame (relative to the clip) that latent ``latent_index`` encodes."""
    check_int(latent_index, "latent_index", 0)
    return 0 if latent_index == 0 else 1 + temporal_factor * (latent_index - 1)


@dataclass(frozen=True)
class ClipGeometry:
    """Latent frames, AR block size, frame size and VAE temporal factor of one clip, validated.

    ``owner`` only names the fields in error messages (``VideoFolderDataset.height: ...``).
    """

    num_latent_frames: int
    frames_per_block: int
    height: int
    width: int
    temporal_factor: int = 4
    owner: InitVar[str] = "ClipGeometry"

    def __post_init__(self, owner: str) -> None:
        for name in ("num_latent_frames", "frames_per_block", "height", "width", "temporal_factor"):
            check_int(getattr(self, name), f"{owner}.{name}", 1)
        if self.num_latent_frames % self.frames_per_block:
            raise ConfigError(f"{owner}.num_latent_frames: must be a multiple of frames_per_block="
                              f"{self.frames_per_block}, got {self.num_latent_frames}")

    @property
    def num_raw_frames(self) -> int:
        """``1 + tf (F - 1)``: the raw frames the clip's latents encode."""
        return raw_frames_for_latents(self.num_latent_frames, self.temporal_factor)

    @property
    def num_blocks(self) -> int:
        return self.num_latent_frames // self.frames_per_block

    def block_start_frame(self, block: int) -> int:
        """The raw frame (relative to the clip) where AR block ``block`` starts."""
        return latent_to_raw_frame(block * self.frames_per_block, self.temporal_factor)

    def shot_bounds(self, cut_blocks: Sequence[int]) -> list[int]:
        """Raw frame bounds ``[start_0, start_1, ..., num_raw_frames]`` of shots that open at the
        first raw frame of the blocks ``cut_blocks`` (increasing, the first 0)."""
        return [self.block_start_frame(j) for j in cut_blocks] + [self.num_raw_frames]


class _FromGeometry:
    """A read-only attribute that reads the field of the same name from ``obj.geometry``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> int:
        if obj is None:
            return self  # type: ignore[return-value]  # the class attribute: the descriptor itself
        return getattr(obj.geometry, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name}: read-only, it is the clip geometry's (set geometry instead)")


class GeometryAttributes:
    """The geometry fields of a data source's ``geometry`` as read-only attributes (the names
    callers and the trainer read: ``source.frames_per_block``, ``source.num_raw_frames``...)."""

    geometry: ClipGeometry

    num_latent_frames = _FromGeometry()
    frames_per_block = _FromGeometry()
    height = _FromGeometry()
    width = _FromGeometry()
    temporal_factor = _FromGeometry()
    num_raw_frames = _FromGeometry()


def resize_center_crop(frames: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: scale preserving the aspect ratio so the
    frame covers ``height x width`` (bilinear, antialiased), then crop the centre.

    Frames already of the target size are returned unchanged. ``chunk`` frames are resized at a
    time to bound the float32 working memory.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize_center_crop: expected uint8 [T, H, W, 3], got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    check_int(height, "height", 1)
    check_int(width, "width", 1)
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h = max(height, round(h * scale))
    new_w = max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = torch.empty(t, height, width, 3, dtype=torch.uint8)
    for a in range(0, t, chunk):
        x = frames[a:a + chunk].permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=True)
        x = x[:, :, top:top + height, left:left + width]
        out[a:a + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out
