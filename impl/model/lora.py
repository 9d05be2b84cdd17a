"""LoRA on a live model, for the few-step (DMD) generator, built on peft (code study §9.2).

The release wraps every block linear (self-attn q/k/v/o, cross-attn q/k/v/o, FFN fc1/fc2:
10 per block, 300 in the 5B model) with ``peft.LoraConfig(r=128, lora_alpha=128,
lora_dropout=0)``; B starts at zero, so the wrapped model equals the base at step 0. Here:

* :class:`LoraSpec` holds the hyper-parameters and target modules;
* :func:`add_lora` injects peft LoRA layers into our own model class in place
  (``peft.inject_adapter_in_model``; no ``PeftModel`` wrapper), freezes everything else;
  :func:`current_spec` reads the spec back from the layers;
* :func:`lora_state_dict` / :func:`expected_shapes` name the LoRA tensors alone, and
  :func:`base_fingerprint` hashes the base weights a LoRA is trained on;
* :func:`merge_and_unload` folds ``W <- W + (alpha/r) B A`` into the base linears and puts
  plain ``nn.Linear`` layers back (required before FP8 / NVFP4 quantization).

LoRA files (ours, the release's ``.pt``, bare peft state dicts) are written and loaded by
:mod:`impl.model.lora_files`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from impl.quant.apply import block_linear_names, merge_lora

_LORA_KEY = re.compile(r"\.lora_[A-Za-z_]+\.")   # peft adapter tensors: lora_A, lora_B, lora_magnitude_vector, ...


class LoraError(ValueError):
    """A LoRA file or spec that does not fit the model (or is not a LoRA file at all)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters. ``targets=None`` means every block linear of the model
    (:func:`impl.quant.apply.block_linear_names`); otherwise exact module names."""

    rank: int = 128
    alpha: float = 128.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoraSpec: rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoraError(f"LoraSpec: alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoraSpec: dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None:
            if isinstance(self.targets, str):
                raise LoraError("LoraSpec: targets must be a sequence of module names, not a string")
            targets = tuple(self.targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise LoraError(f"LoraSpec: targets must be non-empty module names, got {self.targets!r}")
            if len(set(targets)) != len(targets):
                raise LoraError("LoraSpec: targets contain duplicates")
            object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def resolve_targets(self, model: nn.Module) -> tuple[str, ...]:
        """The target module names for ``model`` (which must not carry LoRA layers yet)."""
        return tuple(self.targets) if self.targets is not None else tuple(block_linear_names(model))

    def same_as(self, other: LoraSpec) -> bool:
        """Equal rank, alpha and target set (dropout does not change the weights)."""
        return (self.rank == other.rank and float(self.alpha) == float(other.alpha)
                and set(self.targets or ()) == set(other.targets or ()))


# ----------------------------------------------------------------------------- injection

def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` by module name (the names of the wrapped linears)."""
    return {n: m for n, m in model.named_modules() if _is_lora_layer(m)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def _adapter(layers: dict[str, nn.Module], adapter_name: str | None) -> str:
    names = set()
    for m in layers.values():
        names.update(m.lora_A.keys())
    if adapter_name is not None:
        if adapter_name not in names:
            raise LoraError(f"LoRA adapter {adapter_name!r} not in the model (adapters: {sorted(names)})")
        return adapter_name
    if len(names) != 1:
        raise LoraError(f"the model holds several LoRA adapters {sorted(names)}; pass adapter_name")
    return next(iter(names))


def current_spec(model: nn.Module, adapter_name: str | None = None) -> LoraSpec | None:
    """The spec of the LoRA injected in ``model`` (read from the layers), or None."""
    layers = lora_layers(model)
    if not layers:
        return None
    a = _adapter(layers, adapter_name)
    layers = {n: m for n, m in layers.items() if a in m.lora_A}
    ranks = {m.r[a] for m in layers.values()}
    alphas = {float(m.lora_alpha[a]) for m in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise LoraError(f"LoRA adapter {a!r} has mixed ranks {sorted(ranks)} / alphas {sorted(alphas)}")
    drop = next(iter(layers.values())).lora_dropout[a]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return LoraSpec(rank=ranks.pop(), alpha=alphas.pop(), dropout=p, targets=tuple(layers))


def add_lora(model: nn.Module, spec: LoraSpec | None = None, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA (peft) into the target linears of ``model`` in place and return it.

    B is zero-initialised (peft default), so outputs equal the base model's until training.
    Every non-LoRA parameter is frozen; only ``lora_A`` / ``lora_B`` require grad. The LoRA
    weights take the dtype and device of each base linear (fp32, fp64 and bf16 all work).
    """
    import peft

    spec = spec or LoraSpec()
    if has_lora(model):
        raise LoraError("add_lora: the model already carries LoRA layers; merge_and_unload() first")
    targets = spec.resolve_targets(model)
    if not targets:
        raise LoraError("add_lora: the model has no block linears to target (names starting with 'blocks.')")
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise LoraError(f"add_lora: {len(missing)} target module(s) not in the model, e.g. {missing[:3]}")
    wrong = [t for t in targets if not isinstance(modules[t], nn.Linear)]
    if wrong:
        raise LoraError(f"add_lora: targets must be nn.Linear; not: {wrong[:3]}")
    cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=list(targets), bias="none")
    peft.inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    got = set(lora_layers(model))
    if got != set(targets):  # peft matches by suffix: make sure nothing else was wrapped
        raise LoraError(f"add_lora: peft wrapped {sorted(got ^ set(targets))[:3]} unexpectedly")
    for name, p in model.named_parameters():
        p.requires_grad_(_LORA_KEY.search("." + name) is not None)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- state dicts

def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors only, named ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``
    (detached views of the live parameters; the adapter name is not part of the names)."""
    layers = lora_layers(model)
    if not layers:
        raise LoraError("lora_state_dict: the model carries no LoRA layers")
    a = _adapter(layers, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        if a in m.lora_A:
            out[f"{name}.lora_A.weight"] = m.lora_A[a].weight.detach()
            out[f"{name}.lora_B.weight"] = m.lora_B[a].weight.detach()
    return out


def expected_shapes(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """LoRA tensor name -> shape for ``spec`` on ``model`` (with or without LoRA injected)."""
    modules = dict(model.named_modules())
    out = {}
    for t in spec.resolve_targets(model):
        m = modules.get(t)
        base = m.base_layer if m is not None and _is_lora_layer(m) else m
        if not isinstance(base, nn.Linear):
            raise LoraError(f"target module {t!r} is missing in the model or is not a linear")
        out[f"{t}.lora_A.weight"] = (spec.rank, base.in_features)
        out[f"{t}.lora_B.weight"] = (base.out_features, spec.rank)
    return out


def _base_name(name: str) -> str | None:
    """State-dict name as in the model without LoRA; None for LoRA tensors."""
    if _LORA_KEY.search("." + name):
        return None
    return name.replace(".base_layer.", ".")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights: every non-LoRA state-dict entry (parameters and
    persistent buffers) by name, shape and values, in name order.

    Floating-point values are hashed after rounding to bfloat16, so the same checkpoint
    loaded in float32 (distillation) or bfloat16 (GPU inference) has one fingerprint, while
    genuinely different weights still differ.

    Names are those of the plain model (peft's ``.base_layer`` is removed), so the value is
    the same with or without LoRA injected, but changes once LoRA is merged. Cost: reading
    every weight once (device tensors are copied to CPU one at a time): about a second per
    few GB.
    """
    entries = {}
    for name, t in model.state_dict().items():
        base = _base_name(name)
        if base is not None:
            entries[base] = t
    h = hashlib.sha256()
    for name in sorted(entries):
        t = entries[name].detach()
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
        h.update(f"{name}|{tuple(t.shape)}|{t.is_floating_point()}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- merge

def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base linear (``W += (alpha/r) B A``, peft's
    ``merge(safe_merge=True)``) and put the plain linear back; returns ``model``.

    Uses :func:`impl.quant.apply.merge_lora`. Base parameters keep ``requires_grad=False``
    (call ``model.requires_grad_(True)`` to train the merged model).
    """
    merge_lora(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
