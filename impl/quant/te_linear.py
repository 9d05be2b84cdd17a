"""Transformer Engine's NVFP4 linear (``NVFP4BlockScaling``), where the GPU runs it.

TE implements the standard NVFP4 recipe (static 6/448 scales); the 4-over-6 rules of
:mod:`impl.quant.nvfp4` do not apply to it. NVFP4 GEMMs need a Blackwell GPU (compute
capability 10.x or 12.x); everywhere else :func:`te_nvfp4_status` says why not.
"""

from __future__ import annotations

import torch
from torch import nn

from impl.memory import module_bytes


def te_nvfp4_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason): whether ``nvfp4_te`` can run on ``device``."""
    try:
        import transformer_engine.pytorch as te  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import
        return False, f"Transformer Engine is not importable ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        return False, f"device {dev} is not a CUDA device"
    cap = torch.cuda.get_device_capability(dev)
    if cap[0] < 10:
        return False, (f"{torch.cuda.get_device_name(dev)} has compute capability {cap[0]}.{cap[1]}; "
                       f"NVFP4 tensor cores need Blackwell (10.x or 12.x)")
    check = getattr(te, "is_nvfp4_available", None)
    if check is not None:
        result = check()
        ok, reason = (result if isinstance(result, tuple) else (bool(result), "TE reports NVFP4 unavailable"))
        if not ok:
            return False, str(reason)
    return True, "ok"


def _autocast(te, recipe):
    # TE >= 2.8 names it ``autocast``; older releases ``fp8_autocast``.
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


class TENVFP4Linear(nn.Module):
    """Wraps ``transformer_engine.pytorch.Linear``; every forward runs in NVFP4 autocast."""

    def __init__(self, linear: nn.Linear, *, stochastic_grads: bool = True, weight_2d: bool = False):
        super().__init__()
        ok, reason = te_nvfp4_status(linear.weight.device)
        if not ok:
            raise RuntimeError(f"nvfp4_te cannot run here: {reason}. Use nvfp4_emulated (exact NVFP4 "
                               f"numerics anywhere) or nvfp4_weight_only (4-bit weight memory).")
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import NVFP4BlockScaling
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.linear = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                params_dtype=torch.bfloat16, device=linear.weight.device)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)
        self.recipe = NVFP4BlockScaling(disable_2d_quantization=not weight_2d,
                                        disable_stochastic_rounding=not stochastic_grads,
                                        disable_rht=True)
        self._te = te

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(self._te, self.recipe):
            return self.linear(x)

    def weight_bytes(self) -> int:
        return module_bytes(self)
