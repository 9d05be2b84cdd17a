"""``quality``: the paper's quality comparison on a proxy model trained in the harness.

The paper compares BF16, NVFP4 4-step and NVFP4 2-step LongLive-2.0 on VBench. VBench needs
downloaded networks and the real 5B weights; this benchmark instead trains a small system on
procedural multi-shot videos (:mod:`repro.quality.proxy`: VAE, AR teacher in BF16 or emulated
NVFP4, DMD LoRA students) and scores every variant with weight-free metrics
(:mod:`repro.quality.evaluate`) on the same prompts and noise. One record per model variant:

- ``model``: ``real`` (the evaluation set's ground-truth videos through the VAE: the ceiling),
  ``teacher`` (the AR model, ``steps`` sampler steps) or ``lora`` (the ``steps``-step DMD
  student, LoRA merged before any quantization);
- ``train_precision``: the teacher's training precision; ``precision``: inference block linears;
  ``kv_cache``: BF16 or NVFP4 KV storage; ``sink``: attention sink on or off.

PSNR/SSIM compare each variant with the reference variant (the BF16 teacher at
``reference_steps`` steps, BF16 KV, sink on) from the same noise. Per-block curves are stored
as ``series_<name>_b<block>`` metrics and drawn by the report as drift plots.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch

from repro.benchmark import Benchmark, FieldSpec, register

INFERENCE_PRECISIONS = ["bf16", "fp8", "nvfp4_emulated", "nvfp4_weight_only"]
_PROXY_FIELDS = {
    "vae_steps": FieldSpec(int, 200, min=1, help="VAE training steps"),
    "vae_batch": FieldSpec(int, 4, min=1, help="VAE clips per step"),
    "vae_lr": FieldSpec(float, 2e-3, min=0, help="VAE learning rate"),
    "detector_steps": FieldSpec(int, 300, min=1, help="attribute detector training steps"),
    "detector_clips": FieldSpec(int, 300, min=2, help="one-block procedural clips the detector trains on"),
    "train_clips": FieldSpec(int, 64, min=1, help="distinct clips of the AR training set"),
    "clip_blocks": FieldSpec(int, 4, min=1, help="AR blocks per training clip"),
    "shots_per_clip": FieldSpec(int, 2, min=1, help="shots per training clip"),
    "ar_steps": FieldSpec(int, 200, min=1, help="AR teacher-forcing steps"),
    "ar_batch": FieldSpec(int, 4, min=1, help="AR clips per step"),
    "ar_lr": FieldSpec(float, 1e-3, min=0, help="AR learning rate"),
    "distill_iters": FieldSpec(int, 40, min=1, help="DMD iterations per student"),
    "lora_rank": FieldSpec(int, 16, min=1, help="LoRA rank (= alpha)"),
    "distill_lr": FieldSpec(float, 1e-4, min=0, help="DMD learning rate (student and critic)"),
}
_EVAL_FIELDS = {
    "videos": FieldSpec(int, 4, min=1, help="evaluation videos (prompt sequences, one noise seed each)"),
    "eval_blocks": FieldSpec(int, 8, min=2, help="AR blocks per evaluation video (long rollouts: drift)"),
    "eval_shots": FieldSpec(int, 2, min=1, help="shots per evaluation video"),
    "real_videos": FieldSpec(int, 8, min=2, help="real procedural videos of the feature reference set"),
    "reference_steps": FieldSpec(int, 8, min=1, help="teacher steps of the reference variant (PSNR/SSIM)"),
    "seed": FieldSpec(int, 0, min=0, help="seed of every training run and of the evaluation set"),
    "cache_dir": FieldSpec(str, ".cache/quality", help="where trained proxy pieces are cached"),
    "shared_device": FieldSpec(bool, False, help="other runs share the device (concurrent --only groups): "
                               "the DiT speed is stored as dit_fps_shared_gpu, not as a speed figure"),
}


@functools.lru_cache(maxsize=4)
def _system(preset: str, items: tuple, device: str):
    from repro.quality.proxy import ProxyConfig, ProxySystem
    measure = dict(items)
    return ProxySystem(ProxyConfig.from_measure(measure, preset), measure["cache_dir"], device)


def system_for(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]):
    keys = sorted(set(_PROXY_FIELDS) | {"seed", "cache_dir"})
    return _system(variant["preset"], tuple((k, measure[k]) for k in keys), hardware["device"])


@functools.lru_cache(maxsize=4)
def _evalset(system, videos: int, blocks: int, shots: int, seed: int):
    from repro.quality.evaluate import make_eval_set
    return make_eval_set(system.source(blocks=blocks, length=videos, seed=seed + 51, shots=shots))


@functools.lru_cache(maxsize=4)
def _real_features(system, videos: int, blocks: int, shots: int, seed: int) -> torch.Tensor:
    from repro.quality.evaluate import block_frame_ranges, real_block_features
    src = system.source(blocks=blocks, length=videos, seed=seed + 61, shots=shots)
    fpb = src.frames_per_block
    ranges = block_frame_ranges(blocks, fpb, src.temporal_factor)
    return real_block_features([src[i].frames for i in range(len(src))], ranges, system.detector())


def _pipeline(system, variant: dict[str, Any], device: torch.device):
    from impl.pipeline import StreamingPipeline
    from impl.quant.apply import quantize_model
    from impl.quant.config import QuantConfig
    stream = {"steps": variant["steps"], "guidance_scale": 1.0}
    if not variant["sink"]:
        stream["sink_frames"] = 0
    preset = system.preset.replace(stream=stream)
    lora = variant["steps"] if variant["model"] == "lora" else None
    model = system.model(variant["train_precision"], lora_steps=lora, dtype=torch.bfloat16)
    if variant["precision"] != "bf16":
        quantize_model(model, QuantConfig.for_inference(variant["precision"]))
    return StreamingPipeline(model, preset, text_embedder=system.embedder(), vae=system.vae(), device=device,
                             kv_cache=variant["kv_cache"])


def _is_reference(variant: dict[str, Any], measure: dict[str, Any]) -> bool:
    return (variant["model"] == "teacher" and variant["train_precision"] == "bf16" and variant["precision"] == "bf16"
            and variant["kv_cache"] == "bf16" and variant["sink"] and variant["steps"] == measure["reference_steps"])


@functools.lru_cache(maxsize=2)
def _reference_videos(system, es_args: tuple, steps: int, device: str):
    from repro.quality.evaluate import generate_videos
    evalset = _evalset(system, *es_args)
    ref = {"model": "teacher", "train_precision": "bf16", "precision": "bf16", "kv_cache": "bf16", "sink": True,
           "steps": steps}
    return generate_videos(_pipeline(system, ref, torch.device(device)), evalset)[0]


def run_quality(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    from repro.quality.evaluate import generate_videos, score_videos
    device = torch.device(hardware["device"])
    system = system_for(variant, measure, hardware)
    es_args = (measure["videos"], measure["eval_blocks"], measure["eval_shots"], measure["seed"])
    evalset = _evalset(system, *es_args)
    detector = system.detector()
    real_feats = _real_features(system, measure["real_videos"], *es_args[1:])
    metrics: dict[str, Any] = {}
    if variant["model"] == "real":
        videos = [system.roundtrip(v) for v in evalset.real]
        reference = None
        det = system.detector_info()
        metrics.update({f"detector_{k}": v for k, v in det["heldout_real"].items()})
        metrics.update({f"detector_vae_{k}": v for k, v in det["heldout_vae_roundtrip"].items()})
    else:
        pipe = _pipeline(system, variant, device)
        videos, dit_ms = generate_videos(pipe, evalset)
        frames = sum(v.shape[0] for v in videos)
        fps_key = "dit_fps_shared_gpu" if measure["shared_device"] else "dit_fps"
        metrics[fps_key] = frames / (sum(dit_ms) / 1e3)
        reference = None if _is_reference(variant, measure) else _reference_videos(
            system, es_args, measure["reference_steps"], hardware["device"])
    scores, series = score_videos(videos, evalset, detector, real_feats, reference)
    metrics.update(scores)
    for name, values in series.items():
        for j, v in enumerate(values):
            metrics[f"series_{name}_b{j:02d}"] = None if not math.isfinite(v) else v
    metrics.update(system.training_record(None if variant["model"] == "real" else variant["train_precision"],
                                          variant["steps"] if variant["model"] == "lora" else None))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _check(variant: dict[str, Any]) -> None:
    if variant["model"] == "real":
        defaults = {"train_precision": "bf16", "precision": "bf16", "kv_cache": "bf16", "sink": True}
        changed = [k for k, v in defaults.items() if variant[k] != v]
        if changed:
            raise ValueError(f"model: 'real' videos are the VAE round trip of the ground truth; {changed} "
                             "do not apply (leave them at their defaults)")
    if variant["model"] == "lora" and variant["steps"] > 4:
        raise ValueError("steps: LoRA students are distilled for few-step sampling (steps <= 4)")
    if variant["preset"] not in ("tiny", "proxy"):
        raise ValueError(f"preset: the quality proxy trains 'tiny' or 'proxy', got {variant['preset']!r}")


def drift_plots(records: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """``<experiment>_drift_<hardware tag>.png``: per-block adherence, flicker and PSNR vs the
    reference, one line per variant; one figure per hardware (a CPU smoke run and a GPU-trained
    proxy are different models, so their curves do not share axes)."""
    from repro.hardware import hardware_tag
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(hardware_tag(rec["hardware"]), []).append(rec)
    out = []
    for tag, recs in groups.items():
        path = plots_dir / f"{recs[0]['experiment']}_drift_{tag}.png"
        if _drift_figure(recs, path):
            out.append(path)
    return out


def _drift_figure(records: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from repro.report import hardware_label, variant_labels
    panels = [("adherence", "prompt adherence"), ("flicker", "temporal flickering (1 = static)"),
              ("psnr_vs_ref", "PSNR vs BF16 reference (dB)")]
    labels = variant_labels(records)
    # One colour per variant, the same in every panel (a panel skips variants without a curve,
    # e.g. the reference has no PSNR against itself, so the default colour cycle would shift).
    cmap = matplotlib.colormaps["tab20"]
    colors = [cmap(k % 20) for k in range(len(records))]
    legend_in = 0.2 * math.ceil(len(records) / 2)          # two legend columns under the panels
    fig = Figure(figsize=(15, 4.5 + legend_in))
    FigureCanvasAgg(fig)
    drew = False
    for k, (name, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        prefix = f"series_{name}_b"
        for rec, label, color in zip(records, labels, colors):
            pts = sorted((int(key[len(prefix):]), v) for key, v in rec["metrics"].items()
                         if key.startswith(prefix) and isinstance(v, (int, float)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=label)
                drew = True
        ax.set_xlabel("AR block")
        ax.set_title(title, fontsize=10)
    if not drew:
        return False
    presets = ", ".join(sorted({str(r["variant"].get("preset")) for r in records}))
    fig.suptitle(f"{records[0]['experiment']}: {hardware_label(records[0]['hardware'])}, preset {presets}",
                 fontsize=11)
    handles = [Line2D([], [], color=c, marker="o", ms=3, label=lab) for c, lab in zip(colors, labels)]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (legend_in + 0.2) / (4.5 + legend_in), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return True


QUALITY = register(Benchmark(
    name="quality",
    description="Quality proxy: a small VAE + AR teacher + DMD LoRA students trained on procedural multi-shot "
                "videos; weight-free prompt adherence, VBench-style flicker/smoothness, Frechet/kernel distance "
                "on a harness-trained embedding, multi-shot consistency, drift, and PSNR/SSIM vs the BF16 "
                "reference from the same noise.",
    variant_fields={
        "preset": FieldSpec(str, "tiny", choices=["tiny", "proxy"], help="proxy model size"),
        "model": FieldSpec(str, "teacher", choices=["real", "teacher", "lora"]),
        "train_precision": FieldSpec(str, "bf16", choices=["bf16", "nvfp4_emulated"]),
        "precision": FieldSpec(str, "bf16", choices=INFERENCE_PRECISIONS, help="inference block linears"),
        "kv_cache": FieldSpec(str, "bf16", choices=["bf16", "nvfp4"]),
        "steps": FieldSpec(int, 8, choices=[1, 2, 3, 4, 8, 16]),
        "sink": FieldSpec(bool, True, help="attention sink (first block kept in the KV window)"),
    },
    measure_fields={**_PROXY_FIELDS, **_EVAL_FIELDS},
    run=run_quality,
    check_variant=_check,
    table_metrics=["q_adherence", "q_adh_color", "q_adh_shape", "q_adh_motion", "q_flicker", "q_smoothness",
                   "q_fd", "q_kid", "q_shot_consistency", "q_cut_adherence", "q_drift_adherence",
                   "q_psnr_vs_ref", "q_ssim_vs_ref", "dit_fps"],
    primary_metric="q_adherence",
    extra={"plots": drift_plots},
))
