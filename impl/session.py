"""A streaming session: one block-autoregressive video, pulled block by block and steered live.

Interactive generation turns the block loop inside out: the caller pulls finished blocks
(clean latents, decoded frames, timings) one at a time and may change the prompt between two
pulls. :class:`StreamingSession` is that loop, on any :class:`~impl.pipeline.StreamingPipeline`
(one GPU, or one rank under SP inference: the forwards go through the pipeline's exchange);
:meth:`StreamingPipeline.generate <impl.pipeline.StreamingPipeline.generate>` is its offline
client, so there is one loop, not two.

Start from text alone, from an image (image-to-video: latent frame 0 is the encoded image,
held clean, t = 0, through every sampler step of block 0, as Wan2.2 TI2V does), or from a video
or its latents to continue (the given blocks are prefilled: one clean forward each, block by
block, so the cache holds their K/V; they are decoded too, so the decoder's causal state runs
on into the new frames). Encoding needs the full Wan2.2 VAE (``InferenceConfig.decoder="wan"``)
or an ``encoder=`` VAE; those inputs are checked and encoded in :mod:`impl.session_inputs`.

A switch (:meth:`StreamingSession.switch`, only between pulls) picks one of :data:`SwitchMode`:

- ``"cut"``: a scene cut, the multi-shot path: the prompt gets the scene-cut prefix and the next
  block opens a new shot (RoPE shot offset, shot pin);
- ``"recache"``: a continuous transition with LongLive's KV re-cache: every resident block
  (sink, pin and window) is run again through the clean forward (t = 0) under the new prompt,
  oldest first, each attending to the re-cached blocks before it and itself, so the cached K/V
  are what they would be had the window been generated under the new prompt (LongLive's one
  block-causal forward over the window, done block by block on the same cache); the session
  keeps the clean latents and RoPE positions of the resident blocks for this;
- ``"direct"``: only the cross-attention text K/V change (what ``generate`` does when a
  block's prompt changes without the prefix).

In the async VAE modes (``vae_mode`` stream / device) the DiT runs up to ``vae_queue_depth``
blocks ahead of the blocks pulled (their decodes overlap), so a switch applies to the first
block not yet computed. One session at a time per pipeline (it owns the pipeline's KV cache);
close it (or use ``with``) to free its decoder worker, mp4 writer and latents.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from impl.modes import SwitchMode, check_choice, choices
from impl.session_inputs import (SessionPipeline, check_latents, check_prompt, encode_frames, encode_image,
                                 resolve_encoder)

if TYPE_CHECKING:
    from torch import nn

    from impl.vae_decode import DecodedBlock

SWITCH_MODES: tuple[str, ...] = choices(SwitchMode)
_CLAIM = threading.Lock()   # opening sessions: one per pipeline


class SessionError(RuntimeError):
    """A session used out of turn: a switch or pull while a block is being computed (from a
    callback or another thread), a call after close, a pull past ``max_blocks``, or a second
    session on one pipeline."""


class SessionAborted(RuntimeError):
    """The reason handed to the decoder and mp4 writer when a session is aborted."""


@dataclass(frozen=True)
class BlockTiming:
    """Per-block timings, passed to ``on_block`` in block order.

    In "sync" VAE mode ``on_block`` fires at the end of the block, and ``total_ms`` includes
    the decode. In the async modes it fires once the block's decode has finished (a few
    blocks later, at the latest when ``generate`` drains), ``vae_ms`` is that decode's time,
    measured where it ran (CUDA events on the side stream; wall time in the "device" worker),
    and ``total_ms`` is the DiT loop's wall time for the block: the decode overlaps later
    blocks, so only a wait for a free queue slot shows up in it.
    """

    block: int
    frames: int          # pixel frames this block delivered (0 if not decoded)
    dit_ms: float        # denoising steps + re-cache pass
    vae_ms: float        # streaming decode of this block (0 if not decoded)
    total_ms: float      # wall time of the block in the DiT loop, host-synchronised
    loop_end_s: float = 0.0   # time.perf_counter() when the DiT loop finished the block


@dataclass(frozen=True)
class SessionBlock:
    """One finished block, in block order."""

    index: int
    prompt: str                     # the prompt it was generated under (scene-cut prefix included)
    shot: int
    latents: torch.Tensor           # [B, C, F, h, w] clean latents, float32 on the CPU
    frames: torch.Tensor | None     # [B, 3, T, H, W] in [-1, 1] on the CPU; None without decode
    timing: BlockTiming
    prefill: bool = False           # a given block (video continuation), not generated
    switch: SwitchMode | None = None   # the switch made right before this block was computed
    switch_ms: float = 0.0          # what that switch cost (the re-cache forwards)
    ready_s: float = 0.0            # time.perf_counter() when the block was complete


@dataclass
class _Computed:
    """A block the DiT has finished; its decode may still be running."""

    index: int
    prompt: str
    shot: int
    latents: torch.Tensor
    dit_ms: float
    total_ms: float
    end_s: float
    prefill: bool
    switch: SwitchMode | None
    switch_ms: float


class _Timer:
    """Elapsed ms between two points: CUDA events on GPU (no sync until read), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def follow_prompts(session: "StreamingSession", prompts: "Sequence[str]",
                   shot_switch: SwitchMode = "cut") -> Iterator[SessionBlock]:
    """Drive ``session`` through one prompt per generated block, as offline ``generate`` does:
    a prompt with the scene-cut prefix opens a new shot, any other change is a direct switch (no
    re-cache). ``shot_switch`` says how a new shot switches: ``cut`` (the multi-shot path), or a
    continuous ``recache`` / ``direct`` switch to the prompt without its prefix (the quality
    proxy compares the three). Yields the blocks that finish, in order (prefilled blocks first);
    after the session closes, :meth:`StreamingSession.pop_ready` has the ones still decoding."""
    check_choice(shot_switch, SwitchMode, "shot_switch")
    while session.next_block < session.prefill_blocks:
        session.step()
    prefix = session.pipe.stream.scene_cut_prefix
    for b, prompt in enumerate(prompts):
        if b and prompt.startswith(prefix):
            session.switch(prompt if shot_switch == "cut" else prompt[len(prefix):], shot_switch)
        elif b and prompt != session.prompt:
            session.switch(prompt, "direct")
        session.step()
        yield from session.pop_ready()


