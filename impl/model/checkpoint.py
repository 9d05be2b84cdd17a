"""DiT checkpoint I/O: diffusers layout (native) and the original Wan / LongLive layout.

Our parameter names are diffusers' ``WanTransformer3DModel`` names, so a diffusers-format
Wan2.2-TI2V-5B folder (``transformer/diffusion_pytorch_model*.safetensors``) loads as is.
Original Wan / LongLive state dicts (``self_attn.q``, ``head.head``, ``modulation``, wrapped
in ``{"generator": ...}`` with ``model.`` / FSDP / compile prefixes) are converted by
:func:`original_to_diffusers`.

The release's exports load through the same :func:`load_dit_weights` (code study sections 5.8,
9.2), told apart by their top-level ``checkpoint_format``: the merged generators
(``longlive_generator_merged_lora`` / ``longlive_generator_merged_bf16``) are plain DiT weights;
the pre-quantized NVFP4 generator (``longlive_generator_nvfp4``, ``model_4o6.pt``) puts NVFP4
layers holding its codes bit for bit in place of the block linears
(:mod:`impl.quant.release_nvfp4`); Transformer Engine module state dicts are refused. Every
error names the file and what was expected, in one line (truncated, foreign, LoRA files given
as a DiT, mismatched keys or shapes).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from impl.errors import error_summary
from impl.io import save_safetensors
from impl.quant import release_nvfp4
from impl.quant.apply import _set_module, block_linear_names


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model."""


