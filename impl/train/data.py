"""Training data: video folders with (multi-shot) captions, synthetic stand-ins, DP sharding.

A training sample is a clip of ``F`` latent frames. The Wan2.2 VAE is causal with temporal
factor 4, so the clip needs exactly ``1 + 4 (F - 1)`` raw frames: latent 0 encodes raw frame 0
alone and latent ``l >= 1`` encodes raw frames ``1 + 4 (l - 1) .. 4 l``. Training groups the
latents into AR blocks of ``frames_per_block`` latents, and every block has its own prompt
(multi-shot captions: a scene cut changes the caption). Block ``j`` covers latents
``[j * fpb, (j + 1) * fpb)``; its prompt is the caption of the shot that contains the block's
*first* raw frame (see :func:`block_prompts_for_shots`).

Folder layout (:class:`VideoFolderDataset`, written by :func:`write_video_folder`)::

    root/clip_a.mp4   root/clip_a.txt    # whole file = one caption for the whole video
    root/clip_b.mp4   root/clip_b.json   # {"caption": "..."}
    root/clip_c.mp4   root/clip_c.json   # {"shots": [{"start_frame": 0, "caption": "..."},
                                         #            {"start_frame": 57, "caption": "..."}]}

``start_frame`` is a raw frame index of the source video; the first shot starts at 0 and the
starts increase strictly. Under sequence parallelism only the SP-root rank of each SP group
decodes the video (:func:`root_only_loader`), and the data-parallel groups read disjoint
samples (:class:`ShardedSampler`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from impl.config import ConfigError, raw_frames_for_latents
from impl.parallel.groups import ParallelGroups
from impl.video_io import Mp4Writer, read_video

__all__ = [
    "DatasetError", "Shot", "VideoClip", "SourceVideo", "LatentSample",
    "raw_frames_for_latents", "latent_to_raw_frame", "block_prompts_for_shots",
    "resize_center_crop", "parse_caption_sidecar",
    "VideoFolderDataset", "SyntheticVideoSource", "SyntheticLatentSource",
    "InMemorySource", "ShardedSampler", "root_only_loader", "write_video_folder",
]

CLIP_STARTS = ("random", "start")


class DatasetError(ValueError):
    """A data item is unusable (bad or missing sidecar, too-short video); the message names
    the file and what was expected."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (stable across runs and platforms)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(*parts))


def latent_to_raw_frame(latent_index: int, temporal_factor: int = 4) -> int:
    """First raw frame (relative to the clip) that latent ``latent_index`` encodes."""
    _check_int(latent_index, "latent_index", 0)
    return 0 if latent_index == 0 else 1 + temporal_factor * (latent_index - 1)


@dataclass(frozen=True)
class Shot:
    """One shot of a multi-shot caption: from raw frame ``start_frame`` to the next shot."""

    start_frame: int
    caption: str


def _check_shots(shots: Sequence[Shot], where: str) -> None:
    if len(shots) == 0:
        raise DatasetError(f"{where}: needs at least one shot")
    for k, shot in enumerate(shots):
        if not isinstance(shot.caption, str) or not shot.caption.strip():
            raise DatasetError(f"{where}: shot {k} has an empty caption")
        if (not isinstance(shot.start_frame, (int, np.integer)) or isinstance(shot.start_frame, bool)
                or shot.start_frame < 0):
            raise DatasetError(f"{where}: shot {k} start_frame must be a non-negative integer, "
                               f"got {shot.start_frame!r}")
    if shots[0].start_frame != 0:
        raise DatasetError(f"{where}: the first shot must start at frame 0, got {shots[0].start_frame}")
    for k in range(1, len(shots)):
        if shots[k].start_frame <= shots[k - 1].start_frame:
            raise DatasetError(f"{where}: shot start_frame values must increase strictly, got "
                               f"{shots[k - 1].start_frame} then {shots[k].start_frame} (shot {k})")


