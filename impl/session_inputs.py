"""What a streaming session is given, checked before it starts.

The pipeline it runs on (:class:`SessionPipeline`: the parts and block-loop steps of a pipeline
that a session uses), its prompts, and where the video starts: an image (image-to-video) or a
video to continue, as pixels (encoded here with the Wan2.2 VAE, :func:`resolve_encoder` says
which) or as normalised latents, each checked against the preset's frame size and block length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from impl.config import Preset, StreamConfig
from impl.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from impl.model.attention import TextContext
    from impl.model.dit import CausalWanDiT
    from impl.model.kv_cache import BlockPlan, KVCache


class SessionPipeline(Protocol):
    """What a session uses of the pipeline it runs on (``impl.pipeline.StreamingPipeline`` is
    one): its parts and block geometry, and the steps of the block loop that it drives."""

    model: CausalWanDiT
    cfg: Any                    # the pipeline's InferenceConfig (decoder, vae_mode, ...)
    preset: Preset
    stream: StreamConfig
    vae: nn.Module | None
    device: torch.device
    _session: Any               # a weakref to the open session: one at a time (one KV cache)

    def cache_for(self, batch: int) -> KVCache: ...

    def noise(self, num_blocks: int, *, batch: int = 1, seed: int = 0) -> torch.Tensor: ...

    def _context(self, cache: KVCache, prompt: str, batch: int, negative: str | None) -> TextContext: ...

    def _block_positions(self, block: int, shot: int) -> torch.Tensor: ...

    def _velocity(self, x: torch.Tensor, t: float, ctx: TextContext, pos: torch.Tensor,
                  cache: KVCache, plan: BlockPlan, cfg_scale: float, held: int = 0) -> torch.Tensor: ...

    def _denoise_block(self, x: torch.Tensor, ctx: TextContext, pos: torch.Tensor, cache: KVCache,
                       plan: BlockPlan, cfg_scale: float, exit_step: int | None = None,
                       clean: torch.Tensor | None = None) -> torch.Tensor: ...


def check_prompt(prompt: Any, scene_cut_prefix: str, name: str = "prompt") -> str:
    """``prompt`` if it is a non-empty string with text beyond the scene-cut prefix."""
    if not isinstance(prompt, str):
        raise ValueError(f"{name}: must be a string, got {type(prompt).__name__}")
    body = prompt[len(scene_cut_prefix):] if prompt.startswith(scene_cut_prefix) else prompt
    if not body.strip():
        raise ValueError(f"{name}: empty prompt {prompt!r}; describe the video in words")
    return prompt


def image_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image, or a float tensor [3, H, W] / [B, 3, H, W] in [-1, 1], as [B, 3, H, W] float32."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with the project's dependencies
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        import numpy as np
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
        return (pixels.permute(2, 0, 1)[None].float() / 127.5 - 1.0)
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a PIL image or a tensor [3, H, W] / [B, 3, H, W] in [-1, 1], got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"image: a tensor image must be floating point in [-1, 1], got {image.dtype}")
    return (image[None] if image.dim() == 3 else image).float()


def _check_size(h: int, w: int, preset: Preset, what: str) -> None:
    ph, pw = preset.video.height, preset.video.width
    if (h, w) != (ph, pw):
        raise ValueError(f"{what}: expected {ph}x{pw} pixels (height x width of preset {preset.name!r}), got "
                         f"{h}x{w}; resize or crop it first")


def encode_image(vae: "nn.Module", image: Any, preset: Preset) -> torch.Tensor:
    """The normalised latent [B, C, 1, h, w] of one image (the first frame of image-to-video)."""
    pixels = image_to_tensor(image)
    _check_size(*pixels.shape[-2:], preset, "image")
    from impl.model.vae import encode_video
    return encode_video(vae, pixels[:, :, None])


def encode_frames(vae: "nn.Module", video: torch.Tensor, preset: Preset) -> torch.Tensor:
    """The normalised latents [B, C, F, h, w] of a video to continue; F must fill whole blocks."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video: expected frames [B, 3, T, H, W] in [-1, 1], got {shape}")
    _check_size(*video.shape[-2:], preset, "video")
    fpb, t = preset.stream.frames_per_block, video.shape[2]
    allowed = [preset.raw_frames(n * fpb) for n in range(1, 5)]
    if t not in {preset.raw_frames(n * fpb) for n in range(1, t // fpb + 2)}:
        raise ValueError(f"video: {t} frames do not encode to whole blocks of {fpb} latent frames; "
                         f"use 1 + {preset.vae.temporal_factor} (n * {fpb} - 1) frames ({', '.join(map(str, allowed))}, ...)")
    from impl.model.vae import encode_video
    return encode_video(vae, video.float())


def check_latents(z: Any, preset: Preset, name: str, frames: int | None = None) -> torch.Tensor:
    """``z`` if it is normalised latents [B, C, F, h, w] of ``preset``: ``frames`` latent frames,
    or (``frames=None``) whole blocks of them."""
    c, (lh, lw), fpb = preset.dit.in_channels, preset.latent_hw, preset.stream.frames_per_block
    ok = isinstance(z, torch.Tensor) and z.dim() == 5 and z.shape[1] == c and tuple(z.shape[3:]) == (lh, lw)
    f = z.shape[2] if ok else 0
    ok = ok and (f == frames if frames is not None else f > 0 and f % fpb == 0)
    if not ok:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        want = str(frames) if frames is not None else f"n * {fpb}"
        raise ValueError(f"{name}: expected normalised latents [B, {c}, {want}, {lh}, {lw}], got {shape}")
    return z


def resolve_encoder(pipe: SessionPipeline, encoder: "nn.Module | None") -> "nn.Module":
    """The VAE that encodes images and videos: ``encoder``, else the pipeline's full Wan VAE."""
    if encoder is not None:
        if not callable(getattr(encoder, "encode", None)):
            raise ConfigError(f"encoder: {type(encoder).__name__} cannot encode; pass the full Wan2.2 VAE "
                              "(impl.model.vae.load_vae / build_vae)")
        return encoder
    hint = ("pass encoder=<the Wan2.2 VAE> (impl.model.vae.load_vae(folder)), or already encoded "
            "image_latent= / latents=")
    if pipe.cfg.decoder != "wan":
        raise ConfigError(f"decoder: image-to-video and video continuation encode with the full Wan2.2 VAE, but this "
                          f"pipeline only decodes, with the light decoder {pipe.cfg.decoder!r}; {hint}")
    if pipe.vae is None:
        raise ConfigError(f"image / video: encoding needs the Wan2.2 VAE and this pipeline has none "
                          f"(built with decode=False); {hint}")
    return pipe.vae
