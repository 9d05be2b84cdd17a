"""``train_memory``: per-rank memory of one teacher-forcing training step, as an analytic model
(:mod:`repro.benchmarks._memory_model`: parameters, gradients, AdamW state, master weights,
gathered FSDP layers, activations, CPU offload) and, for one-GPU variants with ``measured``,
beside the real step's peak.

Measured (``measured``, one rank only): the steps of :func:`repro.benchmarks._one_rank.one_rank_steps`,
the code ``train_step`` times, after ``warmup_steps``: on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps (steady state: AdamW state exists),
on the CPU the parameter state present before the steps plus the peak of what they allocate
(a dispatch-mode storage meter; CPU AdamW loops, so the model is asked for no foreach
temporary). ``model_error`` = model peak / measured peak - 1.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from impl.config import get_preset
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import SEED, preset_field, step_fields, train_field, train_fields
from repro.benchmarks._memory_model import GB, H200_GB, memory_model
from repro.benchmarks._one_rank import one_rank_steps


def measure_step(variant: dict[str, Any], measure: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of the real one-rank step (see the module docstring)."""
    with one_rank_steps(variant, measure, device, meter_cpu=True) as run:
        metrics: dict[str, Any] = {}
        if run.warmup_peak_bytes is not None:
            metrics["measured_init_peak_gb"] = run.warmup_peak_bytes / GB
        metrics.update(measured_peak_gb=run.peak_bytes / GB,
                       measured_step_s=statistics.median(s.step_s for s in run.stats),
                       measured_host_peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB)
    return metrics


# ------------------------------------------------------------------ the benchmark


def check_variant(variant: dict[str, Any]) -> None:
    gpus, sp = variant["gpus"], variant["sp_size"] or variant["gpus"]
    if gpus % sp:
        raise ValueError(f"sp_size: must divide gpus; got sp_size {sp}, gpus {gpus}")
    if variant["offload"] and variant["sharding"] != "fsdp":
        raise ValueError("offload: CPU offload moves FSDP shards; it needs sharding 'fsdp'")
    if variant["measured"] and gpus != 1:
        raise ValueError(f"measured: the harness runs one process, so only gpus 1 is measured here "
                         f"(multi-GPU peaks: the sp_training benchmark); got gpus {gpus}")
    preset = get_preset(variant["preset"])
    heads, fpb = preset.dit.num_heads, preset.stream.frames_per_block
    if heads % sp:
        raise ValueError(f"sp_size: must divide the {heads} attention heads; got {sp}")
    if variant["frames"] % (sp * fpb):
        raise ValueError(f"frames: must be a multiple of sp_size * frames_per_block = {sp * fpb} (whole "
                         f"blocks per rank); got {variant['frames']}")


