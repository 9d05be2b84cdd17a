"""One typed, frozen configuration of streaming inference, validated once.

:class:`InferenceConfig` holds every inference knob with its default: the model preset and the
stream overrides (steps, guidance scale, attention sink), the compute ``dtype``, the block-linear
``precision``, the KV-cache storage, the VAE decode mode and device, compilation, and the SP
size and K/V exchange. Allowed values come from :mod:`impl.modes`; ``__post_init__`` checks
every field and every cross-field rule and raises :class:`~impl.errors.ConfigError` naming the
field. The builder (:mod:`impl.inference.build`) turns a config into a pipeline; nothing
downstream re-checks a knob.

This module does not import torch, so command-line parsers can be built from it cheaply
(:func:`add_arguments` / :func:`config_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

from impl.config import PRESETS, Preset, get_preset
from impl.errors import ConfigError
from impl.modes import (AttentionBackend, Decoder, DType, FrameFormat, KVExchange, KVStorage, Precision, ScaleRule,
                        VAEMode, check_choice, choices)


def allowed_sp_sizes(preset: Preset) -> list[int]:
    """SP sizes that split both the attention heads and a block's tokens evenly."""
    heads, tokens = preset.dit.num_heads, preset.tokens_per_block
    return [d for d in range(1, heads + 1) if heads % d == 0 and tokens % d == 0]


def check_sp_size(preset: Preset, sp_size: int) -> None:
    """Raise :class:`ConfigError` naming ``sp_size`` if it does not fit the preset."""
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ConfigError(f"sp_size: must be a positive integer, got {sp_size!r}")
    heads, tokens = preset.dit.num_heads, preset.tokens_per_block
    allowed = allowed_sp_sizes(preset)
    if heads % sp_size:
        raise ConfigError(f"sp_size={sp_size}: Ulysses splits the dit.num_heads={heads} attention heads over the "
                          f"SP ranks, so sp_size must divide it; allowed for preset {preset.name!r}: {allowed}")
    if tokens % sp_size:
        raise ConfigError(f"sp_size={sp_size}: the block's {tokens} tokens (stream.frames_per_block="
                          f"{preset.stream.frames_per_block} x {preset.tokens_per_frame} tokens per frame) must "
                          f"split evenly over the SP ranks; allowed for preset {preset.name!r}: {allowed}")


def _check_device_name(value: str | None, field: str) -> None:
    ok = value is None or (isinstance(value, str) and (
        value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())))
    if not ok:
        raise ConfigError(f"{field}: must be None, 'cpu', 'cuda' or 'cuda:N', got {value!r}")


