"""Typed configuration for the model, the VAE, the text encoder and streaming inference.

Every knob is a frozen dataclass field with a default; ``__post_init__`` validates it and
raises :class:`ConfigError` naming the field and what is allowed. Presets bundle the four
configs: ``wan22_ti2v_5b`` (the real sizes), ``small`` and ``tiny`` (CPU tests), ``proxy``
(the quality proxy model trained in the harness).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from impl.errors import ConfigError
from impl.modes import Sampler, check_choice


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


def raw_frames_for_latents(num_latent_frames: int, temporal_factor: int = 4) -> int:
    """Raw (pixel) frames of ``num_latent_frames`` latents of the causal VAE: ``1 + tf (F - 1)``
    (latent 0 encodes raw frame 0 alone, every later latent ``tf`` frames)."""
    for name, value in (("num_latent_frames", num_latent_frames), ("temporal_factor", temporal_factor)):
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                 f"must be an integer >= 1, got {value!r}")
    return 1 + temporal_factor * (num_latent_frames - 1)


def require_positive_ints(obj: Any, *names: str) -> None:
    """Each named field of a config dataclass is an integer >= 1 (ConfigError naming it)."""
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{type(obj).__name__}.{name}", f"must be a positive integer, got {value!r}")


def require_positive(obj: Any, *names: str) -> None:
    """Each named field of a config dataclass is a number > 0 (ConfigError naming it)."""
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                 f"{type(obj).__name__}.{name}", f"must be > 0, got {value!r}")


@dataclass(frozen=True)
class DiTConfig:
    """Causal Wan2.2-TI2V DiT. Names follow diffusers' ``WanTransformer3DModel``."""

    num_layers: int = 30
    dim: int = 3072
    num_heads: int = 24
    ffn_dim: int = 14336
    in_channels: int = 48
    out_channels: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        require_positive_ints(self, "num_layers", "dim", "num_heads", "ffn_dim", "in_channels",
                  "out_channels", "text_dim", "freq_dim")
        _require(self.dim % self.num_heads == 0, "DiTConfig.dim",
                 f"must be divisible by num_heads={self.num_heads}, got {self.dim}")
        _require(self.head_dim % 2 == 0 and self.head_dim >= 6, "DiTConfig.num_heads",
                 f"head_dim = dim/num_heads must be even and >= 6 for 3-D RoPE, got {self.head_dim}")
        _require(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size),
                 "DiTConfig.patch_size", f"must be three positive ints, got {self.patch_size!r}")
        _require(self.patch_size[0] == 1, "DiTConfig.patch_size",
                 "temporal patch must be 1 (one latent frame per token row)")
        _require(self.eps > 0, "DiTConfig.eps", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real dims of head_dim given to (time, height, width); diffusers' split."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKLWan`` in the Wan2.2 layout (48 latent channels, 4x16x16)."""

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    # Per-channel latent normalisation. None means identity (random-weight presets);
    # a real checkpoint's config.json carries the trained values.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        require_positive_ints(self, "base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "patch_size")
        _require(len(self.temporal_downsample) == len(self.dim_mult) - 1,
                 "VAEConfig.temporal_downsample", "needs len(dim_mult) - 1 entries")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            _require(value is None or len(value) == self.z_dim, f"VAEConfig.{name}",
                     f"needs z_dim={self.z_dim} entries or None")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """transformers ``UMT5EncoderModel`` configuration (umT5-XXL encoder at full size)."""

    vocab_size: int = 256384
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    max_length: int = 512

    def __post_init__(self) -> None:
        require_positive_ints(self, "vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "max_length")


@dataclass(frozen=True)
class VideoConfig:
    """Pixel resolution and frame rate; latent and token grids are derived."""

    height: int = 704
    width: int = 1280
    fps: int = 24

    def __post_init__(self) -> None:
        require_positive_ints(self, "height", "width", "fps")


@dataclass(frozen=True)
class StreamConfig:
    """Block-autoregressive inference: KV window, sink, multi-shot, sampler."""

    frames_per_block: int = 8
    kv_window_frames: int = 32
    sink_frames: int = 8
    multi_shot_sink: bool = True
    shot_rope_offset: int = 8
    scene_cut_prefix: str = "The scene transitions. "
    sampler: Sampler = "unipc"
    steps: int = 4
    shift: float = 5.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        require_positive_ints(self, "frames_per_block", "kv_window_frames", "steps")
        fpb = self.frames_per_block
        _require(self.kv_window_frames % fpb == 0, "StreamConfig.kv_window_frames",
                 f"must be a multiple of frames_per_block={fpb}, got {self.kv_window_frames}")
        _require(self.sink_frames >= 0 and self.sink_frames % fpb == 0, "StreamConfig.sink_frames",
                 f"must be a non-negative multiple of frames_per_block={fpb}, got {self.sink_frames}")
        _require(self.shot_rope_offset >= 0, "StreamConfig.shot_rope_offset", "must be >= 0")
        check_choice(self.sampler, Sampler, "StreamConfig.sampler")
        _require(self.shift > 0, "StreamConfig.shift", "must be > 0")
        _require(self.guidance_scale >= 1.0, "StreamConfig.guidance_scale",
                 f"must be >= 1.0 (1.0 disables CFG), got {self.guidance_scale}")
        # The current block always occupies a slot; sink and the shot pin need their own.
        pinned = 1 if self.multi_shot_sink and self.sink_blocks > 0 else 0
        _require(self.window_blocks >= self.sink_blocks + pinned + 1, "StreamConfig.kv_window_frames",
                 f"window of {self.window_blocks} blocks cannot hold {self.sink_blocks} sink block(s)"
                 f"{' + 1 shot pin' if pinned else ''} + the current block")

    @property
    def window_blocks(self) -> int:
        return self.kv_window_frames // self.frames_per_block

    @property
    def sink_blocks(self) -> int:
        return self.sink_frames // self.frames_per_block


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextEncoderConfig
    video: VideoConfig
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        _require(self.dit.in_channels == self.vae.z_dim and self.dit.out_channels == self.vae.z_dim,
                 "Preset.dit.in_channels", f"must equal vae.z_dim={self.vae.z_dim}")
        _require(self.dit.text_dim == self.text.d_model, "Preset.dit.text_dim",
                 f"must equal text.d_model={self.text.d_model}")
        s = self.vae.spatial_factor * self.dit.patch_size[1]
        _require(self.video.height % s == 0 and self.video.width % s == 0, "Preset.video",
                 f"height and width must be multiples of {s}, got {self.video.height}x{self.video.width}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.vae.spatial_factor
        return self.video.height // f, self.video.width // f

    @property
    def token_grid(self) -> tuple[int, int]:
        lh, lw = self.latent_hw
        return lh // self.dit.patch_size[1], lw // self.dit.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.token_grid
        return gh * gw

    @property
    def tokens_per_block(self) -> int:
        return self.tokens_per_frame * self.stream.frames_per_block

    def raw_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latents: 1 + 4 (F - 1)."""
        return raw_frames_for_latents(latent_frames, self.vae.temporal_factor)

    def replace(self, **sections: Any) -> "Preset":
        """Return a copy with whole sections or section fields replaced.

        ``preset.replace(stream={"steps": 2})`` updates one field of ``stream``.
        """
        updates: dict[str, Any] = {}
        for key, value in sections.items():
            if key not in {"dit", "vae", "text", "video", "stream"}:
                raise ConfigError(f"Preset.{key}: unknown section; allowed: dit, vae, text, video, stream")
            current = getattr(self, key)
            updates[key] = _replace_fields(current, value) if isinstance(value, Mapping) else value
        return dataclasses.replace(self, **updates)


def _replace_fields(obj: Any, values: Mapping[str, Any]) -> Any:
    allowed = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{type(obj).__name__}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return dataclasses.replace(obj, **values)


def _wan22_ti2v_5b() -> Preset:
    return Preset("wan22_ti2v_5b", DiTConfig(), VAEConfig(), TextEncoderConfig(), VideoConfig())


def _cpu_sized(name: str, *, num_layers: int, dim: int, ffn_dim: int, freq_dim: int, z_dim: int,
               vae_dim: int, text_dim: int, text_heads: int, max_length: int, video: VideoConfig) -> Preset:
    """A preset at CPU size, the recipe the small ones share: the DiT's latent channels are the
    VAE's ``z_dim`` and its text width the encoder's ``d_model`` (as Preset requires), 4 DiT
    heads, one VAE width for encoder and decoder, a 2-layer text encoder (vocab 512,
    ``d_ff = 2 d_model``), and 2-frame AR blocks in an 8-frame KV window with a 2-frame sink."""
    return Preset(
        name,
        DiTConfig(num_layers=num_layers, dim=dim, num_heads=4, ffn_dim=ffn_dim, in_channels=z_dim,
                  out_channels=z_dim, text_dim=text_dim, freq_dim=freq_dim),
        VAEConfig(base_dim=vae_dim, decoder_base_dim=vae_dim, z_dim=z_dim),
        TextEncoderConfig(vocab_size=512, d_model=text_dim, num_layers=2, num_heads=text_heads,
                          d_kv=text_dim // text_heads, d_ff=2 * text_dim, max_length=max_length),
        video,
        StreamConfig(frames_per_block=2, kv_window_frames=8, sink_frames=2),
    )


def _small() -> Preset:
    return _cpu_sized("small", num_layers=4, dim=256, ffn_dim=1024, freq_dim=64, z_dim=16, vae_dim=32,
                      text_dim=128, text_heads=4, max_length=64, video=VideoConfig(height=256, width=256))


def _tiny() -> Preset:
    return _cpu_sized("tiny", num_layers=2, dim=64, ffn_dim=128, freq_dim=32, z_dim=8, vae_dim=8,
                      text_dim=32, text_heads=2, max_length=16, video=VideoConfig(height=64, width=64))


def _proxy() -> Preset:
    """The quality proxy (repro/quality): trained in the harness in minutes on one GPU."""
    return _cpu_sized("proxy", num_layers=6, dim=256, ffn_dim=1024, freq_dim=64, z_dim=16, vae_dim=32,
                      text_dim=128, text_heads=4, max_length=32,
                      video=VideoConfig(height=128, width=128, fps=16))


PRESETS = {"wan22_ti2v_5b": _wan22_ti2v_5b, "small": _small, "tiny": _tiny, "proxy": _proxy}


def get_preset(name: str) -> Preset:
    """Build a preset by name; unknown names list the allowed ones."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
