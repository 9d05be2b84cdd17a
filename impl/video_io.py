"""MP4 writing (incremental, atomic) and reading, through imageio's ffmpeg backend.

The ffmpeg binary ships inside the ``imageio-ffmpeg`` wheel, so no system ffmpeg is needed.
Frames are H.264 (libx264, yuv420p), which needs even height and width: odd sizes raise
an error instead of being padded or resized silently. yuv420p also halves the chroma
resolution, so colour detail is lossy even at the highest quality.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from impl.errors import VideoWriteError   # defined torch-free, so command lines can catch it cheaply

__all__ = ["Mp4Writer", "VideoWriteError", "VideoFrameError", "read_video", "frames_to_uint8"]


class VideoFrameError(VideoWriteError, ValueError):
    """Frames an mp4 cannot hold (odd or changing size, wrong dtype or shape)."""


def _require_ffmpeg() -> Any:
    """Return ``imageio.v2`` once the ffmpeg backend is known to be usable."""
    try:
        import imageio.v2 as iio
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("video I/O needs the 'imageio' and 'imageio-ffmpeg' packages "
                           f"(pip install imageio imageio-ffmpeg): {exc}") from exc
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:  # pragma: no cover
        raise RuntimeError(f"imageio-ffmpeg is installed but has no ffmpeg binary: {exc}") from exc
    return iio


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] or [1, 3, T, H, W] floats in [-1, 1] (or uint8) -> uint8 array [T, H, W, 3]."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dim() == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"frames: a 5-D tensor must have batch size 1, got {tuple(frames.shape)}")
        frames = frames[0]
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames: expected [3, T, H, W] or [1, 3, T, H, W], got {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:   # converted already (InferenceConfig.frame_format='uint8')
        x = frames.detach()
    elif not frames.is_floating_point():
        raise TypeError(f"frames: expected floats in [-1, 1] or uint8, got dtype {frames.dtype}")
    else:
        x = float_frames_to_uint8(frames.detach())
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def float_frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] -> uint8 [0, 255] on their own device, the same rounding everywhere (so a
    GPU conversion gives the bytes the CPU would)."""
    return ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class Mp4Writer:
    """Append frames to an MP4 as they are produced; the file appears only on success.

    Frames go to a hidden temp file in the same folder, renamed onto ``path`` when the
    ``with`` block exits normally; on an exception the temp file is deleted and ``path`` is
    left as it was. ``quality`` is imageio's 0..10 scale (10 = best).
    """

    def __init__(self, path: str | Path, fps: int = 24, quality: float = 8.0) -> None:
        if not isinstance(fps, (int, float)) or fps <= 0:
            raise ValueError(f"Mp4Writer.fps must be > 0, got {fps!r}")
        if not 0 <= quality <= 10:
            raise ValueError(f"Mp4Writer.quality must be in [0, 10], got {quality!r}")
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"Mp4Writer.path must end in .mp4, got {self.path}")
        self.fps = fps
        self.quality = quality
        self.frames_written = 0
        self._tmp: Path | None = None
        self._writer: Any = None
        self._size: tuple[int, int] | None = None

    def __enter__(self) -> "Mp4Writer":
        iio = _require_ffmpeg()
        if self.path.is_dir():
            raise VideoWriteError(f"cannot write mp4 {self.path}: it is a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoWriteError(f"cannot write mp4 {self.path}: cannot create its folder "
                                  f"({exc.strerror or exc})") from exc
        self._tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
        try:
            # macro_block_size=1: never let imageio resize frames to multiples of 16.
            self._writer = iio.get_writer(self._tmp, format="FFMPEG", mode="I", fps=self.fps,
                                          codec="libx264", quality=self.quality,
                                          pixelformat="yuv420p", macro_block_size=1)
        except Exception as exc:
            _remove(self._tmp)
            self._tmp = None
            raise VideoWriteError(f"cannot write mp4 {self.path}: {type(exc).__name__}: {_first_line(exc)}") from exc
        return self

    def append(self, frames: torch.Tensor) -> None:
        """Append float frames [3, T, H, W] or [1, 3, T, H, W] in [-1, 1]."""
        self.append_uint8(frames_to_uint8(frames))

    def append_uint8(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append uint8 frames [T, H, W, 3]."""
        if self._writer is None:
            raise RuntimeError("Mp4Writer: use it as a context manager (with Mp4Writer(...) as w:)")
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoFrameError(f"Mp4Writer.append_uint8 ({self.path}): expected uint8 [T, H, W, 3], "
                                  f"got {frames.dtype} {tuple(frames.shape)}")
        h, w = frames.shape[1:3]
        if h % 2 or w % 2:
            raise VideoFrameError(f"Mp4Writer ({self.path}): libx264 (yuv420p) needs even height and width, "
                                  f"got {h}x{w}")
        if self._size is None:
            self._size = (h, w)
        elif self._size != (h, w):
            raise VideoFrameError(f"Mp4Writer ({self.path}): frame size changed from {self._size[0]}x"
                                  f"{self._size[1]} to {h}x{w} within one video")
        for frame in frames:
            try:
                self._writer.append_data(frame)
            except Exception as exc:  # ffmpeg died / its pipe broke / the disk filled up
                raise VideoWriteError(f"writing mp4 {self.path} failed after {self.frames_written} frames: "
                                      f"{type(exc).__name__}: {_first_line(exc)}") from exc
            self.frames_written += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        writer, tmp = self._writer, self._tmp
        self._writer, self._tmp = None, None
        ok = exc_type is None
        try:
            if writer is not None:
                writer.close()
        except Exception as close_exc:
            ok = False
            if exc_type is None:
                _remove(tmp)
                raise VideoWriteError(f"writing mp4 {self.path} failed when finishing the file: "
                                      f"{type(close_exc).__name__}: {_first_line(close_exc)}") from close_exc
        if ok and self.frames_written == 0:
            _remove(tmp)
            raise VideoFrameError(f"Mp4Writer: no frames were written; {self.path} not created")
        if ok and tmp is not None:
            # imageio ignores ffmpeg's exit status: a full disk leaves an mp4 without its index
            # (moov atom), so check the file is whole and on disk before it takes the final name.
            problem = _incomplete_mp4(tmp)
            if problem is not None:
                _remove(tmp)
                raise VideoWriteError(f"writing mp4 {self.path} failed when finishing the file: {problem}; "
                                      f"{self.path} not created")
            try:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                _remove(tmp)
                raise VideoWriteError(f"writing mp4 {self.path} failed when finishing the file: "
                                      f"{exc.strerror or exc}") from exc
            try:
                os.replace(tmp, self.path)  # atomic on one filesystem: never a half-written mp4
            except OSError as exc:
                _remove(tmp)
                raise VideoWriteError(f"cannot move the finished mp4 to {self.path}: "
                                      f"{exc.strerror or exc}") from exc
        else:
            _remove(tmp)


def _incomplete_mp4(path: Path) -> str | None:
    """Why ``path`` is not a complete MP4 (its top-level boxes do not tile the file, or there is
    no ``moov`` index), or None. Reads only the box headers."""
    try:
        size = path.stat().st_size
        seen = set()
        with open(path, "rb") as fh:
            pos = 0
            while pos < size:
                fh.seek(pos)
                head = fh.read(16)
                if len(head) < 8:
                    return f"a truncated box at byte {pos} (disk full?)"
                box, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if box == 1:
                    if len(head) < 16:
                        return f"a truncated box at byte {pos} (disk full?)"
                    box = int.from_bytes(head[8:16], "big")
                elif box == 0:
                    box = size - pos
                if box < 8 or pos + box > size:
                    return f"the {kind.decode('latin-1')!r} box at byte {pos} runs past the end (disk full?)"
                seen.add(kind)
                pos += box
    except OSError as exc:
        return f"cannot read it back ({exc.strerror or exc})"
    if b"moov" not in seen:
        return "ffmpeg left it without its index (no moov atom; disk full?)"
    return None


def _first_line(exc: BaseException) -> str:
    """imageio appends the whole ffmpeg command and its stderr; the first line says what failed."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _remove(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def read_video(path: str | Path, max_frames: int | None = None) -> torch.Tensor:
    """Decode a video file to a uint8 tensor [T, H, W, 3] (RGB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_video: no such file {path}")
    iio = _require_ffmpeg()
    frames = []
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        for frame in reader:
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(np.asarray(frame, dtype=np.uint8))
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"read_video: {path} has no frames")
    return torch.from_numpy(np.stack(frames))