def block_prompts_for_shots(shots: Sequence[Shot], num_latent_frames: int, frames_per_block: int,
                            clip_start: int = 0, temporal_factor: int = 4) -> list[str]:
    """Per-block prompts of a clip starting at raw frame ``clip_start`` of a shot-annotated video.

    Block ``j``'s prompt is the caption of the shot containing raw frame
    ``clip_start + latent_to_raw_frame(j * frames_per_block)`` (the block's first raw frame).
    """
    _check_shots(shots, "shots")
    if num_latent_frames % frames_per_block:
        raise ConfigError(f"num_latent_frames: must be a multiple of frames_per_block="
                          f"{frames_per_block}, got {num_latent_frames}")
    starts = [s.start_frame for s in shots]
    prompts = []
    for j in range(num_latent_frames // frames_per_block):
        raw = clip_start + latent_to_raw_frame(j * frames_per_block, temporal_factor)
        k = int(np.searchsorted(starts, raw, side="right")) - 1
        prompts.append(shots[k].caption)
    return prompts


def _shots_from_block_prompts(prompts: Sequence[str], frames_per_block: int,
                              temporal_factor: int) -> list[Shot]:
    """Inverse of :func:`block_prompts_for_shots` for a clip starting at 0: a new shot at each
    block whose prompt differs from the previous block's."""
    shots: list[Shot] = []
    for j, prompt in enumerate(prompts):
        if not shots or shots[-1].caption != prompt:
            shots.append(Shot(latent_to_raw_frame(j * frames_per_block, temporal_factor), prompt))
    return shots


def resize_center_crop(frames: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: scale preserving the aspect ratio so the
    frame covers ``height x width`` (bilinear, antialiased), then crop the centre.

    Frames already of the target size are returned unchanged. ``chunk`` frames are resized at a
    time to bound the float32 working memory.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize_center_crop: expected uint8 [T, H, W, 3], got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    _check_int(height, "height", 1)
    _check_int(width, "width", 1)
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


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------

@dataclass
class VideoClip:
    """One training clip: ``frames`` uint8 [T, H, W, 3] with T = 1 + 4 (F - 1), one prompt per
    AR block, the source id and the raw frame of the source where the clip starts."""

    frames: torch.Tensor
    block_prompts: list[str]
    key: str
    start_frame: int = 0

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, torch.Tensor) or f.dtype != torch.uint8 or f.dim() != 4 or f.shape[-1] != 3:
            raise ValueError(f"VideoClip.frames ({self.key}): expected a uint8 tensor [T, H, W, 3], got "
                             f"{getattr(f, 'dtype', type(f).__name__)} {tuple(getattr(f, 'shape', ()))}")
        if not self.block_prompts or not all(isinstance(p, str) and p for p in self.block_prompts):
            raise ValueError(f"VideoClip.block_prompts ({self.key}): needs at least one non-empty string, "
                             f"got {self.block_prompts!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.block_prompts)


@dataclass
class SourceVideo:
    """A whole video to write with :func:`write_video_folder`: uint8 frames [T, H, W, 3] and its
    shots (raw frame starts; one shot = a single caption)."""

    key: str
    frames: torch.Tensor
    shots: list[Shot]


@dataclass
class LatentSample:
    """A pre-encoded sample: normalised latents [C, F, h, w], per-block text embeddings
    [n_blocks, text_len, text_dim] and the prompts they stand for."""

    latents: torch.Tensor
    text: torch.Tensor
    block_prompts: list[str]
    key: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.block_prompts)


class _EpochDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...
    def set_epoch(self, epoch: int) -> None: ...


def _check_index(index: Any, length: int, owner: str) -> int:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"{owner}: index must be an integer, got {type(index).__name__}")
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"{owner}: index {index} out of range for length {length}")
    return i


def _check_clip_args(owner: str, num_latent_frames: int, frames_per_block: int, height: int,
                     width: int, temporal_factor: int, seed: int) -> None:
    _check_int(num_latent_frames, f"{owner}.num_latent_frames", 1)
    _check_int(frames_per_block, f"{owner}.frames_per_block", 1)
    _check_int(height, f"{owner}.height", 1)
    _check_int(width, f"{owner}.width", 1)
    _check_int(temporal_factor, f"{owner}.temporal_factor", 1)
    _check_int(seed, f"{owner}.seed", 0)
    if num_latent_frames % frames_per_block:
        raise ConfigError(f"{owner}.num_latent_frames: must be a multiple of frames_per_block="
                          f"{frames_per_block}, got {num_latent_frames}")


# ---------------------------------------------------------------------------------------------
# Video folder
# ---------------------------------------------------------------------------------------------

