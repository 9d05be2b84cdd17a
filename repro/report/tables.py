"""Tables: one row per record, as a pandas frame (CSV) and as Markdown.

Rows are sorted by hardware and variant keys; metrics with 95% intervals over seeds get a
``<metric>_ci95`` column (CSV) or a ``mean ± ci95`` cell (Markdown), and a ``vs_baseline``
verdict naming the metrics whose interval separates from the baseline row's.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from repro.report.groups import baseline_record, device_parts, facet_groups, source_labels, spec_baseline
from repro.report.labels import fmt_num, hardware_label, is_number, short_commit, short_labels
from repro.stats import intervals_separate


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
    for r, source in zip(records, source_labels(records)):
        row: dict[str, Any] = {"hardware": source}
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


def interval_columns(records: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """``<metric>_ci95`` of the table metrics that some record has (quality: over seeds)."""
    return [f"{m}_ci95" for m in metrics if any(is_number(r["metrics"].get(f"{m}_ci95")) for r in records)]


def _verdict(record: dict[str, Any], base: dict[str, Any] | None, metrics: list[str]) -> str | None:
    if base is None:
        return None
    if record is base:
        return "baseline"
    pairs = [(m, record["metrics"].get(m), record["metrics"].get(f"{m}_ci95"), base["metrics"].get(m),
              base["metrics"].get(f"{m}_ci95")) for m in metrics]
    pairs = [p for p in pairs if all(is_number(x) for x in p[1:])]
    if not pairs:
        return None
    real = [f"{m.removeprefix('q_')} {'higher' if a > b else 'lower'}" for m, a, ha, b, hb in pairs
            if intervals_separate(float(a), float(ha), float(b), float(hb))]
    return ", ".join(real) if real else "no measurable difference"


def with_verdicts(records: list[dict[str, Any]], metrics: list[str], bench: Any = None) -> list[dict[str, Any]]:
    """The records with ``vs_baseline`` added to their metrics where intervals are recorded: the
    metrics whose 95% interval separates from the baseline's (same hardware and preset), or
    "no measurable difference"."""
    if not interval_columns(records, metrics):
        return records
    baseline = spec_baseline(records, bench)
    out = []
    for _, group in facet_groups(records):
        base = baseline_record(group, baseline)
        out += [{**r, "metrics": {**r["metrics"], "vs_baseline": _verdict(r, base, metrics)}} for r in group]
    return out


def interval_markdown(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """``mean ± ci95`` cells in place of each metric and its ``_ci95`` column (Markdown tables)."""
    out = df.copy()
    for m in metrics:
        ci = f"{m}_ci95"
        if ci in out.columns and m in out.columns:
            out[m] = [(fmt_num(v) + (f" ± {fmt_num(h)}" if is_number(h) else "")) if is_number(v) else ""
                      for v, h in zip(out[m], out[ci])]
            out = out.drop(columns=[ci])
    return out


def _gpu_type(record: dict[str, Any]) -> str:
    return hardware_label(record["hardware"]).removeprefix("NVIDIA ")   # short column headers


def side_by_side_markdown(records: list[dict[str, Any]], metrics: list[str], bench: Any = None) -> str | None:
    """The GPU records of two or more GPU types as one table: a row per variant, each metric's
    value on every GPU type in adjacent columns (blank where a type lacks the variant), the
    ratio of the second type to the first for the first metric when there are exactly two, and
    the commits each type's rows come from. None for fewer than two GPU types.

    Variants are matched after filling the benchmark's field defaults, so a record written before
    a field existed still pairs with its twin."""
    gpu = dict(device_parts(records)).get("GPU", [])
    types = sorted({_gpu_type(r) for r in gpu})
    metrics = [m for m in metrics if any(is_number(r["metrics"].get(m)) for r in gpu)]
    if len(types) < 2 or not metrics:
        return None
    defaults = bench.defaults() if bench is not None else {}
    rows: dict[str, dict[str, dict[str, Any]]] = {}   # variant id -> GPU type -> record
    variants: dict[str, dict[str, Any]] = {}
    for r in gpu:
        v = {**defaults, **r["variant"]}
        vid = repr(sorted(v.items()))
        variants.setdefault(vid, v)
        rows.setdefault(vid, {}).setdefault(_gpu_type(r), r)   # write_record keeps one per variant and folder
    keys = list(dict.fromkeys(k for v in variants.values() for k in v))
    order = sorted(variants, key=lambda vid: tuple(_sort_key(variants[vid].get(k)) for k in keys))
    order = [vid for vid in order   # a row with none of the metrics (e.g. an SQNR-only row) says nothing here
             if any(is_number(r["metrics"].get(m)) for r in rows[vid].values() for m in metrics)]
    field_order = list(getattr(bench, "variant_fields", {}) or [])
    labels = short_labels([{"variant": variants[vid]} for vid in order], field_order)
    header = ["variant"] + [f"{m} ({t})" for m in metrics for t in types]
    ratio = len(types) == 2
    if ratio:
        header.append(f"{metrics[0]} {types[1]} / {types[0]}")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    for vid, label in zip(order, labels):
        values = {t: rows[vid].get(t, {}).get("metrics", {}) for t in types}
        cells = [label] + [fmt_num(values[t].get(m)) for m in metrics for t in types]
        if ratio:
            a, b = (values[t].get(metrics[0]) for t in types)
            cells.append(f"{b / a:.2f}x" if is_number(a) and is_number(b) and a else "")
        lines.append("| " + " | ".join(cells) + " |")
    commits = "; ".join(f"{t}: " + ", ".join(sorted({short_commit(r) for r in gpu if _gpu_type(r) == t}))
                        for t in types)
    return "\n".join([f"Commits: {commits}.", "", *lines]) + "\n"
