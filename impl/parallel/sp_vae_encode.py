"""The SP chunked-encode protocol: per-rank raw-frame windows with a halo, and the exchange.

The Wan2.2 encoder is causal in time and carries cached features from one 4-frame chunk to
the next, so latent ``i`` depends on raw frames long before its own ``[1+4(i-1), 4i]``. A
sequence-parallel (SP) rank that must produce latents ``[a, b)`` therefore starts encoding
``h`` latents earlier (the *halo*), warms the causal caches on them and discards them.

Window rule (temporal factor ``t``, 4 for Wan2.2). With ``a' = max(0, a - h)``:

* ``a' == 0``: raw frames ``[0, 1 + t(b-1))``; the encode yields ``b`` latents, drop ``a``.
* ``a' > 0``:  raw frames ``[t(a'-1), 1 + t(b-1))``. The first raw frame ``t(a'-1)`` (the last
  frame of latent ``a'-1``) is encoded as a stand-alone "first frame" and gives one
  pseudo-prefix latent; the following ``t``-frame groups line up with the global latent grid
  from ``a'`` on. The encode yields ``1 + b - a'`` latents; drop ``1 + a - a'``.

The result equals a full-video encode bit for bit once ``h`` reaches the encoder's causal
temporal receptive field (:func:`impl.parallel.vae_receptive_field.receptive_field_latents`:
27 latents for the Wan2.2 encoder). Below it the error decays geometrically with ``h`` and only
the first ``receptive_field - h`` kept latents differ.

Distributed use (:func:`sp_encode_video`): only the SP root holds the raw video, as uint8
``[B, T, H, W, 3]``; it sends every other rank only its raw window, point to point, still as
uint8 (a quarter of the float32 bytes), and each rank converts to ``[-1, 1]`` in the VAE dtype
and encodes its own window. ``python -m impl.parallel.vae_encode`` prints the window table.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan

from impl.model.vae import encode_video
from impl.parallel.groups import ParallelConfigError, ParallelGroups
from impl.parallel.vae_receptive_field import check_chunking

__all__ = [
    "DEFAULT_HALO",
    "default_halo",
    "RawWindow",
    "raw_window",
    "window_table",
    "frame_independent_quant_conv",
    "encode_video_exact",
    "frames_uint8_to_float",
    "encode_latent_range",
    "sp_encode_video",
    "gather_latents",
]

#: Halo (in latents) used by default: the Wan2.2 encoder's receptive field (27, see
#: :func:`impl.parallel.vae_receptive_field.receptive_field_latents`) plus one, as in the
#: reference training configs (``infra.vae_halo_latents: 28``). Any value >= the receptive
#: field is exact; larger values only cost encoder time (a halo of h latents re-encodes 4h raw
#: frames per rank).
DEFAULT_HALO: int = 28
default_halo: int = DEFAULT_HALO  # lower-case alias, the name used in the design notes


# --------------------------------------------------------------------------- window arithmetic

def _check_int(value: object, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class RawWindow:
    """Which raw frames one encode call needs to produce latents ``[latent_start, latent_stop)``.

    Encode raw frames ``[raw_start, raw_stop)`` (a valid ``1 + t k`` frame count), then keep
    encoded latents ``[drop, drop + keep)``. ``halo_start`` is the first latent of the global
    grid that the window encodes (``a' = max(0, a - halo)``); when it is > 0 the window also
    starts with one pseudo-prefix frame (the last raw frame of latent ``halo_start - 1``).
    """

    latent_start: int
    latent_stop: int
    halo_start: int
    raw_start: int
    raw_stop: int
    drop: int
    keep: int

    @property
    def raw_frames(self) -> int:
        """Raw frames in the window."""
        return self.raw_stop - self.raw_start

    @property
    def encoded_latents(self) -> int:
        """Latents that encoding the window yields (dropped + kept)."""
        return self.drop + self.keep

    @property
    def pseudo_prefix(self) -> bool:
        """Whether the window starts with a stand-alone pseudo-prefix frame."""
        return self.halo_start > 0


def raw_window(a: int, b: int, halo: int, total_latents: int, temporal_factor: int = 4) -> RawWindow:
    """Raw-frame window that yields latents ``[a, b)`` of a ``total_latents``-latent video
    exactly when ``halo`` >= the encoder's receptive field (see the module docstring)."""
    _check_int(total_latents, "total_latents", 1)
    _check_int(a, "a", 0)
    _check_int(b, "b", 1)
    _check_int(halo, "halo", 0)
    _check_int(temporal_factor, "temporal_factor", 1)
    if not a < b <= total_latents:
        raise ValueError(f"latent range [a, b) = [{a}, {b}) must satisfy 0 <= a < b <= "
                         f"total_latents={total_latents}")
    t = temporal_factor
    raw_stop = 1 + t * (b - 1)
    start = max(0, a - halo)
    if start == 0:
        return RawWindow(a, b, 0, 0, raw_stop, drop=a, keep=b - a)
    return RawWindow(a, b, start, t * (start - 1), raw_stop, drop=1 + a - start, keep=b - a)


def _check_sp_split(num_latents: int, sp_size: int) -> int:
    _check_int(num_latents, "num_latents", 1)
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ParallelConfigError(f"sp_size: must be a positive integer, got {sp_size!r}")
    if num_latents % sp_size:
        raise ParallelConfigError(f"num_latents={num_latents} is not divisible by sp_size={sp_size}: "
                                  f"every SP rank must encode the same number of latents")
    return num_latents // sp_size


def window_table(num_latents: int, sp_size: int, halo: int = DEFAULT_HALO,
                 temporal_factor: int = 4) -> list[RawWindow]:
    """Per-SP-rank windows: rank r keeps latents ``[r F/sp, (r+1) F/sp)``."""
    local = _check_sp_split(num_latents, sp_size)
    return [raw_window(r * local, (r + 1) * local, halo, num_latents, temporal_factor)
            for r in range(sp_size)]


# --------------------------------------------------------------------------- encoding

@contextlib.contextmanager
def frame_independent_quant_conv(vae: AutoencoderKLWan) -> Iterator[AutoencoderKLWan]:
    """Run ``vae.quant_conv`` (a 1x1x1 conv) one latent frame at a time inside the context.

    diffusers applies it to all latents of an encode at once, and the GEMM behind it (MKL on
    CPU) can round the last ulp differently for different frame counts (seen: 5.5e-17 in
    float64), so a windowed encode would differ from a full one by an ulp for reasons unrelated
    to the halo. Per frame, each latent's value no longer depends on the encode's length. Every
    other layer already runs on fixed-size chunks (1 then 4 raw frames). Not re-entrant on one
    VAE, and like ``vae.encode`` itself not safe for concurrent use of one VAE.
    """
    conv = vae.quant_conv
    if tuple(conv.kernel_size) != (1, 1, 1):
        raise ValueError(f"vae.quant_conv: expected a 1x1x1 conv, got kernel {tuple(conv.kernel_size)}")
    if "forward" in conv.__dict__:
        raise RuntimeError("frame_independent_quant_conv: vae.quant_conv.forward is already "
                           "patched (nested use on one VAE)")
    original = conv.forward

    def per_frame(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 5 or x.shape[2] <= 1:
            return original(x, cache_x)
        return torch.cat([original(x[:, :, i:i + 1], cache_x) for i in range(x.shape[2])], dim=2)

    conv.forward = per_frame  # instance attribute shadows the class method
    try:
        yield vae
    finally:
        del conv.forward


def encode_video_exact(vae: AutoencoderKLWan, frames: torch.Tensor) -> torch.Tensor:
    """:func:`impl.model.vae.encode_video` with a frame-independent ``quant_conv``: the full-video
    reference that windowed encodes match bit for bit (and equal to plain ``encode_video`` up
    to the last ulp)."""
    with frame_independent_quant_conv(vae):
        return encode_video(vae, frames)


def frames_uint8_to_float(frames: torch.Tensor, dtype: torch.dtype,
                          device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 video ``[B, T, H, W, 3]`` (what video readers give) -> ``[B, 3, T, H, W]`` in
    ``[-1, 1]`` of ``dtype`` (on ``device`` if given): ``x / 127.5 - 1``, computed in float32
    (float64 for a float64 ``dtype``) and then cast, so bf16/fp16 round only once."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 5 \
            or frames.shape[-1] != 3:
        desc = (f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor)
                else type(frames).__name__)
        raise ValueError(f"frames: expected a uint8 video [B, T, H, W, 3], got {desc}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating point dtype, got {dtype}")
    x = frames.to(device) if device is not None else frames
    work = torch.promote_types(dtype, torch.float32)
    return (x.permute(0, 4, 1, 2, 3).to(work) / 127.5 - 1.0).to(dtype)


def _encode_window(vae: AutoencoderKLWan, window: torch.Tensor, win: RawWindow,
                   exact: bool) -> torch.Tensor:
    """Encode a window's float frames ``[B, 3, raw_frames, H, W]``; keep ``[drop, drop+keep)``."""
    if window.shape[2] != win.raw_frames:
        raise ValueError(f"window: expected {win.raw_frames} raw frames for {win}, "
                         f"got shape {tuple(window.shape)}")
    z = encode_video_exact(vae, window) if exact else encode_video(vae, window)
    if z.shape[2] != win.encoded_latents:
        raise RuntimeError(f"encoding {win.raw_frames} raw frames gave {z.shape[2]} latents, "
                           f"expected drop {win.drop} + keep {win.keep}")
    return z[:, :, win.drop:win.drop + win.keep]


def _num_latents_of(raw_frames: int, t: int, name: str) -> int:
    if raw_frames < 1 or (raw_frames - 1) % t:
        raise ValueError(f"{name}: the raw frame count must be 1 + {t}(F-1) for F latents, "
                         f"got T={raw_frames}")
    return 1 + (raw_frames - 1) // t


def encode_latent_range(vae: AutoencoderKLWan, frames: torch.Tensor, a: int, b: int,
                        halo: int = DEFAULT_HALO, exact: bool = True) -> torch.Tensor:
    """Normalised latents ``[B, C, b-a, h, w]`` of latents ``[a, b)`` of the whole video ``frames``
    (float ``[B, 3, T, H, W]`` in ``[-1, 1]``, the convention of ``encode_video``;
    ``T = 1 + 4(F-1)``), encoding only the raw frames of :func:`raw_window`.

    Equals the same latents of :func:`encode_video_exact` over the whole video bit for bit when
    ``halo >= receptive_field_latents(vae)``. ``exact=False`` calls plain ``encode_video``
    (whole-tensor ``quant_conv``: equal to the full encode up to the last ulp).
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames: expected a float video [B, 3, T, H, W] in [-1, 1], got {shape}")
    if not frames.is_floating_point():
        raise ValueError(f"frames: expected floating point values in [-1, 1], got {frames.dtype} "
                         f"(convert uint8 videos with frames_uint8_to_float)")
    t = vae.config.scale_factor_temporal
    check_chunking(t)
    total = _num_latents_of(frames.shape[2], t, "frames")
    win = raw_window(a, b, halo, total, t)
    return _encode_window(vae, frames[:, :, win.raw_start:win.raw_stop], win, exact)


# --------------------------------------------------------------------------- distributed

_HEADER_LEN = 12
_OK, _ROOT_ERROR = 0, 1


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    """NCCL moves CUDA tensors only; gloo is used with CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _header(status: int, shape: Sequence[int], win: RawWindow | None, num_latents: int,
            halo: int, device: torch.device) -> torch.Tensor:
    b, t, h, w = shape if shape else (0, 0, 0, 0)
    fields = [status, b, t, h, w]
    fields += ([win.raw_start, win.raw_stop, win.drop, win.latent_start, win.latent_stop]
               if win is not None else [0] * 5)
    fields += [num_latents, halo]
    return torch.tensor(fields, dtype=torch.int64, device=device)


def _check_root_frames(vae: AutoencoderKLWan, frames: object, num_latents: int) -> str | None:
    """Why the SP root's video is unusable, or None."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 5 \
            or frames.shape[-1] != 3:
        desc = (f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor)
                else type(frames).__name__)
        return f"frames: the SP root needs a uint8 video [B, T, H, W, 3], got {desc}"
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    want = 1 + t * (num_latents - 1)
    if frames.shape[1] != want:
        return (f"frames: num_latents={num_latents} needs 1 + {t}(F-1) = {want} raw frames, "
                f"got T={frames.shape[1]} (shape {tuple(frames.shape)})")
    if frames.shape[2] % s or frames.shape[3] % s:
        return f"frames: H and W must be multiples of {s}, got {frames.shape[2]}x{frames.shape[3]}"
    return None


def sp_encode_video(vae: AutoencoderKLWan, frames: torch.Tensor | None, groups: ParallelGroups,
                    num_latents: int, halo: int = DEFAULT_HALO, exact: bool = True) -> torch.Tensor:
    """Encode a video across the SP group; return this rank's chunk of normalised latents
    ``[B, C, F/sp, h, w]``, latents ``[sp_rank F/sp, (sp_rank+1) F/sp)``, in the VAE's dtype and
    on its device.

    Only the SP root (``groups.sp_rank == 0``) holds the video: ``frames`` is uint8
    ``[B, T, H, W, 3]`` with ``T = 1 + 4(F-1)`` there, None on the other ranks. The root sends
    each rank an int64 header (status, shape, window) and then only that rank's raw window, as
    uint8: a quarter of the bytes of float32 (an eighth of float64; for the reference setting,
    F=96, sp=4, h=28 at 704x1280, a 209-frame window is 0.57 GB instead of 2.3 GB in float32),
    one isend per rank so the transfers overlap. Each rank converts with
    :func:`frames_uint8_to_float` (``x / 127.5 - 1`` in the VAE dtype) and encodes its window
    with :func:`encode_latent_range`'s rule, so the chunk equals the same latents of
    ``encode_video_exact(vae, frames_uint8_to_float(frames, dtype))`` bit for bit when
    ``halo >= receptive_field_latents(vae)``.

    Every rank must call this with the same ``num_latents`` and ``halo``. If the root's video
    is invalid, the root tells every rank before raising, so all ranks raise a ValueError
    instead of hanging. With ``groups.sp_group`` None (sp_size 1) the video is encoded locally.
    """
    local = _check_sp_split(num_latents, groups.sp_size)
    _check_int(halo, "halo", 0)
    t = vae.config.scale_factor_temporal
    check_chunking(t)
    win = raw_window(groups.sp_rank * local, (groups.sp_rank + 1) * local, halo, num_latents, t)
    p = next(vae.parameters())

    if groups.sp_group is None:
        if groups.sp_size != 1:
            raise ParallelConfigError(f"groups: sp_size={groups.sp_size} but sp_group is None")
        problem = _check_root_frames(vae, frames, num_latents)
        if problem:
            raise ValueError(problem)
        x = frames_uint8_to_float(frames, p.dtype, p.device)
        return _encode_window(vae, x, win, exact)

    group = groups.sp_group
    device = _comm_device(group)
    if groups.sp_rank == 0:
        window_u8 = _root_scatter(vae, frames, groups, num_latents, halo, local, device)
    else:
        window_u8 = _receive_window(groups, win, num_latents, halo, device)
        if frames is not None:
            raise ValueError(f"frames: only the SP root (sp_rank 0) passes the video; SP rank "
                             f"{groups.sp_rank} must pass None")
    x = frames_uint8_to_float(window_u8, p.dtype, p.device)
    return _encode_window(vae, x, win, exact)


def _root_scatter(vae: AutoencoderKLWan, frames: torch.Tensor | None, groups: ParallelGroups,
                  num_latents: int, halo: int, local: int, device: torch.device) -> torch.Tensor:
    """SP root: send every other rank its header and raw window; return the root's own window."""
    group = groups.sp_group
    t = vae.config.scale_factor_temporal
    problem = _check_root_frames(vae, frames, num_latents)
    peers = range(1, groups.sp_size)
    if problem:
        for r in peers:
            dist.send(_header(_ROOT_ERROR, (), None, num_latents, halo, device),
                      dst=dist.get_global_rank(group, r), group=group)
        raise ValueError(problem)
    b, _, h, w, _ = frames.shape
    pending: list[tuple[dist.Work, torch.Tensor]] = []  # keep sent tensors alive until done
    for r in peers:
        win = raw_window(r * local, (r + 1) * local, halo, num_latents, t)
        dst = dist.get_global_rank(group, r)
        head = _header(_OK, (b, win.raw_frames, h, w), win, num_latents, halo, device)
        payload = frames[:, win.raw_start:win.raw_stop].to(device).contiguous()
        pending.append((dist.isend(head, dst=dst, group=group), head))
        pending.append((dist.isend(payload, dst=dst, group=group), payload))
    for work, _ in pending:
        work.wait()
    own = raw_window(0, local, halo, num_latents, t)
    return frames[:, own.raw_start:own.raw_stop]


def _receive_window(groups: ParallelGroups, win: RawWindow, num_latents: int, halo: int,
                    device: torch.device) -> torch.Tensor:
    """Non-root SP rank: receive the header, then the uint8 raw window it announces."""
    group = groups.sp_group
    src = dist.get_global_rank(group, 0)
    head = torch.empty(_HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(head, src=src, group=group)
    status, b, t, h, w, raw_start, raw_stop, drop, a, bb, f_root, halo_root = head.tolist()
    if status != _OK:
        raise ValueError(f"sp_encode_video: the SP root (global rank {src}) rejected its frames "
                         f"(see its error); SP rank {groups.sp_rank} received nothing")
    window = torch.empty((b, t, h, w, 3), dtype=torch.uint8, device=device)
    dist.recv(window, src=src, group=group)  # receive first, so a mismatch cannot hang the root
    if (f_root, halo_root) != (num_latents, halo) or \
            (raw_start, raw_stop, drop, a, bb) != (win.raw_start, win.raw_stop, win.drop,
                                                   win.latent_start, win.latent_stop):
        raise ValueError(f"sp_encode_video: SP rank {groups.sp_rank} was called with "
                         f"num_latents={num_latents}, halo={halo} but the root used "
                         f"num_latents={f_root}, halo={halo_root}; all SP ranks must agree")
    return window


def gather_latents(chunk: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """All-gather equal latent chunks ``[B, C, F/sp, h, w]`` along the frame dim within the SP
    group, in SP-rank order: the full ``[B, C, F, h, w]`` on every SP rank (the naive-SP
    baseline). Returns ``chunk`` itself when there is no SP group."""
    if not isinstance(chunk, torch.Tensor) or chunk.dim() != 5:
        shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise ValueError(f"chunk: expected latents [B, C, F, h, w], got {shape}")
    if groups.sp_group is None:
        return chunk
    chunk = chunk.contiguous()
    parts = [torch.empty_like(chunk) for _ in range(groups.sp_size)]
    dist.all_gather(parts, chunk, group=groups.sp_group)
    return torch.cat(parts, dim=2)
