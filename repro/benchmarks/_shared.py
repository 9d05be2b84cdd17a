"""What several benchmarks declare or do the same way: fields taken from the system's typed
configs (:func:`inference_field`, :func:`train_field`: so no benchmark re-types a list of
allowed values), the measure fields of a streaming run, a training run and a torchrun launch,
and the end of a GPU run (peak memory, then freeing what the run allocated before the next
variant starts).

The leading underscore keeps this module out of the benchmark registry scan.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from impl.config import PRESETS
from impl.inference.config import FIELD_HELP, InferenceConfig
from impl.modes import choices
from impl.train.config import TrainConfig
from repro.benchmark import FieldSpec

_INFERENCE_FIELDS = {f.name: f for f in dataclasses.fields(InferenceConfig)}
# Benchmark fields are plain values; these InferenceConfig defaults are None ("the preset's").
_PLAIN_DEFAULTS = {"steps": 4, "guidance_scale": 1.0}
# The denoising steps the benchmarks offer (the distilled few-step settings and the 8-step teacher).
_BENCHMARK_CHOICES = {"steps": [1, 2, 3, 4, 8]}

_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# As above: TrainConfig's num_layers None ("the preset's depth") is 0 in a benchmark variant.
_TRAIN_PLAIN_DEFAULTS = {"num_layers": 0}
TRAIN_FIELD_HELP = {
    "num_layers": "DiT depth override at the preset's width (0 = the preset's depth)",
    "frames": "latent frames per clip (teacher forcing doubles the tokens)",
    "dtype": "compute dtype of the model (the quantized precisions need bf16)",
    "precision": "format of the block linears (bf16 = not quantized: they run in dtype)",
    "sp_size": "sequence-parallel ranks",
    "sp_layout": "balanced: each rank holds the clean and noisy copy of one chunk; naive: a contiguous cut of "
                 "[clean; noisy]",
    "attention_backend": "teacher-forcing attention: FlexAttention (CUDA) or a dense mask",
    "gradient_checkpointing": "per-block activation checkpointing (each block recomputed in backward)",
    "compile": "torch.compile the blocks' pure halves (CausalWanDiT.compile_hot_path)",
    "sharding": "none = replicated parameters, float32 master weights and AdamW; fsdp = FSDP2 shards over all "
                "ranks. Records without it ran none",
    "offload": "fsdp: shards, gradients and AdamW state in CPU memory",
}

# The model sizes the speed benchmarks run (``proxy`` is the quality proxy's own preset).
SPEED_PRESETS = ["tiny", "small", "wan22_ti2v_5b"]


def preset_field(allowed: list[str] | None = None, default: str = "tiny", help: str = "model size preset") -> FieldSpec:
    """A ``preset`` field; ``allowed`` narrows :data:`impl.config.PRESETS` (default: all of them)."""
    return FieldSpec(str, default, choices=sorted(allowed or PRESETS), help=help)


def inference_field(name: str, **override: Any) -> FieldSpec:
    """The benchmark field of :class:`InferenceConfig` field ``name``: its type, default, allowed
    values (from :mod:`impl.modes`) and help. ``override`` replaces any of them (e.g. a
    narrower ``choices`` list for what a benchmark measures, or a different default)."""
    f = _INFERENCE_FIELDS[name]
    default = override.pop("default", _PLAIN_DEFAULTS.get(name, f.default))
    spec: dict[str, Any] = {"min": 1.0} if name == "guidance_scale" else {}
    if name in _BENCHMARK_CHOICES:
        spec["choices"] = list(_BENCHMARK_CHOICES[name])
    return _config_field(f, default, **{"help": FIELD_HELP[name], **spec, **override})


def inference_fields(*names: str) -> dict[str, FieldSpec]:
    """:func:`inference_field` of each name, in that order: the InferenceConfig knobs a benchmark sweeps."""
    return {name: inference_field(name) for name in names}


def train_field(name: str, **override: Any) -> FieldSpec:
    """The benchmark field of :class:`TrainConfig` field ``name``, as :func:`inference_field` is
    of InferenceConfig's: its type, default (``num_layers``: 0 = the preset's depth), allowed
    values and help; ``override`` replaces any of them."""
    f = _TRAIN_FIELDS[name]
    default = override.pop("default", _TRAIN_PLAIN_DEFAULTS.get(name, f.default))
    spec: dict[str, Any] = {"min": 0} if name == "num_layers" else {}
    return _config_field(f, default, **{"help": TRAIN_FIELD_HELP[name], **spec, **override})


def train_fields(*names: str) -> dict[str, FieldSpec]:
    """:func:`train_field` of each name, in that order."""
    return {name: train_field(name) for name in names}


def _config_field(f: dataclasses.Field, default: Any, **override: Any) -> FieldSpec:
    """A config field's FieldSpec: the type of ``default``, the Literal's values as choices,
    integers >= 1; ``override`` (the help among them) last."""
    kind = {bool: bool, int: int, float: float}.get(type(default), str)
    spec: dict[str, Any] = {}
    literal_choices = _literal_choices(f.type)
    if literal_choices:
        spec["choices"] = list(literal_choices)
    if kind is int:
        spec["min"] = 1
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
STREAM_SEED = FieldSpec(int, 0, min=0, help="seed of weights, noise and text embedding")
TORCHRUN_TIMEOUT = FieldSpec(float, 3600.0, min=1.0, help="limit for the torchrun launch")


def stream_fields(min_warmup: int) -> dict[str, FieldSpec]:
    """The measure fields of one streamed video: warm-up blocks, timed blocks, decode, seed."""
    return {"warmup_blocks": FieldSpec(int, 4, min=min_warmup, help="blocks generated before timing (fill the KV "
                                       "window)"),
            "blocks": FieldSpec(int, 8, min=1, help="timed blocks"),
            "decode": FieldSpec(bool, True, help="VAE-decode each block (streaming; on the SP root under SP)"),
            "seed": STREAM_SEED}


def step_fields(warmup_steps: int, steps: int, min_warmup: int = 1) -> dict[str, FieldSpec]:
    """The measure fields of a timed training run: warm-up and timed optimizer steps."""
    return {"warmup_steps": FieldSpec(int, warmup_steps, min=min_warmup,
                                      help="untimed optimizer steps first (compilation, allocator, AdamW state)"),
            "steps": FieldSpec(int, steps, min=1, help="timed optimizer steps (the median step is reported; a "
                               "measured peak is over them)")}


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
