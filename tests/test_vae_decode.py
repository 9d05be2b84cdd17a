"""Block VAE decoding in sync / stream / device modes (impl/vae_decode.py) and its pipeline use."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import impl.vae_decode as vd
from impl.config import ConfigError, get_preset
from impl.inference.config import InferenceConfig
from impl.model.vae import StreamingDecoder, build_vae
from impl.vae_decode import DecodedBlock, VAEDecodeError, make_block_decoder
from impl.video_io import float_frames_to_uint8, frames_to_uint8

CPU_MODES = [("sync", None), ("device", "cpu")]
BLOCK = 2  # latent frames per block


@pytest.fixture(scope="module")
def vae64():
    return build_vae(get_preset("tiny").vae, dtype=torch.float64, seed=0)


def _latents(blocks: int, batch: int = 1, seed: int = 1, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, blocks * BLOCK, 4, 4, generator=g, dtype=dtype).to(device)


def _make(vae, mode="sync", device=None, queue_depth=2, *, on_frames, frame_format="float32"):
    """A block decoder with these decode settings (validated by InferenceConfig)."""
    cfg = InferenceConfig(vae_mode=mode, vae_device=device, vae_queue_depth=queue_depth, frame_format=frame_format)
    return make_block_decoder(vae, cfg, on_frames=on_frames)


def _decode_all(vae, z, mode, device=None, depth=2, frame_format="float32"):
    got: list[DecodedBlock] = []
    with _make(vae, mode, device=device, queue_depth=depth, on_frames=got.append, frame_format=frame_format) as dec:
        for i in range(0, z.shape[2], BLOCK):
            dec.submit(z[:, :, i:i + BLOCK])
    assert [b.index for b in got] == list(range(z.shape[2] // BLOCK))
    assert dec.decode_ms == [b.decode_ms for b in got] and all(ms > 0 for ms in dec.decode_ms)
    dtype = torch.uint8 if frame_format == "uint8" else torch.float32
    for b in got:
        assert b.frames.dtype == dtype and b.frames.device.type == "cpu" and b.frames.shape[1] == 3
    return torch.cat([b.frames for b in got], dim=2)


@pytest.mark.parametrize("mode", ["sync", "device"])
def test_uint8_frames_are_the_bytes_the_video_writer_makes(mode):
    """frame_format='uint8' converts on the decoder's device with video_io's rounding and hands
    [B, 3, T, H, W] views of [B, T, H, W, 3] memory (what an mp4 frame is)."""
    vae = build_vae(get_preset("tiny").vae, dtype=torch.float32, device="cpu", seed=0)
    z = _latents(blocks=2, batch=2, dtype=torch.float32)
    ref = _decode_all(vae, z, "sync")
    got = _decode_all(vae, z, mode, frame_format="uint8")
    assert torch.equal(got, float_frames_to_uint8(ref))
    assert np.array_equal(frames_to_uint8(got[:1]), frames_to_uint8(ref[:1]))
    blocks: list[DecodedBlock] = []
    with _make(vae, mode, on_frames=blocks.append, frame_format="uint8") as dec:
        dec.submit(z[:, :, :BLOCK])
    assert blocks[0].frames.permute(0, 2, 3, 4, 1).is_contiguous()   # mp4 frames need no copy


class FakeDecoder:
    """Stands in for StreamingDecoder: each frame holds its block's latent mean, so blocks are
    identifiable; ``delay`` slows it down and ``gate`` (an Event) holds it until set."""

    delay = 0.0
    gate: threading.Event | None = None
    calls = 0

    def __init__(self, vae):
        self.first = True

    def decode_block(self, latents, normalized=True):
        if FakeDecoder.gate is not None:
            assert FakeDecoder.gate.wait(10)
        time.sleep(FakeDecoder.delay)
        FakeDecoder.calls += 1
        t = 4 * latents.shape[2] - (3 if self.first else 0)
        self.first = False
        return torch.full((latents.shape[0], 3, t, 2, 2), float(latents.mean()))


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(vd, "stream_decoder", lambda vae, **options: FakeDecoder(vae))
    monkeypatch.setattr(FakeDecoder, "delay", 0.0)
    monkeypatch.setattr(FakeDecoder, "gate", None)
    monkeypatch.setattr(FakeDecoder, "calls", 0)
    return FakeDecoder


def _block(i: int) -> torch.Tensor:
    return torch.full((1, 8, BLOCK, 4, 4), float(i))


# ---- configuration ----

def test_decode_settings_defaults_and_validation():
    c = InferenceConfig()
    assert (c.vae_mode, c.vae_device, c.vae_queue_depth) == ("sync", None, 2)
    assert InferenceConfig(vae_mode="device", vae_device="cuda:1").vae_device == "cuda:1"
    bad = [
        ({"vae_mode": "async"}, "vae_mode"),
        ({"vae_mode": "device", "vae_device": "gpu1"}, "vae_device"),
        ({"vae_mode": "device", "vae_device": "cuda:x"}, "vae_device"),
        ({"vae_device": "cpu"}, "vae_device"),  # sync mode would ignore it
        ({"vae_queue_depth": 0}, "vae_queue_depth"),
        ({"vae_queue_depth": True}, "vae_queue_depth"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ConfigError) as err:
            InferenceConfig(**kwargs)
        assert str(err.value).startswith(field), kwargs


def test_factory_rejects_bad_arguments(vae64):
    sink = lambda block: None  # noqa: E731
    with pytest.raises(ConfigError, match="vae_mode"):
        _make(vae64, "async", on_frames=sink)
    with pytest.raises(ConfigError, match="only used with vae_mode='device'"):
        _make(vae64, "sync", device="cpu", on_frames=sink)
    with pytest.raises(ConfigError, match="vae_queue_depth"):
        _make(vae64, "device", queue_depth=0, on_frames=sink)
    with pytest.raises(ValueError, match="CUDA"):
        _make(vae64, "stream", on_frames=sink)  # the VAE is on the CPU
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            _make(vae64, "device", device="cuda:0", on_frames=sink)
    with _make(vae64, "device", on_frames=sink) as dec:
        with pytest.raises(ValueError, match="expected latents"):
            dec.submit(torch.zeros(1, 3, 2, 4, 4, dtype=torch.float64))


# ---- exactness ----

def test_modes_match_batch_decode_and_each_other_bitwise(vae64):
    z = _latents(blocks=3, batch=2)
    outs = {mode: _decode_all(vae64, z, mode, device) for mode, device in CPU_MODES}
    dec = StreamingDecoder(vae64)
    direct = torch.cat([dec.decode_block(z[:, :, i:i + BLOCK]) for i in range(0, z.shape[2], BLOCK)], 2)
    for out in outs.values():
        assert torch.equal(out, direct.float())  # same decoder, same bits, in every mode
    full = vae64.decode(z).sample  # identity latent stats: normalised == raw latents
    assert outs["sync"].shape == full.shape == (2, 3, 1 + 4 * (z.shape[2] - 1), 64, 64)
    torch.testing.assert_close(outs["sync"], full.float(), atol=1e-6, rtol=0)


def test_caller_may_overwrite_latents_right_after_submit(fake):
    fake.gate = threading.Event()  # the worker reads the block only after we clobbered it
    got = []
    with _make(build_vae(get_preset("tiny").vae), "device", on_frames=got.append) as dec:
        z = _block(7)
        dec.submit(z)
        z.fill_(-1.0)
        fake.gate.set()
    assert got[0].frames.unique().tolist() == [7.0]


# ---- failures ----

@pytest.mark.parametrize("mode,device", CPU_MODES)
def test_worker_error_reaches_caller_and_close_does_not_hang(vae64, monkeypatch, mode, device):
    original = StreamingDecoder.decode_block
    fail_at = 3

    def flaky(self, latents, normalized=True):
        if self.latents_decoded // BLOCK == fail_at:
            raise KeyError("boom at block 3")
        return original(self, latents, normalized)

    monkeypatch.setattr(StreamingDecoder, "decode_block", flaky)
    got: list[DecodedBlock] = []
    dec = _make(vae64, mode, device=device, queue_depth=2, on_frames=got.append)
    z = _latents(blocks=8)
    with pytest.raises(VAEDecodeError, match="block 3") as err:
        for i in range(0, z.shape[2], BLOCK):
            dec.submit(z[:, :, i:i + BLOCK])
        dec.drain()
    assert isinstance(err.value.__cause__, KeyError)
    assert [b.index for b in got] == [0, 1, 2]  # everything before the failure, nothing after
    t0 = time.monotonic()
    with pytest.raises(VAEDecodeError):
        dec.close()
    dec.close()  # a second close is a no-op
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(RuntimeError, match="closed"):
        dec.submit(z[:, :, :BLOCK])
    if dec._thread is not None:
        assert not dec._thread.is_alive()


def test_callback_error_is_a_decode_error(fake):
    def on_frames(block):
        if block.index == 1:
            raise OSError("disk full")

    with pytest.raises(VAEDecodeError, match="block 1.*disk full") as err:
        with _make(build_vae(get_preset("tiny").vae), "device", on_frames=on_frames) as dec:
            for i in range(4):
                dec.submit(_block(i))
    assert isinstance(err.value.__cause__, OSError)


def test_abort_with_a_stuck_worker_returns_and_drops_its_block(fake, monkeypatch):
    monkeypatch.setattr(vd, "_JOIN_S", 0.2)
    fake.gate = threading.Event()
    got = []
    dec = _make(build_vae(get_preset("tiny").vae), "device", on_frames=got.append)
    dec.submit(_block(0))
    dec.submit(_block(1))
    with pytest.raises(TimeoutError, match="still decoding"):
        dec.drain(timeout=0.1)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="did not stop"):
        with pytest.raises(ValueError, match="body"):
            with dec:
                raise ValueError("body error")  # exits through abort()
    assert time.monotonic() - t0 < 2.0
    fake.gate.set()
    dec._thread.join(5)
    assert not dec._thread.is_alive() and got == []  # aborted work is never delivered


# ---- queue bound and ordering ----

@pytest.mark.parametrize("depth", [1, 3])
def test_queue_bound_holds(fake, depth):
    fake.delay = 0.02
    got = []
    peak = 0
    with _make(build_vae(get_preset("tiny").vae), "device", queue_depth=depth,
                            on_frames=got.append) as dec:
        for i in range(8):
            dec.submit(_block(i))
            in_flight = i + 1 - len(got)  # submitted, not yet handed to us
            assert in_flight <= depth and dec.in_flight <= depth
            peak = max(peak, in_flight)
    assert peak == depth  # the bound was reached, so submit did wait
    assert len(got) == 8 and dec.in_flight == 0


def test_many_blocks_arrive_once_and_in_order(fake, monkeypatch):
    sleeps = iter([0.0, 0.01, 0.0, 0.005] * 5)
    original = FakeDecoder.decode_block

    def jittery(self, latents, normalized=True):
        time.sleep(next(sleeps))
        return original(self, latents, normalized)

    monkeypatch.setattr(FakeDecoder, "decode_block", jittery)
    got = []
    with _make(build_vae(get_preset("tiny").vae), "device", queue_depth=3,
                            on_frames=got.append) as dec:
        for i in range(20):
            dec.submit(_block(i))
    assert [b.index for b in got] == list(range(20))
    assert [b.frames.unique().tolist() for b in got] == [[float(i)] for i in range(20)]
    assert [b.frames.shape[2] for b in got] == [1 + 4 * (BLOCK - 1)] + [4 * BLOCK] * 19
    assert fake.calls == 20 and dec.delivered == 20


# ---- pipeline ----

@pytest.fixture(scope="module")
def parts():
    from impl.model.dit import CausalWanDiT
    from impl.model.text_encoder import TextEncoder

    torch.manual_seed(0)
    preset = get_preset("tiny")
    return preset, CausalWanDiT(preset.dit).eval(), TextEncoder.from_preset(preset.text, seed=0), \
        build_vae(preset.vae, seed=0)


def _pipe(parts, **decode):
    from impl.inference.build import pipeline_for_model

    preset, model, text, vae = parts
    return pipeline_for_model(model, InferenceConfig(preset=preset, dtype="fp32", **decode),
                              text_embedder=lambda p: text.encode([p]), vae=vae)


def test_pipeline_device_mode_matches_sync(parts, tmp_path):
    from impl.video_io import read_video

    sync = _pipe(parts).generate(["a cat"] * 4, seed=3)
    timings = []
    dev = _pipe(parts, vae_mode="device", vae_device="cpu", vae_queue_depth=2).generate(
        ["a cat"] * 4, seed=3, video_path=tmp_path / "d.mp4", on_block=timings.append)
    assert torch.equal(dev.latents, sync.latents)
    assert torch.equal(dev.frames, sync.frames)
    assert read_video(tmp_path / "d.mp4").shape[0] == dev.frames.shape[2]
    assert [t.block for t in timings] == list(range(4)) and dev.timings == timings
    assert [t.frames for t in timings] == [t.frames for t in sync.timings]
    assert all(t.vae_ms > 0 and t.dit_ms > 0 and t.total_ms >= t.dit_ms for t in timings)


def test_pipeline_decode_failure_raises_and_leaves_no_mp4(parts, tmp_path, monkeypatch):
    original = StreamingDecoder.decode_block

    def flaky(self, latents, normalized=True):
        if self.latents_decoded:
            raise RuntimeError("VAE exploded")
        return original(self, latents, normalized)

    monkeypatch.setattr(StreamingDecoder, "decode_block", flaky)
    out = tmp_path / "x.mp4"
    with pytest.raises(VAEDecodeError, match="block 1.*VAE exploded"):
        _pipe(parts, vae_mode="device").generate(["a cat"] * 4, video_path=out)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- CUDA (skipped without a GPU) ----

@pytest.mark.gpu
@pytest.mark.parametrize("mode,device", [("stream", None), ("device", "cuda")])
def test_cuda_async_modes_match_sync(mode, device):
    vae = build_vae(get_preset("tiny").vae, dtype=torch.float32, device="cuda", seed=0)
    z = _latents(blocks=4, batch=2, dtype=torch.float32, device="cuda")
    ref = _decode_all(vae, z, "sync")
    assert torch.equal(_decode_all(vae, z, mode, device, depth=2), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,device", [("sync", None), ("stream", None), ("device", "cuda")])
def test_cuda_uint8_frames_match_float_frames(mode, device):
    vae = build_vae(get_preset("tiny").vae, dtype=torch.float32, device="cuda", seed=0)
    z = _latents(blocks=3, batch=2, dtype=torch.float32, device="cuda")
    ref = _decode_all(vae, z, mode, device)
    assert torch.equal(_decode_all(vae, z, mode, device, frame_format="uint8"), float_frames_to_uint8(ref))


@pytest.mark.gpu
def test_cuda_stream_mode_owns_its_input():
    """The producer frees / overwrites its latents right after submit, as the DiT loop does;
    the side stream must still decode the submitted values (the cross-stream race)."""
    vae = build_vae(get_preset("tiny").vae, dtype=torch.float32, device="cuda", seed=0)
    z = _latents(blocks=6, dtype=torch.float32, device="cuda")
    ref = _decode_all(vae, z, "sync")
    got: list[DecodedBlock] = []
    with _make(vae, "stream", queue_depth=3, on_frames=got.append) as dec:
        for i in range(0, z.shape[2], BLOCK):
            x = z[:, :, i:i + BLOCK].clone()
            torch.cuda._sleep(1_000_000)  # keep the producer stream busy so any race shows
            dec.submit(x)
            x.fill_(float("nan"))  # in place, on the producer stream
            del x
            junk = torch.full((1, 8, BLOCK, 4, 4), float("nan"), device="cuda")  # may reuse freed memory
            del junk
    assert torch.equal(torch.cat([b.frames for b in got], dim=2), ref)


# ---- failures that are not decode failures (issue 19) ----

@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_in_on_frames_reaches_the_caller_unwrapped(fake, exc_type):
    def on_frames(block):
        if block.index == 1:
            raise exc_type()

    with pytest.raises(exc_type):
        with _make(build_vae(get_preset("tiny").vae), "device", on_frames=on_frames) as dec:
            for i in range(4):
                dec.submit(_block(i))
    # A second use after the interrupt is a decode error, not a second KeyboardInterrupt.
    with pytest.raises((VAEDecodeError, RuntimeError)):
        dec.submit(_block(0))


def test_ctrl_c_during_a_sync_decode_is_not_a_decode_failure(fake, monkeypatch):
    def interrupted(self, latents, normalized=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeDecoder, "decode_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with _make(build_vae(get_preset("tiny").vae), "sync", on_frames=lambda b: None) as dec:
            dec.submit(_block(0))


def test_video_write_error_in_on_frames_passes_through(fake):
    from impl.video_io import VideoWriteError

    def on_frames(block):
        raise VideoWriteError("writing mp4 out.mp4 failed after 0 frames: OSError: [Errno 32] Broken pipe")

    for mode in ("sync", "device"):
        with pytest.raises(VideoWriteError, match="out.mp4") as err:
            with _make(build_vae(get_preset("tiny").vae), mode, on_frames=on_frames) as dec:
                for i in range(3):
                    dec.submit(_block(i))
        assert not isinstance(err.value, VAEDecodeError)


@pytest.mark.parametrize("where", ["drain", "submit"])
def test_a_waiting_caller_sees_ctrl_c_promptly(fake, where):
    """The caller's waits poll: a SIGINT flag set while it waits (here by _thread.interrupt_main,
    which does not wake a blocking wait the way a real signal may) is seen within ~_POLL_S."""
    import _thread

    fake.gate = threading.Event()   # the worker is stuck in a decode until released
    release = threading.Timer(10.0, fake.gate.set)   # never hang the suite
    release.start()
    dec = _make(build_vae(get_preset("tiny").vae), "device", queue_depth=1, on_frames=lambda b: None)
    try:
        dec.submit(_block(0))
        threading.Timer(0.3, _thread.interrupt_main).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            if where == "drain":
                dec.drain()
            else:
                dec.submit(_block(1))   # waits for the only queue slot
                dec.submit(_block(2))
        assert time.monotonic() - t0 < 2.0
    finally:
        fake.gate.set()
        release.cancel()
        dec.abort()


def test_pipeline_broken_ffmpeg_pipe_is_an_mp4_write_error(parts, tmp_path, monkeypatch):
    """ffmpeg's pipe breaks while the pipeline writes: the error names the mp4, it is not a
    VAE decode failure, and neither the mp4 nor its temp file is left behind."""
    import impl.video_io as vio
    from impl.video_io import VideoWriteError

    class BrokenWriter:   # what imageio's ffmpeg writer does once ffmpeg has died
        def __init__(self, path):
            self.path = path
            open(path, "wb").close()

        def append_data(self, frame):
            raise BrokenPipeError(32, "Broken pipe")

        def close(self):
            pass

    class FakeImageio:
        @staticmethod
        def get_writer(path, **kwargs):
            return BrokenWriter(path)

    monkeypatch.setattr(vio, "_require_ffmpeg", lambda: FakeImageio)
    out = tmp_path / "video.mp4"
    with pytest.raises(VideoWriteError, match=r"writing mp4 .*video\.mp4 failed after 0 frames.*Broken pipe") as err:
        _pipe(parts).generate(["a cat"] * 2, video_path=out)
    assert not isinstance(err.value, VAEDecodeError)
    assert not out.exists() and not list(tmp_path.iterdir())