def run_train_memory(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    check_variant(variant)
    device = torch.device(hardware["device"])
    sp = variant["sp_size"] or variant["gpus"]
    t0 = time.perf_counter()
    metrics = memory_model(variant["preset"], frames=variant["frames"], gpus=variant["gpus"], sp_size=sp,
                           sharding=variant["sharding"], offload=variant["offload"],
                           checkpointing=variant["gradient_checkpointing"], ema=variant["ema"],
                           num_layers=variant["num_layers"],
                           foreach=device.type == "cuda" if variant["measured"] else True)
    metrics["model_s"] = time.perf_counter() - t0
    if variant["measured"]:
        metrics.update(measure_step(variant, measure, device))
        metrics["model_error"] = metrics["model_peak_gb"] / metrics["measured_peak_gb"] - 1.0
    return metrics


# ------------------------------------------------------------------ report: figure and labels

# The GPU memory lines drawn in the figure: (GB, label).
_GPU_LINES = ((80.0, "80 GB (H100)"), (H200_GB, f"{H200_GB:g} GB (H200)"))


def _source_label(record: dict[str, Any]) -> str | None:
    """Tables and plots name a modelled-only row as the model, not the CPU that computed it."""
    return None if record["variant"].get("measured") else "analytic memory model (no device)"


def _series_label(variant: dict[str, Any]) -> str:
    words = ["replicated (sharding none)" if variant.get("sharding") == "none" else "FSDP"]
    if variant.get("offload"):
        words.append("+ CPU offload")
    if not variant.get("gradient_checkpointing", True):
        words.append("no checkpointing")
    if variant.get("ema"):
        words.append("+ EMA")
    return " ".join(words)


def memory_plots(records: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """``train_memory.png`` in place of the generic bar chart: one row per preset of the modelled
    rows, a panel per GPU count with the modelled peak per rank over the clip length, a line per
    sharding setting, and the 80 / 141 GB lines; then the measured rows, the model's peak beside
    the measured one."""
    from matplotlib.lines import Line2D

    from repro.report import fmt_num, hardware_label, new_figure, save_figure

    modelled = [r for r in records if not r["variant"].get("measured")]
    measured = [r for r in records if r["variant"].get("measured") and "measured_peak_gb" in r["metrics"]]
    presets = sorted({str(r["variant"].get("preset")) for r in modelled})
    width = 15.0
    row_h = [4.0] * len(presets) + ([1.4 + 0.55 * len(measured)] if measured else [])
    if not row_h:
        return []
    fig = new_figure(width, sum(row_h) + 0.5)
    rows = list(fig.subfigures(len(row_h), 1, squeeze=False, height_ratios=row_h)[:, 0])
    colors = {"replicated": "tab:red", "FSDP": "tab:blue", "FSDP + CPU offload": "tab:green"}
    rank = {name: i for i, name in enumerate(colors)}
    labels = sorted({_series_label(r["variant"]) for r in modelled},   # lines first, in the colours' order
                    key=lambda s: ("no checkpointing" in s, rank.get(s.split(" no ")[0].replace(" (sharding none)", ""), 9), s))
    style = {}
    for lab in labels:
        base = lab.split(" no checkpointing")[0].replace(" (sharding none)", "")
        ckpt = "no checkpointing" not in lab
        style[lab] = dict(color=colors.get(base, "tab:gray"), marker="o" if ckpt else "X", ms=6 if ckpt else 9,
                          ls="-" if ckpt else "none", lw=1.6)
    for sf, preset in zip(rows, presets):
        recs = [r for r in modelled if str(r["variant"].get("preset")) == preset]
        gpus = sorted({int(r["variant"]["gpus"]) for r in recs})
        axes = sf.subplots(1, len(gpus), squeeze=False, sharey=True)[0]
        frames = sorted({int(r["variant"]["frames"]) for r in recs})
        for ax, g in zip(axes, gpus):
            for lab in labels:
                pts = sorted((int(r["variant"]["frames"]), float(r["metrics"]["model_peak_gb"]))
                             for r in recs if int(r["variant"]["gpus"]) == g and _series_label(r["variant"]) == lab)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], **style[lab])
            for gb, _ in _GPU_LINES:
                ax.axhline(gb, color="black", ls="--" if gb == 80.0 else ":", lw=1.0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.set_xlim(frames[0] / 1.3, frames[-1] * 1.3)
            ax.minorticks_off()
            ax.set_xlabel("latent frames per clip", fontsize=9)
            sps = sorted({int(r["variant"]["sp_size"] or g) for r in recs if int(r["variant"]["gpus"]) == g})
            ax.set_title(f"{g} GPU{'s' if g > 1 else ''} (SP {', '.join(map(str, sps))})", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("modelled peak memory per rank (GB)", fontsize=9)
        handles = [Line2D([], [], **style[lab], label=lab) for lab in labels]
        handles += [Line2D([], [], color="black", ls="--" if gb == 80.0 else ":", lw=1.0, label=name)
                    for gb, name in _GPU_LINES]
        sf.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
        sf.suptitle(f"analytic memory model (no device), preset {preset}: BF16 compute, float32 master weights "
                    f"and AdamW; checkpointing per block unless marked X", fontsize=10, x=0.01, ha="left")
    if measured:
        measured.sort(key=lambda r: (hardware_label(r["hardware"]), str(r["variant"].get("preset")),
                                     rank.get(_series_label(r["variant"]).replace(" (sharding none)", ""), 9)))
        sf = rows[-1]
        ax = sf.subplots(1, 1)
        names = [f"{hardware_label(r['hardware'])}, preset {r['variant'].get('preset')}, "
                 f"{_series_label(r['variant'])} (model error {100 * r['metrics']['model_error']:+.1f}%)"
                 for r in measured]
        small = max(float(r["metrics"]["measured_peak_gb"]) for r in measured) < 1.0   # a tiny preset: MB
        scale, unit = (1e3, "MB") if small else (1.0, "GB")
        ys = list(range(len(measured)))
        for off, key, color, what in ((-0.18, "model_peak_gb", "tab:blue", "model"),
                                      (0.18, "measured_peak_gb", "tab:orange", "measured")):
            vals = [float(r["metrics"][key]) * scale for r in measured]
            bars = ax.barh([y + off for y in ys], vals, height=0.34, color=color, label=what)
            ax.bar_label(bars, labels=[fmt_num(v) for v in vals], padding=3, fontsize=8)
        ax.set_yticks(ys, names, fontsize=9)
        ax.set_ylim(len(ys) - 0.5, -0.5)
        ax.margins(x=0.12)
        ax.set_xlabel(f"peak memory of one training step, one rank ({unit})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        sf.legend(loc="outside right center", fontsize=9, frameon=False)
        sf.suptitle("the model against the measured step (measured: true, one rank)", fontsize=10, x=0.01,
                    ha="left")
    fig.suptitle("train_memory: peak memory per rank of one teacher-forcing training step (lower is better)",
                 fontsize=12)
    path = plots_dir / "train_memory.png"
    save_figure(fig, path)
    return [path]


TRAIN_MEMORY = register(Benchmark(
    name="train_memory",
    description=("Per-rank memory of one teacher-forcing training step, analytic (parameters, gradients, "
                 "AdamW state, master weights, gathered FSDP layers, activations with and without "
                 "checkpointing, CPU offload) for sharding none vs FSDP over 1-8 GPUs, with the real "
                 "one-rank step's peak beside it where measured. See repro/benchmarks/_memory_model.py."),
    variant_fields={
        "preset": preset_field(default="wan22_ti2v_5b"),
        "num_layers": train_field("num_layers"),
        "frames": train_field("frames", default=24),
        "gpus": FieldSpec(int, 1, min=1, max=64, help="ranks = GPUs (FSDP shards over all of them)"),
        "sp_size": train_field("sp_size", default=0, min=0, help="SP ranks per group (0 = all gpus); the rest is DP"),
        **train_fields("sharding", "offload", "gradient_checkpointing"),
        "ema": FieldSpec(bool, False, help="keep a float32 EMA of the weights"),
        "measured": FieldSpec(bool, False, help="also run the real step on this device (gpus 1) and report its peak"),
    },
    measure_fields={
        **step_fields(warmup_steps=1, steps=2),
        "seed": SEED,
    },
    run=run_train_memory,
    check_variant=check_variant,
    table_metrics=["model_peak_gb", "measured_peak_gb", "model_error", "param_gb", "grad_gb", "optimizer_gb",
                   "gathered_gb", "activation_gb", "act_mb_per_frame", "step_peak_gb", "backward_peak_gb",
                   "host_gb", "fits_80gb", "measured_step_s"],
    primary_metric="model_peak_gb",
    extra={"plots": memory_plots, "bar_plot": False, "analytic": _source_label},
))
