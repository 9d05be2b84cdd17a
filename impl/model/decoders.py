"""The video decoders a pipeline can stream through, built or loaded by kind.

- ``wan``: the full Wan2.2 VAE (diffusers ``AutoencoderKLWan``), :mod:`impl.model.vae`;
- ``lightvae_p50`` / ``lightvae_p75``: the pruned Wan2.2 VAE of MG-LightVAE (v1 / v2): the same
  layout and causal 3-D convolutions with every channel width scaled by 1 - p (p = 0.5 / 0.75),
  so the same :class:`~impl.model.vae.StreamingDecoder` runs it;
- ``tae``: the tiny 2-D decoder of the TAEHV ``taew2_2`` architecture, :mod:`impl.model.tae`.

Every kind decodes the DiT's normalised latents block by block with its own causal state
(:func:`stream_decoder`) and yields frames in [-1, 1]. Published weight files load with
:func:`load_decoder`: MG-LightVAE ``.pth`` (state dict possibly nested under ``state_dict`` /
``gen_model`` / ``generator``; training-only ``dynamic_feature_projection_heads.*`` keys dropped;
pruning rate read from the file) and ``taew2_2`` ``.pth`` / ``.safetensors``. A file of the wrong
kind, width or latent size is an error naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from impl.config import VAEConfig
from impl.errors import ConfigError
from impl.model.tae import LatentSpace, TinyDecoder, TinyDecoderConfig, TinyStreamingDecoder

PRUNING = {"lightvae_p50": 0.5, "lightvae_p75": 0.75}
_NESTED = ("state_dict", "gen_model", "generator")
_TRAINING_ONLY = ("dynamic_feature_projection_heads.",)


class DecoderFileError(ConfigError):
    """A decoder weight file is not what the chosen decoder needs; the message names the file."""


def pruned_vae_config(vae: VAEConfig, rate: float) -> VAEConfig:
    """The MG-LightVAE layout of ``vae``: encoder and decoder base widths scaled by 1 - rate."""
    keep = 1.0 - rate
    return dataclasses.replace(vae, base_dim=max(1, round(vae.base_dim * keep)),
                               decoder_base_dim=max(1, round(vae.decoder_base_dim * keep)))


def tae_config(vae: VAEConfig, latents: LatentSpace = "raw") -> TinyDecoderConfig:
    """The tiny decoder for ``vae``'s latents: widths (d, d/2, d/4) of the full decoder's base
    width d (256 at full size: the published taew2_2 widths 256 / 128 / 64)."""
    d = vae.decoder_base_dim
    return TinyDecoderConfig(z_dim=vae.z_dim, widths=(d, max(1, d // 2), max(1, d // 4)), latents=latents,
                             latents_mean=vae.latents_mean, latents_std=vae.latents_std,
                             scale_factor_temporal=vae.temporal_factor, scale_factor_spatial=vae.spatial_factor)


def build_decoder(kind: str, vae: VAEConfig, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", seed: int | None = None,
                  latents: LatentSpace = "raw") -> nn.Module:
    """A randomly initialised decoder of ``kind`` for the preset VAE ``vae`` (seeded)."""
    from impl.model.vae import build_vae
    if kind == "wan":
        return build_vae(vae, dtype=dtype, device=device, seed=seed)
    if kind in PRUNING:
        return build_vae(pruned_vae_config(vae, PRUNING[kind]), dtype=dtype, device=device, seed=seed)
    if kind == "tae":
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            module = TinyDecoder(tae_config(vae, latents))
        return module.to(device=device, dtype=dtype).eval()
    raise ConfigError(f"decoder: unknown decoder {kind!r}; allowed: wan, {', '.join(PRUNING)}, tae")


def stream_decoder(module: nn.Module, *, channels_last: bool = False, compile: bool = False):
    """A fresh streaming decode state over ``module`` (several may share one module)."""
    if isinstance(module, TinyDecoder):
        if channels_last:
            raise ConfigError("vae_channels_last: the tiny decoder runs 2-D convolutions per frame; "
                              "channels-last is a Wan / LightVAE (3-D convolution) option")
        return TinyStreamingDecoder(module, compile=compile)
    from impl.model.vae import StreamingDecoder
    return StreamingDecoder(module, channels_last=channels_last, compile=compile)


# ---------------------------------------------------------------------------- weight files

def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` / ``.pth`` / ``.pt`` file, unnested (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DecoderFileError(f"{path}: decoder weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise DecoderFileError(f"{path}: unsupported decoder file type {path.suffix!r} "
                                   "(use .pth, .pt or .safetensors)")
    except DecoderFileError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise DecoderFileError(f"{path}: cannot read decoder weights ({type(exc).__name__}: {exc})") from None
    for key in _NESTED:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DecoderFileError(f"{path}: not a state dict of tensors")
    return {k: v for k, v in obj.items() if not k.startswith(_TRAINING_ONLY)}


def file_pruning_rate(sd: Mapping[str, torch.Tensor], vae: VAEConfig, path: str | Path) -> float:
    """The pruning rate of an MG-LightVAE state dict: 1 - (decoder.conv_in out channels) /
    (the full decoder's, 1024 at full size); also checks the latent channels."""
    key = "decoder.conv_in.weight"
    if key not in sd:
        raise DecoderFileError(f"{path}: not a (Light)VAE state dict: no {key!r} (keys start with "
                               f"{sorted({k.split('.')[0] for k in sd})[:4]})")
    w = sd[key]
    if w.shape[1] != vae.z_dim:
        raise DecoderFileError(f"{path}: decoder takes {w.shape[1]} latent channels, this model's latents have "
                               f"{vae.z_dim}")
    full = vae.decoder_base_dim * vae.dim_mult[-1]
    return 1.0 - w.shape[0] / full


def load_decoder(kind: str, path: str | Path, vae: VAEConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", latents: LatentSpace = "raw") -> nn.Module:
    """Load a published decoder file of ``kind`` for the preset VAE ``vae`` (see module doc)."""
    sd = read_weight_file(path)
    if kind in PRUNING:
        rate = file_pruning_rate(sd, vae, path)
        if abs(rate - PRUNING[kind]) > 1e-6:
            raise DecoderFileError(f"{path}: an MG-LightVAE file pruned at {rate:.3g}; decoder {kind!r} expects "
                                   f"{PRUNING[kind]} (use " + ", ".join(f"{k} for {v}" for k, v in PRUNING.items())
                                   + ")")
        module = build_decoder(kind, vae, dtype=torch.float32)
    elif kind == "tae":
        module = build_decoder("tae", vae, dtype=torch.float32, latents=latents)
        sd = {k: v for k, v in sd.items() if k.startswith("decoder.")}   # the encoder half is not used
        if not sd:
            raise DecoderFileError(f"{path}: no 'decoder.*' tensors: not a taew2_2 (TAEHV) file")
    else:
        raise ConfigError(f"decoder: {kind!r} loads from the VAE folder (--weights), not a decoder file")
    _load_strict(module, sd, path, kind)
    return module.to(device=device, dtype=dtype).eval()


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str | Path, kind: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise DecoderFileError(f"{path}: does not match the {kind} decoder: {len(missing)} missing keys "
                               f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise DecoderFileError(f"{path}: {len(wrong)} tensor(s) of the wrong shape for the {kind} decoder, "
                               f"e.g. {k}: file {got}, expected {want} (another width or latent size?)")
    module.load_state_dict(sd, strict=True)
