"""DiT checkpoint I/O: diffusers layout (native) and the original Wan / LongLive layout.

Our parameter names are diffusers' ``WanTransformer3DModel`` names, so a diffusers-format
Wan2.2-TI2V-5B folder (``transformer/diffusion_pytorch_model*.safetensors``) loads as is.
Original Wan / LongLive state dicts (``self_attn.q``, ``head.head``, ``modulation``, wrapped
in ``{"generator": ...}`` with ``model.`` / FSDP / compile prefixes) are converted by
:func:`original_to_diffusers`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a DiT state dict from a .safetensors / .pt / .pth file or a diffusers folder.

    Folders may be a diffusers pipeline root (``transformer/`` inside) or the transformer
    folder itself, with one or several (index-listed) safetensors shards.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors weights found (expected a diffusers transformer folder)")
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(shard)))
        return sd
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        # LongLive checkpoints nest the generator; prefer EMA weights only if asked (not here).
        for key in ("generator", "model", "state_dict"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        return obj
    raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r} (use .safetensors, .pt, .pth or a folder)")


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def load_dit_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Load weights in either layout into ``model`` strictly, naming missing/unexpected keys."""
    sd = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    sd = original_to_diffusers(sd) if is_original_layout(sd) else {_strip_prefixes(k): v for k, v in sd.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"checkpoint shapes do not match the model: {_describe(wrong)}")
    model.load_state_dict(sd, strict=True)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
