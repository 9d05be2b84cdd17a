"""Which records belong together, and the metadata around them.

The records' registered benchmark (looked up in the registry, so reports still work from the
records alone when ``impl`` cannot be imported), where each record's numbers come from (its
hardware, or an analytic model and its rates), the panels by (hardware, preset) and the GPU /
CPU parts that never share a table or figure, and the spec's baseline record.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from repro.report.labels import hardware_label


def benchmark_of(records: list[dict[str, Any]]) -> Any:
    """The records' registered benchmark, or None (with a warning) when it cannot be imported."""
    name = next((r.get("benchmark") for r in records if r.get("benchmark")), None)
    if not name:
        return None
    try:
        from repro.benchmark import get_benchmark

        return get_benchmark(name)
    except Exception as exc:  # e.g. impl/ not importable: reports still work from records
        warnings.warn(f"benchmark {name!r} unavailable ({exc}); tabulating all metrics", stacklevel=3)
        return None


def source_labels(records: list[dict[str, Any]]) -> list[str]:
    """Where each record's numbers come from, for the tables' hardware column and the plots'
    panels: its hardware (:func:`hardware_label`), or, for a record of an analytic model (its
    benchmark's ``extra["analytic"]`` names it), the model and the rates it assumes; a cost
    model computed on a CPU is not a CPU measurement."""
    bench = benchmark_of(records)
    describe = (getattr(bench, "extra", None) or {}).get("analytic")
    return [(describe(r) if describe else None) or hardware_label(r["hardware"]) for r in records]


def facet_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Records split by (hardware or analytic model, preset): one panel each; the CPU last."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r, source in zip(records, source_labels(records)):
        preset = r["variant"].get("preset")
        groups.setdefault((source, "" if preset is None else str(preset)), []).append(r)

    def order(item):
        (hw, preset), _ = item
        return (hw == "cpu", hw, preset)
    return [(hw + (f", preset {preset}" if preset else ""), recs) for (hw, preset), recs in sorted(groups.items(), key=order)]


def device_parts(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The records split into GPU and CPU ones (GPU first, empty parts left out): a CPU smoke run's
    speed is never set beside a GPU's in one table or figure."""
    gpu = [r for r in records if r["hardware"].get("device") == "cuda"]
    cpu = [r for r in records if r["hardware"].get("device") != "cuda"]
    return [(kind, part) for kind, part in (("GPU", gpu), ("CPU", cpu)) if part]


def _is_baseline(record: dict[str, Any]) -> bool:
    base = record.get("baseline")
    return isinstance(base, dict) and base.get("variant_slug") == record.get("variant_slug")


def baseline_record(records: list[dict[str, Any]], subset: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec's baseline among ``records``: the record whose ``baseline`` names itself (a run
    that measured its speedups), else the one record matching ``subset`` (:func:`spec_baseline`),
    or None."""
    own = [r for r in records if _is_baseline(r)]
    if own:
        return own[0]
    if subset:
        defaults = subset.get("defaults", {})
        hits = [r for r in records if all(r["variant"].get(k, defaults.get(k)) == v
                                          for k, v in subset["values"].items())]
        if len(hits) == 1:
            return hits[0]
    return None


def spec_baseline(records: list[dict[str, Any]], bench: Any = None) -> dict[str, Any] | None:
    """The ``baseline`` mapping of the spec the records name (``record["spec"]``); a key that a
    record lacks (written before the field existed) matches the field's default. None if the spec
    has no baseline or its file is gone."""
    from repro.records import REPO_ROOT

    spec = next((r.get("spec") for r in records if r.get("spec")), None)
    if not spec:
        return None
    path = Path(spec) if Path(spec).is_absolute() else REPO_ROOT / spec
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError):
        return None
    base = data.get("baseline") if isinstance(data, dict) else None
    if not isinstance(base, dict) or not base:
        return None
    fields = getattr(bench, "variant_fields", {}) or {}
    return {"values": base, "defaults": {k: f.default for k, f in fields.items()}}
