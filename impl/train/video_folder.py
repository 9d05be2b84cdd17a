"""A folder of mp4 clips with caption sidecars as a training data source, and its writer.

Folder layout (:class:`VideoFolderDataset`, written by :func:`write_video_folder`)::

    root/clip_a.mp4   root/clip_a.txt    # sidecars: see impl/train/captions.py
    root/clip_b.mp4   root/clip_b.json

Item ``i`` is a clip of ``1 + tf (F - 1)`` raw frames (see impl/train/clip_geometry.py) cut
from video ``i`` (sorted by name), resized and centre-cropped to the training size, with one
prompt per AR block from the video's shots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import torch

from impl.config import ConfigError
from impl.train.captions import (Shot, block_prompts_for_shots, check_shots, shots_from_block_prompts,
                                 video_sidecar_shots, write_caption_sidecar)
from impl.train.clip_geometry import ClipGeometry, GeometryAttributes, resize_center_crop
from impl.train.data_util import DatasetError, check_index, check_int, seeded_generator
from impl.train.samples import VideoClip
from impl.video_io import Mp4Writer, read_video

__all__ = ["CLIP_STARTS", "SourceVideo", "VideoFolderDataset", "write_video_folder"]

CLIP_STARTS = ("random", "start")


@dataclass
class SourceVideo:
    """A whole video to write with :func:`write_video_folder`: uint8 frames [T, H, W, 3] and its
    shots (raw frame starts; one shot = a single caption)."""

    key: str
    frames: torch.Tensor
    shots: list[Shot]


@dataclass(frozen=True)
class _FolderItem:
    video: Path
    key: str
    shots: tuple[Shot, ...]


class VideoFolderDataset(GeometryAttributes):
    """``*.mp4`` files of one folder (sorted by name, not recursive) with caption sidecars.

    Construction lists the folder and parses every sidecar, so a missing sidecar, bad JSON or
    an empty caption fails at once, naming the file. Frame counts are checked when an item is
    loaded (or at construction with ``probe_frames=True``, which counts the frames of every
    video with ffmpeg). With ``skip_invalid=True`` unusable items found at construction are left
    out instead, listed in :attr:`skipped` as ``(path, reason)`` and reported with a warning;
    a video found too short at load time always raises.

    Item ``i`` (:meth:`__getitem__`) is a :class:`VideoClip` of ``1 + tf (F - 1)`` raw frames
    starting at frame 0 (``clip_start='start'``) or at a start drawn from
    ``(seed, epoch, i)`` (``'random'``; see :meth:`set_epoch`), resized preserving the aspect
    ratio and centre-cropped to ``height x width``.
    """

    def __init__(self, root: str | Path, num_latent_frames: int, frames_per_block: int, height: int,
                 width: int, *, temporal_factor: int = 4, seed: int = 0, clip_start: str = "random",
                 skip_invalid: bool = False, probe_frames: bool = False) -> None:
        owner = "VideoFolderDataset"
        self.geometry = ClipGeometry(num_latent_frames, frames_per_block, height, width, temporal_factor,
                                     owner=owner)
        self.seed = check_int(seed, f"{owner}.seed", 0)
        if clip_start not in CLIP_STARTS:
            raise ConfigError(f"{owner}.clip_start: must be one of {CLIP_STARTS}, got {clip_start!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{owner}.root: {self.root} is not a directory")
        self.clip_start = clip_start
        self.epoch = 0
        self.skipped: list[tuple[Path, str]] = []
        self._frame_counts: dict[int, int] = {}

        videos = sorted(p for p in self.root.iterdir()
                        if p.suffix.lower() == ".mp4" and not p.name.startswith(".") and p.is_file())
        if not videos:
            raise DatasetError(f"{owner}.root: no .mp4 files in {self.root}")
        items: list[_FolderItem] = []
        counts: list[int | None] = []
        for video in videos:
            try:
                item = _FolderItem(video, video.stem, tuple(video_sidecar_shots(video)))
                count = self._probe(video) if probe_frames else None
            except DatasetError as exc:
                if not skip_invalid:
                    raise
                self.skipped.append((video, str(exc)))
                continue
            items.append(item)
            counts.append(count)
        if self.skipped:
            warnings.warn(f"{owner}: skipped {len(self.skipped)} of {len(videos)} videos in {self.root} "
                          f"(see .skipped): " + "; ".join(r for _, r in self.skipped[:3])
                          + (" ..." if len(self.skipped) > 3 else ""), stacklevel=2)
        if not items:
            raise DatasetError(f"{owner}.root: none of the {len(videos)} videos in {self.root} is usable")
        self._items = items
        self._frame_counts = {i: c for i, c in enumerate(counts) if c is not None}

    # -- construction helpers -----------------------------------------------------------------
    def _probe(self, video: Path) -> int:
        import imageio_ffmpeg
        try:
            count = int(imageio_ffmpeg.count_frames_and_secs(str(video))[0])
        except Exception as exc:  # ffmpeg's error for a broken file
            raise DatasetError(f"{video}: cannot count frames: {exc}") from exc
        self._check_length(video, count)
        return count

    def _check_length(self, video: Path, count: int) -> None:
        if count < self.num_raw_frames:
            raise DatasetError(f"{video}: has {count} frames but a clip of num_latent_frames="
                               f"{self.num_latent_frames} needs {self.num_raw_frames} raw frames "
                               f"(1 + {self.temporal_factor} (F - 1))")

    # -- dataset interface --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self._items]

    def shots(self, index: int) -> list[Shot]:
        """The parsed shots of item ``index``."""
        return list(self._items[check_index(index, len(self), "VideoFolderDataset")].shots)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random clip starts :meth:`__getitem__` draws."""
        self.epoch = check_int(epoch, "VideoFolderDataset.set_epoch(epoch)", 0)

    def clip_start_for(self, index: int, num_frames: int) -> int:
        """The clip start of item ``index`` in the current epoch for a video of ``num_frames``."""
        slack = num_frames - self.num_raw_frames
        if self.clip_start == "start" or slack <= 0:
            return 0
        g = seeded_generator(self.seed, self.epoch, index)
        return int(torch.randint(0, slack + 1, (1,), generator=g).item())

    def __getitem__(self, index: int) -> VideoClip:
        i = check_index(index, len(self), "VideoFolderDataset")
        item = self._items[i]
        n = self.num_raw_frames
        known = self._frame_counts.get(i)
        if self.clip_start == "start":  # decode only the clip
            frames = read_video(item.video, max_frames=n)
            self._check_length(item.video, frames.shape[0] if known is None else known)
            start = 0
        elif known is not None:  # length known: decode only up to the end of the clip
            self._check_length(item.video, known)
            start = self.clip_start_for(i, known)
            frames = read_video(item.video, max_frames=start + n)
        else:  # first visit: decode it all to learn the length, remembered for later epochs
            frames = read_video(item.video)
            self._check_length(item.video, frames.shape[0])
            self._frame_counts[i] = frames.shape[0]
            start = self.clip_start_for(i, frames.shape[0])
        clip = frames[start:start + n]
        if clip.shape[0] != n:  # the file changed since its length was recorded
            raise DatasetError(f"{item.video}: decoded {frames.shape[0]} frames, needed {start + n} "
                               f"(clip start {start} + {n} raw frames); was the file replaced?")
        clip = resize_center_crop(clip, self.height, self.width)
        prompts = block_prompts_for_shots(item.shots, self.num_latent_frames, self.frames_per_block,
                                          start, self.temporal_factor)
        return VideoClip(clip.contiguous(), prompts, item.key, start)


