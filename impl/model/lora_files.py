"""LoRA files: writing ours, reading ours, the release's and peft's, and loading one into a model.

Our format (:func:`save_lora`, :func:`read_lora_metadata`) is a safetensors file: tensor names
``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r] (peft's names without
the adapter name), metadata strings ``format`` (:data:`FORMAT`), ``format_version``, ``rank``,
``alpha``, ``dropout``, ``target_modules`` (JSON list), ``base_model_hash``
(:func:`impl.model.lora.base_fingerprint` of the base weights it was trained on),
``training_steps`` and any caller ``extra`` keys.

The release's standalone LoRA ``.pt`` (``{"generator_lora": peft state dict, "critic_lora": ...,
"step": ...}``) and bare peft state dicts load through the same :func:`load_lora` (key names
mapped onto ours, rank from the shapes, alpha the release's 128; no base fingerprint to check,
so a warning instead). :func:`lora_sampling_steps` / :func:`sampling_steps_warning` tell a
builder when a LoRA distilled for N sampler steps runs at another count.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from impl.errors import error_summary
from impl.model.lora import (LoraError, LoraSpec, add_lora, base_fingerprint, current_spec, expected_shapes,
                             lora_state_dict)

FORMAT = "longlive2-lora"
FORMAT_VERSION = 1
RESERVED_KEYS = ("format", "format_version", "rank", "alpha", "dropout", "target_modules",
                 "base_model_hash", "training_steps")


# ----------------------------------------------------------------------------- our files

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


def _is_torch_file(path: str | os.PathLike) -> bool:
    """A torch.save file (zip, or legacy pickle), told apart from safetensors by structure: a
    safetensors file whose header length ends in 0x80 starts with the pickle protocol byte."""
    from impl.io import weight_file_format
    return weight_file_format(path) in ("torch_zip", "torch_pickle")


def _torch_load(path: str | os.PathLike, mmap: bool = False) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises OSError/RuntimeError/UnpicklingError/EOFError
        raise LoraError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {error_summary(e)}; "
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
        raise LoraError(f"{path}: not a safetensors file ({error_summary(e)}) nor a PyTorch .pt; {_EXPECTED_LORA}") from None
    if meta.get("format") == FORMAT or not keys or not all(_PEFT_TENSOR.match(k) for k in keys):
        spec, meta = read_lora_metadata(path)    # our format, or the error saying what it is not
        return spec, meta, None
    try:
        sd = load_file(str(path))     # peft's adapter_model.safetensors
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise LoraError(f"{path}: cannot read its tensors (truncated?): {error_summary(e)}") from None
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
            raise LoraError(f"{path}: cannot read its tensors (truncated or corrupt?): {error_summary(e)}") from None
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
