"""``sp_training``: measured teacher-forcing training step under Balanced vs naive SP.

The measured counterpart of ``sp_training_cost`` (the analytic model). The harness runs one
process, so each variant launches ``torchrun --standalone --nproc-per-node sp_size -m
impl.train`` (NCCL, one GPU per rank, on CUDA; gloo on the CPU) with random weights and
``warmup_steps + steps`` optimizer steps, and reads what global rank 0 writes: the per-step
log (``train_log.jsonl``) and the ``--metrics-out`` summary (every rank's peak memory).

- ``step_ms_p50`` / ``step_ms_mean``: optimizer-step wall time over the timed steps (the SP
  ranks synchronise in every all-to-all, so rank 0's step is the group's step);
- ``tokens_per_s``: clean + noisy tokens of the clip per second at the median step;
- ``peak_mem_gb_max`` / ``peak_mem_gb_min``: peak allocated GPU memory over the ranks (the
  naive layout's ranks are unequal; CUDA only).

``data: latents`` trains on pre-encoded random latents (the DiT step alone, as ``train_step``);
``data: video`` feeds raw clips through each rank's VAE encoder, SP-chunked with a halo under
the Balanced layout, so the encode is part of the step. ``sharding: fsdp`` (``--sharding
fsdp``) shards parameters, gradients and AdamW state over all ranks, which the full-depth
5B model needs on 80 GB GPUs; records from before the field ran ``none``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import (SPEED_PRESETS, TORCHRUN_TIMEOUT, preset_field, step_fields, train_field,
                                      train_fields)
from repro.torchrun import run_torchrun, torchrun_env, torchrun_prefix


def _check(variant: dict[str, Any]) -> None:
    from impl.train.config import TrainConfig
    from repro.benchmarks.sp_training_cost import check_variant
    check_variant(variant)   # the same shape rules as the analytic model (whole blocks per rank, heads % sp)
    # dtype x precision (quantized formats need bf16) and offload x sharding as the launched run
    # validates them, before launching.
    TrainConfig(preset=variant["preset"], dtype=variant["dtype"], precision=variant["precision"],
                sharding=variant["sharding"], offload=variant["offload"])


def launch_command(variant: dict[str, Any], measure: dict[str, Any], out: Path) -> list[str]:
    """The torchrun command line of one variant."""
    cmd = [*torchrun_prefix(variant["sp_size"]), "-m", "impl.train", "--preset", variant["preset"], "--sp-size", str(variant["sp_size"]),
           "--sp-layout", variant["sp_layout"], "--frames", str(variant["frames"]),
           "--dtype", variant["dtype"], "--precision", variant["precision"], "--sharding", variant["sharding"],
           "--steps", str(measure["warmup_steps"] + measure["steps"]),
           "--data", "synthetic-latents" if variant["data"] == "latents" else "synthetic-video",
           "--data-length", "8", "--checkpoint-every", "0", "--seed", str(measure["seed"]),
           "--out", str(out / "run"), "--metrics-out", str(out / "metrics.json"), "--no-progress"]
    if variant["num_layers"]:
        cmd += ["--num-layers", str(variant["num_layers"])]
    if variant["compile"]:
        cmd.append("--compile")
    if not variant["gradient_checkpointing"]:
        cmd.append("--no-gradient-checkpointing")
    if variant["offload"]:
        cmd.append("--offload")
    return cmd


def summarize(log: list[dict[str, Any]], summary: dict[str, Any], warmup_steps: int) -> dict[str, Any]:
    """Metrics of one run from its per-step log and its end-of-run summary."""
    timed = log[warmup_steps:]
    if not timed:
        raise RuntimeError(f"the run logged {len(log)} steps, none after the {warmup_steps} warm-up steps")
    step_s = [e["step_s"] for e in timed]
    p50 = statistics.median(step_s)
    tokens = timed[0]["tokens_per_s"] * timed[0]["step_s"]   # the same clip every step
    peaks = [p for p in summary["peak_mem_gb_per_rank"] if p is not None]
    return {"step_ms_p50": p50 * 1e3, "step_ms_mean": statistics.fmean(step_s) * 1e3,
            "tokens_per_s": tokens / p50, "timed_steps": len(timed), "loss_last": timed[-1]["loss"],
            "peak_mem_gb_max": max(peaks) if peaks else None, "peak_mem_gb_min": min(peaks) if peaks else None,
            "ranks": summary["world_size"]}


def run_sp_training(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    _check(variant)
    sp = variant["sp_size"]
    log_name = "run/train_log.jsonl"

    def read(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        lines = (out / log_name).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()], json.loads((out / "metrics.json").read_text())

    log, summary = run_torchrun(lambda out: launch_command(variant, measure, out), sp, torchrun_env(sp, hardware),
                                timeout_s=measure["timeout_s"], required=["metrics.json", log_name], read=read,
                                prefix="sp_training_")
    return summarize(log, summary, measure["warmup_steps"])


SP_TRAINING = register(Benchmark(
    name="sp_training",
    description=("Measured teacher-forcing training step under Balanced vs naive sequence parallelism: torchrun "
                 "with sp_size ranks (NCCL on GPUs, gloo on CPU), random weights, step time, clip tokens/s and "
                 "the peak memory of the fullest and emptiest rank."),
    variant_fields={
        "preset": preset_field(SPEED_PRESETS),
        "num_layers": train_field("num_layers"),
        "sp_size": train_field("sp_size", max=64, help="SP ranks = GPUs used (one SP group)"),
        "sp_layout": train_field("sp_layout"),
        "frames": train_field("frames", help="latent frames per clip (whole blocks per rank)"),
        "dtype": train_field("dtype", help="compute dtype of the model, VAE and text encoder (the quantized "
                                           "precisions need bf16)"),
        "precision": train_field("precision"),
        "data": FieldSpec(str, "latents", choices=["latents", "video"],
                          help="latents: DiT step alone; video: the SP VAE encode is part of the step"),
        **train_fields("gradient_checkpointing", "compile", "sharding", "offload"),
    },
    measure_fields={
        **step_fields(warmup_steps=2, steps=5, min_warmup=0),
        "seed": FieldSpec(int, 0, min=0, help="seed of weights and data"),
        "timeout_s": TORCHRUN_TIMEOUT,
    },
    run=run_sp_training,
    check_variant=_check,
    table_metrics=["step_ms_p50", "tokens_per_s", "peak_mem_gb_max", "peak_mem_gb_min", "step_ms_mean",
                   "loss_last"],
    primary_metric="tokens_per_s",
    plot="tokens_per_s",
))
