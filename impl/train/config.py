"""Typed configuration of teacher-forcing AR training (defaults: the release's train_ar.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from impl.config import ConfigError, PRESETS, _require, get_preset
from impl.modes import DType, Sharding, SPLayout, TrainAttention, TrainPrecision, check_choice, choices

# Before dtype had its own field, ``precision`` also named the compute dtype: these are its
# old values that are dtypes and not block-linear formats (fp32, fp64).
LEGACY_DTYPE_PRECISIONS = tuple(d for d in choices(DType) if d not in choices(TrainPrecision))


def upgrade_config_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict in today's fields: a config or checkpoint written before the split
    that says ``precision: fp32`` (or fp64) and gives no ``dtype`` meant an unquantized model
    computing in that dtype, i.e. ``dtype: fp32, precision: bf16``. Anything else is returned
    as it is (a copy)."""
    out = dict(values)
    if "dtype" not in out and out.get("precision") in LEGACY_DTYPE_PRECISIONS:
        out["dtype"], out["precision"] = out["precision"], "bf16"
    return out


@dataclass(frozen=True)
class ErrorRecyclingConfig:
    """Inject previously observed prediction errors into training inputs (SVI-style).

    Buckets of ``bucket_width`` timestep indices hold up to ``buffer_size_per_bucket`` per-block
    errors each. Per step: with ``clean_prob`` nothing is injected; otherwise each block's
    target latents get a bucket-matched latent error with ``latent_inject_prob``, the noise a
    bucket-matched noise error with ``noise_inject_prob``, and each clean-context block a
    random latent error with ``context_inject_prob``; every error is scaled by
    U(1 - modulate_factor, 1 + modulate_factor).
    """

    enabled: bool = False
    num_buckets: int = 50
    buffer_size_per_bucket: int = 500
    clean_prob: float = 0.2
    latent_inject_prob: float = 0.9
    noise_inject_prob: float = 0.01
    context_inject_prob: float = 0.9
    modulate_factor: float = 0.3
    clean_buffer_update_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("clean_prob", "latent_inject_prob", "noise_inject_prob", "context_inject_prob",
                     "clean_buffer_update_prob"):
            v = getattr(self, name)
            _require(0.0 <= v <= 1.0, f"ErrorRecyclingConfig.{name}", f"must be in [0, 1], got {v}")
        _require(self.num_buckets >= 1, "ErrorRecyclingConfig.num_buckets", "must be >= 1")
        _require(self.buffer_size_per_bucket >= 1, "ErrorRecyclingConfig.buffer_size_per_bucket", "must be >= 1")
        _require(0.0 <= self.modulate_factor < 1.0, "ErrorRecyclingConfig.modulate_factor", "must be in [0, 1)")


_FLOAT_FIELDS = ("lr", "beta1", "beta2", "weight_decay", "grad_clip", "shift", "ema_decay")
_INT_FIELDS = ("num_layers", "frames", "sp_size", "batch_size", "grad_accum", "steps", "ema_start_step",
               "checkpoint_every", "max_checkpoints", "vae_halo", "seed", "log_every")