def parse_caption_sidecar(path: str | Path) -> list[Shot]:
    """Read a ``.txt`` (one caption) or ``.json`` (``caption`` or ``shots``) sidecar as shots."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read caption sidecar: {exc}") from exc
    if path.suffix == ".txt":
        if not text.strip():
            raise DatasetError(f"{path}: empty caption")
        return [Shot(0, text.strip())]
    if path.suffix != ".json":
        raise DatasetError(f"{path}: caption sidecar must be .txt or .json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'caption' or 'shots', "
                           f"got {type(data).__name__}")
    has_caption, has_shots = "caption" in data, "shots" in data
    if has_caption == has_shots:
        raise DatasetError(f"{path}: needs exactly one of the keys 'caption' (one caption) or 'shots' "
                           f"(list of {{'start_frame', 'caption'}}), got keys {sorted(data)}")
    if has_caption:
        caption = data["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetError(f"{path}: 'caption' must be a non-empty string, got {caption!r}")
        return [Shot(0, caption.strip())]
    raw_shots = data["shots"]
    if not isinstance(raw_shots, list) or not raw_shots:
        raise DatasetError(f"{path}: 'shots' must be a non-empty list, got {raw_shots!r}")
    shots = []
    for k, item in enumerate(raw_shots):
        if not isinstance(item, dict) or "start_frame" not in item or "caption" not in item:
            raise DatasetError(f"{path}: shots[{k}] must be an object with 'start_frame' and 'caption', "
                               f"got {item!r}")
        start, caption = item["start_frame"], item["caption"]
        if not isinstance(start, int) or isinstance(start, bool):
            raise DatasetError(f"{path}: shots[{k}].start_frame must be an integer raw frame index, "
                               f"got {start!r}")
        if not isinstance(caption, str):
            raise DatasetError(f"{path}: shots[{k}].caption must be a string, got {caption!r}")
        shots.append(Shot(start, caption.strip()))
    _check_shots(shots, str(path))
    return shots


@dataclass(frozen=True)
class _FolderItem:
    video: Path
    key: str
    shots: tuple[Shot, ...]


class VideoFolderDataset:
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
        _check_clip_args(owner, num_latent_frames, frames_per_block, height, width, temporal_factor, seed)
        if clip_start not in CLIP_STARTS:
            raise ConfigError(f"{owner}.clip_start: must be one of {CLIP_STARTS}, got {clip_start!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{owner}.root: {self.root} is not a directory")
        self.num_latent_frames = num_latent_frames
        self.frames_per_block = frames_per_block
        self.height, self.width = height, width
        self.temporal_factor = temporal_factor
        self.seed = seed
        self.clip_start = clip_start
        self.num_raw_frames = raw_frames_for_latents(num_latent_frames, temporal_factor)
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
                item = _FolderItem(video, video.stem, tuple(self._sidecar_shots(video)))
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
    @staticmethod
    def _sidecar_shots(video: Path) -> list[Shot]:
        txt, js = video.with_suffix(".txt"), video.with_suffix(".json")
        if txt.is_file() and js.is_file():
            raise DatasetError(f"{video}: has both {txt.name} and {js.name}; keep one caption sidecar")
        if not txt.is_file() and not js.is_file():
            raise DatasetError(f"{video}: missing caption sidecar {txt.name} or {js.name}")
        return parse_caption_sidecar(js if js.is_file() else txt)

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
        return list(self._items[_check_index(index, len(self), "VideoFolderDataset")].shots)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random clip starts :meth:`__getitem__` draws."""
        self.epoch = _check_int(epoch, "VideoFolderDataset.set_epoch(epoch)", 0)

    def clip_start_for(self, index: int, num_frames: int) -> int:
        """The clip start of item ``index`` in the current epoch for a video of ``num_frames``."""
        slack = num_frames - self.num_raw_frames
        if self.clip_start == "start" or slack <= 0:
            return 0
        g = _generator(self.seed, self.epoch, index)
        return int(torch.randint(0, slack + 1, (1,), generator=g).item())

    def __getitem__(self, index: int) -> VideoClip:
        i = _check_index(index, len(self), "VideoFolderDataset")
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


# ---------------------------------------------------------------------------------------------
# Synthetic sources
# ---------------------------------------------------------------------------------------------

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


def _pick_cut_blocks(g: torch.Generator, n_blocks: int, n_shots: int) -> list[int]:
    if n_shots == 1:
        return [0]
    chosen = (torch.randperm(n_blocks - 1, generator=g)[:n_shots - 1] + 1).sort().values.tolist()
    return [0] + chosen


