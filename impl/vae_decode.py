"""Block-by-block VAE decoding, synchronous or overlapped with the DiT.

:class:`BlockDecoder` takes one block of latents at a time (:meth:`BlockDecoder.submit`) and
hands its pixel frames, as CPU ``[B, 3, T, H, W]`` (float32 in ``[-1, 1]``, or uint8 converted on
the GPU with ``InferenceConfig.frame_format="uint8"``), to a callback in block order. The mode (``InferenceConfig.vae_mode``) picks where the decode runs:

* ``"sync"``: in the caller's thread on the VAE's device; ``submit`` returns after delivery.
* ``"stream"``: on a second CUDA stream of the VAE's GPU, launched by a worker thread, so the
  GPU overlaps the decode of block k with the DiT of block k + 1.
* ``"device"``: in a worker thread with the VAE on another device (another GPU or the CPU);
  latents cross over through pinned host buffers.

In the async modes ``submit`` only blocks while ``queue_depth`` blocks are in flight
(submitted but not yet delivered). A failure in the worker reaches the caller at the next
``submit``/``drain``/``close`` as :class:`VAEDecodeError` with the original as ``__cause__``;
the worker then stops and pending blocks are discarded, so frames are never lost silently,
duplicated or reordered. Two kinds of failure are not decode failures and reach the caller
unwrapped, the first time they are raised: a :class:`KeyboardInterrupt` / :class:`SystemExit`
(Ctrl-C during a sync decode, or raised by ``on_frames``) and an
:class:`impl.video_io.VideoWriteError` from ``on_frames`` (writing the mp4 failed). Every wait
of the caller (a queue slot in ``submit``, ``drain``) polls, so Ctrl-C is seen within
``_POLL_S`` seconds.

Cross-stream ownership ("stream" mode; the official release races here): ``submit`` copies
the latents on the producer (caller's current) stream into a tensor the decoder owns, records
an event after that copy, and the side stream waits on the event before reading. The copy is
``record_stream``-ed on the side stream and kept referenced until its block has finished, so
the caching allocator cannot hand its memory to the DiT while the side stream still reads it,
and the caller may overwrite or free its own tensor right after ``submit``.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable

import torch

from impl.errors import ConfigError
from impl.model.decoders import stream_decoder
from impl.video_io import VideoWriteError, float_frames_to_uint8

if TYPE_CHECKING:
    from impl.inference.config import InferenceConfig

__all__ = ["DecodedBlock", "VAEDecodeError", "BlockDecoder", "make_block_decoder"]
_POLL_S = 0.05      # how often a waiting caller re-checks the worker for errors
_JOIN_S = 30.0      # close()/abort() give up on a stuck worker after this (it is a daemon)
_STOP = object()    # worker sentinel


class VAEDecodeError(RuntimeError):
    """Decoding (or delivering) a block failed; ``__cause__`` holds the original error."""


def _passes_through(exc: BaseException) -> bool:
    """Errors that are not the decoder's: Ctrl-C / exit, and a failed mp4 write in ``on_frames``."""
    return not isinstance(exc, Exception) or isinstance(exc, VideoWriteError)


@dataclass(frozen=True)
class DecodedBlock:
    """One decoded block, as handed to the ``on_frames`` callback."""

    index: int              # 0-based block number, in submit order
    frames: torch.Tensor    # [B, 3, T, H, W] on the CPU: float32 in [-1, 1], or uint8 (frame_format)
    decode_ms: float        # time of the VAE decode itself (see the backends for the clock)


FramesCallback = Callable[[DecodedBlock], None]


def _vae_device(vae: torch.nn.Module) -> torch.device:
    return next(vae.parameters()).device