_OPTIONAL_FIELDS = ("grad_clip", "num_layers", "ema_start_step")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    num_layers: int | None = None      # override the preset's depth (speed runs at 5B width)
    frames: int = 8                    # latent frames per clip (96 in the release)
    dtype: DType = "bf16"              # compute dtype of the model (and the VAE / text encoder)
    precision: TrainPrecision = "bf16"  # block-linear format: bf16 = not quantized (run in dtype)
    sp_size: int = 1
    sp_layout: SPLayout = "balanced"
    attention_backend: TrainAttention = "auto"    # auto = FlexAttention on CUDA, dense mask on CPU
    sharding: Sharding = "none"        # none = replicated; fsdp = sharded over all dp x sp ranks
    offload: bool = False              # fsdp only: sharded params, grads and AdamW state on the CPU
    batch_size: int = 1                # clips per rank per micro-step
    grad_accum: int = 1
    steps: int = 600                   # optimizer steps
    lr: float = 1e-5
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    gradient_checkpointing: bool = True
    compile: bool = False              # torch.compile the blocks' pure halves (norms, projections, FFN)
    shift: float = 5.0
    ema_decay: float = 0.99
    ema_start_step: int | None = 100   # None disables the EMA
    checkpoint_every: int = 100        # optimizer steps between checkpoints (0 = only at the end)
    max_checkpoints: int = 3
    vae_halo: int = 28
    seed: int = 0
    log_every: int = 1
    error_recycling: ErrorRecyclingConfig = field(default_factory=ErrorRecyclingConfig)

    def __post_init__(self) -> None:
        # Types first, so a YAML value like lr: "fast" is a one-line error, not a TypeError below.
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            _require((v is None and name in _OPTIONAL_FIELDS) or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                     f"TrainConfig.{name}", f"must be a number, got {v!r}")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            _require((v is None and name in _OPTIONAL_FIELDS) or (isinstance(v, int) and not isinstance(v, bool)),
                     f"TrainConfig.{name}", f"must be an integer, got {v!r}")
        for name in ("gradient_checkpointing", "compile"):
            _require(isinstance(getattr(self, name), bool), f"TrainConfig.{name}",
                     f"must be true or false, got {getattr(self, name)!r}")
        _require(self.preset in PRESETS, "TrainConfig.preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name, kind in (("dtype", DType), ("precision", TrainPrecision), ("sp_layout", SPLayout),
                           ("attention_backend", TrainAttention), ("sharding", Sharding)):
            check_choice(getattr(self, name), kind, f"TrainConfig.{name}")
        _require(isinstance(self.offload, bool), "TrainConfig.offload", f"must be a bool, got {self.offload!r}")
        _require(not self.offload or self.sharding == "fsdp", "TrainConfig.offload",
                 f"CPU offload moves FSDP shards; it needs sharding 'fsdp', got {self.sharding!r}")
        # Quantized linears keep BF16 master weights and quantize BF16 activations.
        _require(self.precision == "bf16" or self.dtype == "bf16", "TrainConfig.precision",
                 f"{self.precision!r} block linears train with dtype 'bf16', got dtype {self.dtype!r}")
        for name in ("frames", "sp_size", "batch_size", "grad_accum", "steps", "max_checkpoints", "log_every"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"TrainConfig.{name}", f"must be a positive integer, got {v!r}")
        _require(self.num_layers is None or self.num_layers >= 1, "TrainConfig.num_layers", "must be >= 1 or None")
        fpb = get_preset(self.preset).stream.frames_per_block
        _require(self.frames % fpb == 0, "TrainConfig.frames",
                 f"must be whole AR blocks, a multiple of {fpb} latent frames (preset {self.preset!r}), got {self.frames}")
        _require(self.lr > 0, "TrainConfig.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "TrainConfig.beta1/beta2", "must be in [0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, "TrainConfig.grad_clip", "must be > 0 or None")
        _require(self.checkpoint_every >= 0, "TrainConfig.checkpoint_every", "must be >= 0")
        _require(self.vae_halo >= 0, "TrainConfig.vae_halo", "must be >= 0")
        _require(self.ema_start_step is None or self.ema_start_step >= 0, "TrainConfig.ema_start_step",
                 "must be >= 0 or None")
        _require(0 < self.ema_decay < 1, "TrainConfig.ema_decay", "must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """The config of a dict of fields (a YAML file, a checkpoint's meta); old dicts with
        ``precision: fp32/fp64`` load through :func:`upgrade_config_dict`."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        values = upgrade_config_dict(values)
        for name in _FLOAT_FIELDS:   # YAML 1.1 reads 1e-5 (no dot) as a string
            if isinstance(values.get(name), str):
                try:
                    values[name] = float(values[name])
                except ValueError:
                    pass                 # __post_init__ names the field
        er = values.get("error_recycling")
        if isinstance(er, Mapping):
            er_allowed = {f.name for f in dataclasses.fields(ErrorRecyclingConfig)}
            bad = sorted(set(er) - er_allowed)
            if bad:
                raise ConfigError(f"ErrorRecyclingConfig: unknown field(s) {bad}; allowed: {sorted(er_allowed)}")
            values["error_recycling"] = ErrorRecyclingConfig(**er)
        return cls(**values)
