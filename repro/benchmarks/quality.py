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
  ``kv_cache``: BF16 or NVFP4 KV storage; ``sink``: attention sink on or off; ``switch``: how
  the prompt switches at a new shot (``cut``: the multi-shot scene cut; ``recache`` / ``direct``:
  a continuous switch of a live session with / without the KV re-cache, see impl/session.py).

PSNR/SSIM compare each variant with the reference variant (the BF16 teacher at
``reference_steps`` steps, BF16 KV, sink on) from the same noise. Per-block curves are stored
as ``series_<name>_b<block>`` metrics and drawn by the report as drift plots.

Every row is the mean over ``seeds`` independent seeds (``seed``, ``seed + 1``, ...): each seed
trains its own proxy (VAE, detector, teachers, students, light decoders) and draws its own
evaluation prompts and noise. Each quality metric ``q_*`` comes with ``q_*_ci95``, the half-width
of the Student-t 95% confidence interval of that mean (:func:`repro.stats.mean_ci95`); the report
calls a difference from the baseline real only where the two intervals separate.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch

from impl.modes import PORTABLE_PRECISIONS, SwitchMode, choices
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import inference_field, preset_field
from repro.quality.proxy import PROXY_PRESETS, TRAIN_PRECISIONS

def _proxy_fields() -> dict[str, FieldSpec]:
    """The proxy's training settings as measure fields, from ProxyConfig (declared once there)."""
    from repro.quality.proxy import ProxyConfig
    out = {}
    for name, default, help_ in ProxyConfig.knobs():
        kind = type(default)
        low = 0 if (kind is float or name == "seed") else 1
        out[name] = FieldSpec(kind, default, min=low, help=help_)
    return out


_PROXY_FIELDS = _proxy_fields()
_EVAL_FIELDS = {
    "videos": FieldSpec(int, 4, min=1, help="evaluation videos (prompt sequences, one noise seed each)"),
    "eval_blocks": FieldSpec(int, 8, min=2, help="AR blocks per evaluation video (long rollouts: drift)"),
    "eval_shots": FieldSpec(int, 2, min=1, help="shots per evaluation video"),
    "real_videos": FieldSpec(int, 8, min=2, help="real procedural videos of the feature reference set"),
    "reference_steps": FieldSpec(int, 8, min=1, help="teacher steps of the reference variant (PSNR/SSIM)"),
    "seeds": FieldSpec(int, 3, min=1, help="independent seeds averaged per row (seed, seed + 1, ...): each trains "
                       "its own proxy and draws its own evaluation prompts and noise; q_*_ci95 needs >= 2"),
    "cache_dir": FieldSpec(str, ".cache/quality", help="where trained proxy pieces are cached"),
    "shared_device": FieldSpec(bool, False, help="other runs share the device (concurrent --only groups): "
                               "the DiT speed is stored as dit_fps_shared_gpu, not as a speed figure"),
}


# Caches hold one entry per seed (and per evaluation setting): a few tiny models each.
@functools.lru_cache(maxsize=16)
def _system(preset: str, items: tuple, device: str):
    from repro.quality.proxy import ProxyConfig, ProxySystem
    measure = dict(items)
    return ProxySystem(ProxyConfig.from_measure(measure, preset), measure["cache_dir"], device)


def system_for(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]):
    """The proxy system of ``measure["seed"]`` (trained once per process, cached on disk)."""
    keys = sorted(set(_PROXY_FIELDS) | {"cache_dir"})
    return _system(variant["preset"], tuple((k, measure[k]) for k in keys), hardware["device"])


@functools.lru_cache(maxsize=16)
def _evalset(system, videos: int, blocks: int, shots: int, seed: int):
    from repro.quality.evaluate import make_eval_set
    return make_eval_set(system.source(blocks=blocks, length=videos, seed=seed + 51, shots=shots))


@functools.lru_cache(maxsize=16)
def _real_features(system, videos: int, blocks: int, shots: int, seed: int) -> torch.Tensor:
    from repro.quality.evaluate import block_frame_ranges, real_block_features
    src = system.source(blocks=blocks, length=videos, seed=seed + 61, shots=shots)
    fpb = src.frames_per_block
    ranges = block_frame_ranges(blocks, fpb, src.temporal_factor)
    return real_block_features([src[i].frames for i in range(len(src))], ranges, system.detector())


def _pipeline(system, variant: dict[str, Any], device: torch.device):
    """The variant's pipeline, through the one builder: the proxy teacher's weights (and the
    student's LoRA, merged) in BF16, the proxy's VAE and text encoder."""
    from impl.inference.build import Weights, build_pipeline
    from impl.inference.config import InferenceConfig
    cfg = InferenceConfig(preset=system.preset, steps=variant["steps"], guidance_scale=1.0, sink=variant["sink"],
                          dtype="bf16", precision=variant["precision"], kv_cache=variant["kv_cache"],
                          decoder=variant["decoder"], attention=variant["attention"],
                          bf16_attention_steps=variant["bf16_attention_steps"])
    lora = system.student_path(variant["steps"], variant["train_precision"]) if variant["model"] == "lora" else None
    weights = Weights(dit=system.teacher_state(variant["train_precision"]), lora=lora, vae=system.vae(),
                      decoder=None if variant["decoder"] == "wan" else system.decoder(variant["decoder"]),
                      text=system.embedder())
    return build_pipeline(cfg, device, weights)