class SyntheticVideoSource:
    """Deterministic synthetic clips with the interface of :class:`VideoFolderDataset`.

    Each shot is a smooth drifting sinusoidal colour gradient with a moving soft blob (so VAE
    encodings have structure, unlike pure noise) and a caption describing it. With
    ``shots_per_clip > 1`` scene cuts fall on the first raw frame of randomly chosen blocks, so
    every block lies within one shot. Item ``i`` depends only on ``(seed, i)``;
    :meth:`set_epoch` is accepted for interface compatibility and changes nothing.
    """

    def __init__(self, num_latent_frames: int, frames_per_block: int, height: int, width: int, *,
                 length: int, seed: int = 0, shots_per_clip: int = 1, temporal_factor: int = 4) -> None:
        owner = "SyntheticVideoSource"
        _check_clip_args(owner, num_latent_frames, frames_per_block, height, width, temporal_factor, seed)
        self.length = _check_int(length, f"{owner}.length", 1)
        self.n_blocks = num_latent_frames // frames_per_block
        _check_int(shots_per_clip, f"{owner}.shots_per_clip", 1)
        if shots_per_clip > self.n_blocks:
            raise ConfigError(f"{owner}.shots_per_clip: at most the number of blocks "
                              f"({self.n_blocks}), got {shots_per_clip}")
        self.num_latent_frames = num_latent_frames
        self.frames_per_block = frames_per_block
        self.height, self.width = height, width
        self.temporal_factor = temporal_factor
        self.seed = seed
        self.shots_per_clip = shots_per_clip
        self.num_raw_frames = raw_frames_for_latents(num_latent_frames, temporal_factor)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int(epoch, "SyntheticVideoSource.set_epoch(epoch)", 0)

    def shots(self, index: int) -> list[Shot]:
        """The shots (raw frame starts and captions) of item ``index``."""
        i = _check_index(index, len(self), "SyntheticVideoSource")
        return self._plan(_generator(self.seed, i))[0]

    def _plan(self, g: torch.Generator) -> tuple[list[Shot], list[dict[str, Any]]]:
        cut_blocks = _pick_cut_blocks(g, self.n_blocks, self.shots_per_clip)
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
            shots.append(Shot(latent_to_raw_frame(j * self.frames_per_block, self.temporal_factor), caption))
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
        i = _check_index(index, len(self), "SyntheticVideoSource")
        shots, params = self._plan(_generator(self.seed, i))
        n = self.num_raw_frames
        frames = torch.empty(n, self.height, self.width, 3, dtype=torch.uint8)
        bounds = [s.start_frame for s in shots] + [n]
        for k, p in enumerate(params):
            for a in range(bounds[k], bounds[k + 1], 16):
                b = min(a + 16, bounds[k + 1])
                frames[a:b] = self._render(p, a, b)
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
            _check_int(value, f"{owner}.{name}", 1)
        _check_clip_args(owner, num_latent_frames, frames_per_block, latent_height, latent_width, 1, seed)
        self.length = _check_int(length, f"{owner}.length", 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"{owner}.dtype: must be a floating torch.dtype, got {dtype!r}")
        self.n_blocks = num_latent_frames // frames_per_block
        _check_int(shots_per_clip, f"{owner}.shots_per_clip", 1)
        if shots_per_clip > self.n_blocks:
            raise ConfigError(f"{owner}.shots_per_clip: at most the number of blocks "
                              f"({self.n_blocks}), got {shots_per_clip}")
        self.latent_shape = (latent_channels, num_latent_frames, latent_height, latent_width)
        self.text_len, self.text_dim = text_len, text_dim
        self.frames_per_block = frames_per_block
        self.seed, self.dtype, self.shots_per_clip = seed, dtype, shots_per_clip
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Accepted for interface compatibility; items do not depend on the epoch."""
        self.epoch = _check_int(epoch, "SyntheticLatentSource.set_epoch(epoch)", 0)

    def __getitem__(self, index: int) -> LatentSample:
        i = _check_index(index, len(self), "SyntheticLatentSource")
        g = _generator(self.seed, i)
        cuts = _pick_cut_blocks(g, self.n_blocks, self.shots_per_clip)
        latents = torch.randn(self.latent_shape, generator=g)
        shot_text = torch.randn(len(cuts), self.text_len, self.text_dim, generator=g)
        shot_of_block = [sum(1 for c in cuts if c <= j) - 1 for j in range(self.n_blocks)]
        text = shot_text[shot_of_block]
        prompts = [f"synthetic latent sample {self.seed}-{i}, shot {k}" for k in shot_of_block]
        return LatentSample(latents.to(self.dtype), text.to(self.dtype), prompts,
                            f"synthetic-latent-{self.seed}-{i:06d}")


class InMemorySource:
    """A list of pre-built samples (e.g. :class:`LatentSample` items encoded once by the caller)
    with the dataset interface the trainer reads."""

    def __init__(self, items: Sequence[Any]) -> None:
        if len(items) == 0:
            raise ConfigError("InMemorySource: needs at least one item")
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[_check_index(index, len(self), "InMemorySource")]

    def set_epoch(self, epoch: int) -> None:
        _check_int(epoch, "InMemorySource.set_epoch(epoch)", 0)


# ---------------------------------------------------------------------------------------------
# Sharding and loading
# ---------------------------------------------------------------------------------------------

class ShardedSampler:
    """This data-parallel rank's sample indices for one epoch.

    Every epoch all indices are permuted with ``(seed, epoch)`` (or kept in order with
    ``shuffle=False``), cut to ``(dataset_len // dp_size) * dp_size`` — the remainder is dropped
    so every rank takes the same number of steps (with shuffling, different samples are dropped
    each epoch) — and dealt round-robin: rank ``r`` gets positions ``r, r + dp_size, ...``. The
    ranks' indices are disjoint; every rank computes the same permutation, so no communication
    is needed. All SP ranks of one SP group share ``dp_rank`` and thus see the same indices.
    """

    def __init__(self, dataset_len: int, dp_rank: int, dp_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.dataset_len = _check_int(dataset_len, "ShardedSampler.dataset_len", 1)
        self.dp_size = _check_int(dp_size, "ShardedSampler.dp_size", 1)
        self.dp_rank = _check_int(dp_rank, "ShardedSampler.dp_rank", 0)
        if self.dp_rank >= dp_size:
            raise ConfigError(f"ShardedSampler.dp_rank: must be in [0, dp_size={dp_size}), got {dp_rank}")
        if dataset_len < dp_size:
            raise ConfigError(f"ShardedSampler.dataset_len: {dataset_len} samples cannot feed "
                              f"dp_size={dp_size} ranks one sample each")
        self.seed = _check_int(seed, "ShardedSampler.seed", 0)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.num_samples = dataset_len // dp_size

    @classmethod
    def for_groups(cls, dataset_len: int, groups: ParallelGroups, seed: int = 0,
                   shuffle: bool = True) -> "ShardedSampler":
        """The sampler of this rank's DP position in ``groups``."""
        return cls(dataset_len, groups.dp_rank, groups.dp_size, seed, shuffle)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int(epoch, "ShardedSampler.set_epoch(epoch)", 0)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        n = self.dataset_len
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        return order[:self.num_samples * self.dp_size][self.dp_rank::self.dp_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())


def _keep_item(item: Any) -> Any:
    """DataLoader collate for ``batch_size=None``: pass the sample through unchanged."""
    return item


def root_only_loader(dataset: _EpochDataset, groups: ParallelGroups, sampler: Iterable[int], *,
                     epoch: int | None = None, num_workers: int = 0) -> Iterator[Any]:
    """One epoch of samples: ``dataset[i]`` for each sampler index on SP-root ranks, and ``None``
    as many times on the other SP ranks, so all ranks of an SP group step together while only
    the root decodes (it then scatters the data over the SP group).

    ``epoch`` (optional) calls ``set_epoch`` on the sampler and the dataset first.
    ``num_workers > 0`` loads on the root through a ``torch.utils.data.DataLoader`` with that
    many worker processes (one sample at a time, samples kept as they are).
    """
    _check_int(num_workers, "root_only_loader.num_workers", 0)
    if epoch is not None:
        for obj in (sampler, dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
    indices = list(sampler)
    return _root_iter(dataset, indices, groups.is_sp_root, num_workers)


def _root_iter(dataset: Any, indices: list[int], is_root: bool, num_workers: int) -> Iterator[Any]:
    if not is_root:
        for _ in indices:
            yield None
        return
    if num_workers == 0:
        for i in indices:
            yield dataset[i]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=indices,
                                         num_workers=num_workers, collate_fn=_keep_item)
    yield from loader


# ---------------------------------------------------------------------------------------------
# Writing sample folders
# ---------------------------------------------------------------------------------------------

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
            shots = _shots_from_block_prompts(clip.block_prompts, f_lat // clip.num_blocks, temporal_factor)
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
        _check_shots(shots, f"write_video_folder: {key}")
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
        if len(shots) == 1:
            meta: dict[str, Any] = {"caption": shots[0].caption}
        else:
            meta = {"shots": [{"start_frame": int(s.start_frame), "caption": s.caption} for s in shots]}
        sidecar = root / f"{key}.json"
        tmp = sidecar.with_name(f".{key}.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(sidecar)
        written.append(path)
    return written
