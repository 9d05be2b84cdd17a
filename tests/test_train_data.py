"""Training data layer: video folders with multi-shot captions, synthetic sources, DP sharding,
SP-root-only loading. Tiny videos (a few frames of 32..64 px) keep the whole file fast."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from impl.config import ConfigError, raw_frames_for_latents
from impl.parallel.groups import ParallelGroups
from impl.train.captions import Shot, block_prompts_for_shots, parse_caption_sidecar
from impl.train.clip_geometry import ClipGeometry, latent_to_raw_frame, resize_center_crop
from impl.train.data_util import DatasetError
from impl.train.sampler import ShardedSampler, root_only_loader
from impl.train.samples import LatentSample, VideoClip
from impl.train.synthetic import SyntheticLatentSource, SyntheticVideoSource
from impl.train.video_folder import SourceVideo, VideoFolderDataset, write_video_folder
from impl.video_io import read_video


def _moving_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth frames uint8 [T, H, W, 3] that change from frame to frame (codec friendly)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(t, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _groups(sp_size: int, sp_rank: int, dp_size: int = 1, dp_rank: int = 0) -> ParallelGroups:
    return ParallelGroups(dp_rank * sp_size + sp_rank, sp_size * dp_size, sp_size, sp_rank,
                          dp_size, dp_rank, None, None)


@pytest.fixture(scope="module")
def shot_folder(tmp_path_factory) -> Path:
    """Two 30-frame 32x48 videos: 'cuts' with three shots, 'plain' with one caption (.txt)."""
    root = tmp_path_factory.mktemp("videos")
    shots = [Shot(0, "a red room"), Shot(3, "a blue sky"), Shot(11, "a green field")]
    write_video_folder(root, [SourceVideo("cuts", _moving_frames(30, 32, 48, seed=1), shots)])
    write_video_folder(root, [SourceVideo("plain", _moving_frames(30, 32, 48, seed=2), [Shot(0, "x")])])
    (root / "plain.json").unlink()
    (root / "plain.txt").write_text("  one caption for everything\n", encoding="utf-8")
    return root


# --- frame arithmetic and prompt mapping -------------------------------------------------------

def test_raw_frame_arithmetic():
    assert [raw_frames_for_latents(f) for f in (1, 2, 4, 21)] == [1, 5, 13, 81]
    assert [latent_to_raw_frame(l) for l in range(5)] == [0, 1, 5, 9, 13]
    assert raw_frames_for_latents(3, temporal_factor=2) == 5
    with pytest.raises(ConfigError, match="num_latent_frames"):
        raw_frames_for_latents(0)


def test_clip_geometry_is_the_arithmetic_every_source_used():
    # The values the folder dataset, the synthetic and the procedural sources computed inline
    # before they shared ClipGeometry: raw frames 1 + tf (F - 1), blocks F / fpb, and block j
    # starting at raw frame latent_to_raw_frame(j * fpb).
    for f, fpb, tf in ((8, 2, 4), (12, 3, 4), (6, 1, 2), (4, 4, 4), (1, 1, 4)):
        g = ClipGeometry(f, fpb, 32, 48, tf)
        assert g.num_raw_frames == raw_frames_for_latents(f, tf) == 1 + tf * (f - 1)
        assert g.num_blocks == f // fpb
        assert [g.block_start_frame(j) for j in range(g.num_blocks)] == \
            [latent_to_raw_frame(j * fpb, tf) for j in range(g.num_blocks)]
    g = ClipGeometry(8, 2, 32, 48)
    assert g.num_raw_frames == 29 and g.num_blocks == 4
    assert [g.block_start_frame(j) for j in range(4)] == [0, 5, 13, 21]
    assert g.shot_bounds([0, 2, 3]) == [0, 13, 21, 29]
    with pytest.raises(ConfigError, match=r"^VideoFolderDataset\.num_latent_frames: must be a multiple of "
                                          r"frames_per_block=2, got 5"):
        ClipGeometry(5, 2, 32, 48, owner="VideoFolderDataset")
    with pytest.raises(ConfigError, match=r"^ClipGeometry\.width: must be an integer >= 1"):
        ClipGeometry(4, 2, 32, 0)
    # Every raw-clip source reads the same geometry and cuts shots on block starts.
    from impl.train.procedural import ProceduralVideoSource
    syn = SyntheticVideoSource(8, 2, 32, 48, length=2, seed=3, shots_per_clip=3)
    proc = ProceduralVideoSource(8, 2, 32, 48, length=2, seed=3, shots_per_clip=3)
    for src in (syn, proc):
        assert (src.num_latent_frames, src.frames_per_block, src.temporal_factor, src.num_raw_frames,
                src.n_blocks, src.height, src.width) == (8, 2, 4, 29, 4, 32, 48)
        assert src.geometry == g
        for i in range(2):
            starts = [s.start_frame for s in src.shots(i)]
            assert len(starts) == 3 and set(starts) <= {0, 5, 13, 21} and starts[0] == 0
            assert src[i].frames.shape == (29, 32, 48, 3)


def test_block_prompts_for_shots():
    shots = [Shot(0, "A"), Shot(3, "B"), Shot(11, "C")]
    # fpb=2, F=6: blocks start at latents 0, 2, 4 -> raw 0, 5, 13
    assert block_prompts_for_shots(shots, 6, 2) == ["A", "B", "C"]
    # the cut at raw 3 falls inside block 0 (raw 0..4): block 0 keeps the first shot's caption
    assert block_prompts_for_shots(shots, 4, 2) == ["A", "B"]
    # a clip starting at raw 9: blocks start at raw 9 and 14
    assert block_prompts_for_shots(shots, 4, 2, clip_start=9) == ["B", "C"]
    with pytest.raises(ConfigError, match="multiple of frames_per_block"):
        block_prompts_for_shots(shots, 5, 2)


# --- resize and crop ---------------------------------------------------------------------------

def test_resize_center_crop_shapes_and_alignment():
    x = _moving_frames(3, 32, 64)
    assert resize_center_crop(x, 32, 64) is x                            # already the target size
    assert torch.equal(resize_center_crop(x, 32, 32), x[:, :, 16:48])      # crop only, no resampling
    assert torch.equal(resize_center_crop(x, 16, 64), x[:, 8:24])
    down = resize_center_crop(x, 24, 24)                                   # 32x64 -> 24x48 -> crop
    ref = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=(24, 48), mode="bilinear",
                                          antialias=True, align_corners=False)[..., 12:36]
    assert down.shape == (3, 24, 24, 3) and down.dtype == torch.uint8
    assert (down.float() - ref.round().permute(0, 2, 3, 1)).abs().max() <= 1
    up = resize_center_crop(x, 96, 40)                                     # 32x64 -> 96x192 -> crop
    assert up.shape == (3, 96, 40, 3)
    assert torch.equal(resize_center_crop(x, 24, 24, chunk=1), down)       # chunking changes nothing
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(x.float(), 8, 8)


# --- folder dataset ----------------------------------------------------------------------------

def test_synthetic_round_trip_through_folder(tmp_path):
    src = SyntheticVideoSource(4, 2, 32, 48, length=2, seed=5, shots_per_clip=2)
    clips = [src[i] for i in range(2)]
    write_video_folder(tmp_path, clips)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "synthetic-5-000000.json", "synthetic-5-000000.mp4", "synthetic-5-000001.json", "synthetic-5-000001.mp4"]
    ds = VideoFolderDataset(tmp_path, 4, 2, 32, 48, clip_start="start")
    assert len(ds) == 2 and ds.keys == [c.key for c in clips]
    for i, clip in enumerate(clips):
        got = ds[i]
        assert isinstance(got, VideoClip)
        assert got.frames.shape == (13, 32, 48, 3) and got.frames.dtype == torch.uint8
        assert got.key == clip.key and got.start_frame == 0
        assert got.block_prompts == clip.block_prompts and len(set(got.block_prompts)) == 2
        assert (got.frames.float() - clip.frames.float()).abs().mean() < 6.0  # lossy H.264 yuv420p


def test_multi_shot_prompts_and_exact_frames(shot_folder):
    ds = VideoFolderDataset(shot_folder, 4, 2, 32, 48, clip_start="start")
    assert ds.keys == ["cuts", "plain"]
    assert ds.shots(0) == [Shot(0, "a red room"), Shot(3, "a blue sky"), Shot(11, "a green field")]
    cuts, plain = ds[0], ds[1]
    assert cuts.frames.shape == (raw_frames_for_latents(4), 32, 48, 3)
    assert cuts.block_prompts == ["a red room", "a blue sky"]  # block 1 starts at raw 5, after the cut
    assert plain.block_prompts == ["one caption for everything"] * 2
    assert torch.equal(cuts.frames, read_video(shot_folder / "cuts.mp4")[:13])

    ds6 = VideoFolderDataset(shot_folder, 6, 2, 32, 48, clip_start="start")
    assert ds6[0].block_prompts == ["a red room", "a blue sky", "a green field"]
    ds1 = VideoFolderDataset(shot_folder, 4, 1, 32, 48, clip_start="start")
    assert ds1[0].block_prompts == ["a red room", "a red room", "a blue sky", "a blue sky"]  # raw 0,1,5,9


def test_random_clip_starts_are_deterministic(shot_folder):
    full = read_video(shot_folder / "cuts.mp4")
    shots = [Shot(0, "a red room"), Shot(3, "a blue sky"), Shot(11, "a green field")]

    def starts(seed, epoch):
        ds = VideoFolderDataset(shot_folder, 2, 1, 32, 48, seed=seed)
        ds.set_epoch(epoch)
        out = []
        for _ in range(2):  # the first visit decodes it all; the second only up to the clip's end
            clip = ds[0]
            assert torch.equal(clip.frames, full[clip.start_frame:clip.start_frame + 5])
            assert clip.block_prompts == block_prompts_for_shots(shots, 2, 1, clip.start_frame)
            out.append(clip.start_frame)
        assert out[0] == out[1]
        return out[0]

    s = {(seed, epoch): starts(seed, epoch) for seed in (0, 1) for epoch in range(3)}
    assert all(0 <= v <= 30 - 5 for v in s.values())
    assert starts(0, 1) == s[(0, 1)]
    assert len(set(s.values())) > 1  # seed and epoch move the start
    ds = VideoFolderDataset(shot_folder, 2, 1, 32, 48, seed=0)
    assert [ds.clip_start_for(0, 30) for _ in range(3)] == [s[(0, 0)]] * 3


def test_resize_crop_of_non_square_source(tmp_path):
    # 32x64 source: black side columns, white middle -> the centre crop to 32x32 or 48x48 is white
    frames = torch.zeros(5, 32, 64, 3, dtype=torch.uint8)
    frames[:, :, 16:48] = 255
    write_video_folder(tmp_path, [SourceVideo("wide", frames, [Shot(0, "white bar")])])
    for h, w in ((32, 32), (48, 48), (16, 16)):
        clip = VideoFolderDataset(tmp_path, 2, 1, h, w, clip_start="start")[0]
        assert clip.frames.shape == (5, h, w, 3) and clip.frames.dtype == torch.uint8
        centre = clip.frames[:, :, w // 8: w - w // 8].float()
        assert centre.mean() > 235, (h, w, centre.mean())
    wide = VideoFolderDataset(tmp_path, 2, 1, 16, 64, clip_start="start")[0]  # 32x64 -> 32x64 -> crop rows
    assert wide.frames.shape == (5, 16, 64, 3)
    assert wide.frames[:, :, :12].float().mean() < 20 and wide.frames[:, :, 20:44].float().mean() > 235


def test_construction_errors(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")  # construction parses sidecars only; it never decodes

    def make(**kw):
        args = dict(num_latent_frames=4, frames_per_block=2, height=32, width=32)
        args.update(kw)
        return VideoFolderDataset(tmp_path, **args)

    with pytest.raises(ConfigError, match="multiple of frames_per_block=2, got 5"):
        make(num_latent_frames=5)
    with pytest.raises(ConfigError, match=r"clip_start: must be one of \('random', 'start'\)"):
        make(clip_start="middle")
    with pytest.raises(ConfigError, match="height"):
        make(height=0)
    with pytest.raises(DatasetError, match="not a directory"):
        VideoFolderDataset(tmp_path / "nope", 4, 2, 32, 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no .mp4 files"):
        VideoFolderDataset(empty, 4, 2, 32, 32)
    with pytest.raises(DatasetError, match=r"v\.mp4: missing caption sidecar v\.txt or v\.json"):
        make()

    txt, js = tmp_path / "v.txt", tmp_path / "v.json"
    txt.write_text(" \n")
    with pytest.raises(DatasetError, match=r"v\.txt: empty caption"):
        make()
    js.write_text('{"caption": "x"}')
    with pytest.raises(DatasetError, match="both v.txt and v.json"):
        make()
    txt.unlink()
    cases = {
        '{"caption": "x"': "invalid JSON",
        '["x"]': "expected a JSON object",
        '{"text": "x"}': "exactly one of the keys 'caption'",
        '{"caption": "x", "shots": []}': "exactly one of the keys 'caption'",
        '{"caption": "  "}': "'caption' must be a non-empty string",
        '{"shots": []}': "'shots' must be a non-empty list",
        '{"shots": [{"caption": "a"}]}': r"shots\[0\] must be an object with 'start_frame'",
        '{"shots": [{"start_frame": 1.5, "caption": "a"}]}': r"shots\[0\].start_frame must be an integer",
        '{"shots": [{"start_frame": 2, "caption": "a"}]}': "first shot must start at frame 0, got 2",
        '{"shots": [{"start_frame": 0, "caption": "a"}, {"start_frame": 0, "caption": "b"}]}':
            "increase strictly, got 0 then 0",
        '{"shots": [{"start_frame": 0, "caption": "a"}, {"start_frame": 4, "caption": ""}]}':
            "shot 1 has an empty caption",
    }
    for text, message in cases.items():
        js.write_text(text)
        with pytest.raises(DatasetError, match=message) as info:
            make()
        assert "v.json" in str(info.value), text
    js.write_text('{"shots": [{"start_frame": 0, "caption": "a"}, {"start_frame": 4, "caption": "b"}]}')
    assert parse_caption_sidecar(js) == [Shot(0, "a"), Shot(4, "b")]
    assert len(make()) == 1


def test_skip_invalid_reports_what_it_skips(tmp_path):
    (tmp_path / "good.mp4").write_bytes(b"")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.mp4").write_bytes(b"")
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / ".hidden.tmp.mp4").write_bytes(b"")  # Mp4Writer temp files are ignored
    with pytest.raises(DatasetError, match="bad.json: invalid JSON"):
        VideoFolderDataset(tmp_path, 2, 1, 32, 32)
    with pytest.warns(UserWarning, match="skipped 1 of 2 videos"):
        ds = VideoFolderDataset(tmp_path, 2, 1, 32, 32, skip_invalid=True)
    assert ds.keys == ["good"]
    assert [(p.name, "invalid JSON" in r) for p, r in ds.skipped] == [("bad.mp4", True)]
    (tmp_path / "good.txt").unlink()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="none of the 2 videos"):
        VideoFolderDataset(tmp_path, 2, 1, 32, 32, skip_invalid=True)


def test_short_video_errors(shot_folder, tmp_path):
    # 30 frames; F=9 needs 33 raw frames
    for mode in ("start", "random"):
        ds = VideoFolderDataset(shot_folder, 9, 3, 32, 48, clip_start=mode)
        with pytest.raises(DatasetError, match=r"cuts\.mp4: has 30 frames but .* needs 33 raw frames"):
            ds[0]
    with pytest.raises(DatasetError, match=r"cuts\.mp4: has 30 frames"):
        VideoFolderDataset(shot_folder, 9, 3, 32, 48, probe_frames=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="none of the 2 videos"):
            VideoFolderDataset(shot_folder, 9, 3, 32, 48, probe_frames=True, skip_invalid=True)
    ds = VideoFolderDataset(shot_folder, 8, 2, 32, 48, probe_frames=True)  # 29 frames fit
    assert ds[1].frames.shape[0] == 29 and ds[1].start_frame in (0, 1)
    with pytest.raises(IndexError):
        ds[2]
    assert ds[-1].key == "plain"


# --- synthetic sources -------------------------------------------------------------------------

def test_synthetic_video_source():
    a = SyntheticVideoSource(8, 2, 32, 48, length=4, seed=3, shots_per_clip=3)
    b = SyntheticVideoSource(8, 2, 32, 48, length=4, seed=3, shots_per_clip=3)
    c = SyntheticVideoSource(8, 2, 32, 48, length=4, seed=4, shots_per_clip=3)
    x = a[1]
    assert x.frames.shape == (29, 32, 48, 3) and x.frames.dtype == torch.uint8 and x.start_frame == 0
    assert len(x.block_prompts) == 4 and len(set(x.block_prompts)) == 3
    y = b[1]
    assert torch.equal(x.frames, y.frames) and x.block_prompts == y.block_prompts and x.key == y.key
    a.set_epoch(7)
    assert torch.equal(a[1].frames, x.frames)  # items depend on (seed, index) only
    assert not torch.equal(a[0].frames, x.frames) and not torch.equal(c[1].frames, x.frames)
    # structured, not noise: varied in space, smooth in space and time within a shot
    f = x.frames.float()
    assert f.std() > 20
    assert (f[:, 1:] - f[:, :-1]).abs().mean() < 12 and (f[:, :, 1:] - f[:, :, :-1]).abs().mean() < 12
    shots = a.shots(1)
    assert [s.caption for s in shots] == list(dict.fromkeys(x.block_prompts))
    within = [t for t in range(1, 29) if t not in {s.start_frame for s in shots}]
    assert (f[within] - f[[t - 1 for t in within]]).abs().mean() < 12
    assert all(s.start_frame in {latent_to_raw_frame(2 * j) for j in range(4)} for s in shots)
    single = SyntheticVideoSource(4, 2, 16, 16, length=1, seed=0)[0]
    assert len(set(single.block_prompts)) == 1
    with pytest.raises(ConfigError, match="shots_per_clip: at most the number of blocks"):
        SyntheticVideoSource(4, 2, 16, 16, length=1, seed=0, shots_per_clip=3)
    with pytest.raises(ConfigError, match="multiple of frames_per_block"):
        SyntheticVideoSource(5, 2, 16, 16, length=1, seed=0)
    with pytest.raises(IndexError):
        a[4]


def test_synthetic_latent_source():
    kw = dict(frames_per_block=2, length=3, seed=1, shots_per_clip=2)
    src = SyntheticLatentSource(8, 6, 4, 6, 5, 16, dtype=torch.bfloat16, **kw)
    s = src[2]
    assert isinstance(s, LatentSample)
    assert s.latents.shape == (8, 6, 4, 6) and s.latents.dtype == torch.bfloat16
    assert s.text.shape == (3, 5, 16) and s.text.dtype == torch.bfloat16 and s.num_blocks == 3
    again = SyntheticLatentSource(8, 6, 4, 6, 5, 16, dtype=torch.bfloat16, **kw)[2]
    assert torch.equal(s.latents, again.latents) and torch.equal(s.text, again.text)
    f32 = SyntheticLatentSource(8, 6, 4, 6, 5, 16, dtype=torch.float32, **kw)[2]
    assert torch.equal(f32.latents.to(torch.bfloat16), s.latents)
    assert not torch.equal(src[1].latents, s.latents)
    # blocks of one shot share their text embedding; two shots -> two distinct embeddings
    distinct = {tuple(s.text[j].flatten()[:4].tolist()) for j in range(3)}
    assert len(distinct) == 2 == len(set(s.block_prompts))
    with pytest.raises(ConfigError, match="dtype"):
        SyntheticLatentSource(8, 6, 4, 6, 5, 16, dtype=torch.int32, **kw)


# --- sharding and loading ----------------------------------------------------------------------

def test_sharded_sampler():
    n, dp = 23, 4
    samplers = [ShardedSampler(n, r, dp, seed=7) for r in range(dp)]
    shards = [list(s) for s in samplers]
    assert all(len(x) == len(s) == n // dp for x, s in zip(shards, samplers))
    flat = [i for x in shards for i in x]
    assert len(set(flat)) == len(flat) == (n // dp) * dp and all(0 <= i < n for i in flat)
    assert shards == [list(ShardedSampler(n, r, dp, seed=7)) for r in range(dp)]  # deterministic
    for s in samplers:
        s.set_epoch(1)
    epoch1 = [list(s) for s in samplers]
    assert epoch1 != shards and len({i for x in epoch1 for i in x}) == (n // dp) * dp
    assert list(ShardedSampler(n, 0, dp, seed=8)) != shards[0]
    assert list(ShardedSampler(10, 1, 3, shuffle=False)) == [1, 4, 7]  # index 9 dropped
    g = _groups(sp_size=2, sp_rank=1, dp_size=2, dp_rank=1)
    assert list(ShardedSampler.for_groups(10, g, seed=7)) == list(ShardedSampler(10, 1, 2, seed=7))
    with pytest.raises(ConfigError, match=r"dp_rank: must be in \[0, dp_size=2\)"):
        ShardedSampler(10, 2, 2)
    with pytest.raises(ConfigError, match="3 samples cannot feed dp_size=4"):
        ShardedSampler(3, 0, 4)


class _CountingSource(SyntheticVideoSource):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[int] = []

    def __getitem__(self, index):
        self.loaded.append(index)
        return super().__getitem__(index)


def test_root_only_loader():
    sampler = ShardedSampler(6, 0, 2, seed=1)
    root_src = _CountingSource(2, 1, 16, 16, length=6, seed=0)
    root = list(root_only_loader(root_src, _groups(2, 0, 2, 0), sampler, epoch=3))
    assert root_src.loaded == list(sampler) and sampler.epoch == 3 and root_src.epoch == 3
    assert [c.key for c in root] == [f"synthetic-0-{i:06d}" for i in sampler]
    other_src = _CountingSource(2, 1, 16, 16, length=6, seed=0)
    other = list(root_only_loader(other_src, _groups(2, 1, 2, 0), sampler))
    assert other == [None] * len(root) and other_src.loaded == []  # non-root ranks decode nothing
    single = list(root_only_loader(root_src, _groups(1, 0), [0, 5]))
    assert [c.key for c in single] == ["synthetic-0-000000", "synthetic-0-000005"]


def test_root_only_loader_with_workers():
    src = SyntheticVideoSource(2, 1, 16, 16, length=4, seed=2)
    got = list(root_only_loader(src, _groups(1, 0), [3, 1, 2], num_workers=2))
    assert all(isinstance(c, VideoClip) for c in got)
    assert [c.key for c in got] == [src[i].key for i in (3, 1, 2)]
    assert all(torch.equal(c.frames, src[i].frames) for c, i in zip(got, (3, 1, 2)))


def test_write_video_folder_errors(tmp_path):
    frames = _moving_frames(5, 16, 16)
    with pytest.raises(ValueError, match="unique, non-empty file stem"):
        write_video_folder(tmp_path, [SourceVideo("a/b", frames, [Shot(0, "x")])])
    with pytest.raises(DatasetError, match="first shot must start at frame 0"):
        write_video_folder(tmp_path, [SourceVideo("a", frames, [Shot(1, "x")])])
    with pytest.raises(ValueError, match="past the last frame"):
        write_video_folder(tmp_path, [SourceVideo("a", frames, [Shot(0, "x"), Shot(5, "y")])])
    with pytest.raises(ValueError, match="even height and width"):
        write_video_folder(tmp_path, [SourceVideo("odd", _moving_frames(2, 15, 16), [Shot(0, "x")])])
    with pytest.raises(ValueError, match="not 1 \\+ 4 \\(F - 1\\)"):
        write_video_folder(tmp_path, [VideoClip(_moving_frames(4, 16, 16), ["x"], "c")])
    (tmp_path / "t.txt").write_text("old")
    with pytest.raises(DatasetError, match="t.txt exists"):
        write_video_folder(tmp_path, [SourceVideo("t", frames, [Shot(0, "x")])])
    assert not (tmp_path / "odd.mp4").exists() and not (tmp_path / "t.mp4").exists()
    meta = json.dumps({"caption": "x"})
    write_video_folder(tmp_path, [SourceVideo("ok", frames, [Shot(0, "x")])])
    assert (tmp_path / "ok.json").read_text().replace("\n", "").replace(" ", "") == meta.replace(" ", "")
