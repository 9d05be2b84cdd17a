"""Typed quantization settings for the DiT's block linears (allowed values: :mod:`impl.modes`)."""

from __future__ import annotations

from dataclasses import dataclass

from impl import modes
from impl.config import ConfigError, _require


@dataclass(frozen=True)
class QuantConfig:
    """Which format the 300 block linears run in, and with which NVFP4 scale rules.

    mode: ``bf16`` (no quantization); ``fp8`` (row-wise W8A8, ``torch._scaled_mm``);
      ``nvfp4_emulated`` (exact W4A4 numerics, any device, straight-through gradients);
      ``nvfp4_weight_only`` (packed 4-bit weights, BF16 activations; inference only);
      ``nvfp4_te`` (Transformer Engine's NVFP4 recipe: Blackwell only);
      ``nvfp4`` picks ``nvfp4_te`` where it runs and ``nvfp4_emulated`` elsewhere.
    weight_rule / activation_rule / grad_rule: NVFP4 scale rules (``static_6``, ``static_4``,
      ``mse``, ``mae``, ``abs_max``).
    weight_2d: 16x16 weight tiles, so W and W^T quantize to the same values (training).
    quantize_grads: quantize the backward GEMMs' operands too (gradients with stochastic
      rounding, a random Hadamard transform on the weight-gradient GEMM); False means plain
      straight-through gradients in high precision.
    keep_master_weights: keep the BF16 weight as a trainable parameter and re-quantize it on
      every forward (training); False quantizes once and frees it (inference memory).
    """

    mode: modes.Precision = "bf16"
    weight_rule: modes.ScaleRule = "mse"
    activation_rule: modes.ScaleRule = "mse"
    grad_rule: modes.ScaleRule = "mse"
    weight_2d: bool = False
    quantize_grads: bool = True
    keep_master_weights: bool = False

    def __post_init__(self) -> None:
        modes.check_choice(self.mode, modes.Precision, "QuantConfig.mode")
        for name in ("weight_rule", "activation_rule", "grad_rule"):
            modes.check_choice(getattr(self, name), modes.ScaleRule, f"QuantConfig.{name}")
        _require(not (self.mode == "nvfp4_weight_only" and self.keep_master_weights),
                 "QuantConfig.keep_master_weights", "nvfp4_weight_only is inference-only")

    @classmethod
    def for_inference(cls, mode: str) -> "QuantConfig":
        """The release's inference settings: 4-over-6 (mse) weights and activations, 1x16."""
        return cls(mode=mode)

    @classmethod
    def for_training(cls, mode: str) -> "QuantConfig":
        """The release's AR-training settings: static_6 16x16 weights, mse activations, mse +
        stochastic rounding gradients with RHT on the weight gradient; master weights kept."""
        if mode == "nvfp4_weight_only":
            raise ConfigError("QuantConfig.mode: nvfp4_weight_only is inference-only; "
                              "train with nvfp4_emulated or nvfp4_te")
        return cls(mode=mode, weight_rule="static_6", weight_2d=True, keep_master_weights=True)