def write_video_folder(root: str | Path, clips: Iterable[Union[VideoClip, SourceVideo]], *,
                       fps: int = 24, quality: float = 9.0, temporal_factor: int = 4) -> list[Path]:
    """Write ``<key>.mp4`` + ``<key>.json`` for every clip into ``root`` (created if needed).

    A :class:`SourceVideo` is written with its shots. A :class:`VideoClip` gets one shot per
    run of equal block prompts, starting at the first raw frame of the run's first block (its
    frame count must be ``1 + tf (F - 1)`` with ``F`` a multiple of the block count), so reading
    it back with the same ``frames_per_block`` and ``clip_start='start'`` gives the same block
    prompts. One shot is written as ``{"caption": ...}``, several as ``{"shots": [...]}``.
    Frames must have even height and width (H.264 yuv420p). Returns the mp4 paths.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen: set[str] = set()
    for clip in clips:
        if isinstance(clip, VideoClip):
            t = clip.frames.shape[0]
            if (t - 1) % temporal_factor:
                raise ValueError(f"write_video_folder: clip {clip.key!r} has {t} frames, not "
                                 f"1 + {temporal_factor} (F - 1)")
            f_lat = 1 + (t - 1) // temporal_factor
            if f_lat % clip.num_blocks:
                raise ValueError(f"write_video_folder: clip {clip.key!r}: {f_lat} latent frames do "
                                 f"not split into {clip.num_blocks} blocks")
            shots = shots_from_block_prompts(clip.block_prompts, f_lat // clip.num_blocks, temporal_factor)
        elif isinstance(clip, SourceVideo):
            shots = list(clip.shots)
        else:
            raise TypeError(f"write_video_folder: clips must be VideoClip or SourceVideo, "
                            f"got {type(clip).__name__}")
        key = clip.key
        if not key or "/" in key or "\\" in key or key.startswith(".") or key in seen:
            raise ValueError(f"write_video_folder: key {key!r} must be a unique, non-empty file stem "
                             f"without path separators or a leading '.'")
        seen.add(key)
        check_shots(shots, f"write_video_folder: {key}")
        if shots[-1].start_frame >= clip.frames.shape[0]:
            raise ValueError(f"write_video_folder: {key}: shot start {shots[-1].start_frame} is past "
                             f"the last frame ({clip.frames.shape[0]} frames)")
        stale = root / f"{key}.txt"
        if stale.exists():
            raise DatasetError(f"write_video_folder: {stale} exists and would sit next to the new "
                               f"{key}.json; remove it (a video must have one caption sidecar)")
        path = root / f"{key}.mp4"
        with Mp4Writer(path, fps=fps, quality=quality) as writer:
            writer.append_uint8(clip.frames)
        write_caption_sidecar(root, key, shots)
        written.append(path)
    return written
