"""Quantize a DiT: merge LoRA, then swap the 300 block linears for quantized ones.

The six outer projections (text/time embedders, time projection, output head), the patch
embedding and every norm stay BF16, as in the release (code study section 5.5).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from impl.memory import module_bytes
from impl.quant.config import QuantConfig
from impl.quant.linear import Fp8Linear, NVFP4EmulatedLinear, NVFP4WeightOnlyLinear, QuantLinear

BLOCK_PREFIX = "blocks."


@dataclass(frozen=True)
class QuantReport:
    mode: str                  # the mode that was applied (``nvfp4`` resolved)
    quantized: int             # block linears replaced
    kept: int                  # other nn.Linear layers left in BF16
    weight_bytes_before: int   # block linears' weights + biases before
    weight_bytes_after: int


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the block linears, plain (``nn.Linear``) or already quantized."""
    return [n for n, m in model.named_modules() if n.startswith(BLOCK_PREFIX) and _is_linear(m)]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantLinear)) or type(m).__name__ == "TENVFP4Linear"   # TE: optional import


def merge_lora(model: nn.Module) -> int:
    """Merge every peft LoRA layer into its base linear and put the base back; returns count."""
    merged = 0
    for name, module in list(model.named_modules()):
        if hasattr(module, "merge") and hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            module.merge(safe_merge=True)
            _set_module(model, name, module.base_layer)
            merged += 1
    return merged


def resolve_mode(mode: str, device: torch.device) -> str:
    """``nvfp4`` -> ``nvfp4_te`` where TE's NVFP4 runs, else ``nvfp4_emulated`` (with a warning)."""
    if mode != "nvfp4":
        return mode
    from impl.quant.te_linear import te_nvfp4_status
    ok, reason = te_nvfp4_status(device)
    if ok:
        return "nvfp4_te"
    warnings.warn(f"nvfp4: Transformer Engine NVFP4 unavailable ({reason}); using nvfp4_emulated", stacklevel=3)
    return "nvfp4_emulated"


def quantize_model(model: nn.Module, cfg: QuantConfig) -> QuantReport:
    """Replace the block linears of ``model`` in place according to ``cfg``."""
    if merge_lora(model):
        warnings.warn("quantize_model: merged LoRA weights into the base linears first", stacklevel=2)
    pre = [n for n in block_linear_names(model) if getattr(model.get_submodule(n), "prequantized", False)]
    names = [n for n in block_linear_names(model) if isinstance(model.get_submodule(n), nn.Linear)]
    if not names and not pre:
        raise ValueError("quantize_model: the model has no unquantized block linears (names starting with 'blocks.')")
    kept = sum(isinstance(m, nn.Linear) for m in model.modules()) - len(names)
    before = block_linear_bytes(model, names)
    device = next(model.parameters()).device
    mode = _adopt_prequantized(model, pre, cfg) if pre else resolve_mode(cfg.mode, device)
    if not names:
        return QuantReport(mode, 0, kept, before, before)
    if mode == "bf16":
        return QuantReport(mode, 0, kept + len(names), before, before)
    for name in names:
        _set_module(model, name, make_quant_linear(model.get_submodule(name), mode, cfg))
    return QuantReport(mode, len(names), kept, before, block_linear_bytes(model, names))


def _adopt_prequantized(model: nn.Module, names: list[str], cfg: QuantConfig) -> str:
    """Block linears loaded from a pre-quantized NVFP4 checkpoint (impl/quant/release_nvfp4.py)
    keep their codes: they run weight-only or, moved bit for bit into emulated layers, W4A4
    (``nvfp4`` means that here: Transformer Engine would need the BF16 weights). Other formats
    would need the BF16 weights the file does not have. Returns the mode used."""
    from impl.quant.linear import _packed_weight, nvfp4_linear_from_packed
    mode = "nvfp4_emulated" if cfg.mode == "nvfp4" else cfg.mode
    if mode not in ("nvfp4_weight_only", "nvfp4_emulated") or cfg.keep_master_weights:
        raise ValueError(f"quantize_model: {len(names)} block linears hold a pre-quantized NVFP4 checkpoint's weights "
                         f"(no BF16 weights to quantize); precision must be nvfp4_weight_only or nvfp4_emulated "
                         f"(W4A4, as the release runs it) for inference, got {cfg.mode!r}"
                         f"{' with master weights (training)' if cfg.keep_master_weights else ''}")
    wanted = NVFP4WeightOnlyLinear if mode == "nvfp4_weight_only" else NVFP4EmulatedLinear
    for name in names:
        layer = model.get_submodule(name)
        if type(layer) is not wanted:
            new = nvfp4_linear_from_packed(_packed_weight(layer), layer.bias, QuantConfig.for_inference(mode))
            new.prequantized = True
            _set_module(model, name, new)
    return mode


def make_quant_linear(linear: nn.Linear, mode: str, cfg: QuantConfig) -> nn.Module:
    """The quantized replacement of one linear for a resolved ``mode`` (not ``nvfp4``)."""
    if mode == "fp8":
        return Fp8Linear(linear, cfg)
    if mode == "nvfp4_emulated":
        return NVFP4EmulatedLinear(linear, cfg)
    if mode == "nvfp4_weight_only":
        return NVFP4WeightOnlyLinear(linear, cfg)
    if mode == "nvfp4_te":
        from impl.quant.te_linear import TENVFP4Linear
        return TENVFP4Linear(linear, stochastic_grads=cfg.quantize_grads, weight_2d=cfg.weight_2d)
    raise ValueError(f"quantize_model: unknown mode {mode!r}")


def block_linear_bytes(model: nn.Module, names: list[str] | None = None) -> int:
    """Bytes held by the block linears (weights, biases, quantized buffers), quantized or not."""
    return sum(module_bytes(model.get_submodule(n)) for n in (names or block_linear_names(model)))


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
