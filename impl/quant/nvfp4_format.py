"""The NVFP4 format's vocabulary, shared by the PyTorch quantizer and the Triton kernels.

:mod:`impl.quant.nvfp4` (PyTorch, any device) and :mod:`impl.quant.triton_nvfp4` (CUDA kernels)
both build on this module and never on each other's internals: the block size, the code
packing, the scale rules, the tensor container, the input checks and the tensor decode factor
``gd = fp32(amax / (Qt * M))``. Nothing here computes more than a few elementwise ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impl import modes
from impl.memory import tensor_bytes

GROUP = 16                      # elements per block scale (along the last dimension)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # magnitude of codes 0..7


class QuantFormatError(ValueError):
    """Bad input to a quantizer (shape, rule, dtype); the message says what is allowed."""


@dataclass(frozen=True)
class ScaleRule:
    """How block scales are chosen. ``tensor_q * max_scale`` sets the tensor decode factor."""

    name: str
    tensor_q: float            # Qt: E2M1 value the tensor amax maps to
    max_scale: float           # M: largest block scale the tensor amax maps to
    candidates: tuple[float, ...]  # Qb values tried per block
    error: str | None          # block error used to choose: "mse" | "mae" | "abs_max" | None


SCALE_RULES: dict[str, ScaleRule] = {
    "static_6": ScaleRule("static_6", 6.0, 448.0, (6.0,), None),
    "static_4": ScaleRule("static_4", 4.0, 448.0, (4.0,), None),
    # 4-over-6: M = 256 keeps 1.5 * s6 <= 384 representable in E4M3.
    "mse": ScaleRule("mse", 6.0, 256.0, (6.0, 4.0), "mse"),
    "mae": ScaleRule("mae", 6.0, 256.0, (6.0, 4.0), "mae"),
    "abs_max": ScaleRule("abs_max", 6.0, 256.0, (6.0, 4.0), "abs_max"),
}
# Configs and CLIs validate rule names against impl.modes; the table must define exactly those.
assert tuple(SCALE_RULES) == modes.choices(modes.ScaleRule), (
    f"SCALE_RULES {tuple(SCALE_RULES)} != impl.modes.ScaleRule {modes.choices(modes.ScaleRule)}")


def get_rule(rule: str | ScaleRule) -> ScaleRule:
    """The :class:`ScaleRule` named ``rule`` (a rule object passes through)."""
    if isinstance(rule, ScaleRule):
        return rule
    if rule not in SCALE_RULES:
        raise QuantFormatError(f"scale rule: unknown rule {rule!r}; allowed: {sorted(SCALE_RULES)}")
    return SCALE_RULES[rule]


def global_decode_scale(amax: torch.Tensor, rule: str | ScaleRule) -> torch.Tensor:
    """``gd = fp32(amax / (Qt * M))``: one IEEE float32 division (exactly rounded)."""
    r = get_rule(rule)
    return amax.float() / (r.tensor_q * r.max_scale)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (0..15) -> bytes [..., K/2], the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> uint8 codes [..., K] (sign in bit 3, magnitude index in bits 0-2)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def check_input(x: torch.Tensor, *, tile_2d: bool = False) -> None:
    """Raise :class:`QuantFormatError` unless ``x`` can be quantized (with 16x16 tiles or not)."""
    if not x.is_floating_point():
        raise QuantFormatError(f"NVFP4 quantize: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % GROUP:
        raise QuantFormatError(f"NVFP4 quantize: the last dimension must be a multiple of {GROUP}, "
                               f"got shape {tuple(x.shape)}")
    if tile_2d and (x.dim() != 2 or x.shape[0] % GROUP):
        raise QuantFormatError(f"NVFP4 quantize: 16x16 tiles need a 2-D tensor whose both dims are "
                               f"multiples of {GROUP}, got shape {tuple(x.shape)}")


def check_amax(amax: torch.Tensor, x: torch.Tensor, *, tile_2d: bool = False) -> None:
    """``amax`` must be a scalar, or (1x16 blocks only) broadcastable to ``x``'s ``[..., 1]``."""
    if amax.dim() == 0:
        return
    if tile_2d or amax.dim() != x.dim() or amax.shape[-1] != 1:
        raise QuantFormatError(f"NVFP4 quantize: amax must be a scalar{'' if tile_2d else ' or broadcastable to [..., 1]'}"
                               f" for x of shape {tuple(x.shape)}, got shape {tuple(amax.shape)}")


@dataclass
class NVFP4Tensor:
    """A quantized tensor of logical shape ``[..., K]`` (K a multiple of 16).
    Decode it with :func:`impl.quant.nvfp4.dequantize` (the Triton kernel or the PyTorch ops).

    packed: uint8 [..., K/2]; scales: float8_e4m3fn [..., K/16];
    global_scale: float32 decode factor ``gd``, broadcastable to ``scales``.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    rule: str

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.packed, self.scales, self.global_scale))

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed)
