"""Wan2.2 VAE (diffusers ``AutoencoderKLWan``): build, load, latent normalisation,
video encoding and a streaming (block-by-block) causal decoder.

The Wan2.2 VAE compresses 4 (t) x 16 x 16 (h, w): a 2x2 space-to-depth patchify
(3 -> 12 channels) then three spatial x2 stages, two of them also temporal x2.
Decoding is causal: the first latent frame gives 1 pixel frame, every later one 4.

:class:`StreamingDecoder` fixes the gap noted in the code study (section 14.1): the
official release has no cached decoder for the main Wan VAE. It keeps its own causal-conv
feature cache, so decoding a video block by block gives exactly the frames of one
``vae.decode`` over all latents, and several decoders can share one VAE module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanCausalConv3d, WanResample, unpatchify

from impl.config import VAEConfig, raw_frames_for_latents

__all__ = [
    "build_vae",
    "load_vae",
    "read_vae_config",
    "latent_stats",
    "normalize_latents",
    "denormalize_latents",
    "encode_video",
    "StreamingDecoder",
    "raw_frames_for_latents",
    "vae_to_channels_last",
    "set_first_chunk_upsampling",
    "first_chunk_upsampling",
]


def build_vae(cfg: VAEConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              seed: int | None = None) -> AutoencoderKLWan:
    """Randomly initialised ``AutoencoderKLWan`` in the Wan2.2 layout described by ``cfg``.

    ``seed`` makes the init reproducible without touching the global RNG state.
    Latent mean/std default to identity (zeros/ones) when the config has None.
    """
    channels = 3 * cfg.patch_size * cfg.patch_size
    kwargs: dict[str, Any] = dict(
        base_dim=cfg.base_dim,
        decoder_base_dim=cfg.decoder_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=list(cfg.temporal_downsample),  # diffusers' spelling
        dropout=0.0,
        latents_mean=list(cfg.latents_mean) if cfg.latents_mean is not None else [0.0] * cfg.z_dim,
        latents_std=list(cfg.latents_std) if cfg.latents_std is not None else [1.0] * cfg.z_dim,
        is_residual=True,
        in_channels=channels,
        out_channels=channels,
        patch_size=cfg.patch_size,
        scale_factor_temporal=cfg.temporal_factor,
        scale_factor_spatial=cfg.spatial_factor,
    )
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        vae = AutoencoderKLWan(**kwargs)
    return _to(vae, dtype, device)


def _to(vae: AutoencoderKLWan, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKLWan:
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules on every
    # dtype cast even though this model has none.
    return torch.nn.Module.to(vae, device=device, dtype=dtype).eval()


def _resolve_subfolder(path: str | Path, subfolder: str, marker: str, what: str) -> Path:
    """Accept either the component folder itself or a diffusers pipeline root holding it."""
    root = Path(path)
    if (root / marker).is_file():
        return root
    if (root / subfolder / marker).is_file():
        return root / subfolder
    raise FileNotFoundError(
        f"{what}: no {marker} found at {root} or {root / subfolder}; expected a diffusers-format "
        f"folder (e.g. Wan2.2-TI2V-5B-Diffusers/{subfolder}). Weights cannot be downloaded here."
    )


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """Load a diffusers-format ``AutoencoderKLWan`` from a local folder (or its pipeline root)."""
    folder = _resolve_subfolder(path, "vae", "config.json", "load_vae")
    vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    return _to(vae, dtype, device)


def read_vae_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers-format VAE folder (or its pipeline root), without
    loading any weights (a light decoder needs only the latent statistics)."""
    import json
    folder = _resolve_subfolder(path, "vae", "config.json", "read_vae_config")
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) from ``vae.config``, shaped [1, C, 1, 1, 1] on ``like``'s device/dtype."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device)
    if mean.numel() != c or std.numel() != c:
        raise ValueError(f"vae.config.latents_mean/std need z_dim={c} entries, "
                         f"got {mean.numel()} and {std.numel()}")
    return mean.view(1, c, 1, 1, 1), std.view(1, c, 1, 1, 1)


def _check_latents(vae: AutoencoderKLWan, z: torch.Tensor, name: str) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name}: expected latents [B, C, F, h, w] (rank 5), got {shape}")
    if z.shape[1] != vae.config.z_dim:
        raise ValueError(f"{name}: expected C = vae z_dim = {vae.config.z_dim} channels, "
                         f"got shape {tuple(z.shape)}")
    if z.shape[2] < 1:
        raise ValueError(f"{name}: need at least one latent frame, got shape {tuple(z.shape)}")