@dataclass(frozen=True)
class InferenceConfig:
    """Every knob of streaming inference (see the module docstring).

    preset: a preset name (:data:`impl.config.PRESETS`) or a :class:`Preset` (tests, custom sizes).
    steps / guidance_scale: override the preset's stream settings; None keeps the preset's.
    sink: False drops the attention sink (``sink_frames = 0``); True keeps the preset's.
    dtype: compute dtype of the DiT, the VAE and the text encoder.
    precision: block-linear format (``bf16`` = not quantized: the linears run in ``dtype``).
    kv_cache / kv_rule: KV-cache storage and, for NVFP4 storage, its block-scale rule.
    decoder: the video decoder (impl/model/decoders.py): the full Wan2.2 VAE, a pruned
      MG-LightVAE, or the tiny TAEHV-architecture decoder.
    vae_mode / vae_device / vae_queue_depth: where each block is decoded (impl/vae_decode.py);
      ``vae_device`` only with ``vae_mode="device"`` (None there means the CPU); the queue
      depth bounds the blocks in flight in the async modes.
    vae_channels_last / vae_compile: run the decoder's 3-D convolutions channels-last (Wan /
      LightVAE; the builder refuses it for a decoder without them, as its registry entry in
      impl/model/decoders.py declares), and ``torch.compile`` its module (``vae_mode="sync"`` only: compiling in the
      async modes' worker thread is not safe beside the DiT).
    attention: the kernel of KV-cached self-attention (impl/model/attention_backends.py).
    bf16_attention_steps: denoising steps whose self-attention runs the backend's BF16 sibling
      (``fa3`` for ``fa3_fp8``, else ``sdpa``) instead of an FP8 kernel: ``"none"`` or
      comma-separated step indices, negative from the end, or ``first`` / ``last``. The
      clean re-cache pass always runs ``attention``.
    frame_format: decoded frames as float32 in [-1, 1], or uint8 converted on the GPU and copied
      through pinned staging buffers reused across blocks (a quarter of the bytes; what mp4 stores).
    compile: ``torch.compile`` each DiT block's two pure halves; ``cuda_graphs`` (needs
      ``compile``, CUDA) compiles them with ``mode="reduce-overhead"``, so each half replays as
      one CUDA graph and the host no longer gates the GPU.
    sp_size / kv_comm: ranks per Ulysses SP group and how K/V cross its all-to-all
      (``auto`` = NVFP4 codes with NVFP4 storage under SP, else plain).
    """

    preset: str | Preset = "tiny"
    steps: int | None = None
    guidance_scale: float | None = None
    sink: bool = True
    dtype: DType = "bf16"
    precision: Precision = "bf16"
    kv_cache: KVStorage = "bf16"
    kv_rule: ScaleRule = "mse"
    decoder: Decoder = "wan"
    vae_mode: VAEMode = "sync"
    vae_device: str | None = None
    vae_queue_depth: int = 2
    vae_channels_last: bool = False
    vae_compile: bool = False
    attention: AttentionBackend = "sdpa"
    bf16_attention_steps: str = "none"
    frame_format: FrameFormat = "float32"
    compile: bool = False
    cuda_graphs: bool = False
    sp_size: int = 1
    kv_comm: KVExchange = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.preset, str):
            if self.preset not in PRESETS:
                raise ConfigError(f"preset: unknown preset {self.preset!r}; allowed: {sorted(PRESETS)}")
        elif not isinstance(self.preset, Preset):
            raise ConfigError(f"preset: must be a preset name or a Preset, got {type(self.preset).__name__}")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise ConfigError(f"steps: must be a positive integer or None, got {self.steps!r}")
        if self.guidance_scale is not None and not (isinstance(self.guidance_scale, (int, float))
                                                    and self.guidance_scale >= 1.0):
            raise ConfigError(f"guidance_scale: must be >= 1.0 (1.0 disables CFG) or None, got {self.guidance_scale!r}")
        for name in ("sink", "compile", "cuda_graphs", "vae_channels_last", "vae_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        for name, kind in (("dtype", DType), ("precision", Precision), ("kv_cache", KVStorage),
                           ("kv_rule", ScaleRule), ("decoder", Decoder), ("vae_mode", VAEMode),
                           ("kv_comm", KVExchange), ("attention", AttentionBackend),
                           ("frame_format", FrameFormat)):
            check_choice(getattr(self, name), kind, name)
        self.bf16_attention_step_indices()   # validates the field
        _check_device_name(self.vae_device, "vae_device")
        if self.vae_device is not None and self.vae_mode != "device":
            raise ConfigError(f"vae_device: is only used with vae_mode='device' (vae_mode is {self.vae_mode!r}); "
                              "leave it unset")
        if not isinstance(self.vae_queue_depth, int) or isinstance(self.vae_queue_depth, bool) \
                or self.vae_queue_depth < 1:
            raise ConfigError(f"vae_queue_depth: must be a positive integer, got {self.vae_queue_depth!r}")
        if self.vae_compile and self.vae_mode != "sync":
            # Measured on an H200: a compiled decoder in the worker thread slowed the DiT 2.6x and,
            # on a recompile, crashed its forward (torch.compile's FX tracing patches
            # nn.Module.__call__ for the whole process while it traces).
            raise ConfigError(f"vae_compile: only with vae_mode='sync' (got {self.vae_mode!r}); torch.compile "
                              "traces in the decode worker's thread, which breaks the DiT running beside it")
        if self.cuda_graphs and not self.compile:
            raise ConfigError("cuda_graphs: CUDA graphs capture the compiled block halves; set compile=true too")
        if self.kv_comm == "nvfp4" and self.kv_cache != "nvfp4":
            raise ConfigError("kv_comm: 'nvfp4' sends K/V as NVFP4 codes that are stored as they are, so it "
                              "needs kv_cache='nvfp4'")
        check_sp_size(self.stream_preset, self.sp_size)  # also builds (and so validates) the preset

    # ---- derived -------------------------------------------------------------------------
    @cached_property
    def stream_preset(self) -> Preset:
        """The preset with this config's stream overrides applied."""
        base = get_preset(self.preset) if isinstance(self.preset, str) else self.preset
        stream: dict[str, Any] = {}
        if self.steps is not None:
            stream["steps"] = self.steps
        if self.guidance_scale is not None:
            stream["guidance_scale"] = float(self.guidance_scale)
        if not self.sink:
            stream["sink_frames"] = 0
        return base.replace(stream=stream) if stream else base

    def bf16_attention_step_indices(self) -> frozenset[int]:
        """The denoising steps (0-based) of :attr:`bf16_attention_steps`; raises ConfigError."""
        text = self.bf16_attention_steps
        if not isinstance(text, str):
            raise ConfigError(f"bf16_attention_steps: must be 'none' or comma-separated step indices, got {text!r}")
        if text.strip() in ("", "none"):
            return frozenset()
        steps = self.stream_preset.stream.steps
        out = set()
        for part in text.split(","):
            part = {"first": "0", "last": "-1"}.get(part.strip(), part)
            try:
                i = int(part)
            except ValueError:
                raise ConfigError(f"bf16_attention_steps: {part.strip()!r} is not a step index "
                                  f"(use e.g. 'last' or '-1' for the last step, 'first,last', or 'none')") from None
            if not -steps <= i < steps:
                raise ConfigError(f"bf16_attention_steps: step {i} is outside the {steps} denoising steps "
                                  f"(0..{steps - 1}, or -{steps}..-1 from the end)")
            out.add(i % steps)
        if self.attention in ("sdpa", "fa3"):
            raise ConfigError(f"bf16_attention_steps: attention={self.attention!r} already runs in BF16 on every "
                              "step; it applies to the FP8 backends")
        return frozenset(out)

    @property
    def preset_name(self) -> str:
        return self.preset if isinstance(self.preset, str) else self.preset.name

    @property
    def kv_exchange(self) -> str:
        """The K/V exchange actually used: ``auto`` is ``nvfp4`` with NVFP4 storage under SP."""
        if self.kv_comm != "auto":
            return self.kv_comm
        return "nvfp4" if self.kv_cache == "nvfp4" and self.sp_size > 1 else "plain"

    def replace(self, **changes: Any) -> "InferenceConfig":
        """A copy with fields changed (validated again); unknown names are an error."""
        allowed = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ConfigError(f"InferenceConfig: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_variant(cls, variant: Mapping[str, Any], **extra: Any) -> "InferenceConfig":
        """The config of a benchmark variant: its keys that are config fields, plus ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in variant.items() if k in names}, **extra)


FIELD_HELP = {
    "preset": "model size preset",
    "steps": "denoising steps per block (default: the preset's, 4)",
    "guidance_scale": "CFG scale; 1.0 disables CFG (default: the preset's, 1.0)",
    "sink": "keep the attention sink (the first block) in the KV window",
    "dtype": "compute dtype of the DiT, VAE and text encoder",
    "precision": "format of the 300 block linears: bf16 = not quantized, fp8 = W8A8, nvfp4_* (docs/nvfp4.md); "
                 "nvfp4 = nvfp4_te where Transformer Engine runs it, else nvfp4_emulated",
    "kv_cache": "KV-cache storage: bf16 (the compute dtype), fp8 (e4m3 codes FP8 attention reads as stored), "
                "nvfp4 (4.5 bits, dequantized per read)",
    "kv_rule": "NVFP4 block-scale rule of the KV cache",
    "decoder": "video decoder: wan = the full Wan2.2 VAE, lightvae_p50 / lightvae_p75 = MG-LightVAE pruned by "
               "50%% / 75%%, tae = the tiny TAEHV-architecture decoder",
    "vae_mode": "VAE decoding: in the DiT loop, on a side CUDA stream, or on --vae-device",
    "vae_device": "device of the VAE with --vae-mode device: cpu, cuda or cuda:N (default: cpu)",
    "vae_queue_depth": "async VAE modes: most blocks decoding at once",
    "vae_channels_last": "decode in channels-last layout (wan / lightvae: cuDNN's preferred conv layout)",
    "vae_compile": "torch.compile the decoder module",
    "attention": "KV-cached self-attention kernel: sdpa (PyTorch, the model dtype), fa3 / fa3_fp8 "
                 "(FlashAttention-3 BF16 / FP8, Hopper; pip install fa3-fwd), fp8_triton (our Triton FP8 "
                 "kernel, Hopper), fp8_cudnn (cuDNN frontend FP8 SDPA), fp8_emulated (FP8 numerics in PyTorch)",
    "bf16_attention_steps": "denoising steps that keep BF16 attention under an FP8 backend: none, or "
                            "comma-separated indices, negative from the end, or first / last (e.g. last)",
    "frame_format": "decoded frames: float32 in [-1, 1], or uint8 converted on the GPU (pinned host copies)",
    "compile": "torch.compile the DiT blocks' pure halves",
    "cuda_graphs": "replay the compiled halves as CUDA graphs (torch.compile mode reduce-overhead; needs --compile)",
    "sp_size": "ranks per sequence-parallel group",
    "kv_comm": "how K/V cross the SP all-to-all: plain, nvfp4 (packed codes; needs --kv-cache nvfp4), "
               "auto = nvfp4 with an NVFP4 cache under SP",
}
_CHOICES = {"dtype": DType, "precision": Precision, "kv_cache": KVStorage, "kv_rule": ScaleRule,
            "decoder": Decoder, "vae_mode": VAEMode, "kv_comm": KVExchange, "attention": AttentionBackend,
            "frame_format": FrameFormat}


def add_arguments(ap: argparse.ArgumentParser, *, skip: tuple[str, ...] = (),
                  defaults: Mapping[str, Any] | None = None) -> None:
    """Add one ``--flag`` per :class:`InferenceConfig` field (not those in ``skip``), with the
    allowed values and defaults in the help. ``defaults`` overrides the config's defaults
    (a value of None leaves the flag unset, to be resolved by the caller)."""
    base = {f.name: f.default for f in dataclasses.fields(InferenceConfig)}
    base.update(defaults or {})
    for f in dataclasses.fields(InferenceConfig):
        if f.name in skip:
            continue
        flag, default, help_ = "--" + f.name.replace("_", "-"), base[f.name], FIELD_HELP[f.name]
        if f.name in ("sink", "compile", "cuda_graphs", "vae_channels_last", "vae_compile"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                            help=f"{help_} (default: {default})")
        elif f.name == "preset":
            ap.add_argument(flag, default=default, choices=sorted(PRESETS), help=f"{help_} (default: {default})")
        elif f.name in _CHOICES:
            shown = "auto" if default is None else default
            ap.add_argument(flag, default=default, choices=list(choices(_CHOICES[f.name])),
                            help=f"{help_} (default: {shown})")
        else:
            kind = {"steps": int, "sp_size": int, "vae_queue_depth": int, "guidance_scale": float}.get(f.name, str)
            ap.add_argument(flag, type=kind, default=default, help=f"{help_} (default: {default})")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> InferenceConfig:
    """The config named by :func:`add_arguments` flags; ``overrides`` win over the flags."""
    names = [f.name for f in dataclasses.fields(InferenceConfig)]
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    values.update(overrides)
    return InferenceConfig(**values)
