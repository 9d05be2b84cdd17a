"""Standalone LoRA weights for the few-step (DMD) generator, built on peft (code study §9.2).

The release wraps every block linear (self-attn q/k/v/o, cross-attn q/k/v/o, FFN fc1/fc2:
10 per block, 300 in the 5B model) with ``peft.LoraConfig(r=128, lora_alpha=128,
lora_dropout=0)``; B starts at zero, so the wrapped model equals the base at step 0. Here:

* :func:`add_lora` injects peft LoRA layers into our own model class in place
  (``peft.inject_adapter_in_model``; no ``PeftModel`` wrapper), freezes everything else;
* :func:`lora_state_dict` / :func:`save_lora` / :func:`load_lora` move the LoRA tensors
  alone through a safetensors file whose metadata records the spec, the number of training
  steps and a fingerprint of the base weights it was trained on (:func:`base_fingerprint`);
* :func:`merge_and_unload` folds ``W <- W + (alpha/r) B A`` into the base linears and puts
  plain ``nn.Linear`` layers back (required before FP8 / NVFP4 quantization).

The release's standalone LoRA ``.pt`` (``{"generator_lora": peft state dict, "critic_lora": ...,
"step": ...}``) and bare peft state dicts load through the same :func:`load_lora` (key names
mapped onto ours, rank from the shapes, alpha the release's 128; no base fingerprint to check,
so a warning instead). :func:`lora_sampling_steps` / :func:`sampling_steps_warning` tell a
builder when a LoRA distilled for N sampler steps runs at another count.

File layout: tensor names ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight``
[out, r] (peft's names without the adapter name), metadata strings ``format``
(:data:`FORMAT`), ``format_version``, ``rank``, ``alpha``, ``dropout``, ``target_modules``
(JSON list), ``base_model_hash``, ``training_steps`` and any caller ``extra`` keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from impl.quant.apply import block_linear_names, merge_lora

FORMAT = "longlive2-lora"
FORMAT_VERSION = 1
RESERVED_KEYS = ("format", "format_version", "rank", "alpha", "dropout", "target_modules",
                 "base_model_hash", "training_steps")

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


# ----------------------------------------------------------------------------- files

def save_lora(path: str | os.PathLike, model: nn.Module, spec: LoraSpec | None = None, *, steps: int,
              base_hash: str, extra: dict | None = None, adapter_name: str | None = None,
              state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA tensors of ``model`` (in their own dtype) and metadata to a safetensors
    file, atomically (temp file in the same folder, then ``os.replace``).

    ``state``: the LoRA tensors to write instead of ``lora_state_dict(model)``; an FSDP-sharded
    model passes :func:`impl.parallel.fsdp.gather_lora_state_dict` (its own tensors are shards).

    ``spec`` defaults to the spec read from the model's LoRA layers; a given ``spec`` must
    agree with them. ``base_hash`` is :func:`base_fingerprint` of the base weights the LoRA
    was trained on. ``extra`` values are stored as strings (non-strings JSON-encoded); its
    keys may not shadow the reserved ones.
    """
    have = current_spec(model, adapter_name)
    if have is None:
        raise LoraError("save_lora: the model carries no LoRA layers")
    if spec is None:
        spec = have
    else:
        resolved = LoraSpec(spec.rank, spec.alpha, spec.dropout, spec.targets or have.targets)
        if not resolved.same_as(have):
            raise LoraError(f"save_lora: spec (rank {spec.rank}, alpha {spec.alpha}, "
                            f"{len(resolved.targets)} targets) differs from the model's LoRA (rank {have.rank}, "
                            f"alpha {have.alpha}, {len(have.targets)} targets)")
        spec = LoraSpec(spec.rank, spec.alpha, spec.dropout, have.targets)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise LoraError(f"save_lora: steps must be an integer >= 0, got {steps!r}")
    if not isinstance(base_hash, str) or not base_hash:
        raise LoraError("save_lora: base_hash must be a non-empty string (see base_fingerprint)")
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "rank": str(spec.rank),
            "alpha": repr(float(spec.alpha)), "dropout": repr(float(spec.dropout)),
            "target_modules": json.dumps(list(spec.targets)), "base_model_hash": base_hash,
            "training_steps": str(steps)}
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or k in RESERVED_KEYS:
            raise LoraError(f"save_lora: extra key {k!r} is reserved or not a string")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    if state is None:
        state = lora_state_dict(model, adapter_name)
        if any(type(v).__name__ == "DTensor" for v in state.values()):
            raise LoraError("save_lora: the model is sharded (FSDP); pass "
                            "state=impl.parallel.fsdp.gather_lora_state_dict(model), called on every rank")
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}

    from impl.io import save_safetensors
    return save_safetensors(path, tensors, meta)


