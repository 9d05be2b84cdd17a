"""``train_step``: teacher-forcing training step time, throughput, memory and GEMM share.

One rank of the AR trainer (:class:`impl.train.trainer.Trainer`, sp_size 1) on pre-encoded
synthetic latents (VAE and text encoder excluded: they are not part of the step being
compared across precisions). ``precision`` is the format of the block linears (bf16 = not
quantized), ``dtype`` the compute dtype (the quantized formats train in bf16). ``num_layers`` reduces the depth at full width when the 5B
model's optimizer state would not fit one GPU; step time scales linearly with depth, the
GEMM share and the precision ratios do not depend on it. ``sharding: fsdp`` runs the step
under FSDP2 in a world of one (float32 master shards, BF16 gather, float32 reduce; no
replicated BF16 copy or master-gradient cast), which is what lets the full 30-layer 5B step
fit one H200; ``offload`` moves the shards and AdamW to the CPU. Records from before the
``sharding`` field ran the replicated trainer: a missing ``sharding`` means ``none``.
After ``warmup_steps`` (FlexAttention
and quantizer compilation), ``steps`` optimizer steps are timed; one more step runs under
torch.profiler and its GPU kernel time is split into phases (GEMM, attention, quantization,
elementwise, ...) with :mod:`repro.profile`'s categories.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import SEED, SPEED_PRESETS, preset_field, step_fields, train_field, train_fields
from repro.benchmarks._one_rank import StepRun, one_rank_steps, train_config


def _check(variant: dict[str, Any]) -> None:
    """Spec-time check of the fields TrainConfig validates together (quantized formats need
    bf16, offload needs fsdp, whole blocks of frames)."""
    train_config(variant, seed=0)


def _profile_step(run: StepRun, device: torch.device) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    from repro.profile import kernel_times_ms, phase_times_ms

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run.step()
    phases = phase_times_ms(kernel_times_ms(prof, device.type))
    total = sum(phases.values()) or 1.0
    return {f"{name}_share": ms / total for name, ms in phases.items()}


def run_train_step(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    with one_rank_steps(variant, measure, device) as run:
        stats = run.stats
        step_s = statistics.median(s.step_s for s in stats)
        metrics: dict[str, Any] = {
            "step_s": step_s,
            "tokens_per_s": stats[0].tokens / step_s,
            "tokens_per_step": stats[0].tokens,
            "num_layers": run.trainer.model.cfg.num_layers,
            "params_b": sum(p.numel() for p in run.trainer.model.parameters()) / 1e9,
            "loss": stats[-1].loss,
        }
        if run.peak_bytes is not None:   # CUDA: the whole run's peak, the trainer's build included
            metrics["peak_mem_gb"] = max(run.peak_bytes, run.warmup_peak_bytes) / 1e9
        if measure["profile"]:
            metrics.update(_profile_step(run, device))
    return metrics


TRAIN_STEP = register(Benchmark(
    name="train_step",
    description="Teacher-forcing AR training step (one rank, synthetic latents): time, tokens/s, memory, GEMM share.",
    variant_fields={
        "preset": preset_field(SPEED_PRESETS, help="model width preset"),
        **train_fields("num_layers", "dtype", "precision", "frames", "gradient_checkpointing", "compile",
                       "attention_backend"),
        "sharding": train_field("sharding", help="none = replicated float32 master + AdamW beside BF16 params; "
                                                 "fsdp = FSDP2 shards (a world of one here). Records without it ran none"),
        "offload": train_field("offload"),
    },
    measure_fields={
        **step_fields(warmup_steps=1, steps=3),
        "profile": FieldSpec(bool, True, help="profile one extra step for the per-phase time shares"),
        "seed": SEED,
    },
    run=run_train_step,
    check_variant=_check,
    table_metrics=["step_s", "tokens_per_s", "peak_mem_gb", "gemm_share", "attention_share", "quantize_share",
                   "norm_elementwise_share", "params_b"],
    primary_metric="tokens_per_s",
))
