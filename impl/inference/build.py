"""The one place where an inference pipeline is assembled from an :class:`InferenceConfig`.

``build_pipeline(cfg, device, weights)`` runs, in this order: seed -> DiT in the compute dtype
(random, or the weights loaded) -> LoRA merged -> block linears quantized (the config's
``precision``) -> attention kernel set -> hot path compiled -> video decoder (``cfg.decoder``) -> text embedder ->
:class:`StreamingPipeline`.
``build_dit`` is its first half, for callers that need the model alone (training the quality
proxy's students, the SP wrapper's checks); ``pipeline_for_model`` wraps a model that someone
else owns (DMD rollouts of a student in training).

Generate, profile, every inference benchmark and SP inference build through here; nothing
else constructs a :class:`StreamingPipeline`.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Union

import torch
from torch import nn

from impl.errors import ConfigError
from impl.inference.config import InferenceConfig
from impl.modes import DecoderLatents, LightVAEFirstChunk, check_choice
from impl.model import decoders
from impl.model.attention import SequenceParallel
from impl.model.attention_backends import attention_fn
from impl.model.dit import CausalWanDiT
from impl.pipeline import StreamingPipeline, TextEmbedder
from impl.vae_decode import check_stream_device

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}

# "encoder": the umT5 encoder (from Weights.root, else seeded random weights at the preset's size);
# "embedding": no encoder, a fixed random embedding per prompt (speed runs: the encoder runs once
# per prompt before streaming and never counts toward FPS); or any prompt -> [1, L, D] callable.
TextSource = Union[Literal["encoder", "embedding"], TextEmbedder]


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ConfigError(f"dtype: must be one of {sorted(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: {dtype} has no name here; allowed: {sorted(TORCH_DTYPES)}")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class Weights:
    """Where each part's weights come from. Nothing is downloaded; a part without a source is
    randomly initialised at the preset's size from ``seed`` (speed does not depend on values).

    root: a diffusers-format Wan2.2-TI2V-5B folder (transformer/, vae/, text_encoder/, tokenizer/).
    dit: a DiT checkpoint (file or folder, diffusers or original Wan / LongLive layout) or a
      state dict; overrides ``root``'s transformer.
    lora: a few-step LoRA file (impl.model.lora_files), merged into the DiT before quantization;
      ``lora_check_base=False`` skips the check that it was trained on these base weights.
    vae: a VAE folder, or a built VAE module (used as it is: its own dtype and device);
      overrides ``root``'s vae. With ``decoder="wan"`` this is the decoder.
    decoder: with a light decoder (``lightvae_*``, ``tae``), its published weight file
      (impl/model/decoders.py) or a built module (used as it is); None = random weights.
      Latent statistics come from ``root``'s (or ``vae``'s) VAE config when there is one, else
      the preset's, else for the Wan2.2 48-channel latent its published values
      (:func:`impl.model.decoders.with_latent_stats`).
    decoder_latents: the latent space a ``tae`` file was trained on: the DiT's ``normalized``
      latents as they are (the default: the published taew2_2 files, as TAEHV applies no scale
      or shift) or the VAE's ``raw`` ones.
    lightvae_first_chunk: how a pruned decoder's temporal upsamplers treat the stream's first
      latent frame: ``skip_time_conv`` (the default: LightX2V, official Wan2.2, diffusers) or
      ``time_conv_drop_first`` (the Matrix-Game-3 release's copy); docs/fast_paths.md.
    text: see :data:`TextSource`.
    """

    root: str | Path | None = None
    dit: str | Path | Mapping[str, torch.Tensor] | None = None
    lora: str | Path | None = None
    lora_check_base: bool = True
    vae: str | Path | nn.Module | None = None
    decoder: str | Path | nn.Module | None = None
    decoder_latents: DecoderLatents = "normalized"
    lightvae_first_chunk: LightVAEFirstChunk = "skip_time_conv"
    text: TextSource = "encoder"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.decoder_latents, DecoderLatents, "decoder_latents")
        check_choice(self.lightvae_first_chunk, LightVAEFirstChunk, "lightvae_first_chunk")
        if isinstance(self.text, str) and self.text not in ("encoder", "embedding"):
            raise ConfigError(f"text: must be 'encoder', 'embedding' or a callable, got {self.text!r}")
        if not isinstance(self.text, str) and not callable(self.text):
            raise ConfigError(f"text: must be 'encoder', 'embedding' or a callable, got {type(self.text).__name__}")


def random_text_embedder(preset, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> TextEmbedder:
    """A fixed random text-encoder output [1, L, text_dim] per prompt, seeded by the prompt's
    CRC32 (the same on every rank, run and machine): stands in for umT5 where the encoder
    would only cost memory and start-up time."""
    length, dim = preset.text.max_length, preset.dit.text_dim

    def embed(prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8")))
        return torch.randn(1, length, dim, generator=g).to(device, dtype)

    return embed


def build_dit(cfg: InferenceConfig, device: torch.device | str, weights: Weights = Weights()) -> CausalWanDiT:
    """The DiT of ``cfg``: created under ``torch.manual_seed(weights.seed)`` in the compute dtype,
    weights loaded, LoRA merged, block linears quantized to ``cfg.precision``, hot path
    compiled if ``cfg.compile``. Frozen and in eval mode."""
    from impl.quant.apply import quantize_model
    from impl.quant.config import QuantConfig

    preset = cfg.stream_preset
    dtype = torch_dtype(cfg.dtype)
    # The kernel first: it checks what the backend needs of the machine before any weight exists.
    attention = attention_fn(cfg.attention, device, preset.dit.head_dim)
    torch.manual_seed(weights.seed)   # random init (and anything seeded after it) is reproducible
    model = CausalWanDiT(preset.dit, device=device, dtype=dtype).eval()
    source = weights.dit if weights.dit is not None else weights.root
    if source is not None:
        from impl.model.checkpoint import load_dit_weights
        # The precision lets a pre-quantized release file (model_4o6.pt) load its NVFP4 codes as
        # they are, and refuses a precision that would run them under the wrong label.
        load_dit_weights(model, source, precision=cfg.precision)
    if weights.lora is not None:
        from impl.model.lora_files import sampling_steps_warning
        warning = sampling_steps_warning(weights.lora, preset.stream.steps)
        if warning is not None:
            warnings.warn(warning, stacklevel=2)
        _merge_lora(model, weights.lora, check_base=weights.lora_check_base)
    if cfg.precision != "bf16":
        quantize_model(model, QuantConfig.for_inference(cfg.precision))
    model.set_attention_backend(attention)
    if cfg.compile:
        model.compile_hot_path(cuda_graphs=cfg.cuda_graphs)
    return model.requires_grad_(False)


def _merge_lora(model: CausalWanDiT, path: str | Path, *, check_base: bool) -> None:
    """Merge a LoRA file into ``model`` in place. Merging happens in at least float32 (the
    delta (alpha / r) B A is formed and added at full precision and the weight rounded once
    to the compute dtype), so a BF16 model gets the same weights as a float32 merge."""
    from impl.model.lora import merge_and_unload
    from impl.model.lora_files import load_lora
    dtype = model.dtype
    if dtype in (torch.bfloat16, torch.float16):
        model.float()
    load_lora(model, path, check_base=check_base)   # checks the base-weight fingerprint
    merge_and_unload(model)
    model.to(dtype)


def build_text_embedder(cfg: InferenceConfig, device: torch.device | str, weights: Weights) -> TextEmbedder:
    """The prompt -> [1, L, text_dim] function of :data:`TextSource` ``weights.text``."""
    preset, dtype = cfg.stream_preset, torch_dtype(cfg.dtype)
    if callable(weights.text):
        return weights.text
    if weights.text == "embedding":
        return random_text_embedder(preset, dtype, device, seed=weights.seed)
    from impl.model.text_encoder import TextEncoder
    if weights.root is not None:
        text = TextEncoder.from_pretrained(weights.root, dtype=dtype, device=device,
                                           max_length=preset.text.max_length)
    else:
        text = TextEncoder.from_preset(preset.text, dtype=dtype, device=device, seed=weights.seed)
    return lambda prompt: text.encode([prompt])


def build_video_decoder(cfg: InferenceConfig, device: torch.device | str, weights: Weights) -> nn.Module:
    """The decoder module of ``cfg.decoder``: a built module as given; the full VAE from
    ``weights.vae`` / ``root``; a light decoder from ``weights.decoder``; else seeded random
    weights at the preset's size (the options checked by :func:`check_decoder_options`)."""
    from impl.model import vae as vae_lib
    dtype = torch_dtype(cfg.dtype)
    if not decoders.decoder_kind(cfg.decoder).weight_file:     # the full VAE
        if isinstance(weights.vae, nn.Module):
            return weights.vae
        folder = weights.vae if weights.vae is not None else weights.root
        if folder is not None:
            return vae_lib.load_vae(folder, dtype=dtype, device=device)
        return decoders.build_decoder(cfg.decoder, cfg.stream_preset.vae, dtype=dtype, device=device,
                                      seed=weights.seed)
    if isinstance(weights.decoder, nn.Module):
        return weights.decoder
    vae_cfg = _latent_stats_config(cfg, weights)
    options = {"latents": weights.decoder_latents, "first_chunk": weights.lightvae_first_chunk}
    if weights.decoder is not None:
        return decoders.load_decoder(cfg.decoder, weights.decoder, vae_cfg, dtype=dtype, device=device, **options)
    return decoders.build_decoder(cfg.decoder, vae_cfg, dtype=dtype, device=device, seed=weights.seed, **options)


def check_decoder_options(cfg: InferenceConfig, weights: Weights) -> None:
    """The decode options of ``cfg`` and ``weights`` that ``cfg.decoder`` cannot honour, as
    one-line errors naming the field (checked before any model is built)."""
    kind = decoders.decoder_kind(cfg.decoder)
    kind.check_options(channels_last=cfg.vae_channels_last, first_chunk=weights.lightvae_first_chunk)
    if not kind.weight_file and weights.decoder is not None:
        raise ConfigError(f"decoder_weights: given for decoder {kind.name!r}; the full VAE loads from --weights "
                          "(or Weights.vae); choose a light decoder to use a decoder file")
    if weights.lightvae_first_chunk != "skip_time_conv" and isinstance(weights.decoder, nn.Module):
        raise ConfigError("lightvae_first_chunk: a built decoder module is used as it is; set it on the module "
                          "with impl.model.vae.set_first_chunk_upsampling")


def _latent_stats_config(cfg: InferenceConfig, weights: Weights):
    """The preset's VAE config with the latent mean / std of the real VAE when one is given
    (a light decoder maps the DiT's normalised latents back with the full VAE's statistics):
    a built VAE module's, else a VAE folder's config.json. Without either the light decoder
    builders fill in the published Wan2.2 values for a 48-channel latent
    (:func:`impl.model.decoders.with_latent_stats`)."""
    import dataclasses
    vae_cfg = cfg.stream_preset.vae
    config = getattr(weights.vae, "config", None) if isinstance(weights.vae, nn.Module) else None
    if getattr(config, "latents_mean", None) is not None:
        return dataclasses.replace(vae_cfg, latents_mean=tuple(config.latents_mean),
                                   latents_std=tuple(config.latents_std))
    folder = weights.vae if isinstance(weights.vae, (str, Path)) else weights.root
    if folder is None:
        return vae_cfg
    from impl.model.vae import read_vae_config
    real = read_vae_config(folder)
    return dataclasses.replace(vae_cfg, latents_mean=tuple(real["latents_mean"]), latents_std=tuple(real["latents_std"]))


def build_pipeline(cfg: InferenceConfig, device: torch.device | str = "cpu", weights: Weights = Weights(), *,
                   decode: bool = True, sp: SequenceParallel | None = None) -> StreamingPipeline:
    """Assemble the streaming pipeline of ``cfg`` on ``device`` (see the module docstring).

    decode: build a VAE (False: latents only, e.g. DiT profiling or SP ranks other than the root).
    sp: the sequence-parallel exchange of this rank (impl.inference.sp builds it).
    """
    device = torch.device(device)
    _check_device(cfg, device)
    if decode:
        check_decoder_options(cfg, weights)
    model = build_dit(cfg, device, weights)
    vae = build_video_decoder(cfg, device, weights) if decode else None
    embedder = build_text_embedder(cfg, device, weights)
    return pipeline_for_model(model, cfg, device, text_embedder=embedder, vae=vae, sp=sp)


def pipeline_for_model(model: CausalWanDiT, cfg: InferenceConfig, device: torch.device | str = "cpu", *,
                       text_embedder: TextEmbedder, vae: nn.Module | None = None,
                       sp: SequenceParallel | None = None) -> StreamingPipeline:
    """Wrap a DiT that the caller owns (built by :func:`build_dit`, or a student in training)
    in the pipeline of ``cfg``. The model is used as it is, so ``cfg`` must describe it: its
    dtype, and no quantization or compilation left to do."""
    if dtype_name(model.dtype) != cfg.dtype:
        raise ConfigError(f"dtype: the config says {cfg.dtype} but the model computes in {dtype_name(model.dtype)}")
    if model.cfg != cfg.stream_preset.dit:
        raise ConfigError(f"preset: the model's DiT config does not match preset {cfg.preset_name!r}")
    if sp is not None and sp.size != cfg.sp_size:
        raise ConfigError(f"sp_size: the config says {cfg.sp_size} but the exchange spans {sp.size} ranks")
    return StreamingPipeline(model, cfg, text_embedder=text_embedder, vae=vae, device=device, sp=sp)


def _check_device(cfg: InferenceConfig, device: torch.device) -> None:
    """What the config needs of the machine, checked before any weight is allocated."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} requested but CUDA is not available")
    if cfg.vae_mode == "stream":
        check_stream_device(device)
    if cfg.cuda_graphs and device.type != "cuda":
        raise ConfigError("cuda_graphs: CUDA graphs need a CUDA device")