_REFERENCE = {"model": "teacher", "train_precision": "bf16", "precision": "bf16", "kv_cache": "bf16", "sink": True,
              "decoder": "wan", "attention": "sdpa", "bf16_attention_steps": "none", "switch": "cut"}


def _is_reference(variant: dict[str, Any], measure: dict[str, Any]) -> bool:
    return all(variant[k] == v for k, v in _REFERENCE.items()) and variant["steps"] == measure["reference_steps"]


@functools.lru_cache(maxsize=8)
def _reference_videos(system, es_args: tuple, steps: int, device: str):
    from repro.quality.evaluate import generate_videos
    evalset = _evalset(system, *es_args)
    return generate_videos(_pipeline(system, {**_REFERENCE, "steps": steps}, torch.device(device)), evalset)[0]


def run_quality(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    """The variant's metrics for each of ``measure["seeds"]`` seeds, then their mean (and CI).
    On CPU without oneDNN (:func:`repro.quality.proxy.portable_cpu_kernels`): the same numbers
    on another x86 CPU."""
    from repro.quality.proxy import portable_cpu_kernels
    with portable_cpu_kernels(hardware["device"]):
        per_seed = [_run_seed(variant, {**measure, "seed": measure["seed"] + k}, hardware)
                    for k in range(measure["seeds"])]
    return combine_seeds(per_seed)


def combine_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One record's metrics from per-seed ones: the mean of every number over the seeds that have
    it (``train_s_*``: per seed), ``<metric>_ci95`` for the quality metrics, the training losses
    and the detector's accuracies (not for per-block curves, times and speeds), strings from the
    first seed (the same in all: devices, modes). A speed (``*fps*``) is the median over the seeds
    with ``_min`` / ``_max`` beside it, and ``busy`` says whether the seeds' speeds spread as on a
    machine busy with something else (:func:`repro.stats.is_busy`)."""
    from repro.stats import is_busy, is_number, mean_ci95, repeat_summary
    out: dict[str, Any] = {}
    busy: list[str] = []
    names = list(dict.fromkeys(k for m in per_seed for k in m))
    for name in names:
        values = [m.get(name) for m in per_seed]
        nums = [v for v in values if is_number(v)]
        if not nums:
            out[name] = next((v for v in values if v is not None), None)
            continue
        if "fps" in name:
            spread = repeat_summary(nums)
            out[name], out[f"{name}_min"], out[f"{name}_max"] = spread["median"], spread["min"], spread["max"]
            if is_busy(nums):
                busy.append(name)
            continue
        mean, half = mean_ci95(nums)
        out[name] = mean if math.isfinite(mean) else None
        if not name.startswith(("series_", "train_s_")):
            out[f"{name}_ci95"] = half
    if any("fps" in name for name in names):
        out["busy"], out["busy_metrics"] = bool(busy), ", ".join(busy)
    out["seeds_used"] = len(per_seed)
    return out


def _run_seed(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
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
        videos, dit_ms = generate_videos(pipe, evalset, variant["switch"])
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
                                          variant["steps"] if variant["model"] == "lora" else None,
                                          variant["decoder"]))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _check(variant: dict[str, Any]) -> None:
    if variant["model"] == "real":
        defaults = {k: v for k, v in _REFERENCE.items() if k != "model"}
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


def _drift_rows(records: list[dict[str, Any]], base: dict[str, Any] | None, order: list[str],
                per_row: int = 5) -> list[list[dict[str, Any]]]:
    """The variants other than the baseline, grouped by the keys in which they differ from it
    (steps, decoder, switch, ...) and packed into rows of at most ``per_row`` lines."""
    def differs(r):
        return tuple(k for k in order if base is None or r["variant"].get(k) != base["variant"].get(k))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r is not base:
            groups.setdefault(differs(r), []).append(r)
    rows: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: (len(k), k)):
        group = groups[key]
        if current and len(current) + len(group) > per_row:
            rows.append(current)
            current = []
        while len(group) > per_row:
            rows.append(group[:per_row])
            group = group[per_row:]
        current += group
    return rows + ([current] if current else [])


def _drift_figure(records: list[dict[str, Any]], path: Path) -> bool:
    """Per-block curves in rows of at most five variants, each row against the baseline (black):
    three panels (adherence, flicker, PSNR vs the reference) and a legend per row. Colours,
    dash patterns and markers differ inside a row, so every line can be told apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from repro.report import baseline_record, common_label, hardware_label, save_figure, short_labels, spec_baseline
    panels = [("adherence", "prompt adherence per block (higher is better)"),
              ("flicker", "temporal flickering score (1 = static)"),
              ("psnr_vs_ref", "PSNR vs the BF16 reference (dB)")]
    order = list(QUALITY.variant_fields)
    label_of = {id(r): lab for r, lab in zip(records, short_labels(records, order))}
    base = baseline_record(records, spec_baseline(records, QUALITY))
    rows = _drift_rows(records, base, order) or [[]]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    dashes = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]
    markers = "osD^v"
    row_h = 2.9
    fig = Figure(figsize=(16, row_h * len(rows) + 0.7))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), len(panels) + 1, width_ratios=[1] * len(panels) + [0.85])
    drew = False
    for i, row in enumerate(rows):
        lines = ([(base, "black", "-", None, 2.2)] if base is not None else []) + \
                [(r, colors[k % 5], dashes[k % 5], markers[k % 5], 1.4) for k, r in enumerate(row)]
        for j, (name, title) in enumerate(panels):
            ax = fig.add_subplot(grid[i, j])
            prefix = f"series_{name}_b"
            for rec, color, dash, marker, width in lines:
                pts = sorted((int(key[len(prefix):]), v) for key, v in rec["metrics"].items()
                             if key.startswith(prefix) and isinstance(v, (int, float)))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=dash, marker=marker, ms=4,
                            lw=width, zorder=3 if rec is base else 2)
                    drew = True
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("AR block (time)", fontsize=9)
        leg = fig.add_subplot(grid[i, -1])
        leg.axis("off")
        handles = [Line2D([], [], color=c, ls=d, marker=m, ms=5, lw=w,
                          label=label_of[id(r)] + (" (baseline)" if r is base else ""))
                   for r, c, d, m, w in lines]
        leg.legend(handles=handles, loc="center left", fontsize=8, frameon=False)
    if not drew:
        return False
    presets = ", ".join(sorted({str(r["variant"].get("preset")) for r in records}))
    common = common_label(records, order)
    seeds = sorted({r["metrics"].get("seeds_used") for r in records if r["metrics"].get("seeds_used")})
    fig.suptitle(f"{records[0]['experiment']}: drift over a rollout, {hardware_label(records[0]['hardware'])}, "
                 f"preset {presets}" + (f", mean of {seeds[-1]} seeds" if seeds else "") +
                 (f" (all lines: {common})" if common else "") + "; each row: a few variants against the baseline",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (row_h * len(rows) + 0.7)))
    save_figure(fig, path)
    return True