# Original Wan names -> diffusers names. Block-level patterns apply after "blocks.{i}.".
_BLOCK_RULES = [
    (r"self_attn\.q\.", "attn1.to_q."), (r"self_attn\.k\.", "attn1.to_k."),
    (r"self_attn\.v\.", "attn1.to_v."), (r"self_attn\.o\.", "attn1.to_out.0."),
    (r"self_attn\.norm_q\.", "attn1.norm_q."), (r"self_attn\.norm_k\.", "attn1.norm_k."),
    (r"cross_attn\.q\.", "attn2.to_q."), (r"cross_attn\.k\.", "attn2.to_k."),
    (r"cross_attn\.v\.", "attn2.to_v."), (r"cross_attn\.o\.", "attn2.to_out.0."),
    (r"cross_attn\.norm_q\.", "attn2.norm_q."), (r"cross_attn\.norm_k\.", "attn2.norm_k."),
    (r"norm3\.", "norm2."), (r"ffn\.0\.", "ffn.net.0.proj."), (r"ffn\.2\.", "ffn.net.2."),
    (r"modulation$", "scale_shift_table"),
]
_TOP_RULES = [
    (r"text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"time_projection\.1\.", "condition_embedder.time_proj."),
    (r"head\.head\.", "proj_out."), (r"head\.modulation$", "scale_shift_table"),
]
# Wrappers the official trainers add: WanDiffusionWrapper.model, FSDP, torch.compile.
_PREFIXES = ("model.", "_fsdp_wrapped_module.", "_orig_mod.", "module.")
_ORIGINAL_MARKERS = ("self_attn.", "cross_attn.", "head.head.", "time_projection.", "text_embedding.")
_LORA_TENSOR = re.compile(r"\.lora_(A|B|magnitude_vector)\.")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._fsdp_wrapped_module.", ".").replace("._orig_mod.", ".")
    return key


def _apply(rules, key: str) -> str:
    for pattern, repl in rules:
        new = re.sub(r"^" + pattern, repl, key)
        if new != key:
            return new
    return key


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original Wan / LongLive DiT state dict to diffusers names."""
    out = {}
    for key, value in sd.items():
        key = _strip_prefixes(key)
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        key = f"blocks.{m.group(1)}.{_apply(_BLOCK_RULES, m.group(2))}" if m else _apply(_TOP_RULES, key)
        out[key] = value
    return out


def _invert(rules):
    # Patterns are plain names with escaped dots; build the reverse mapping.
    return [(re.escape(repl), pat.replace("\\.", ".").rstrip("$")) for pat, repl in rules]


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping (for writing checkpoints the official release can read)."""
    block_rules, top_rules = _invert(_BLOCK_RULES), _invert(_TOP_RULES)
    out = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        key = f"blocks.{m.group(1)}.{_apply(block_rules, m.group(2))}" if m else _apply(top_rules, key)
        out[key] = value
    return out


def is_original_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(marker in _strip_prefixes(k) for k in sd for marker in _ORIGINAL_MARKERS)


# Top-level ``checkpoint_format`` values of the release's exports (code study sections 5.8, 9.2).
MERGED_FORMATS = ("longlive_generator_merged_lora", "longlive_generator_merged_bf16")
NVFP4_FORMAT = release_nvfp4.FORMAT      # "longlive_generator_nvfp4"
REJECTED_FORMATS = {
    "longlive_generator_te_nvfp4": "a Transformer Engine module state dict (TE's own quantized parameters, which "
                                   "the release rejects too); use the merged BF16 export (save_merged_nvfp4_generator.py "
                                   "--backend transformer_engine) or the FourOverSix NVFP4 one (--backend fouroversix)",
}
_NESTED = ("generator", "model", "state_dict")
_EXPECTED = ("expected a Wan2.2-TI2V DiT state dict: a diffusers transformer folder or .safetensors, or a "
             ".pt/.pth of tensors (optionally under 'generator' / 'model' / 'state_dict', original Wan / LongLive "
             "names allowed)")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file says about itself besides its tensors."""

    path: str | None = None
    format: str | None = None          # top-level ``checkpoint_format`` (release exports), else None
    version: int | None = None         # top-level ``checkpoint_version``
    meta: Mapping[str, object] = field(default_factory=dict)   # other non-tensor top-level entries


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise CheckpointError(f"{path}: cannot read as safetensors (truncated or corrupt?): {error_summary(e)}; "
                              f"{_EXPECTED}") from None


def _torch_load(path: Path) -> object:
    """``torch.load`` (tensors and plain containers only), with one-line errors naming ``path``."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises OSError/RuntimeError/UnpicklingError/EOFError
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint (truncated, corrupt or not a "
                              f"torch.save file?): {error_summary(e)}") from None


def _preview(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:4]
        return f"a dict with keys {keys}{' ...' if len(obj) > 4 else ''}"
    return f"a {type(obj).__name__}"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read a DiT state dict and what the file says about itself.

    Files: ``.safetensors``, ``.pt`` / ``.pth`` / ``.bin`` (a state dict, or one nested under
    ``generator`` / ``model`` / ``state_dict``, the release's exports with their top-level
    ``checkpoint_format``), or a diffusers folder (a pipeline root with ``transformer/`` inside,
    or the transformer folder, with one or several safetensors shards). Errors are one line
    naming the file and what was expected (:class:`CheckpointError`).
    """
    path = Path(path)
    if path.is_dir() and (path / "trainer.json").is_file():   # an impl.train checkpoint_<step> folder
        if (path / "model.safetensors").is_file():
            return _load_safetensors(path / "model.safetensors"), CheckpointInfo(str(path / "model.safetensors"))
        raise CheckpointError(f"{path}: a sharded training checkpoint (no model.safetensors); export its weights "
                              f"first: python -m impl.train.checkpoint export {path} OUT.safetensors")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors weights found (expected a diffusers transformer folder)")
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(_load_safetensors(shard))
        return sd, CheckpointInfo(str(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), CheckpointInfo(str(path))
    if path.suffix not in (".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r} (use .safetensors, .pt, .pth or a folder)")
    obj = _torch_load(path)
    top = obj if isinstance(obj, dict) else {}
    if "generator_lora" in top and not any(k in top for k in _NESTED):
        raise CheckpointError(f"{path}: a standalone LoRA file ('generator_lora'), not a DiT checkpoint; pass it "
                              f"with --lora and the base DiT with --dit or --weights")
    for key in _NESTED:
        if key in top and isinstance(top[key], dict):
            obj = top[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (got {_preview(obj)}); {_EXPECTED}")
    meta = {k: v for k, v in top.items() if k not in _NESTED and not isinstance(v, torch.Tensor)
            and not (isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()))}
    fmt, version = top.get("checkpoint_format"), top.get("checkpoint_version")
    return obj, CheckpointInfo(str(path), fmt if isinstance(fmt, str) else None,
                               version if isinstance(version, int) else None, meta)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a DiT state dict from a .safetensors / .pt / .pth file or a diffusers folder
    (:func:`read_checkpoint` without the file's self-description)."""
    return read_checkpoint(path)[0]


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def _to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return original_to_diffusers(sd) if is_original_layout(sd) else {_strip_prefixes(k): v for k, v in sd.items()}


def _check_format(info: CheckpointInfo, where: str) -> None:
    fmt = info.format
    if fmt in REJECTED_FORMATS:
        raise CheckpointError(f"{where}: checkpoint_format {fmt!r} is {REJECTED_FORMATS[fmt]}")
    if fmt == NVFP4_FORMAT and info.version not in (None, 1):
        raise CheckpointError(f"{where}: {NVFP4_FORMAT} version {info.version} is not supported (expected 1)")
    if fmt is not None and fmt not in (*MERGED_FORMATS, NVFP4_FORMAT) and fmt.startswith("longlive_"):
        warnings.warn(f"{where}: unknown checkpoint_format {fmt!r} (known: {', '.join((*MERGED_FORMATS, NVFP4_FORMAT))}); "
                      f"loading its tensors as a DiT state dict", stacklevel=3)


def _mismatch(where: str, expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> str | None:
    """One line naming the missing / unexpected keys and wrong shapes, or None if ``sd`` fits."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing and len(missing) == len(expected):
        return (f"{where}: not a checkpoint of this DiT: none of its {len(sd)} tensors is one of the model's "
                f"{len(expected)} (expected names like blocks.0.attn1.to_q.weight, or original Wan "
                f"blocks.0.self_attn.q.weight); the file holds e.g. {_describe(sorted(sd), 4)}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        return (f"{where}: checkpoint does not match the model (a truncated export, or another architecture "
                f"or depth?); " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        return f"{where}: checkpoint shapes do not match the model (another model width?): {_describe(wrong)}"
    return None


def load_dit_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                     precision: str | None = None, nvfp4_rule: str | None = None) -> CheckpointInfo:
    """Load weights in either layout into ``model`` strictly, naming the file and the
    missing / unexpected keys; returns what the file says about itself.

    Accepted besides plain state dicts: the release's merged generators
    (``checkpoint_format`` ``longlive_generator_merged_lora`` / ``..._merged_bf16``: ordinary
    DiT weights) and its pre-quantized NVFP4 generator (``longlive_generator_nvfp4``,
    ``model_4o6.pt``; any file with ``quantized_weight_values`` buffers): its block linears are
    replaced by NVFP4 layers holding the file's codes and scales bit for bit
    (impl/quant/release_nvfp4.py), which :func:`impl.quant.apply.quantize_model` keeps.
    ``precision``: the run's block-linear format; for a pre-quantized file ``nvfp4_weight_only``
    (also the default, None, with a warning naming the flag) or ``nvfp4_emulated`` / ``nvfp4``
    (W4A4); any other is an error, since the file has no BF16 block weights. ``nvfp4_rule``:
    the file's weight scale rule when its metadata does not record one (default ``mse``).
    """
    if isinstance(source, Mapping):
        sd, info = dict(source), CheckpointInfo()
    else:
        sd, info = read_checkpoint(source)
    where = info.path or "state dict"
    _check_format(info, where)
    if any(_LORA_TENSOR.search(k) for k in sd):
        raise CheckpointError(f"{where}: holds LoRA tensors (lora_A / lora_B), not a DiT checkpoint; pass a LoRA "
                              f"file with --lora and the base DiT with --dit or --weights")
    sd = _to_diffusers(sd)
    if release_nvfp4.is_prequantized(sd):
        _load_prequantized(model, sd, info, where, precision, nvfp4_rule)
        return info
    if info.format == NVFP4_FORMAT:
        raise CheckpointError(f"{where}: declares checkpoint_format {NVFP4_FORMAT!r} but holds no "
                              f"quantized_weight_* buffers (a truncated or hand-edited export?)")
    error = _mismatch(where, model.state_dict(), sd)
    if error:
        raise CheckpointError(error)
    model.load_state_dict(sd, strict=True)
    return info


def _load_prequantized(model: nn.Module, sd: dict[str, torch.Tensor], info: CheckpointInfo, where: str,
                       precision: str | None, rule: str | None) -> None:
    """Swap the block linears of ``model`` for NVFP4 layers holding the file's codes, then load
    the other tensors strictly. Everything is checked before ``model`` changes."""

    mode = {None: "nvfp4_weight_only", "nvfp4_weight_only": "nvfp4_weight_only",
            "nvfp4_emulated": "nvfp4_emulated", "nvfp4": "nvfp4_emulated"}.get(precision)
    if mode is None:
        raise CheckpointError(f"{where}: a pre-quantized NVFP4 checkpoint ({NVFP4_FORMAT}) holds no BF16 block-linear "
                              f"weights; run it with --precision nvfp4_weight_only or nvfp4_emulated, not {precision!r} "
                              f"(or load the release's merged BF16 generator instead)")
    plain, quant = release_nvfp4.split_prequantized(sd)
    try:
        rule = release_nvfp4.resolve_rule(info.meta.get("quantization"), where, rule)
        layers = release_nvfp4.build_prequantized_layers(model, quant, plain, rule, mode)
    except release_nvfp4.ReleaseNVFP4Error as e:
        raise CheckpointError(f"{where}: not a valid {NVFP4_FORMAT} checkpoint for this model: {e}") from None
    expected = {k: v for k, v in model.state_dict().items()
                if k.rpartition(".")[0] not in layers}   # the swapped linears' weight and bias come from `layers`
    rest = {k: v for k, v in plain.items() if k.rpartition(".")[0] not in layers}
    error = _mismatch(where, expected, rest)
    if error:
        raise CheckpointError(error)
    for name, layer in layers.items():
        _set_module(model, name, layer)
    model.load_state_dict(rest, strict=False)
    if precision is None:
        warnings.warn(f"{where}: pre-quantized NVFP4 checkpoint: {len(layers)} block linears hold its codes as NVFP4 "
                      f"weight-only layers whatever the run's precision; run with --precision nvfp4_weight_only "
                      f"(or nvfp4_emulated for the release's W4A4)", stacklevel=3)
    masters = [f"{n}.weight" for n in layers if f"{n}.weight" in plain]
    if masters:
        warnings.warn(f"{where}: ignored {len(masters)} BF16 weights of linears the file also holds quantized "
                      f"(e.g. {masters[0]}); the quantized codes are used", stacklevel=3)


def save_dit_weights(model: nn.Module, path: str | os.PathLike, *, layout: str = "diffusers",
                     metadata: Mapping[str, object] | None = None) -> Path:
    """Write ``model``'s weights as safetensors (atomically), in ``diffusers`` or ``original`` layout."""
    if layout not in ("diffusers", "original"):
        raise CheckpointError(f"layout: must be 'diffusers' or 'original', got {layout!r}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if layout == "original":
        sd = diffusers_to_original(sd)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"layout": layout, **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    return save_safetensors(path, sd, meta)


def export_release_checkpoint(model: nn.Module, path, rule: str = release_nvfp4.DEFAULT_RULE, *,
                              extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (plain BF16 block linears) as the release's pre-quantized NVFP4
    generator: original Wan names, the block linears as ``quantized_weight_*`` buffers from our
    quantizer, everything else as it is (for tests, and for users of the release's loader)."""
    names = set(block_linear_names(model))
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in names and leaf == "weight":
            for k, v in release_nvfp4.quantize_to_release(value.detach().cpu(), rule).items():
                sd[f"{module}.{k}"] = v
        else:
            sd[key] = value.detach().cpu()
    obj = {"generator": diffusers_to_original(sd), "checkpoint_format": NVFP4_FORMAT,
           "checkpoint_version": release_nvfp4.FORMAT_VERSION, "merged_lora": False, "quantization": {"backend": "fouroversix", "weight_scale_rule": rule,
                                                  "activation_scale_rule": rule}, **(extra or {})}
    torch.save(obj, str(path))
