"""The video decoders a pipeline can stream through, built or loaded by kind.

- ``wan``: the full Wan2.2 VAE (diffusers ``AutoencoderKLWan``), :mod:`impl.model.vae`;
- ``lightvae_p50`` / ``lightvae_p75``: the pruned Wan2.2 VAE of MG-LightVAE (v1 / v2): the same
  layout and causal 3-D convolutions with every channel width scaled by 1 - p (p = 0.5 / 0.75),
  so the same :class:`~impl.model.vae.StreamingDecoder` runs it;
- ``tae``: the tiny 2-D decoder of the TAEHV ``taew2_2`` architecture, :mod:`impl.model.tae`.

Every kind decodes the DiT's normalised latents block by block with its own causal state
(:func:`stream_decoder`) and yields frames in [-1, 1]. Published weight files load with
:func:`load_decoder`: MG-LightVAE ``.pth`` (state dict possibly nested under ``state_dict``, then
``gen_model``, then ``generator``, as the public loaders unwrap them; training-only
``dynamic_feature_projection_heads.*`` keys dropped; pruning rate read from the file) and
``taew2_2`` ``.pth`` / ``.safetensors``. A file of the wrong kind, width or latent size is an
error naming the file and what was expected.

Latent statistics: a pruned VAE maps the DiT's latents back with ``z * std + mean`` before
decoding, so it needs the mean / std of the VAE it was distilled from. For the Wan2.2 48-channel
latent they are fixed published constants (:data:`WAN22_LATENTS_MEAN` / :data:`WAN22_LATENTS_STD`),
used whenever the VAE config at hand carries none (:func:`with_latent_stats`); other presets keep
their own (identity for the random-weight ones, as their random VAE has). The published
``taew2_2`` files apply no scale or shift at all (``latents="normalized"``, the default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from impl.config import VAEConfig
from impl.errors import ConfigError
from impl.model.tae import LatentSpace, TinyDecoder, TinyDecoderConfig, TinyStreamingDecoder
from impl.modes import LightVAEFirstChunk, check_choice

_NESTED = ("state_dict", "gen_model", "generator")   # unwrapped in this order, each if present

# The Wan2.2 VAE's per-channel latent statistics (48 channels): the official Wan2.2 code
# (wan/modules/vae2_2.py, Wan2_2_VAE) and diffusers' Wan2.2-TI2V-5B-Diffusers vae/config.json
# (latents_mean / latents_std) publish the same values.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
_TRAINING_ONLY = ("dynamic_feature_projection_heads.",)


class DecoderFileError(ConfigError):
    """A decoder weight file is not what the chosen decoder needs; the message names the file."""


def pruned_vae_config(vae: VAEConfig, rate: float) -> VAEConfig:
    """The MG-LightVAE layout of ``vae``: encoder and decoder base widths scaled by 1 - rate."""
    keep = 1.0 - rate
    return dataclasses.replace(vae, base_dim=max(1, round(vae.base_dim * keep)),
                               decoder_base_dim=max(1, round(vae.decoder_base_dim * keep)))


def with_latent_stats(vae: VAEConfig) -> VAEConfig:
    """``vae`` with latent statistics: its own if it has them, else the published Wan2.2 ones for
    a 48-channel latent (the Wan2.2 VAE's, the one the published light decoders are made for);
    another latent size without statistics keeps None (identity, as that preset's VAE has)."""
    if vae.latents_mean is not None or vae.z_dim != len(WAN22_LATENTS_MEAN):
        return vae
    return dataclasses.replace(vae, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)


def tae_config(vae: VAEConfig, latents: LatentSpace = "normalized") -> TinyDecoderConfig:
    """The tiny decoder for ``vae``'s latents: widths (d, d/2, d/4) of the full decoder's base
    width d (256 at full size: the published taew2_2 widths 256 / 128 / 64)."""
    d = vae.decoder_base_dim
    return TinyDecoderConfig(z_dim=vae.z_dim, widths=(d, max(1, d // 2), max(1, d // 4)), latents=latents,
                             latents_mean=vae.latents_mean, latents_std=vae.latents_std,
                             scale_factor_temporal=vae.temporal_factor, scale_factor_spatial=vae.spatial_factor)


def _build_wan(vae: VAEConfig, dtype: torch.dtype, device, seed: int | None, latents: LatentSpace,
               first_chunk: LightVAEFirstChunk) -> nn.Module:
    from impl.model.vae import build_vae
    return build_vae(vae, dtype=dtype, device=device, seed=seed)


def _pruned_builder(rate: float):
    def build(vae: VAEConfig, dtype: torch.dtype, device, seed: int | None, latents: LatentSpace,
              first_chunk: LightVAEFirstChunk) -> nn.Module:
        from impl.model.vae import build_vae, set_first_chunk_upsampling
        module = build_vae(pruned_vae_config(with_latent_stats(vae), rate), dtype=dtype, device=device, seed=seed)
        return set_first_chunk_upsampling(module, first_chunk)
    return build


def _build_tae(vae: VAEConfig, dtype: torch.dtype, device, seed: int | None, latents: LatentSpace,
               first_chunk: LightVAEFirstChunk) -> nn.Module:
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        module = TinyDecoder(tae_config(with_latent_stats(vae), latents))
    return module.to(device=device, dtype=dtype).eval()


def _stream_wan(module: nn.Module, channels_last: bool, compile: bool):
    from impl.model.vae import StreamingDecoder
    return StreamingDecoder(module, channels_last=channels_last, compile=compile)


def _stream_tae(module: nn.Module, channels_last: bool, compile: bool):
    return TinyStreamingDecoder(module, compile=compile)


@dataclass(frozen=True)
class DecoderKind:
    """One video decoder of :data:`DECODERS`: its name (from :data:`impl.modes.Decoder`), how it
    is built and streamed, and the options it takes (checked by :meth:`check_options`)."""

    name: str
    build: Callable[..., nn.Module]   # (vae, dtype, device, seed, latents, first_chunk): random weights
    stream: Callable[[nn.Module, bool, bool], Any]   # (module, channels_last, compile) -> state
    is_module: Callable[[nn.Module], bool]           # does this module belong to the kind's family
    pruning: float | None = None      # MG-LightVAE: every width scaled by 1 - pruning
    channels_last: bool = True        # 3-D convolutions, which a channels-last layout speeds up
    weight_file: bool = True          # loads a published file (False: from the VAE folder, --weights)
    file_prefix: str = ""             # only the file's tensors under this prefix are the decoder's
    file_format: str = ""             # what its published files are, for errors

    def check_options(self, *, channels_last: bool = False,
                      first_chunk: LightVAEFirstChunk = "skip_time_conv") -> None:
        """The decode options this kind cannot honour, as one-line errors naming the field."""
        check_choice(first_chunk, LightVAEFirstChunk, "lightvae_first_chunk")
        if channels_last and not self.channels_last:
            raise ConfigError(f"vae_channels_last: decoder {self.name!r} runs 2-D convolutions per frame; "
                              f"channels-last applies to the 3-D convolutions of "
                              f"{', '.join(k.name for k in DECODERS.values() if k.channels_last)}")
        if first_chunk != "skip_time_conv" and self.pruning is None:
            pruned = ", ".join(k.name for k in DECODERS.values() if k.pruning is not None)
            raise ConfigError(f"lightvae_first_chunk: {first_chunk!r} is an option of the pruned decoders "
                              f"({pruned}), not of decoder {self.name!r}")


def _is_tae(module: nn.Module) -> bool:
    return isinstance(module, TinyDecoder)


def _is_wan(module: nn.Module) -> bool:
    return not isinstance(module, TinyDecoder)


DECODERS: dict[str, DecoderKind] = {k.name: k for k in (
    DecoderKind("wan", _build_wan, _stream_wan, _is_wan, weight_file=False),
    DecoderKind("lightvae_p50", _pruned_builder(0.5), _stream_wan, _is_wan, pruning=0.5),
    DecoderKind("lightvae_p75", _pruned_builder(0.75), _stream_wan, _is_wan, pruning=0.75),
    # taew2_2 files hold an encoder half too, which is not used
    DecoderKind("tae", _build_tae, _stream_tae, _is_tae, channels_last=False, file_prefix="decoder.",
                file_format="taew2_2 (TAEHV) file"),
)}


def decoder_kind(name: str) -> DecoderKind:
    """The registry entry of ``name``; an unknown name lists the allowed ones."""
    if name not in DECODERS:
        raise ConfigError(f"decoder: unknown decoder {name!r}; allowed: {', '.join(DECODERS)}")
    return DECODERS[name]


def build_decoder(kind: str, vae: VAEConfig, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", seed: int | None = None,
                  latents: LatentSpace = "normalized",
                  first_chunk: LightVAEFirstChunk = "skip_time_conv") -> nn.Module:
    """A randomly initialised decoder of ``kind`` for the preset VAE ``vae`` (seeded). A light
    decoder gets :func:`with_latent_stats`; ``latents`` is the tiny decoder's latent space,
    ``first_chunk`` the pruned VAE's first-chunk upsampling
    (:func:`impl.model.vae.set_first_chunk_upsampling`)."""
    entry = decoder_kind(kind)
    entry.check_options(first_chunk=first_chunk)
    return entry.build(vae, dtype, device, seed, latents, first_chunk)


def stream_decoder(module: nn.Module, *, channels_last: bool = False, compile: bool = False):
    """A fresh streaming decode state over ``module`` (several may share one module)."""
    entry = next(k for k in DECODERS.values() if k.is_module(module))
    entry.check_options(channels_last=channels_last)
    return entry.stream(module, channels_last, compile)


# ---------------------------------------------------------------------------- weight files

def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` / ``.pth`` / ``.pt`` file, unnested: under
    ``state_dict``, then ``gen_model``, then ``generator``, each level unwrapped if present (any
    combination of them, as the public MG-LightVAE loaders read these files)."""
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
                 device: torch.device | str = "cpu", latents: LatentSpace = "normalized",
                 first_chunk: LightVAEFirstChunk = "skip_time_conv") -> nn.Module:
    """Load a published decoder file of ``kind`` for the preset VAE ``vae`` (see module doc;
    ``latents`` and ``first_chunk`` as in :func:`build_decoder`)."""
    entry = decoder_kind(kind)
    entry.check_options(first_chunk=first_chunk)
    if not entry.weight_file:
        raise ConfigError(f"decoder: {kind!r} loads from the VAE folder (--weights), not a decoder file")
    sd = read_weight_file(path)
    if entry.pruning is not None:
        rate = file_pruning_rate(sd, vae, path)
        if abs(rate - entry.pruning) > 1e-6:
            rates = ", ".join(f"{k.name} for {k.pruning}" for k in DECODERS.values() if k.pruning is not None)
            raise DecoderFileError(f"{path}: an MG-LightVAE file pruned at {rate:.3g}; decoder {kind!r} expects "
                                   f"{entry.pruning} (use {rates})")
    if entry.file_prefix:
        sd = {k: v for k, v in sd.items() if k.startswith(entry.file_prefix)}
        if not sd:
            raise DecoderFileError(f"{path}: no '{entry.file_prefix}*' tensors: not a {entry.file_format}")
    module = build_decoder(kind, vae, dtype=torch.float32, latents=latents, first_chunk=first_chunk)
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
