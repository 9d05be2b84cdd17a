"""Analytic temporal receptive field of the causal Wan2.2 VAE encoder.

The encoder carries cached features from one 4-frame chunk to the next, so latent ``i``
depends on raw frames long before its own ``[1+4(i-1), 4i]``. Walking the encoder's modules
(not a hard-coded number) gives how far back: :func:`receptive_field_raw_frames` (112 raw
frames for Wan2.2) and the smallest exact SP halo :func:`receptive_field_latents` (27
latents), which :mod:`impl.parallel.sp_vae_encode` relies on.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    AvgDown3D,
    WanAttentionBlock,
    WanCausalConv3d,
    WanEncoder3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanResidualDownBlock,
    WanRMS_norm,
)
from torch import nn

from impl.config import VAEConfig
from impl.model.vae import build_vae

__all__ = [
    "check_chunking",
    "receptive_field_raw_frames",
    "receptive_field_latents",
    "receptive_field_for_config",
]

# Each module of the encoder maps to a pair (scale, reach): output frame m (at that module's
# output frame rate) depends on input frames [scale*m - reach, scale*m] only. Frame m of a
# level is indexed so that latent i's frames at a level of rate r end at index r*i (frame 0
# is the stand-alone first frame at every level). Running x -> f -> g composes as
#     (s_f * s_g, s_f * reach_g + reach_f),
# and parallel branches (residual paths) have equal scales and take the larger reach.
#
# Cached-chunk semantics of diffusers' encoder (checked against its forward code):
# * WanCausalConv3d with kernel k, dilation d, stride 1: zero-padded causal conv whose cache
#   carries the previous chunk's last CACHE_T = 2 frames, i.e. an ordinary causal conv on the
#   whole sequence as long as (k-1) d <= 2 (checked): (1, (k-1) d).
# * WanResample 'downsample3d': a per-frame 2-D conv, then time_conv (kernel 3, stride 2, no
#   padding) over [last cached input frame, chunk]; the first chunk passes through. Output m
#   reads input frames 2m-2, 2m-1, 2m: (stride, k-1), valid because the cache holds exactly
#   k - stride = 1 frame.
# * AvgDown3D (the residual down block's shortcut, factor f): averages within a chunk,
#   output m reads inputs fm-f+1 .. fm: (f, f-1).
# * Attention (per frame), RMS norms, activations, dropout, 2-D convs, 1x1x1 convs: (1, 0).
#
# Why features in the window are exact once the window contains every raw frame a kept latent
# depends on: the windowed encode computes the same function as the full encode on every
# feature whose full-encode dependencies lie inside the window; where a feature would read
# frames before the window it sees zeros (causal padding) or the pseudo frame's pass-through
# instead, and all such features lie outside the kept latents' dependency cone.
# Consequence for the halo: the kept latent a reads raw frames back to t*a - R (R = total
# reach in raw frames), and the window for halo h starts at raw frame t*(a - h - 1), so the
# smallest exact halo is ceil(R / t) - 1. For Wan2.2: R = 112 raw frames, t = 4, halo 27.
# This matches the measured boundary (code study 4.4, H100 fp64: error 3.8e-8 at h=26, 0 at
# h=27) and tests/test_vae_encode_sp.py checks h = rf exact / h = rf - 1 not, with no offset.

_Reach = tuple[int, int]
_DIFFUSERS_CHUNK = 4
_IDENTITY: _Reach = (1, 0)
_NO_TIME = (WanRMS_norm, WanAttentionBlock, nn.Identity, nn.Dropout, nn.SiLU, nn.Conv2d,
            nn.ZeroPad2d, nn.Sequential)


def _compose(first: _Reach, then: _Reach) -> _Reach:
    return first[0] * then[0], first[0] * then[1] + first[1]


def _chain(*reaches: _Reach) -> _Reach:
    out = _IDENTITY
    for r in reaches:
        out = _compose(out, r)
    return out


def _parallel(*reaches: _Reach) -> _Reach:
    scales = {s for s, _ in reaches}
    if len(scales) != 1:
        raise NotImplementedError(f"receptive field: residual branches with different temporal "
                                  f"scales {sorted(scales)}")
    return reaches[0][0], max(r for _, r in reaches)


def _causal_conv(conv: WanCausalConv3d) -> _Reach:
    k, stride, dil = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if stride != 1:
        raise NotImplementedError(f"receptive field: strided WanCausalConv3d {conv} outside a "
                                  f"WanResample is not part of the diffusers encoder")
    if (k - 1) * dil > CACHE_T:  # the chunk cache would lose frames: not a plain causal conv
        raise NotImplementedError(f"receptive field: WanCausalConv3d {conv} reaches {(k - 1) * dil} "
                                  f"frames back but diffusers caches only CACHE_T={CACHE_T}")
    return 1, (k - 1) * dil


def _resample(m: WanResample) -> _Reach:
    if m.mode in ("none", "downsample2d"):
        return _IDENTITY
    if m.mode == "downsample3d":
        k, s, d = m.time_conv.kernel_size[0], m.time_conv.stride[0], m.time_conv.dilation[0]
        if d != 1 or k - s != 1:  # diffusers caches exactly one input frame for this conv
            raise NotImplementedError(f"receptive field: downsample3d time_conv with kernel {k}, "
                                      f"stride {s}, dilation {d} (the one-frame cache needs k - s = 1)")
        return s, k - 1
    raise NotImplementedError(f"receptive field: WanResample mode {m.mode!r} is not an encoder mode")


def _reach(m: nn.Module) -> _Reach:
    """(scale, reach) of one encoder module, in its forward order."""
    if isinstance(m, WanCausalConv3d):
        return _causal_conv(m)
    if isinstance(m, WanResidualBlock):
        return _parallel(_chain(_reach(m.conv1), _reach(m.conv2)), _reach(m.conv_shortcut))
    if isinstance(m, WanResample):
        return _resample(m)
    if isinstance(m, AvgDown3D):
        return m.factor_t, m.factor_t - 1
    if isinstance(m, WanResidualDownBlock):
        main = [_reach(r) for r in m.resnets]
        if m.downsampler is not None:
            main.append(_reach(m.downsampler))
        return _parallel(_chain(*main), _reach(m.avg_shortcut))
    if isinstance(m, WanMidBlock):
        parts = [_reach(m.resnets[0])]
        for attn, res in zip(m.attentions, m.resnets[1:]):
            if attn is not None:
                parts.append(_reach(attn))
            parts.append(_reach(res))
        return _chain(*parts)
    if isinstance(m, WanEncoder3d):
        return _chain(_reach(m.conv_in), *(_reach(b) for b in m.down_blocks), _reach(m.mid_block),
                      _reach(m.norm_out), _reach(m.conv_out))
    if isinstance(m, _NO_TIME):
        if isinstance(m, nn.Sequential) and any(isinstance(c, WanCausalConv3d) for c in m.modules()):
            raise NotImplementedError("receptive field: nn.Sequential holding causal convs")
        return _IDENTITY
    raise NotImplementedError(f"receptive field: no temporal rule for {type(m).__name__}; "
                              f"extend impl/parallel/vae_receptive_field.py::_reach")


def _encoder_reach(vae: AutoencoderKLWan | WanEncoder3d) -> _Reach:
    if isinstance(vae, AutoencoderKLWan):
        reach = _chain(_reach(vae.encoder), _reach(vae.quant_conv))
        t = vae.config.scale_factor_temporal
        if reach[0] != t:
            raise ValueError(f"vae: encoder's temporal downsampling is {reach[0]}x but "
                             f"vae.config.scale_factor_temporal is {t}")
    elif isinstance(vae, WanEncoder3d):
        reach = _reach(vae)
    else:
        raise TypeError(f"vae: expected an AutoencoderKLWan or WanEncoder3d, got {type(vae).__name__}")
    check_chunking(reach[0])
    return reach


def check_chunking(temporal_factor: int) -> None:
    # diffusers' AutoencoderKLWan._encode feeds raw frames in chunks of 1, 4, 4, ... (hard-coded),
    # so one chunk is one latent, which the window rule and the halo arithmetic rely on.
    if temporal_factor != _DIFFUSERS_CHUNK:
        raise ValueError(f"vae: temporal downsampling must be {_DIFFUSERS_CHUNK}x (diffusers encodes "
                         f"raw frames in chunks of 1, {_DIFFUSERS_CHUNK}, {_DIFFUSERS_CHUNK}, ...: one "
                         f"latent per chunk), got {temporal_factor}x")


def receptive_field_raw_frames(vae: AutoencoderKLWan | WanEncoder3d) -> int:
    """How far back, in raw frames, the encoder reaches: latent i depends on raw frames
    ``[t i - R, t i]`` (``t`` = temporal factor). 112 for the Wan2.2 encoder."""
    return _encoder_reach(vae)[1]


def receptive_field_latents(vae: AutoencoderKLWan | WanEncoder3d) -> int:
    """The encoder's causal temporal receptive field in latents: the smallest halo for which
    :func:`impl.parallel.sp_vae_encode.encode_latent_range` is exact, ``ceil(R / t) - 1`` with
    ``R`` from :func:`receptive_field_raw_frames` (the ``- 1``: the window's pseudo-prefix frame is itself
    the last raw frame of the latent before the halo). Computed by walking the encoder's
    modules; 27 for the Wan2.2 layout (tiny and full presets alike: same depth and strides)."""
    t, reach = _encoder_reach(vae)
    return max(0, math.ceil(reach / t) - 1)


def receptive_field_for_config(cfg: VAEConfig) -> int:
    """:func:`receptive_field_latents` of the VAE that ``cfg`` describes, built on the meta
    device (no memory, no weights): usable for the full 5B VAE anywhere."""
    with torch.device("meta"):
        vae = build_vae(cfg, device="meta")
    return receptive_field_latents(vae)