QUALITY = register(Benchmark(
    name="quality",
    description="Quality proxy: a small VAE + AR teacher + DMD LoRA students trained on procedural multi-shot "
                "videos; weight-free prompt adherence, VBench-style flicker/smoothness, Frechet/kernel distance "
                "on a harness-trained embedding, multi-shot consistency, drift, and PSNR/SSIM vs the BF16 "
                "reference from the same noise.",
    variant_fields={
        "preset": preset_field(list(PROXY_PRESETS), help="proxy model size"),
        "model": FieldSpec(str, "teacher", choices=["real", "teacher", "lora"],
                           help="ground truth through the VAE, the AR teacher, or a DMD LoRA student"),
        "train_precision": FieldSpec(str, "bf16", choices=list(TRAIN_PRECISIONS),
                                     help="the teacher's training precision"),
        "precision": inference_field("precision", choices=list(PORTABLE_PRECISIONS),
                                     help="inference block linears"),
        "kv_cache": inference_field("kv_cache"),
        "decoder": inference_field("decoder", help="video decoder; light ones are distilled from the proxy VAE"),
        "attention": inference_field("attention"),
        "bf16_attention_steps": inference_field("bf16_attention_steps"),
        "steps": FieldSpec(int, 8, choices=[1, 2, 3, 4, 8, 16]),
        "sink": FieldSpec(bool, True, help="attention sink (first block kept in the KV window)"),
        "switch": FieldSpec(str, "cut", choices=list(choices(SwitchMode)),
                            help="prompt switch at a new shot: scene cut, or continuous with / without KV re-cache"),
    },
    measure_fields={**_PROXY_FIELDS, **_EVAL_FIELDS},
    run=run_quality,
    check_variant=_check,
    table_metrics=["q_adherence", "q_adh_color", "q_adh_shape", "q_adh_motion", "q_flicker", "q_smoothness",
                   "q_fd", "q_kid", "q_shot_consistency", "q_cut_adherence", "q_switch_adherence", "q_switch_continuity",
                   "q_drift_adherence",
                   "q_psnr_vs_ref", "q_ssim_vs_ref", "dit_fps"],
    primary_metric="q_adherence",
    extra={"plots": drift_plots},
))