# ---- the session ----

class StreamingSession:
    """One video streamed block by block from one pipeline (see the module docstring).

    prompt: the first prompt. seed / noise / max_blocks: ``noise`` [B, C, n * fpb, h, w] gives
      every generated block's noise (and ``max_blocks = n``); else ``max_blocks`` draws
      ``pipe.noise(max_blocks, seed)``, the noise ``generate`` uses; else the session is
      unbounded and draws each block's noise from a generator seeded with ``seed``.
    image / image_latent: image-to-video, from pixels (encoded here) or a normalised latent
      [B, C, 1, h, w]. video / latents: continue a video (pixels or normalised latents of
      whole blocks). encoder: the VAE that encodes (default: the pipeline's, if it is Wan).
    decode / video_path / on_block / negative_prompt / latent_dtype: as in ``generate``.
    ``max_blocks`` counts generated blocks; prefilled blocks come first and are numbered 0...
    """

    def __init__(self, pipe: SessionPipeline, prompt: str, *, seed: int = 0, noise: torch.Tensor | None = None,
                 max_blocks: int | None = None, batch: int | None = None, image: Any = None,
                 image_latent: torch.Tensor | None = None, video: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None, encoder: "nn.Module | None" = None,
                 negative_prompt: str = "", decode: bool | None = None, video_path: str | Path | None = None,
                 on_block: Callable[[BlockTiming], None] | None = None,
                 latent_dtype: torch.dtype = torch.float32):
        self.pipe = pipe
        self.started_s = time.perf_counter()
        s, preset = pipe.stream, pipe.preset
        self._fpb, self._prefix = s.frames_per_block, s.scene_cut_prefix
        self._prompt = check_prompt(prompt, self._prefix)
        if decode is None:
            decode = pipe.vae is not None
        if (decode or video_path is not None) and pipe.vae is None:
            raise ValueError("decode/video_path need a VAE; build the pipeline with vae=...")
        self._decoding = bool(decode or video_path is not None)
        given = [n for n, v in (("image", image), ("image_latent", image_latent), ("video", video),
                                ("latents", latents)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{', '.join(given)}: start from at most one of image, image_latent, video, latents")
        for name, value in (("max_blocks", max_blocks), ("batch", batch)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: must be a positive integer or None, got {value!r}")

        with torch.no_grad():
            self._image_latent, self._prefill = self._start_latents(image, image_latent, video, latents, encoder,
                                                                    latent_dtype)
        self._n_prefill = 0 if self._prefill is None else self._prefill.shape[2] // self._fpb
        start = self._image_latent if self._image_latent is not None else self._prefill
        sizes = {name: n for name, n in (("batch", batch), ("noise", None if noise is None else noise.shape[0]),
                                         (given[0] if given else "", None if start is None else start.shape[0]))
                 if n is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch: the batch sizes differ ({sizes})")
        self.batch = next(iter(sizes.values()), 1)
        self._noise, self._gen, self.max_blocks = self._noise_source(noise, max_blocks, seed)

        self._latent_dtype = latent_dtype
        self._cfg_scale = s.guidance_scale
        self._negative = negative_prompt if self._cfg_scale > 1.0 else None
        self._on_block = on_block
        self._timer = _Timer(pipe.device)
        self._lock = threading.Lock()
        self._closed = False
        self._next = 0                  # next block to compute
        self._shot = 0
        self._cut = False               # the next block opens a new shot
        self._switch: tuple[SwitchMode, float] | None = None   # made since the last block
        self._resident: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # block -> (clean latents, RoPE positions)
        self._waiting: deque[_Computed] = deque()
        self._ready: deque[SessionBlock] = deque()
        self._decoded: queue.SimpleQueue = queue.SimpleQueue()   # (frames, decode ms) in block order
        self._stack = ExitStack()
        self._decoder = None
        self._claim()
        try:
            self.cache = pipe.cache_for(self.batch * (2 if self._negative is not None else 1))
            if video_path is not None:
                from impl.video_io import Mp4Writer
                self._writer = self._stack.enter_context(Mp4Writer(video_path, fps=preset.video.fps))
            else:
                self._writer = None
            if self._decoding:
                from impl.vae_decode import make_block_decoder
                # Entered after the writer, so it is closed (or aborted) before the writer.
                self._decoder = self._stack.enter_context(
                    make_block_decoder(pipe.vae, pipe.cfg, on_frames=self._on_frames))
        except BaseException as exc:
            self._shutdown(exc)
            raise

    def _start_latents(self, image: Any, image_latent: torch.Tensor | None, video: torch.Tensor | None,
                       latents: torch.Tensor | None, encoder: "nn.Module | None",
                       dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image latent [B, C, 1, h, w], prefill latents [B, C, n * fpb, h, w]) on the DiT's device."""
        pipe, preset = self.pipe, self.pipe.preset
        if image is not None:
            image_latent = encode_image(resolve_encoder(pipe, encoder), image, preset)
        elif image_latent is not None:
            image_latent = check_latents(image_latent, preset, "image_latent", frames=1)
        if video is not None:
            latents = encode_frames(resolve_encoder(pipe, encoder), video, preset)
        elif latents is not None:
            latents = check_latents(latents, preset, "latents")
        return tuple(None if z is None else z.to(pipe.device, dtype) for z in (image_latent, latents))

    def _noise_source(self, noise: torch.Tensor | None, max_blocks: int | None,
                      seed: int) -> tuple[torch.Tensor | None, torch.Generator | None, int | None]:
        """(noise of every generated block, or a generator for an unbounded session; max_blocks)."""
        if noise is not None:
            c = self.pipe.model.cfg.in_channels
            if noise.dim() != 5 or noise.shape[1] != c or noise.shape[2] == 0 or noise.shape[2] % self._fpb:
                raise ValueError(f"noise: expected [B, {c}, n * {self._fpb}, h, w], got {tuple(noise.shape)}")
            have = noise.shape[2] // self._fpb
            if max_blocks is not None and max_blocks > have:
                raise ValueError(f"max_blocks: {max_blocks} blocks but the noise covers {have}")
            return noise, None, max_blocks or have
        if max_blocks is not None:
            return self.pipe.noise(max_blocks, batch=self.batch, seed=seed), None, max_blocks
        return None, torch.Generator().manual_seed(seed), None

    # ---- state ----
    @property
    def prompt(self) -> str:
        """The prompt of the next block."""
        return self._prompt

    @property
    def next_block(self) -> int:
        return self._next

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def prefill_blocks(self) -> int:
        """Blocks of the given video / latents (numbered first)."""
        return self._n_prefill

    @property
    def exhausted(self) -> bool:
        """All ``max_blocks`` generated blocks have been computed."""
        return self.max_blocks is not None and self._next >= self._n_prefill + self.max_blocks

    def resident(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Clean latents and RoPE positions of the blocks resident in the KV cache (what a
        re-cache recomputes), by block."""
        return dict(self._resident)

    # ---- the caller's side ----
    def switch(self, prompt: str, mode: SwitchMode = "recache") -> None:
        """Change the prompt for the next block (see :data:`SwitchMode`); only between pulls.
        A later switch before the next block replaces this one (a re-cache it ran stays done)."""
        if mode not in SWITCH_MODES:
            raise ValueError(f"mode: must be one of {list(SWITCH_MODES)}, got {mode!r}")
        prompt = check_prompt(prompt, self._prefix)
        if mode == "cut" and not prompt.startswith(self._prefix):
            prompt = self._prefix + prompt
        elif mode != "cut" and prompt.startswith(self._prefix):
            raise ValueError(f"prompt: starts with the scene-cut prefix {self._prefix!r}, which marks a scene cut; "
                             f"use mode='cut' or drop the prefix")
        with self._turn("switch"), torch.no_grad():
            t0 = self._timer.mark()
            if mode == "recache" and self.cache.current_block >= 0:
                self._recache(prompt)
            self._prompt, self._cut = prompt, mode == "cut"
            self._switch = (mode, self._timer.ms(t0, self._timer.mark()))

    def step(self) -> int:
        """Compute the next block (its decode is submitted) and return its index; finished
        blocks wait in :meth:`pop_ready` (and the iterator)."""
        with self._turn("step"), torch.no_grad():
            return self._step()

    def pop_ready(self) -> list[SessionBlock]:
        """The finished blocks not handed out yet, in block order."""
        out = []
        while self._ready:
            out.append(self._ready.popleft())
        return out

    def __iter__(self) -> Iterator[SessionBlock]:
        return self

    def __next__(self) -> SessionBlock:
        """The next finished block, computing blocks as needed (StopIteration after max_blocks)."""
        if self._closed:
            if self._ready:
                return self._ready.popleft()
            raise StopIteration
        with self._turn("next"), torch.no_grad():
            while not self._ready and not (self.exhausted and not self._waiting):
                if not self.exhausted:
                    self._step()
                else:   # every block computed: wait for the last decodes
                    self._decoder.drain()
                    self._collect()
            block = self._ready.popleft() if self._ready else None
        if block is None:
            raise StopIteration
        return block

    def close(self) -> None:
        """Finish: wait for the decodes in flight (their blocks stay in :meth:`pop_ready`),
        close the mp4 and free the session. A second call does nothing."""
        if self._closed:
            return
        with self._turn("close"):
            if self._decoder is not None:
                self._decoder.close()   # every frame delivered (and written) before the writer closes
            self._collect()
            self._shutdown(None)

    def abort(self) -> None:
        """Stop now: drop the blocks still decoding, delete a partial mp4, free the session."""
        if self._closed:
            return
        with self._turn("abort"):
            self._shutdown(SessionAborted("the session was aborted"))

    def __enter__(self) -> "StreamingSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- internals ----
    @contextmanager
    def _turn(self, what: str):
        """Hold the session for one call. Misuse is a :class:`SessionError` before anything
        changes; any failure inside the call (the cache may be half written) stops the session."""
        if not self._lock.acquire(blocking=False):
            raise SessionError(f"{what}: the session is computing a block; switch and pull only between pulls, "
                               "from the thread that pulls (not from a callback, nor from another thread meanwhile)")
        try:
            if self._closed:
                raise SessionError(f"{what}: the session is closed")
            if what == "step" and self.exhausted:
                raise SessionError(f"step: all max_blocks={self.max_blocks} blocks are computed")
        except BaseException:
            self._lock.release()
            raise
        try:
            yield
        except BaseException as exc:
            if not self._closed:
                self._shutdown(exc)
            raise
        finally:
            self._lock.release()

    def _claim(self) -> None:
        with _CLAIM:
            ref = getattr(self.pipe, "_session", None)
            other = ref() if ref is not None else None
            if other is not None and not other.closed:
                raise SessionError("a session is already open on this pipeline (it owns the one KV cache); "
                                   "close it first")
            self.pipe._session = weakref.ref(self)

    def _shutdown(self, exc: BaseException | None) -> None:
        """Close (exc None: the writer keeps its mp4) or abort the decoder and writer; free the
        latents and the pipeline."""
        self._closed = True
        try:
            if exc is None:
                self._stack.close()
            else:
                self._stack.__exit__(type(exc), exc, exc.__traceback__)
        finally:
            self._resident.clear()
            self._noise = self._gen = self._image_latent = self._prefill = None
            self._decoder = self._writer = None
            with _CLAIM:
                ref = getattr(self.pipe, "_session", None)
                if ref is not None and ref() is self:
                    self.pipe._session = None

    def _on_frames(self, block: "DecodedBlock") -> None:   # the decoder's thread in the async modes
        if self._writer is not None:
            self._writer.append(block.frames[0])
        self._decoded.put((block.frames, block.decode_ms))

    def _collect(self) -> None:
        """Move blocks whose decode is done to the ready queue, in order; fire ``on_block``."""
        while self._waiting and (not self._decoding or not self._decoded.empty()):
            c = self._waiting.popleft()
            frames, vae_ms = self._decoded.get() if self._decoding else (None, 0.0)
            timing = BlockTiming(c.index, 0 if frames is None else frames.shape[2], c.dit_ms, vae_ms,
                                 c.total_ms, c.end_s)
            self._ready.append(SessionBlock(c.index, c.prompt, c.shot, c.latents, frames, timing, c.prefill,
                                            c.switch, c.switch_ms, time.perf_counter()))
            if self._on_block is not None:
                self._on_block(timing)

    def _step(self) -> int:
        pipe, cache, b = self.pipe, self.cache, self._next
        prefill = b < self._n_prefill
        shot_start = b == 0 or self._cut
        if shot_start and b > 0:
            self._shot += 1
        wall0 = time.perf_counter()
        t0 = self._timer.mark()
        ctx = pipe._context(cache, self._prompt, self.batch, self._negative)
        plan = cache.begin_block(b, shot_start=shot_start)
        pos = pipe._block_positions(b, self._shot)
        if prefill:   # a given block: only the clean forward that caches its K/V
            x = self._prefill[:, :, b * self._fpb:(b + 1) * self._fpb]
            pipe._velocity(x, 0.0, ctx, pos, cache, plan, self._cfg_scale)
        else:
            x = self._block_noise(b - self._n_prefill).to(pipe.device, self._latent_dtype)
            clean = self._image_latent if b == 0 else None
            x = pipe._denoise_block(x, ctx, pos, cache, plan, self._cfg_scale, clean=clean)
        t1 = self._timer.mark()
        self._resident[b] = (x, pos)
        for old in set(self._resident) - set(cache.resident_blocks()):
            del self._resident[old]
        if self._decoder is not None:
            self._decoder.submit(x)   # sync: decodes now; async: waits only for a queue slot
        latents = x.float().cpu()
        now = time.perf_counter()
        mode, switch_ms = self._switch if self._switch is not None else (None, 0.0)
        self._waiting.append(_Computed(b, self._prompt, self._shot, latents, self._timer.ms(t0, t1),
                                       (now - wall0) * 1e3, now, prefill, mode, switch_ms))
        self._next, self._cut, self._switch = b + 1, False, None
        self._collect()
        return b

    def _block_noise(self, g: int) -> torch.Tensor:
        """Noise of the g-th generated block."""
        if self._noise is not None:
            return self._noise[:, :, g * self._fpb:(g + 1) * self._fpb]
        lh, lw = self.pipe.preset.latent_hw
        return torch.randn(self.batch, self.pipe.model.cfg.in_channels, self._fpb, lh, lw, generator=self._gen)

    def _recache(self, prompt: str) -> None:
        """LongLive's KV re-cache: clean forwards of the resident blocks under ``prompt``."""
        ctx = self.pipe._context(self.cache, prompt, self.batch, self._negative)
        for plan in self.cache.recache_plans():
            x, pos = self._resident[plan.block]
            self.pipe._velocity(x, 0.0, ctx, pos, self.cache, plan, self._cfg_scale)