def normalize_latents(vae: AutoencoderKLWan, mu: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the DiT's space: (mu - mean_c) / std_c."""
    _check_latents(vae, mu, "normalize_latents")
    mean, std = latent_stats(vae, mu)
    return (mu - mean) / std


def denormalize_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`: z * std_c + mean_c."""
    _check_latents(vae, z, "denormalize_latents")
    mean, std = latent_stats(vae, z)
    return z * std + mean


def _vae_param(vae: AutoencoderKLWan) -> torch.Tensor:
    return next(vae.parameters())


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, frames: torch.Tensor) -> torch.Tensor:
    """Frames [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, z_dim, 1 + (T-1)/4, H/16, W/16].

    Uses the posterior mean (no sampling), as Wan does for conditioning and training data.
    Note: ``vae.encode`` keeps its cache on the module, so do not encode concurrently on one VAE.
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"encode_video: expected frames [B, 3, T, H, W], got {shape}")
    t_factor = vae.config.scale_factor_temporal
    s_factor = vae.config.scale_factor_spatial
    t, h, w = frames.shape[2:]
    if (t - 1) % t_factor != 0:
        raise ValueError(f"encode_video: T must be 1 + {t_factor}k frames (causal chunking), got T={t}")
    if h % s_factor or w % s_factor:
        raise ValueError(f"encode_video: H and W must be multiples of {s_factor}, got {h}x{w}")
    p = _vae_param(vae)
    mu = vae.encode(frames.to(device=p.device, dtype=p.dtype)).latent_dist.mean
    return normalize_latents(vae, mu)


def _count_causal_convs(vae: AutoencoderKLWan) -> int:
    counts = getattr(vae, "_cached_conv_counts", None)
    if isinstance(counts, dict) and "decoder" in counts:
        return int(counts["decoder"])
    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


def vae_to_channels_last(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Put the decode path's conv weights in channels-last layout, in place; returns ``vae``.

    Mutates the module (every user of it, e.g. other decoders sharing it or ``vae.decode``,
    sees the new layout): the 5-D ``Conv3d`` weights of ``vae.decoder`` and
    ``vae.post_quant_conv`` become ``torch.channels_last_3d``, and the decoder's 4-D ``Conv2d``
    weights (per-frame spatial upsampling, mid-block attention 1x1 convs, which get
    channels-last inputs once the activations are) ``torch.channels_last``. Parameters stay
    the same ``Parameter`` objects; other parameters and the encoder are untouched
    (``nn.Module.to(memory_format=)`` cannot be used: it fails on parameters of other ranks).
    Idempotent. Only strides change, so decoding results are numerically equivalent, up to
    floating-point reassociation (the conv kernels picked for a layout may sum in another order).
    """
    with torch.no_grad():
        for module in (*vae.post_quant_conv.modules(), *vae.decoder.modules()):
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                weight = module.weight
                fmt = torch.channels_last_3d if weight.dim() == 5 else torch.channels_last
                if not weight.is_contiguous(memory_format=fmt):
                    weight.data = weight.data.contiguous(memory_format=fmt)
    return vae


class TimeConvFirstChunkResample(WanResample):
    """A temporal upsampler (``upsample3d``) that treats the first chunk of a stream as the
    Matrix-Game-3 release's copy of the pruned Wan2.2 VAE does (``wan/modules/vae2_2.py`` there):
    the time conv runs over it with zero history (its causal padding), the chunk's frames are
    doubled as on every later chunk, and the first of the doubled frames is dropped, so one
    latent frame still gives one frame. diffusers, the official Wan2.2 code and LightX2V instead
    pass the first chunk through without the time conv. Later chunks are the same in both
    (this chunk's frames become the next one's history), so only the stream's start differs."""

    def forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - diffusers' signature
        if self.mode != "upsample3d" or feat_cache is None or feat_cache[feat_idx[0]] is not None:
            return super().forward(x, feat_cache=feat_cache, feat_idx=feat_idx)
        b, c, t, h, w = x.shape
        feat_cache[feat_idx[0]] = x[:, :, -CACHE_T:].clone()   # the next chunk's history
        feat_idx[0] += 1
        y = self.time_conv(x).reshape(b, 2, c, t, h, w)
        y = torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, 2 * t, h, w)[:, :, 1:]
        t = y.shape[2]
        y = self.resample(y.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.view(b, t, y.size(1), y.size(2), y.size(3)).permute(0, 2, 1, 3, 4)


_FIRST_CHUNK = {"skip_time_conv": WanResample, "time_conv_drop_first": TimeConvFirstChunkResample}


def set_first_chunk_upsampling(vae: AutoencoderKLWan, behaviour: str) -> AutoencoderKLWan:
    """Choose, in place, how the decoder's temporal upsamplers treat a stream's first latent
    frame; returns ``vae``. ``"skip_time_conv"``: no time conv on it (diffusers, official Wan2.2,
    LightX2V; what ``build_vae`` gives). ``"time_conv_drop_first"``: :class:`TimeConvFirstChunkResample`
    (the Matrix-Game-3 release). Only the modules' class changes (no attributes are added), so
    parameters, their layout and the state dict keys stay as they are; ``vae.decode`` and every
    :class:`StreamingDecoder` of the module follow the choice."""
    if behaviour not in _FIRST_CHUNK:
        raise ValueError(f"first-chunk upsampling: must be one of {list(_FIRST_CHUNK)}, got {behaviour!r}")
    for module in vae.decoder.modules():
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            module.__class__ = _FIRST_CHUNK[behaviour]
    return vae


def first_chunk_upsampling(vae: AutoencoderKLWan) -> str | None:
    """Which :func:`set_first_chunk_upsampling` behaviour the decoder has (None: no temporal upsampler)."""
    kinds = {type(m) for m in vae.decoder.modules() if isinstance(m, WanResample) and m.mode == "upsample3d"}
    names = [name for name, cls in _FIRST_CHUNK.items() if cls in kinds]
    return names[0] if len(names) == 1 else None


class StreamingDecoder:
    """Decode latent blocks one after another, carrying the causal-conv cache across calls.

    The output does not depend on how the latents are cut into blocks (bit for bit, any dtype)
    and equals ``vae.decode`` over all latents at once: bit for bit whenever the 1x1x1
    ``post_quant_conv`` is exact (diffusers runs it on the whole tensor, where BLAS may round
    the last ulp differently), otherwise to ~1e-15 in float64 and ~1e-6 in float32. The feature cache is owned by this object, not the VAE, so
    several decoders (e.g. one per stream or thread) can share one VAE module.

    The first block of a stream yields 1 + 4 (F - 1) frames, later blocks 4 F frames.
    One decoder is one stream and is not itself thread-safe; if ``decode_block`` raises
    part-way, the cache is partly advanced, so call :meth:`reset` before reusing it.

    ``channels_last=True`` runs the decoder in channels-last (NDHWC) layout, which cuDNN's
    conv kernels prefer: it converts the VAE's decoder weights in place with
    :func:`vae_to_channels_last` (this mutates the shared module) and feeds each latent frame
    as ``torch.channels_last_3d``. Frames are still returned contiguous; they equal the
    default layout's (and ``vae.decode``'s) up to floating-point reassociation, not bit for
    bit, while the block-cutting invariance above holds bit for bit within either layout.

    ``compile=True`` runs the decoder module through ``torch.compile`` (this decoder's own
    compiled callable; the shared module is not changed).
    """

    def __init__(self, vae: AutoencoderKLWan, *, channels_last: bool = False, compile: bool = False) -> None:
        self.vae = vae
        self.channels_last = bool(channels_last)
        if self.channels_last:
            vae_to_channels_last(vae)
        # Static shapes: the first few calls of a stream differ (first chunk, cache filling),
        # each gets its own graph in the first blocks (about 5, under Dynamo's limit of 8).
        self._decoder = torch.compile(vae.decoder, dynamic=False) if compile else vae.decoder
        self._num_convs = _count_causal_convs(vae)
        self.reset()

    @property
    def module(self) -> AutoencoderKLWan:
        """The decoder module (the same attribute on every streaming decoder)."""
        return self.vae

    def reset(self) -> None:
        """Start a new video: drop the cached features and the counters."""
        self._feat_cache: list[Any] = [None] * self._num_convs
        self._first_chunk = True
        self._shape: tuple[int, ...] | None = None  # (B, h, w) fixed for one stream
        self.frames_decoded = 0
        self.latents_decoded = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Latents [B, C, F, h, w] -> frames [B, 3, T, H, W] in [-1, 1] (VAE dtype and device).

        ``normalized``: the latents are in the DiT's normalised space (the default) and are
        mapped back with the VAE's mean/std first. The input tensor is never modified.
        """
        vae = self.vae
        _check_latents(vae, latents, "StreamingDecoder.decode_block")
        shape = (latents.shape[0], *latents.shape[3:])
        if self.latents_decoded and shape != self._shape:
            raise ValueError(f"StreamingDecoder.decode_block: batch size or latent h, w changed "
                             f"mid-stream from {self._shape} to {shape} (B, h, w); call reset() "
                             f"to start a new stream")
        p = _vae_param(vae)
        z = latents.to(device=p.device, dtype=p.dtype)
        if normalized:
            z = denormalize_latents(vae, z)  # out of place: the caller's tensor stays intact
        # One latent frame per decoder call, exactly as diffusers' _decode: the cache logic
        # (first-chunk "Rep" markers, 2-frame tails) assumes single-frame chunks.
        # post_quant_conv (1x1x1) also runs per frame: its GEMM result can depend on the
        # tensor size in the last ulp (MKL dgemm), so per-frame calls make the output
        # independent of how the stream is cut into blocks, bit for bit.
        outs = []
        for i in range(z.shape[2]):
            x = z[:, :, i:i + 1]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            x = vae.post_quant_conv(x)
            out = self._decoder(x, feat_cache=self._feat_cache, feat_idx=[0],
                                first_chunk=self._first_chunk)
            self._first_chunk = False
            outs.append(out)
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        if self.channels_last:
            out = out.contiguous()  # no-op after unpatchify; needed without patchify
        out = torch.clamp(out, min=-1.0, max=1.0)
        self._shape = shape
        self.latents_decoded += latents.shape[2]
        self.frames_decoded += out.shape[2]
        return out

    def frames_for_block(self, latent_frames: int) -> int:
        """How many pixel frames the next ``decode_block`` of ``latent_frames`` latents returns."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        t = self.vae.config.scale_factor_temporal
        return t * latent_frames - (t - 1 if self._first_chunk else 0)
