"""A tiny streaming video decoder of the TAEHV ``taew2_2`` architecture (2-D convolutions only).

Layout (``TinyDecoder.decoder`` is an ``nn.Sequential``, so its keys are ``decoder.<index>.``
as in the published ``taew2_2`` files), for widths (w0, w1, w2) = (256, 128, 64) at full size:

  0 soft clamp tanh(x / 3) * 3 | 1 conv3x3 z -> w0 | 2 ReLU | 3-5 MemBlock(w0) | 6 nearest 2x
  7 TGrow(w0, 1) | 8 conv3x3 w0 -> w1 (no bias) | 9-11 MemBlock(w1) | 12 2x | 13 TGrow(w1, 2)
  14 conv3x3 w1 -> w2 (no bias) | 15-17 MemBlock(w2) | 18 2x | 19 TGrow(w2, 2)
  20 conv3x3 w2 -> w2 (no bias) | 21 ReLU | 22 conv3x3 w2 -> 12

then a 2x pixel shuffle to RGB and a clamp to [0, 1]. A MemBlock(n) sees its input
concatenated with the same block's input one frame earlier (zeros before the first frame):
conv 2n -> n, ReLU, conv, ReLU, conv (keys ``conv.0/2/4``), plus the input, then ReLU. A
TGrow(n, s) is a 1x1 conv n -> n s (no bias) whose output channels split into s consecutive
frames. So a latent frame yields 4 frames; the first 3 of a stream are dropped (the first
latent gives 1 frame, as with the Wan VAE).

Time runs through MemBlocks only via the previous frame's input: :class:`TinyStreamingDecoder`
keeps each MemBlock's last input frame as the memory for the next block, which makes
block-by-block decoding equal to decoding all latents at once (bit for bit: every layer runs
frame by frame).

Latent space: by default (``latents="normalized"``) the decoder takes the DiT's normalised
latents as they are, with no scale or shift. That is what the reference does: TAEHV applies no
latent scale or shift (its README says so, its Wan2.2 wrapper uses mean 0 and std 1, and
LightX2V feeds it the DiT's latents unchanged), so the published ``taew2_2`` files decode the
normalised latents. ``latents="raw"`` first maps them to the VAE's raw latents
(``z * std + mean``), for a decoder of one's own trained that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LatentSpace = Literal["raw", "normalized"]


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape of a :class:`TinyDecoder`; ``config.z_dim`` is what the block decoder checks."""

    z_dim: int = 48
    widths: tuple[int, int, int] = (256, 128, 64)
    latents: LatentSpace = "normalized"
    latents_mean: tuple[float, ...] | None = None    # to map normalised latents back to raw ones
    latents_std: tuple[float, ...] | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 16

    def __post_init__(self) -> None:
        if self.latents not in ("raw", "normalized"):
            raise ValueError(f"TinyDecoderConfig.latents: must be 'raw' or 'normalized', got {self.latents!r}")
        if len(self.widths) != 3 or any(w < 1 for w in self.widths):
            raise ValueError(f"TinyDecoderConfig.widths: need three positive widths, got {self.widths!r}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"TinyDecoderConfig.{name}: needs z_dim={self.z_dim} entries or None")


def _conv(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """conv(cat(x_t, x_{t-1})) residual block over a list of frames [N, C, H, W]; ``memory`` is
    the last input frame of the previous call (None at the start of a stream: zeros)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, frames: list[torch.Tensor], memory: torch.Tensor | None) -> list[torch.Tensor]:
        past = [torch.zeros_like(frames[0]) if memory is None else memory] + frames[:-1]
        return [F.relu(self.conv(torch.cat([x, p], dim=1)) + x) for x, p in zip(frames, past)]


class TGrow(nn.Module):
    """1x1 conv n -> n * stride; each input frame becomes ``stride`` consecutive frames."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, frames: list[torch.Tensor]) -> list[torch.Tensor]:
        return [y for x in frames for y in self.conv(x).chunk(self.stride, dim=1)]


def _decoder_layers(z_dim: int, widths: Sequence[int]) -> list[nn.Module]:
    w0, w1, w2 = widths
    return [SoftClamp(), _conv(z_dim, w0), nn.ReLU(), MemBlock(w0), MemBlock(w0), MemBlock(w0),
            nn.Upsample(scale_factor=2), TGrow(w0, 1), _conv(w0, w1, bias=False),
            MemBlock(w1), MemBlock(w1), MemBlock(w1), nn.Upsample(scale_factor=2), TGrow(w1, 2),
            _conv(w1, w2, bias=False), MemBlock(w2), MemBlock(w2), MemBlock(w2), nn.Upsample(scale_factor=2),
            TGrow(w2, 2), _conv(w2, w2, bias=False), nn.ReLU(), _conv(w2, 12)]


class TinyDecoder(nn.Module):
    """The ``taew2_2`` decoder (see the module docstring). Parameters live in ``decoder``."""

    FRAMES_TRIMMED = 3   # the first output frames of a stream that are dropped (4 - 1)

    def __init__(self, config: TinyDecoderConfig = TinyDecoderConfig()):
        super().__init__()
        self.config = config
        self.decoder = nn.Sequential(*_decoder_layers(config.z_dim, config.widths))

    def run(self, frames: list[torch.Tensor], memories: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                                    list[torch.Tensor]]:
        """Raw latent frames [N, z, h, w] -> RGB frames [N, 3, H, W] in [0, 1] (4 per latent),
        and the MemBlocks' new memories (their inputs' last frames), in layer order.

        Every layer runs frame by frame, so a frame's output does not depend on how many
        frames share a call (batched convolutions may round differently per batch size):
        decoding block by block gives the frames of one call over all latents, bit for bit."""
        new: list[torch.Tensor] = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                new.append(frames[-1])
                frames = layer(frames, memories[len(new) - 1] if memories else None)
            elif isinstance(layer, TGrow):
                frames = layer(frames)
            else:
                frames = [layer(x) for x in frames]
        return [F.pixel_shuffle(x, 2).clamp(0, 1) for x in frames], new


class TinyStreamingDecoder:
    """Block-by-block decoding with a :class:`TinyDecoder`, same contract as
    :class:`impl.model.vae.StreamingDecoder`: normalised latents [B, z, F, h, w] in, frames
    [B, 3, T, H, W] in [-1, 1] out (1 + 4 (F - 1) frames for the first block, 4 F after)."""

    def __init__(self, decoder: TinyDecoder, *, compile: bool = False):
        self.module = decoder
        self._run = torch.compile(decoder.run, dynamic=False) if compile else decoder.run
        self.reset()

    def reset(self) -> None:
        self._memories: list[torch.Tensor] = []
        self.frames_decoded = 0
        self.latents_decoded = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        cfg = self.module.config
        if latents.dim() != 5 or latents.shape[1] != cfg.z_dim:
            raise ValueError(f"TinyStreamingDecoder.decode_block: expected latents [B, {cfg.z_dim}, F, h, w], "
                             f"got {tuple(latents.shape)}")
        p = next(self.module.parameters())
        z = latents.to(device=p.device, dtype=p.dtype)
        if normalized and cfg.latents == "raw":
            z = _denormalize(z, cfg)
        elif not normalized and cfg.latents == "normalized":
            raise ValueError("TinyStreamingDecoder: this decoder takes normalised latents")
        frames, self._memories = self._run(list(z.unbind(2)), self._memories)
        if self.latents_decoded == 0:
            frames = frames[TinyDecoder.FRAMES_TRIMMED:]
        self.latents_decoded += latents.shape[2]
        self.frames_decoded += len(frames)
        return torch.stack(frames, dim=2) * 2 - 1

    def frames_for_block(self, latent_frames: int) -> int:
        t = self.module.config.scale_factor_temporal
        return t * latent_frames - (t - 1 if self.latents_decoded == 0 else 0)


def _denormalize(z: torch.Tensor, cfg: TinyDecoderConfig) -> torch.Tensor:
    if cfg.latents_mean is None:
        return z
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(shape)
    std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(shape)
    return z * std + mean
