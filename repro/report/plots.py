"""Plots: bar charts of a spec's plot metric and scatter views (speed vs memory, speed vs quality).

Plots are faceted by hardware and preset (a CPU smoke run and a 5B GPU run never share an
axis), labelled with only the variant keys that differ inside a panel, and show the spec's
baseline as a reference line. Axis labels carry units; titles say which way is better. Every
PNG is written through :mod:`impl.io` (atomic, mode 0644).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

from impl.io import atomic_path

from repro.report.groups import baseline_record, facet_groups, spec_baseline
from repro.report.labels import common_label, fmt_num, is_number, short_labels


PLOT_DPI = 110
FIG_WIDTH_IN = 11.0        # 1210 px: every figure stays well under 1800 px wide
WIDE_FIG_WIDTH_IN = 14.0   # 1540 px: two panels side by side
MAX_FIG_WIDTH_IN = 16.0    # 1760 px: three scatter panels and their legend

AXIS_LABELS: dict[str, str] = {
    "e2e_fps": "end-to-end FPS (video frames / s, VAE decode included)",
    "dit_fps": "DiT-only FPS (video frames / s, no decode)",
    "tflops": "throughput (TFLOP/s)",
    "fraction_of_copy": "bandwidth as a fraction of a device copy",
    "decode_fps": "decode FPS (video frames / s)",
    "tokens_per_s": "training throughput (tokens / s)",
    "est_dit_fps": "modelled DiT-only FPS (video frames / s)",
    "est_step_s": "modelled step time per rank (s)",
    "peak_mem_gb": "peak GPU memory (GB)",
    "q_adherence": "prompt adherence (0-1)",
    "q_fd": "Frechet distance to real videos",
    "q_psnr_vs_ref": "PSNR vs the BF16 reference (dB)",
    "q_psnr_vs_teacher": "PSNR vs the teacher's many-step video (dB)",
    "q_flicker": "temporal flickering score (1 = static)",
    "switch_latency_ms_p50": "median prompt-switch latency to the new prompt's first block (ms)",
}

SHORT_AXIS_LABELS: dict[str, str] = {
    "e2e_fps": "end-to-end FPS (frames / s)",
    "dit_fps": "DiT-only FPS (frames / s)",
}

PLOT_TITLES: dict[str, str] = {
    "e2e_fps": "end-to-end generation speed",
    "dit_fps": "DiT-only generation speed",
    "tflops": "kernel throughput",
    "fraction_of_copy": "NVFP4 kernel bandwidth against a device copy",
    "decode_fps": "VAE decode speed",
    "tokens_per_s": "training throughput",
    "est_dit_fps": "modelled SP inference speed",
    "est_step_s": "modelled SP training step time",
    "q_adherence": "prompt adherence of the quality proxy",
    "q_fd": "distance to real videos",
    "q_psnr_vs_ref": "fidelity to the BF16 reference",
    "q_psnr_vs_teacher": "fidelity to the teacher's many-step video",
    "peak_mem_gb": "peak GPU memory",
    "switch_latency_ms_p50": "prompt-switch latency of a live session",
}

_UNITS = ((r"(^|_)fps$", "frames / s"), (r"_ms(_p\d+)?$", "ms"), (r"(^|_)s$", "s"), (r"_gb(_\w+)?$", "GB"),
          (r"tflops$", "TFLOP/s"), (r"_db$", "dB"), (r"_mb$", "MB"), (r"per_s$", "1 / s"))


def axis_label(metric: str) -> str:
    """An axis label with units for ``metric``."""
    if metric in AXIS_LABELS:
        return AXIS_LABELS[metric]
    for pattern, unit in _UNITS:
        if re.search(pattern, metric):
            return f"{metric} ({unit})"
    return metric


def _direction(metric: str) -> str | None:
    if metric.startswith("q_"):
        return "lower" if metric in ("q_fd", "q_kid", "q_latent_rmse_vs_teacher") else "higher"
    if metric == "ttff_ms" or metric.startswith("switch_latency_ms"):
        return "lower"
    if metric.endswith("fraction_of_copy"):
        return "higher"
    from repro.runner import metric_direction

    return metric_direction(metric)


def plot_title(experiment: str, metric: str) -> str:
    what = PLOT_TITLES.get(metric, metric)
    better = _direction(metric)
    return f"{experiment}: {what}" + (f" ({better} is better)" if better else "")


def _wrap(text: str, width: int = 120) -> str:
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- plots

def bar_plot(records: list[dict[str, Any]], metric: str, title: str, path: Path, *,
             order: list[str] | None = None, companion: str | None = None,
             baseline: dict[str, Any] | None = None) -> Path | None:
    """Horizontal bars of ``metric``, one row of panels per (hardware, preset), best value on top.

    Each row is a subfigure headed by its hardware (or the analytic model's rates), preset and
    the settings all its bars share, across the whole row, so no panel title sits under it.
    ``companion`` (e.g. ``dit_fps`` beside ``e2e_fps``) gets its own panel to the right, with
    its own scale, where recorded. The spec's baseline variant (the record whose ``baseline``
    names itself, else the one matching ``baseline``, see :func:`spec_baseline`) is
    drawn in orange with a dashed reference line at its value. Returns None when no record has
    ``metric``."""
    recs = [r for r in records if is_number(r["metrics"].get(metric))]
    if not recs:
        return None
    groups = facet_groups(recs)
    pair = companion is not None and any(is_number(r["metrics"].get(companion)) for r in recs)
    metrics = [metric, companion] if pair else [metric]
    width = WIDE_FIG_WIDTH_IN if pair else FIG_WIDTH_IN
    heads = []
    for gtitle, grecs in groups:
        base = baseline_record(grecs, baseline)
        sub = common_label(grecs, order)
        chars = width * _CHARS_PER_IN
        head = gtitle if len(gtitle) < chars else gtitle.replace(", preset ", "\npreset ", 1)  # a long model label
        note = "(orange: the spec's baseline; dashed line at its value)" if base is not None else ""
        if note:
            head += (" " if len(head.split("\n")[-1]) + len(note) < chars else "\n") + note
        if any(is_number(r["metrics"].get(f"{metric}_ci95")) for r in grecs):
            head += "\nerror bars: 95% confidence intervals over seeds"
        elif any(is_number(r["metrics"].get(f"{metric}_min")) for r in grecs):
            head += "\nwhiskers: fastest and slowest of the repeated runs (bars: their median)"
        heads.append((head + (f"\nall rows: {sub}" if sub else ""), base))
    # a row: its heading, the panel titles and x labels, and at least four bars' height
    heights = [_BAR_ROW_FIXED_IN + _TITLE_LINE_IN * _wrapped_lines(h, width) + _BAR_IN * max(len(g), 4)
               for (h, _), (_, g) in zip(heads, groups)]
    fig = new_figure(width, sum(heights) + 0.4)
    rows = fig.subfigures(len(groups), 1, squeeze=False, height_ratios=heights)[:, 0]
    higher = _direction(metric) != "lower"
    for sf, (head, base), (_, grecs) in zip(rows, heads, groups):
        labels = short_labels(grecs, order)
        bars_of = sorted(zip(grecs, labels), key=lambda t: float(t[0]["metrics"][metric]), reverse=higher)
        ys = list(range(len(bars_of)))
        axes = sf.subplots(1, len(metrics), squeeze=False)[0]
        for j, (ax, m) in enumerate(zip(axes, metrics)):
            vals = [float(r["metrics"][m]) if is_number(r["metrics"].get(m)) else float("nan") for r, _ in bars_of]
            # 95% intervals over seeds (quality) as error bars, where recorded; else the min-max
            # range of repeated runs (speed)
            errs = [float(r["metrics"][f"{m}_ci95"]) if is_number(r["metrics"].get(f"{m}_ci95")) else 0.0 for r, _ in bars_of]
            spans = [(v - float(r["metrics"][f"{m}_min"]), float(r["metrics"][f"{m}_max"]) - v)
                     if is_number(r["metrics"].get(f"{m}_min")) and is_number(r["metrics"].get(f"{m}_max")) else (e, e)
                     for (r, _), v, e in zip(bars_of, vals, errs)]
            xerr = [[lo for lo, _ in spans], [hi for _, hi in spans]] if any(lo or hi for lo, hi in spans) else None
            colors = ["tab:orange" if r is base else ("tab:blue" if j == 0 else "tab:cyan") for r, _ in bars_of]
            ax.barh(ys, vals, height=0.7, color=colors, zorder=2,
                    xerr=xerr, error_kw={"ecolor": "black", "capsize": 3, "lw": 1})
            # Value labels past the bar (and its error bar) on a white box above the baseline line,
            # so the line never runs through a number.
            for y, v, e, (lo, hi) in zip(ys, vals, errs, spans):
                if math.isfinite(v):
                    ax.annotate(fmt_num(v) + (f" ± {fmt_num(e)}" if e else ""), (v + hi if v >= 0 else v - lo, y),
                                xytext=(4 if v >= 0 else -4, 0), textcoords="offset points", va="center",
                                ha="left" if v >= 0 else "right", fontsize=8, zorder=4,
                                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})
            if base is not None and is_number(base["metrics"].get(m)):
                bv = float(base["metrics"][m])
                ax.axvline(bv, color="tab:orange", ls="--", lw=1.2, zorder=1)
            ax.set_yticks(ys)
            ax.set_yticklabels([lab + (" (baseline)" if r is base else "") for r, lab in bars_of] if j == 0 else [],
                               fontsize=9)
            for tick, (r, _) in zip(ax.get_yticklabels(), bars_of):
                if r is base:
                    tick.set_color("tab:orange")
            ax.set_ylim(len(bars_of) - 0.5, -0.5)   # best on top
            ax.set_xlabel(axis_label(m), fontsize=9)
            ax.margins(x=0.24 if xerr else 0.16)
            if all(v >= 0 for v in vals if math.isfinite(v)):
                ax.set_xlim(left=0)   # an error bar below zero is cut, not an axis of negative values
            ax.grid(axis="x", alpha=0.3)
            if pair:   # the figure title names the first metric; two panels each say what they show
                ax.set_title(PLOT_TITLES.get(m, m), fontsize=10, loc="left")
        sf.suptitle(_wrap_lines(head, width), fontsize=10, x=0.01, ha="left")
    fig.suptitle(title, fontsize=12)
    save_figure(fig, path)
    return path


_BAR_ROW_FIXED_IN = 1.0   # per bar-plot row: panel titles, x tick labels and the x label, inches
_TITLE_LINE_IN = 0.2      # one line of a row heading at fontsize 10
_BAR_IN = 0.3             # one bar
_CHARS_PER_IN = 12        # characters of fontsize-10 text per inch of figure width (a little under)


def _wrap_lines(text: str, width_in: float) -> str:
    """``text`` wrapped line by line to fit a figure ``width_in`` inches wide."""
    chars = int(width_in * _CHARS_PER_IN)
    return "\n".join(_wrap(line, chars) for line in text.split("\n"))


def _wrapped_lines(text: str, width_in: float) -> int:
    return _wrap_lines(text, width_in).count("\n") + 1



def scatter_plot(records: list[dict[str, Any]], x_metric: str, y_metrics: list[str], title: str, path: Path, *,
                 order: list[str] | None = None, baseline: dict[str, Any] | None = None) -> Path | None:
    """One row per (hardware, preset) with at least two records that have ``x_metric`` and a
    ``y_metrics`` value; one panel per y metric; markers named in a legend beside the row (the
    baseline, as in :func:`bar_plot`, outlined in black)."""
    from matplotlib.lines import Line2D
    import matplotlib

    groups = []
    for gtitle, grecs in facet_groups(records):
        ys = [m for m in y_metrics if sum(1 for r in grecs if is_number(r["metrics"].get(x_metric))
                                            and is_number(r["metrics"].get(m))) >= 2]
        if ys:
            groups.append((gtitle, [r for r in grecs if is_number(r["metrics"].get(x_metric))], ys))
    if not groups:
        return None
    cols = max(len(ys) for _, _, ys in groups)
    row_h = [max(3.6, 0.22 * len(g) + 1.2) for _, g, _ in groups]
    fig = new_figure(min(4.8 * cols + 4.2, MAX_FIG_WIDTH_IN), sum(row_h) + 0.5)
    sub = fig.subfigures(len(groups), 1, squeeze=False, height_ratios=row_h)[:, 0]
    cmap = matplotlib.colormaps["tab20"]
    markers = "oDs^vP*Xh<>p"
    for sf, (gtitle, grecs, ys) in zip(sub, groups):
        higher = _direction(ys[0]) != "lower"
        grecs = sorted(grecs, key=lambda r: float(r["metrics"][ys[0]]) if is_number(r["metrics"].get(ys[0]))
                       else -math.inf, reverse=higher)      # legend order: best first
        labels = short_labels(grecs, order)
        base = baseline_record(grecs, baseline)
        style = [(cmap((2 * i) % 20 + (i // 10) % 2), markers[i % len(markers)]) for i in range(len(grecs))]
        axes = sf.subplots(1, cols + 1, squeeze=False, width_ratios=[1] * cols + [0.9])[0]
        for ax, m in zip(axes, ys):
            for r, (c, mk) in zip(grecs, style):
                if is_number(r["metrics"].get(m)):
                    ax.scatter([r["metrics"][x_metric]], [r["metrics"][m]], color=c, marker=mk, s=60,
                               edgecolors="black" if r is base else "none", linewidths=1.2, zorder=3)
            ax.set_xlabel(SHORT_AXIS_LABELS.get(x_metric, axis_label(x_metric)), fontsize=9)
            ax.set_ylabel(SHORT_AXIS_LABELS.get(m, axis_label(m)), fontsize=9)
            ax.grid(alpha=0.3)
            better = _direction(m)
            ax.set_title(PLOT_TITLES.get(m, m) + (f" ({better} is better)" if better else ""), fontsize=10)
        for ax in axes[len(ys):cols]:
            ax.set_visible(False)
        leg = axes[-1]
        leg.axis("off")
        handles = [Line2D([], [], ls="", marker=mk, color=c, ms=8,
                          markeredgecolor="black" if r is base else c,
                          label=lab + (" (baseline)" if r is base else ""))
                   for r, lab, (c, mk) in zip(grecs, labels, style)]
        leg.legend(handles=handles, loc="center left", fontsize=8, frameon=False)
        common = common_label(grecs, order)
        sf.suptitle(gtitle + (f"; all points: {_wrap(common, 120)}" if common else ""), fontsize=10, x=0.01,
                    ha="left")
    fig.suptitle(title, fontsize=12)
    save_figure(fig, path)
    return path


# Quality metrics drawn against speed, in order of preference (up to three panels).
_QUALITY_VIEW = ("q_adherence", "q_fd", "q_psnr_vs_ref", "q_psnr_vs_teacher")


def extra_report_plots(experiment: str, records: list[dict[str, Any]], bench: Any, plots_dir: Path,
                       suffix: str = "") -> list[Path]:
    """The views beyond the bar chart: speed vs peak memory where records have both, and speed vs
    quality where a spec measures both."""
    order = list(getattr(bench, "variant_fields", {}) or [])
    baseline = spec_baseline(records, bench)
    out: list[Path] = []
    speed = [m for m in ("e2e_fps", "dit_fps") if any(is_number(r["metrics"].get(m)) for r in records)]
    if speed and any(is_number(r["metrics"].get("peak_mem_gb")) for r in records):
        # x = memory, one panel per speed metric: which paths are fast AND small
        p = scatter_plot([r for r in records if is_number(r["metrics"].get("peak_mem_gb"))], "peak_mem_gb",
                         speed, f"{experiment}: speed vs peak GPU memory (up and to the left is better)",
                         plots_dir / f"{experiment}_speed_vs_memory{suffix}.png", order=order, baseline=baseline)
        if p is not None:
            out.append(p)
    quality = [m for m in _QUALITY_VIEW if any(is_number(r["metrics"].get(m)) for r in records)][:3]
    qspeed = next((m for m in ("dit_fps", "e2e_fps") if any(is_number(r["metrics"].get(m)) for r in records)), None)
    if quality and qspeed:
        p = scatter_plot(records, qspeed, quality, f"{experiment}: quality vs speed",
                         plots_dir / f"{experiment}_speed_vs_quality{suffix}.png", order=order, baseline=baseline)
        if p is not None:
            out.append(p)
    return out


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` (PNG) atomically, mode 0644 (through impl.io)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI)
    return path
