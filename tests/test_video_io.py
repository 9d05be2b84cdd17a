"""MP4 writing/reading: incremental append, round trip, atomic final file, clear errors."""

from __future__ import annotations

import pytest
import torch

from impl.video_io import Mp4Writer, frames_to_uint8, read_video


def _smooth_frames(t: int, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    """Random but smooth frames [3, T, H, W] in [-1, 1]: pure noise is a codec worst case,
    and yuv420p halves the chroma resolution, so colours must vary slowly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, t, h // 16, w // 16, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def test_frames_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4)
    u = frames_to_uint8(x)
    assert u.shape == (1, 1, 4, 3) and u.dtype.name == "uint8"
    assert u[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert (frames_to_uint8(x.unsqueeze(0)) == u).all()
    with pytest.raises(ValueError, match="3, T, H, W"):
        frames_to_uint8(torch.zeros(4, 1, 2, 2))


def test_write_incrementally_and_read_back(tmp_path):
    path = tmp_path / "x.mp4"
    a, b = _smooth_frames(5, seed=0), _smooth_frames(4, seed=1)
    with Mp4Writer(path, fps=24, quality=10) as w:
        w.append(a)
        w.append(b.unsqueeze(0))
        assert not path.exists()  # only the temp file exists until close
        assert w.frames_written == 9
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]  # no temp file left behind
    video = read_video(path)
    assert video.shape == (9, 64, 96, 3) and video.dtype == torch.uint8
    expected = torch.from_numpy(frames_to_uint8(torch.cat([a, b], dim=1))).float()
    err = (video.float() - expected).abs().mean().item()
    assert err < 6.0, err  # measured ~2.6 (mostly chroma subsampling)
    assert read_video(path, max_frames=3).shape[0] == 3


def test_no_file_when_exception_inside_with(tmp_path):
    path = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path, fps=24) as w:
            w.append(_smooth_frames(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_kept_on_failure(tmp_path):
    path = tmp_path / "x.mp4"
    with Mp4Writer(path, fps=24) as w:
        w.append(_smooth_frames(2))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with Mp4Writer(path, fps=24) as w:
            w.append(_smooth_frames(4, seed=3))
            raise RuntimeError("fail")
    assert path.read_bytes() == before


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        with Mp4Writer(tmp_path / "odd.mp4", fps=24) as w:
            w.append(torch.rand(3, 2, 33, 64) * 2 - 1)
    with pytest.raises(ValueError, match="frame size changed"):
        with Mp4Writer(tmp_path / "mixed.mp4", fps=24) as w:
            w.append(_smooth_frames(1))
            w.append(_smooth_frames(1, h=32, w=32))
    with pytest.raises(ValueError, match="no frames"):
        with Mp4Writer(tmp_path / "empty.mp4", fps=24):
            pass
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match=".mp4"):
        Mp4Writer(tmp_path / "a.avi", fps=24)
    with pytest.raises(RuntimeError, match="context manager"):
        Mp4Writer(tmp_path / "a.mp4").append(_smooth_frames(1))
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "none.mp4")
    assert list(tmp_path.iterdir()) == []


def _ffmpeg_children() -> list[int]:
    """Process ids of this process's ffmpeg children (from /proc)."""
    import os
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == os.getpid() and "ffmpeg" in comm:
            pids.append(int(d))
    return pids


def test_broken_ffmpeg_pipe_is_a_write_error_naming_the_file(tmp_path):
    import os
    import signal
    import sys
    import time

    from impl.video_io import VideoWriteError

    if not sys.platform.startswith("linux"):
        pytest.skip("finds the ffmpeg child through /proc")
    path = tmp_path / "broken.mp4"
    with pytest.raises(VideoWriteError, match=r"writing mp4 .*broken\.mp4 failed") as err:
        with Mp4Writer(path, fps=24) as w:
            w.append(_smooth_frames(2))
            kids = _ffmpeg_children()
            assert kids, "ffmpeg was not started"
            for pid in kids:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            for _ in range(50):
                w.append(_smooth_frames(8))
    assert "\n" not in str(err.value)   # one line, not imageio's ffmpeg dump
    assert isinstance(err.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []   # no mp4 and no temp file


def test_unwritable_output_is_a_write_error(tmp_path):
    from impl.video_io import VideoWriteError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VideoWriteError, match="cannot write mp4 .*file/x.mp4"):
        with Mp4Writer(blocker / "x.mp4") as w:
            w.append(_smooth_frames(2))
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(VideoWriteError, match="is a folder"):
        with Mp4Writer(tmp_path / "d.mp4") as w:
            w.append(_smooth_frames(2))