def read_lora_metadata(path: str | os.PathLike) -> tuple[LoraSpec, dict[str, str]]:
    """(spec, all metadata strings) of a LoRA file; :class:`LoraError` if it is not one."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad headers
        raise LoraError(f"{path}: not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise LoraError(f"{path}: not a LoRA file of format {FORMAT!r} (metadata format="
                        f"{meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise LoraError(f"{path}: LoRA format version {meta.get('format_version')!r} is not supported "
                        f"(expected {FORMAT_VERSION})")
    try:
        targets = json.loads(meta["target_modules"])
        spec = LoraSpec(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                        dropout=float(meta.get("dropout", "0.0")), targets=tuple(targets))
        int(meta["training_steps"])
        meta["base_model_hash"]
    except (KeyError, ValueError, TypeError) as e:
        raise LoraError(f"{path}: malformed LoRA metadata ({type(e).__name__}: {e})") from e
    return spec, meta


# ----------------------------------------------------------------------------- the release's files

# The release's standalone LoRA (code study section 9.2): a torch.save'd
# {"generator_lora": peft state dict (lora_A / lora_B only), "critic_lora": ..., "step": N},
# r = alpha = 128 over all 300 block linears. The file records neither rank nor alpha: the rank
# is read from the tensor shapes, alpha is the release's 128 unless load_lora(alpha=...) says.
RELEASE_NETWORK = "generator_lora"
RELEASE_RANK = 128
RELEASE_ALPHA = 128.0
SKIP_BASE_CHECK_FLAG = "--lora-skip-base-check"    # repro generate's override of the base check
# peft tensor names: <module>.lora_A[.<adapter>].weight, the module possibly under peft's
# "base_model.model." and the trainers' wrappers, in original Wan or diffusers names.
_PEFT_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."
_EXPECTED_LORA = (f"expected a LoRA file: our safetensors (metadata format {FORMAT!r}) or the release's standalone "
                  f"LoRA .pt ({{'{RELEASE_NETWORK}': peft state dict of lora_A / lora_B tensors, 'critic_lora': ..., "
                  f"'step': ...}})")


def _one_line(e: BaseException) -> str:
    from impl.model.checkpoint import _first_line
    return _first_line(e)


def _is_torch_file(path: str | os.PathLike) -> bool:
    """A torch.save file (zip, or legacy pickle), told apart from safetensors by structure: a
    safetensors file whose header length ends in 0x80 starts with the pickle protocol byte."""
    from impl.io import weight_file_format
    return weight_file_format(path) in ("torch_zip", "torch_pickle")


def _torch_load(path: str | os.PathLike, mmap: bool = False) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises OSError/RuntimeError/UnpicklingError/EOFError
        raise LoraError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {_one_line(e)}; "
                        f"{_EXPECTED_LORA}") from None


def _module_name(key: str) -> str:
    """A peft module path -> our (diffusers) module name."""
    from impl.model.checkpoint import _strip_prefixes, original_to_diffusers
    prev = None
    while prev != key:
        prev = key
        key = _strip_prefixes(key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key)
    # the mapping works on tensor names: map "<module>.weight" and drop the suffix again
    return next(iter(original_to_diffusers({f"{key}.weight": None}))).rsplit(".", 1)[0]


def peft_to_lora_tensors(sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], int]:
    """A peft LoRA state dict (any of peft's spellings, original Wan or diffusers module names)
    -> (our tensor names ``<module>.lora_A.weight`` / ``.lora_B.weight``, the rank)."""
    out: dict[str, torch.Tensor] = {}
    adapters, bad = set(), []
    for key, value in sd.items():
        m = _PEFT_TENSOR.match(key)
        if m is None or not isinstance(value, torch.Tensor) or value.dim() != 2:
            bad.append(key)
            continue
        adapters.add(m.group("adapter"))
        name = f"{_module_name(m.group('module'))}.{m.group('ab')}.weight"
        if name in out:
            raise LoraError(f"{where}: two tensors map to {name} (several adapters or wrappers in one file?)")
        out[name] = value
    if bad:
        raise LoraError(f"{where}: {len(bad)} entries are not peft LoRA A/B matrices (2-D '<module>.lora_A.weight' / "
                        f"'.lora_B.weight'), e.g. {bad[0]!r}; {_EXPECTED_LORA}")
    if not out:
        raise LoraError(f"{where}: the LoRA state dict is empty; {_EXPECTED_LORA}")
    if len(adapters) > 1:
        raise LoraError(f"{where}: tensors of several peft adapters {sorted(a or '(none)' for a in adapters)}")
    modules = sorted({k.rsplit(".", 2)[0] for k in out})
    half = [m for m in modules if f"{m}.lora_A.weight" not in out or f"{m}.lora_B.weight" not in out]
    if half:
        raise LoraError(f"{where}: {len(half)} module(s) have lora_A without lora_B or the reverse, e.g. {half[0]}")
    ranks = {out[f"{m}.lora_A.weight"].shape[0] for m in modules} | {out[f"{m}.lora_B.weight"].shape[1] for m in modules}
    if len(ranks) != 1:
        raise LoraError(f"{where}: LoRA matrices of mixed ranks {sorted(ranks)}")
    return out, ranks.pop()


def _read_any_lora(path: str | os.PathLike, alpha: float | None
                   ) -> tuple[LoraSpec, dict[str, str], dict[str, torch.Tensor] | None]:
    """(spec, metadata, tensors or None) of a LoRA file in either layout. Our format returns
    its spec and no tensors yet (they are read after the cheap checks); the release's and bare
    peft files return their tensors and a spec without targets (``targets=None``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    release_alpha = RELEASE_ALPHA if alpha is None else float(alpha)
    if _is_torch_file(path):
        obj = _torch_load(path)
        if isinstance(obj, dict) and RELEASE_NETWORK in obj and isinstance(obj[RELEASE_NETWORK], dict):
            sd, layout = obj[RELEASE_NETWORK], f"the release's standalone LoRA ('{RELEASE_NETWORK}')"
        elif isinstance(obj, dict) and obj and all(isinstance(k, str) and _PEFT_TENSOR.match(k) for k in obj):
            sd, layout = obj, "a peft LoRA state dict"
        else:
            keys = list(obj)[:4] if isinstance(obj, dict) else type(obj).__name__
            raise LoraError(f"{path}: not a LoRA file (holds {keys}); {_EXPECTED_LORA}")
        step = obj.get("step") if isinstance(obj, dict) else None
        tensors, rank = peft_to_lora_tensors(sd, str(path))
        meta = {"format": "release", "layout": layout, "alpha_source": "file" if alpha is None else "argument"}
        if isinstance(step, int):
            meta["training_steps"] = str(step)
        if isinstance(obj.get("sampling_steps"), int):
            meta["sampling_steps"] = str(obj["sampling_steps"])
        return LoraSpec(rank=rank, alpha=release_alpha), meta, tensors
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad headers
        raise LoraError(f"{path}: not a safetensors file ({_one_line(e)}) nor a PyTorch .pt; {_EXPECTED_LORA}") from None
    if meta.get("format") == FORMAT or not keys or not all(_PEFT_TENSOR.match(k) for k in keys):
        spec, meta = read_lora_metadata(path)    # our format, or the error saying what it is not
        return spec, meta, None
    try:
        sd = load_file(str(path))     # peft's adapter_model.safetensors
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise LoraError(f"{path}: cannot read its tensors (truncated?): {_one_line(e)}") from None
    tensors, rank = peft_to_lora_tensors(sd, str(path))
    return LoraSpec(rank=rank, alpha=release_alpha), {"format": "peft", "layout": "a peft safetensors LoRA"}, tensors


def lora_sampling_steps(path: str | os.PathLike) -> int | None:
    """The sampler step count a LoRA file was distilled for (metadata ``sampling_steps``,
    written by ``impl.train.distill``), or None when the file does not record it (the release's
    .pt files do not). Reads the header / top level only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if _is_torch_file(path):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped
            obj = _torch_load(path)
        value = obj.get("sampling_steps") if isinstance(obj, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    _, meta = read_lora_metadata(path)
    raw = meta.get("sampling_steps")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sampling_steps_warning(path: str | os.PathLike, steps: int) -> str | None:
    """A warning text when the LoRA at ``path`` was distilled for another step count than the
    pipeline's ``steps`` (the builder shows it), else None (same count, or not recorded)."""
    distilled = lora_sampling_steps(path)
    if distilled is None or distilled == steps:
        return None
    return (f"--lora {path}: this LoRA was distilled for {distilled} sampling steps, but the pipeline runs {steps} "
            f"(--steps {distilled} matches it); a few-step LoRA is only calibrated for its own step count")


# ----------------------------------------------------------------------------- loading

def load_lora(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True,
              adapter_name: str | None = None, alpha: float | None = None) -> LoraSpec:
    """Load a LoRA file into ``model`` and return its spec.

    Files: ours (safetensors, :func:`save_lora`), the release's standalone LoRA ``.pt``
    (``{"generator_lora": peft state dict, "critic_lora": ..., "step": ...}``; peft names with or
    without ``base_model.model.`` and the adapter name, original Wan or diffusers module names)
    and bare peft state dicts (.pt or safetensors). For the release's files the rank comes from
    the tensors and alpha is ``alpha`` (default the release's 128); they record no base
    fingerprint, so they load with a warning instead of the base check.

    If the model has no LoRA, it is injected with the file's spec (:func:`add_lora`; base
    frozen); if it has, its spec must match. Checked before anything is changed: the target
    modules exist, every tensor is present with the shape the model needs (strict: no
    missing or unexpected tensors), and, unless ``check_base=False`` (``repro generate
    --lora-skip-base-check``), the base weights' :func:`base_fingerprint` equals the one
    recorded in the file (costs one read of the weights). ``adapter_name``: which adapter to
    load into when the model holds several; a fresh injection is named ``"default"`` unless given.
    """
    from safetensors.torch import load_file

    spec, meta, tensors = _read_any_lora(path, alpha)
    if spec.targets is None:   # release / peft file: the targets are the modules it holds, in model order
        held = {k.rsplit(".", 2)[0] for k in tensors}
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        spec = LoraSpec(spec.rank, spec.alpha, spec.dropout, tuple(sorted(held, key=lambda n: (order.get(n, 1 << 60), n))))
    have = current_spec(model, adapter_name)
    if have is not None and not spec.same_as(have):
        raise LoraError(f"{path}: LoRA spec (rank {spec.rank}, alpha {spec.alpha}, {len(spec.targets)} targets) "
                        f"differs from the LoRA already in the model (rank {have.rank}, alpha {have.alpha}, "
                        f"{len(have.targets)} targets)")
    modules = dict(model.named_modules())
    missing_mods = [t for t in spec.targets if t not in modules]
    if missing_mods:
        raise LoraError(f"{path}: {len(missing_mods)} LoRA target module(s) are missing in the model, "
                        f"e.g. {missing_mods[:3]} (LoRA for another architecture or depth?)")
    quantized = [t for t in spec.targets if getattr(modules[t], "prequantized", False)]
    if quantized:
        raise LoraError(f"{path}: the base DiT is a pre-quantized NVFP4 checkpoint (its block linears hold NVFP4 codes, "
                        f"no BF16 weights to merge into); the release merges LoRA before quantizing: use the BF16 "
                        f"generator with --dit and this --lora, or the NVFP4 export of the merged model without --lora")
    want = expected_shapes(model, spec)
    if tensors is None:
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise LoraError(f"{path}: cannot read its tensors (truncated or corrupt?): {_one_line(e)}") from None
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise LoraError(f"{path}: LoRA tensors do not match its target modules: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    bad = [(k, tuple(tensors[k].shape), want[k]) for k in want if tuple(tensors[k].shape) != want[k]]
    if bad:
        k, got, exp = bad[0]
        raise LoraError(f"{path}: {len(bad)} LoRA tensor(s) have the wrong shape, e.g. {k}: file {got}, "
                        f"model needs {exp} (LoRA trained for another model width?)")
    if "base_model_hash" not in meta:
        note = (f"; rank {spec.rank} from the tensors, alpha {spec.alpha:g} "
                f"({'the release default' if alpha is None else 'as given'})")
        if alpha is None and spec.rank != RELEASE_RANK:
            note += f" although the release trains rank {RELEASE_RANK} (pass alpha= if it was trained otherwise)"
        warnings.warn(f"--lora {path}: {meta.get('layout', 'this LoRA file')} records no fingerprint of the base "
                      f"weights it was trained on, so it cannot be checked against the DiT given with --dit / "
                      f"--weights; loading it unchecked{note}", stacklevel=2)
    elif check_base:
        ours = base_fingerprint(model)
        if ours != meta["base_model_hash"]:
            raise LoraError(f"{path}: base model hash mismatch: the LoRA was trained on base "
                            f"{meta['base_model_hash'][:16]}..., this model's base is {ours[:16]}... "
                            f"(pass {SKIP_BASE_CHECK_FLAG} to repro generate, or check_base=False, to load anyway)")
    if have is None:
        adapter_name = adapter_name or "default"
        add_lora(model, spec, adapter_name=adapter_name)
    live = lora_state_dict(model, adapter_name)
    with torch.no_grad():
        for k, dst in live.items():
            dst.copy_(tensors[k])
    return spec


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