def check_stream_device(device: torch.device) -> None:
    """``vae_mode="stream"`` decodes on a side CUDA stream of the VAE's GPU: ``device`` must be one
    (the builder asks before any weight exists, the stream backend of the module it is given)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"vae_mode: 'stream' decodes on a side CUDA stream and needs the VAE on a CUDA GPU, "
                          f"not {device}; use vae_mode='sync' or 'device'")


class _PinnedPool:
    """Reusable host buffers keyed by (shape, dtype), page-locked when CUDA is present.

    Pinned memory makes host<->device copies asynchronous (``non_blocking``) and fast. A
    buffer belongs to one block from ``take`` until ``give``; in-flight blocks are bounded
    by the queue depth, so the pool is too.
    """

    def __init__(self) -> None:
        self._pin = torch.cuda.is_available()
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=self._pin)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)


def _deliverable(frames: torch.Tensor, frame_format: str) -> torch.Tensor:
    """Decoder output [B, 3, T, H, W] in [-1, 1] -> what is copied to the host, on its device:
    float32 as it is, or uint8 laid out [B, T, H, W, 3] (the order video files store)."""
    if frame_format == "uint8":
        return float_frames_to_uint8(frames).permute(0, 2, 3, 4, 1).contiguous()
    return frames.float()


def _as_delivered(host: torch.Tensor, frame_format: str) -> torch.Tensor:
    """The [B, 3, T, H, W] view of a host copy made by :func:`_deliverable` (uint8: a view of
    the [B, T, H, W, 3] memory, so writing a video needs no copy)."""
    return host.permute(0, 4, 1, 2, 3) if frame_format == "uint8" else host


def _delivered_on_cpu(frames: torch.Tensor, frame_format: str) -> torch.Tensor:
    """What a decode on the CPU delivers: its frames converted, no copy between devices."""
    return _as_delivered(_deliverable(frames, frame_format), frame_format)


def _to_host(frames: torch.Tensor, stream: torch.cuda.Stream, pool: _PinnedPool, frame_format: str) -> torch.Tensor:
    """CUDA frames -> pageable CPU frames: converted on the GPU (uint8 is a quarter of the
    bytes), copied asynchronously on ``stream`` into a pinned staging buffer reused across blocks,
    waited for on an event (not the whole device: the DiT keeps running), then cloned so the
    caller never holds pinned memory for the whole video."""
    out = _deliverable(frames, frame_format)
    buf = pool.take(out.shape, out.dtype)
    buf.copy_(out, non_blocking=True)
    done = torch.cuda.Event()
    done.record(stream)
    done.synchronize()
    host = buf.clone()
    pool.give(buf)
    return _as_delivered(host, frame_format)


# ---- backends: stage() runs in the caller's thread, decode() where the mode decodes ----

class _SyncBackend:
    """Decode in the caller's thread (no staging: the decode is done before ``submit`` returns);
    time with CUDA events on the current stream, or perf_counter on the CPU."""

    def __init__(self, vae: torch.nn.Module, frame_format: str, **options: bool) -> None:
        self.device = _vae_device(vae)
        self.decoder = stream_decoder(vae, **options)
        self.frame_format = frame_format
        self.staging = _PinnedPool()

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            frames = self.decoder.decode_block(latents)
            out = _delivered_on_cpu(frames, self.frame_format)
            return out, (time.perf_counter() - t0) * 1e3
        with torch.cuda.device(self.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            frames = self.decoder.decode_block(latents)
            end.record()
            host = _to_host(frames, torch.cuda.current_stream(self.device), self.staging, self.frame_format)
            return host, start.elapsed_time(end)


class _StreamBackend:
    """Decode on a side CUDA stream of the VAE's GPU; decode time from CUDA events on it."""

    def __init__(self, vae: torch.nn.Module, frame_format: str, **options: bool) -> None:
        self.device = _vae_device(vae)
        self.frame_format = frame_format
        check_stream_device(self.device)
        self.decoder = stream_decoder(vae, **options)
        self.side = torch.cuda.Stream(device=self.device)
        self.staging = _PinnedPool()

    def stage(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        # Our own copy, made on the producer's stream, so the caller may reuse its tensor.
        producer = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device):
            z = latents.detach().to(self.device, copy=True)
            ready = torch.cuda.Event()
            ready.record(producer)
        # z was allocated on the producer stream but is read on the side stream: without this
        # the allocator could recycle its memory once it is freed, while the side stream
        # still reads it. The job also keeps z referenced until the block is finished.
        z.record_stream(self.side)
        return z, ready

    def decode(self, staged: tuple[torch.Tensor, torch.cuda.Event]) -> tuple[torch.Tensor, float]:
        z, ready = staged
        with torch.cuda.device(self.device), torch.cuda.stream(self.side):
            self.side.wait_event(ready)  # the producer's copy into z has finished
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.side)
            frames = self.decoder.decode_block(z)
            end.record(self.side)
            host = _to_host(frames, self.side, self.staging, self.frame_format)
        return host, start.elapsed_time(end)


