"""Tables (Markdown + CSV) and bar plots from result records; needs no ``impl`` import."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from impl.io import atomic_path, write_text

from repro.records import load_records

META_COLS = ("hardware",)
TAIL_COLS = ("speedup_vs_baseline", "commit")


def fmt_num(x: Any) -> str:
    """3 significant figures without scientific notation for everyday magnitudes."""
    if x is None:
        return ""
    if isinstance(x, (bool, str)) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return ""
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    if mag >= 6 or mag < -4:
        return f"{x:.3g}"
    return f"{round(x, 2 - mag):.{max(0, 2 - mag)}f}"


def hardware_label(hw: dict[str, Any]) -> str:
    if hw.get("device") == "cuda" and hw.get("gpu_name"):
        count = int(hw.get("gpu_count") or 1)
        return hw["gpu_name"] + (f" x{count}" if count > 1 else "")
    return "cpu"


def short_commit(record: dict[str, Any]) -> str:
    sha = str(record.get("commit") or "unknown")
    short = sha[:8] if re.fullmatch(r"[0-9a-f]{7,40}", sha) else sha
    return short + ("-dirty" if record.get("dirty") else "")


def _benchmark_columns(records: list[dict[str, Any]]) -> tuple[list[str], str | None, str, Any]:
    """(table metrics, plot metric, description, extra plot function or None) from the registry,
    else from the records."""
    present: list[str] = []
    for r in records:
        for k in r["metrics"]:
            if k not in present and k != "speedup_vs_baseline":
                present.append(k)
    name = next((r.get("benchmark") for r in records if r.get("benchmark")), None)
    if name:
        try:
            from repro.benchmark import get_benchmark

            bench = get_benchmark(name)
            return list(bench.table_metrics), bench.plot_metric, bench.description, bench.extra.get("plots")
        except Exception as exc:  # e.g. impl/ not importable: reports still work from records
            warnings.warn(f"benchmark {name!r} unavailable ({exc}); tabulating all metrics",
                          stacklevel=2)
    return present, (present[0] if present else None), "", None


def _sort_key(value: Any) -> tuple:
    # Mixed types across records (None, numbers, strings) must still sort deterministically.
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def experiment_frame(records: list[dict[str, Any]], metrics: list[str]) -> pd.DataFrame:
    """One row per record: hardware, variant keys, metrics, speedup (if any), commit."""
    vkeys: list[str] = []
    for r in records:
        for k in r["variant"]:
            if k not in vkeys:
                vkeys.append(k)
    rows = []
    for r in records:
        row: dict[str, Any] = {"hardware": hardware_label(r["hardware"])}
        row.update({k: r["variant"].get(k) for k in vkeys})
        row.update({m: r["metrics"].get(m) for m in metrics})
        if any("speedup_vs_baseline" in x["metrics"] for x in records):
            row["speedup_vs_baseline"] = r["metrics"].get("speedup_vs_baseline")
        row["commit"] = short_commit(r)
        rows.append(row)
    order = ["hardware", *vkeys]
    rows.sort(key=lambda row: tuple(_sort_key(row[c]) for c in order))  # list.sort is stable
    cols = ["hardware", *vkeys, *metrics]
    if rows and "speedup_vs_baseline" in rows[0]:
        cols.append("speedup_vs_baseline")
    cols.append("commit")
    return pd.DataFrame(rows, columns=cols)


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---"
                         for c in df.columns) + "|"
    body = ["| " + " | ".join(fmt_num(v) if not isinstance(v, str) else v for v in row) + " |"
            for row in df.astype(object).itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def variant_labels(records: list[dict[str, Any]]) -> list[str]:
    """A label per record naming the variant keys that differ between the records."""
    keys = sorted({k for r in records for k in r["variant"]})
    varying = [k for k in keys if len({repr(r["variant"].get(k)) for r in records}) > 1]
    if not varying:
        return ["default"] * len(records)
    return [", ".join(f"{k}={r['variant'].get(k)}" for k in varying) for r in records]


def bar_plot(records: list[dict[str, Any]], metric: str, title: str, path: Path) -> Path | None:
    """Bars of ``metric`` per variant, one colour per hardware. Uses the Agg canvas directly."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = [r for r in records if isinstance(r["metrics"].get(metric), (int, float))]
    if not recs:
        return None
    labels = variant_labels(recs)
    variants = list(dict.fromkeys(labels))
    hws = list(dict.fromkeys(hardware_label(r["hardware"]) for r in recs))
    # Latest record wins when the same variant/hardware was measured more than once.
    val: dict[tuple[str, str], float] = {}
    for r, lab in sorted(zip(recs, labels), key=lambda t: str(t[0].get("created", ""))):
        val[(lab, hardware_label(r["hardware"]))] = float(r["metrics"][metric])
    fig = Figure(figsize=(max(6.0, 0.9 * len(variants) * max(1, len(hws)) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(hws)
    for i, hw in enumerate(hws):
        xs = [j + (i - (len(hws) - 1) / 2) * width for j in range(len(variants))]
        ys = [val.get((v, hw), float("nan")) for v in variants]
        bars = ax.bar(xs, ys, width=width, label=hw)
        ax.bar_label(bars, labels=[fmt_num(y) for y in ys], fontsize=7)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` (PNG) atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def build_report(results_dir: str | Path = "results") -> list[Path]:
    """Write tables/<exp>.md|.csv, plots/<exp>.png and tables/README.md; return written paths."""
    root = Path(results_dir)
    records = load_records(root)
    by_exp: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_exp.setdefault(r["experiment"], []).append(r)
    out: list[Path] = []
    index = ["# Result tables", "", "Generated by `python -m repro report`; do not edit by hand.", "",
             "| experiment | records | hardware | table | csv | plot |", "|---|---:|---|---|---|---|"]
    for exp in sorted(by_exp):
        recs = by_exp[exp]
        metrics, plot_metric, description, extra_plots = _benchmark_columns(recs)
        df = experiment_frame(recs, metrics)
        md = [f"# {exp}", ""]
        if description:
            md += [description, ""]
        md += [to_markdown(df)]
        out.append(write_text(root / "tables" / f"{exp}.md", "\n".join(md)))
        csv_path = root / "tables" / f"{exp}.csv"
        out.append(write_text(csv_path, df.to_csv(index=False)))
        png = bar_plot(recs, plot_metric, exp, root / "plots" / f"{exp}.png") if plot_metric else None
        if png is not None:
            out.append(png)
        if extra_plots is not None:   # benchmark-specific figures (e.g. drift curves)
            out += extra_plots(recs, root / "plots")
        hws = ", ".join(dict.fromkeys(df["hardware"]))
        index.append(f"| {exp} | {len(recs)} | {hws} | [{exp}.md]({exp}.md) | [{exp}.csv]({exp}.csv) | "
                     + (f"[{exp}.png](../plots/{exp}.png)" if png else "") + " |")
    if not by_exp:
        index.append("| (no records yet) | 0 | | | | |")
    out.append(write_text(root / "tables" / "README.md", "\n".join(index) + "\n"))
    return out
