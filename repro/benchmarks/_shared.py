"""What several benchmarks declare or do the same way: fields taken from the system's typed
configs (so no benchmark re-types a list of allowed values), and the end of a GPU run (peak
memory, then freeing what the run allocated before the next variant starts).

The leading underscore keeps this module out of the benchmark registry scan.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from impl.config import PRESETS
from impl.inference.config import FIELD_HELP, InferenceConfig
from impl.modes import choices
from repro.benchmark import FieldSpec

_INFERENCE_FIELDS = {f.name: f for f in dataclasses.fields(InferenceConfig)}
# Benchmark fields are plain values; these InferenceConfig defaults are None ("the preset's").
_PLAIN_DEFAULTS = {"steps": 4, "guidance_scale": 1.0}


def preset_field(allowed: list[str] | None = None, default: str = "tiny", help: str = "model size preset") -> FieldSpec:
    """A ``preset`` field; ``allowed`` narrows :data:`impl.config.PRESETS` (default: all of them)."""
    return FieldSpec(str, default, choices=sorted(allowed or PRESETS), help=help)


def inference_field(name: str, **override: Any) -> FieldSpec:
    """The benchmark field of :class:`InferenceConfig` field ``name``: its type, default, allowed
    values (from :mod:`impl.modes`) and help. ``override`` replaces any of them (e.g. a
    narrower ``choices`` list for what a benchmark measures, or a different default)."""
    f = _INFERENCE_FIELDS[name]
    default = override.pop("default", _PLAIN_DEFAULTS.get(name, f.default))
    kind = {bool: bool, int: int, float: float}.get(type(default), str)
    spec: dict[str, Any] = {"help": FIELD_HELP[name]}
    literal_choices = _literal_choices(f.type)
    if literal_choices:
        spec["choices"] = list(literal_choices)
    if kind is int:
        spec["min"] = 1
    if name == "guidance_scale":
        spec["min"] = 1.0
    spec.update(override)
    return FieldSpec(kind, default, **spec)


def _literal_choices(annotation: Any) -> tuple[str, ...] | None:
    import impl.modes as modes
    if isinstance(annotation, str):   # postponed annotations: the Literal's name in impl.modes
        annotation = getattr(modes, annotation, None)
    try:
        return choices(annotation) if annotation is not None else None
    except TypeError:
        return None


SEED = FieldSpec(int, 0, min=0, help="seed of the weights and inputs")


def timing_fields(warmup: int, repeats: int, buffers: int | None = None) -> dict[str, FieldSpec]:
    """The measure fields of a repeated kernel timing (median of ``repeats`` calls)."""
    out = {"warmup": FieldSpec(int, warmup, min=0, help="untimed calls first (autotuning, graph builds)"),
           "repeats": FieldSpec(int, repeats, min=1, help="timed calls; the median is reported")}
    if buffers is not None:
        out["buffers"] = FieldSpec(int, buffers, min=1, help="input sets rotated over (defeats the L2 cache)")
    return out


def finish_gpu_run(metrics: dict[str, Any], device: Any) -> dict[str, Any]:
    """Add ``peak_mem_gb`` (CUDA) to ``metrics``, then collect garbage and return the caching
    allocator's free blocks, so the next variant starts from an empty device. The caller must
    have dropped its own references (``del``) first."""
    import torch
    if getattr(device, "type", device) == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    gc.collect()
    if getattr(device, "type", device) == "cuda":
        torch.cuda.empty_cache()
    return metrics


def vae_device_for(mode: str, device: Any) -> str | None:
    """``vae_mode: device`` decodes on a second GPU when there is one, else on the CPU."""
    import torch
    if mode != "device":
        return None
    return "cuda:1" if device.type == "cuda" and torch.cuda.device_count() > 1 else "cpu"