class _DeviceBackend:
    """Decode with the VAE on ``device`` (moved there once, in place); wall time in the worker."""

    def __init__(self, vae: torch.nn.Module, device: str | torch.device | None, frame_format: str,
                 **options: bool) -> None:
        self.frame_format = frame_format
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"vae_device={str(dev)!r} needs CUDA, which this machine lacks; "
                                 f"use vae_device='cpu'")
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"vae_device={str(dev)!r}: only {torch.cuda.device_count()} "
                                 f"CUDA device(s) present")
        elif dev.type != "cpu":
            raise ValueError(f"vae_device must be 'cpu' or a CUDA device, got {str(dev)!r}")
        if _vae_device(vae) != dev:
            torch.nn.Module.to(vae, device=dev)
        self.device = dev
        self.decoder = stream_decoder(vae, **options)
        self.stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        self.inputs = _PinnedPool()   # host hop of the latents
        self.staging = _PinnedPool()  # host hop of the frames

    def stage(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None, bool]:
        latents = latents.detach()
        if latents.device.type == "cpu" and self.device.type == "cpu":
            return latents.clone(), None, False  # private copy: the caller may reuse its tensor
        buf = self.inputs.take(latents.shape, latents.dtype)
        if latents.device.type == "cuda":
            # Async D2H on the producer's stream; the worker waits on the event, not the device.
            buf.copy_(latents, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            return buf, ready, True
        buf.copy_(latents)
        return buf, None, True

    def decode(self, staged: tuple[torch.Tensor, torch.cuda.Event | None, bool]) -> tuple[torch.Tensor, float]:
        host, ready, pooled = staged
        if ready is not None:
            ready.synchronize()
        if self.stream is None:
            t0 = time.perf_counter()
            frames = self.decoder.decode_block(host)
            ms = (time.perf_counter() - t0) * 1e3
            out = _delivered_on_cpu(frames, self.frame_format)
        else:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                z = host.to(self.device, non_blocking=True)
                t0 = time.perf_counter()
                frames = self.decoder.decode_block(z)
                self.stream.synchronize()  # wall time needs the GPU work done; also ends the H2D read
                ms = (time.perf_counter() - t0) * 1e3
                out = _to_host(frames, self.stream, self.staging, self.frame_format)
        if pooled:  # only on success: after a failure an async copy may still use it
            self.inputs.give(host)
        return out, ms


# ---- the decoder ----

class BlockDecoder:
    """Decode latent blocks in order and hand their frames to ``on_frames``.

    Use :func:`make_block_decoder` to build one. ``on_frames`` runs in the thread that decodes:
    the caller's in ``"sync"`` mode, the single worker thread otherwise (one block at a time, in
    block order); it must not call back into this decoder, and an exception in it counts as a
    decode failure, except a :class:`~impl.video_io.VideoWriteError`, ``KeyboardInterrupt`` or
    ``SystemExit``, which reach the caller as they are. Use as a context manager: a normal exit drains (like :meth:`close`), an
    exception exits through :meth:`abort`. One decoder decodes one video.
    """

    def __init__(self, backend: Any, mode: str, queue_depth: int, on_frames: FramesCallback,
                 z_dim: int) -> None:
        self.mode = mode
        self.queue_depth = queue_depth
        self.decode_ms: list[float] = []   # per delivered block, in block order
        self._backend = backend
        self._on_frames = on_frames
        self._z_dim = z_dim
        self._submitted = 0
        self._delivered = 0
        self._error: tuple[int, BaseException] | None = None
        self._error_raised = False   # a pass-through error is raised as is only once
        self._closed = False
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(queue_depth)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if mode != "sync":
            self._thread = threading.Thread(target=self._work, name=f"vae-decode-{mode}", daemon=True)
            self._thread.start()

    # ---- caller side ----
    @property
    def in_flight(self) -> int:
        """Blocks submitted but not yet delivered (at most ``queue_depth``)."""
        with self._cond:
            return self._submitted - self._delivered

    @property
    def delivered(self) -> int:
        """Blocks handed to ``on_frames`` so far."""
        with self._cond:
            return self._delivered

    def submit(self, latents: torch.Tensor) -> None:
        """Queue one block ``[B, C, F, h, w]`` (normalised latents) for decoding.

        Returns at once in the async modes unless ``queue_depth`` blocks are in flight, then
        waits for a slot. The decoder takes its own copy, so ``latents`` may be reused
        afterwards. Raises :class:`VAEDecodeError` if an earlier block failed.
        """
        if self._closed:
            raise RuntimeError("BlockDecoder.submit: the decoder is closed")
        self._raise_if_failed()
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != self._z_dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"BlockDecoder.submit: expected latents [B, {self._z_dim}, F, h, w], got {shape}")
        index = self._submitted
        if self._thread is None:
            self._submitted += 1
            self._process(index, latents)
            self._raise_if_failed()
            return
        self._acquire_slot()
        try:
            staged = self._backend.stage(latents)
        except BaseException:
            self._slots.release()
            raise
        with self._cond:
            self._submitted += 1
        self._jobs.put((index, staged))

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every submitted block is delivered; re-raise a worker failure.

        ``timeout`` (seconds, None = no limit) raises :class:`TimeoutError` when it runs out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._delivered < self._submitted and self._error is None:
                if self._thread is None or not self._thread.is_alive():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"BlockDecoder.drain: {self._submitted - self._delivered} "
                                       f"block(s) still decoding after {timeout} s")
                self._cond.wait(_POLL_S)
            missing = self._submitted - self._delivered
        self._raise_if_failed()
        if missing:
            raise RuntimeError(f"BlockDecoder.drain: the decode worker stopped with {missing} block(s) pending")

    def close(self, timeout: float | None = None) -> None:
        """Drain, then stop the worker. Re-raises a worker failure; a second call does nothing."""
        if self._closed:
            return
        try:
            self.drain(timeout)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop now: discard blocks not yet delivered and stop the worker. Never raises.

        Waits at most ``_JOIN_S`` seconds for a decode already running (it cannot be
        interrupted); its frames are then dropped, not delivered.
        """
        self._closed = True
        self._stop.set()
        if self._thread is None:
            return
        self._jobs.put(_STOP)
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            warnings.warn(f"BlockDecoder: the decode worker did not stop within {_JOIN_S} s; "
                          f"leaving it (daemon thread) to finish its current block", RuntimeWarning)

    def __enter__(self) -> "BlockDecoder":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # the body's exception wins; a worker error would only hide it

    # ---- both sides ----
    def _acquire_slot(self) -> None:
        while not self._slots.acquire(timeout=_POLL_S):
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("BlockDecoder.submit: the decode worker is not running")
        if self._error is not None:
            self._slots.release()
            self._raise_if_failed()

    def _process(self, index: int, staged: Any) -> bool:
        """Decode and deliver one block; record a failure instead of raising (the caller's
        thread raises it: see :meth:`_raise_if_failed`; Ctrl-C and mp4 write errors unwrapped)."""
        try:
            frames, ms = self._backend.decode(staged)
            del staged  # drop our reference to the input as soon as the decode is done
            if self._stop.is_set():
                return False
            self._on_frames(DecodedBlock(index, frames, ms))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, not swallowed
            with self._cond:
                if self._error is None:
                    self._error = (index, exc)
                self._cond.notify_all()
            return False
        with self._cond:
            self.decode_ms.append(ms)
            self._delivered += 1
            self._cond.notify_all()
        return True

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            index, exc = self._error
            if _passes_through(exc) and not self._error_raised:
                self._error_raised = True
                raise exc
            raise VAEDecodeError(f"VAE decode of block {index} failed ({self.mode} mode): "
                                 f"{type(exc).__name__}: {exc}") from exc

    # ---- worker side ----
    def _work(self) -> None:
        with torch.no_grad():  # grad mode is thread-local
            while True:
                job = self._jobs.get()
                if job is _STOP or self._stop.is_set():
                    break
                ok = self._process(*job)
                del job
                self._slots.release()  # after delivery: in_flight never exceeds queue_depth
                if not ok:
                    break
        # Discard whatever is still queued (after a failure or an abort); free its slots.
        self._stop.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                self._slots.release()


def make_block_decoder(vae: torch.nn.Module, cfg: "InferenceConfig", *, on_frames: FramesCallback) -> BlockDecoder:
    """Build a :class:`BlockDecoder` for ``vae`` (any decoder of :mod:`impl.model.decoders`) with the
    decode settings of ``cfg`` (validated there): ``vae_channels_last`` / ``vae_compile`` for the
    decoder's streaming state; ``vae_mode`` ``"sync"``, ``"stream"`` (the VAE on a
    CUDA GPU) or ``"device"`` (the VAE is moved, in place, to ``vae_device``, the CPU by
    default); ``vae_queue_depth`` bounds the blocks in flight in the async modes.
    ``on_frames`` receives each :class:`DecodedBlock`, in block order."""
    if not callable(on_frames):
        raise TypeError("on_frames must be callable")
    options = {"channels_last": cfg.vae_channels_last, "compile": cfg.vae_compile}
    if cfg.vae_mode == "sync":
        backend: Any = _SyncBackend(vae, cfg.frame_format, **options)
    elif cfg.vae_mode == "stream":
        backend = _StreamBackend(vae, cfg.frame_format, **options)
    else:
        backend = _DeviceBackend(vae, cfg.vae_device, cfg.frame_format, **options)
    return BlockDecoder(backend, cfg.vae_mode, cfg.vae_queue_depth, on_frames, z_dim=vae.config.z_dim)
