"""The vocabulary of modes: every allowed value of every mode knob, declared once.

Each knob is a ``Literal`` type; :func:`choices` turns it into the tuple of allowed values that
configs validate against and that CLIs and benchmark fields offer. Nothing else in the tree
types these lists out. This module imports nothing heavy (no torch), so command-line parsers
and the harness can use it without loading the model stack.

Two words that used to be mixed up:
- ``dtype``: the dtype the model computes and keeps its unquantized weights in;
- ``precision``: the format of the 300 block linears (``bf16`` = not quantized: they run in
  the compute dtype). Records, specs, CLIs and configs use these two names the same way.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from impl.errors import ConfigError

DType = Literal["bf16", "fp32", "fp64"]
# Block-linear format. ``nvfp4`` resolves to ``nvfp4_te`` where Transformer Engine's NVFP4 runs
# (Blackwell), else ``nvfp4_emulated``.
Precision = Literal["bf16", "fp8", "nvfp4", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4_te"]
# Formats that run on any device (no Transformer Engine / Blackwell needed).
PORTABLE_PRECISIONS = ("bf16", "fp8", "nvfp4_emulated", "nvfp4_weight_only")
# Formats that train (weight-only NVFP4 has no backward).
TrainPrecision = Literal["bf16", "fp8", "nvfp4_emulated", "nvfp4_te"]
KVStorage = Literal["bf16", "fp8", "nvfp4"]       # KV-cache storage (bf16 = the compute dtype)
KVExchange = Literal["auto", "plain", "nvfp4"]     # how K/V cross the SP all-to-all
VAEMode = Literal["sync", "stream", "device"]      # where a block's VAE decode runs
# Video decoder: the full Wan2.2 VAE, MG-LightVAE pruned at 50% / 75% of every width, or the
# tiny TAEHV-architecture decoder (impl/model/decoders.py).
Decoder = Literal["wan", "lightvae_p50", "lightvae_p75", "tae"]
# How decoded frames reach the caller: float32 [-1, 1], or uint8 [0, 255] converted on the GPU
# (a quarter of the bytes over the host copy; what video files store).
FrameFormat = Literal["float32", "uint8"]
# The latent space a tiny decoder file expects: the DiT's normalised latents as they are (what the
# published TAEHV taew2_2 files take), or the VAE's raw ones (z * std + mean).
DecoderLatents = Literal["normalized", "raw"]
# The first latent frame at a pruned (MG-LightVAE) decoder's temporal upsamplers: skip the time
# conv (LightX2V, official Wan2.2, diffusers), or run it with zero history and drop its first
# output frame (the Matrix-Game-3 release's copy); impl/model/vae.py.
LightVAEFirstChunk = Literal["skip_time_conv", "time_conv_drop_first"]
# Kernel of KV-cached self-attention (impl/model/attention_backends.py).
AttentionBackend = Literal["sdpa", "fa3", "fa3_fp8", "fp8_triton", "fp8_cudnn", "fp8_emulated"]
ScaleRule = Literal["static_6", "static_4", "mse", "mae", "abs_max"]   # NVFP4 block-scale rules
Sampler = Literal["unipc", "euler"]
SPLayout = Literal["balanced", "naive"]            # teacher-forcing token layout under SP
TrainAttention = Literal["auto", "dense", "flex"]  # masked attention core of training forwards
# Training state over the ranks: none = replicated on every rank (float32 master copy + AdamW
# beside BF16 parameters); fsdp = FSDP2 over the flattened dp x sp mesh (impl.parallel.fsdp).
Sharding = Literal["none", "fsdp"]
# A prompt switch in a live session: scene cut; continuous with the KV re-cache; text K/V only.
SwitchMode = Literal["recache", "cut", "direct"]


def choices(kind: Any) -> tuple[str, ...]:
    """The allowed values of a mode ``Literal``, in declaration order."""
    values = get_args(kind)
    if not values:
        raise TypeError(f"choices: {kind!r} is not a Literal mode type")
    return values


def check_choice(value: Any, kind: Any, field: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``value`` is one of ``kind``'s values."""
    allowed = choices(kind)
    if value not in allowed:
        raise ConfigError(f"{field}: must be one of {list(allowed)}, got {value!r}")
