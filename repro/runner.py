"""Run every variant of a spec on this machine and write one record per variant."""

from __future__ import annotations

import math
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from tqdm import tqdm

from repro.errors import RunError, SpecError
from repro.hardware import detect_hardware
from repro.records import check_output_dir, git_state, make_record, spec_relpath, write_record
from repro.spec import Spec, Variant, load_spec

_LOWER_IS_BETTER = re.compile(r"(^|_)(ms|s)(_p\d+)?$")


def metric_direction(name: str) -> str | None:
    """"higher" for throughput metrics, "lower" for times, None if speedup makes no sense."""
    if name.endswith(("fps", "tflops", "per_s")):
        return "higher"
    if _LOWER_IS_BETTER.search(name):
        return "lower"
    return None


def speedup(metric: str, value: float, baseline: float) -> float | None:
    direction = metric_direction(metric)
    if direction is None or not (math.isfinite(value) and math.isfinite(baseline)):
        return None
    if direction == "higher":
        return value / baseline if baseline > 0 else None
    return baseline / value if value > 0 else None


def _typed(spec: Spec, items: dict[str, Any] | None, fields: dict[str, Any], flag: str, kind: str,
           validate: bool) -> dict[str, Any]:
    """Type ``key=value`` CLI items (strings) with the benchmark's fields."""
    out: dict[str, Any] = {}
    for key, raw in (items or {}).items():
        if key not in fields:
            raise SpecError(f"{spec.path}: {flag} {key}: unknown {kind} key; allowed: {sorted(fields)}")
        if isinstance(raw, str) and fields[key].type is not str:
            try:
                raw = fields[key].parse(raw)
            except ValueError as exc:
                raise SpecError(f"{spec.path}: {flag} {key}: {exc}") from None
        problem = fields[key].problem(raw)
        if validate and problem is not None:
            raise SpecError(f"{spec.path}: {flag} {key}: {problem}")
        out[key] = fields[key].coerce(raw) if problem is None else raw
    return out


def parse_only(spec: Spec, only: dict[str, Any] | None) -> dict[str, Any]:
    """Type ``--only key=value`` filters with the benchmark's variant fields."""
    return _typed(spec, only, spec.get_benchmark().variant_fields, "--only", "variant", validate=False)


def parse_measure(spec: Spec, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Type and validate ``--measure key=value`` overrides with the benchmark's measure fields."""
    return _typed(spec, overrides, spec.get_benchmark().measure_fields, "--measure", "measure", validate=True)


def _clean_metrics(metrics: Any) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        raise TypeError(f"benchmark returned {type(metrics).__name__}, expected a dict of metrics")
    for k, v in metrics.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (int, float, str, bool))):
            raise TypeError(f"metric {k!r} has unsupported value {v!r}")
    return dict(metrics)


def run_spec(spec_path: str | Path, results_dir: str | Path = "results", device: str | None = None,
             only: dict[str, Any] | None = None, progress: bool = True,
             commit: str | None = None, measure: dict[str, Any] | None = None,
             profile: str | None = None, exclude: dict[str, Any] | None = None) -> list[Path]:
    """Run a spec's variants for this machine; return the written record paths.

    Raises SpecError for invalid specs/filters and RunError (after running the others) if
    any variant failed. ``speedup_vs_baseline`` is filled in only when the baseline variant
    ran successfully in this same invocation. ``commit`` names the code's commit where the
    tree is a copy without git metadata (e.g. on a remote GPU machine), or with stale metadata
    (an older HEAD plus uncommitted edits); a clean checkout's own HEAD always wins.
    ``measure`` overrides the spec's measure settings for this run (e.g. a shorter training
    schedule); records carry the settings actually used. ``profile`` picks the spec profile
    of another device class than the one the run uses (e.g. GPU-sized settings evaluated on a
    CPU); records still name the hardware that ran.
    """
    spec = load_spec(spec_path)
    try:
        hw = detect_hardware(device)
    except ValueError as exc:
        raise SpecError(f"{spec.path}: --device: {exc}") from None
    dev = profile or hw["device"]
    bench = spec.get_benchmark()
    measure = {**spec.measure_for(dev), **parse_measure(spec, measure)}
    variants = spec.expand(dev)
    base_variant = spec.baseline_variant(dev)
    filt = parse_only(spec, only)
    drop = _typed(spec, exclude, bench.variant_fields, "--exclude", "variant", validate=False)
    if filt or drop:
        variants = _filter_variants(spec, dev, variants, filt, drop)
        if base_variant is not None and all(v.slug != base_variant.slug for v in variants):
            # Speedups compare with a baseline measured in the same run, so it always runs.
            variants.insert(0, base_variant)
    check_output_dir(results_dir, "--results")   # before any model is built

    git = git_state(exclude=(results_dir,))
    if commit is not None and git["commit"] == "unknown":
        git = {"commit": commit, "dirty": None, "commit_source": "--commit (tree without git metadata)"}
    elif commit is not None and not git["commit"].startswith(commit) and git.get("dirty"):
        # A copied tree whose git metadata is stale (it names an older commit and shows edits):
        # the caller's --commit says which committed tree was sent.
        git = {"commit": commit, "dirty": None,
               "commit_source": f"--commit (tree copy with stale git metadata: {git['commit'][:12]} + edits)"}
    spec_rel = spec_relpath(spec.path)
    written: dict[str, tuple[Path, dict[str, Any]]] = {}
    failures: list[tuple[Variant, str]] = []

    bar = tqdm(variants, desc=spec.name, unit="variant", disable=not progress, file=sys.stderr)
    for variant in bar:
        bar.set_postfix_str(variant.slug, refresh=True)
        try:
            metrics = _clean_metrics(bench.run(dict(variant.values), dict(measure), dict(hw)))
        except KeyboardInterrupt:
            raise   # Ctrl-C stops the whole run (the CLI exits 130), not just this variant
        except Exception as exc:  # one failing variant must not stop the others
            if _interrupted(exc):  # Ctrl-C wrapped by library code (e.g. into a RuntimeError)
                raise KeyboardInterrupt from exc
            msg = f"{type(exc).__name__}: {exc}"
            failures.append((variant, msg))
            tqdm.write(f"[repro] FAILED {spec.name} variant {variant.slug} {variant.values}: {msg}",
                       file=sys.stderr)
            if not isinstance(exc, ValueError):  # config errors are self-explanatory
                tqdm.write("".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr)
            continue
        record = make_record(experiment=spec.name, benchmark=bench.name, variant=variant.values,
                             slug=variant.slug, hardware=hw, metrics=metrics, measure=measure,
                             spec=spec_rel, git=git)
        written[variant.slug] = (write_record(record, results_dir), record)
        if base_variant is not None and base_variant.slug in written:
            # As each record lands (the baseline runs first), so that a run cut short by a
            # deadline or Ctrl-C keeps the speedups of the rows it measured.
            _add_speedups(bench.primary_metric, base_variant.slug, written, results_dir)
    bar.close()

    if failures:
        lines = "; ".join(f"{v.slug}: {m}" for v, m in failures)
        raise RunError(f"{spec.name}: {len(failures)} of {len(variants)} variants failed "
                       f"({len(written)} recorded): {lines}")
    return [p for p, _ in written.values()]


def _interrupted(exc: BaseException) -> bool:
    """True if a KeyboardInterrupt is anywhere in ``exc``'s cause/context chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _values_of(variants: list[Variant], key: str) -> list[Any]:
    return sorted({v.values.get(key) for v in variants}, key=lambda x: (str(type(x)), str(x)))


def _filter_variants(spec: Spec, dev: str, variants: list[Variant], filt: dict[str, Any],
                     drop: dict[str, Any]) -> list[Variant]:
    """Apply ``--only`` then ``--exclude``; a value that matches no variant of the spec (a typo)
    is an error listing the values that exist for its key, never silently ignored."""
    for flag, items in (("--only", filt), ("--exclude", drop)):
        for key, want in items.items():
            if not any(v.values.get(key) == want for v in variants):
                raise SpecError(f"{spec.path}: {flag} {key}={want}: no variant has it on {dev}; "
                                f"values of {key}: {', '.join(map(str, _values_of(variants, key)))}")
    kept = [v for v in variants if all(v.values.get(k) == want for k, want in filt.items())]
    if not kept:
        parts = "; ".join(f"{k}: {', '.join(map(str, _values_of(variants, k)))}" for k in filt)
        raise SpecError(f"{spec.path}: --only {' '.join(f'{k}={w}' for k, w in filt.items())}: each value "
                        f"exists, but no variant on {dev} has them all; values per key: {parts}")
    kept = [v for v in kept if not any(v.values.get(k) == unwanted for k, unwanted in drop.items())]
    if not kept:
        raise SpecError(f"{spec.path}: --only {filt} / --exclude {drop} leave no variant to run on {dev}")
    return kept


def _add_speedups(metric: str, base_slug: str, written: dict[str, tuple[Path, dict[str, Any]]],
                  results_dir: str | Path) -> None:
    base_value = written[base_slug][1]["metrics"].get(metric)
    if not isinstance(base_value, (int, float)):
        return
    for slug, (path, record) in written.items():
        value = record["metrics"].get(metric)
        if not isinstance(value, (int, float)) or "speedup_vs_baseline" in record["metrics"]:
            continue
        s = speedup(metric, float(value), float(base_value))
        if s is None:
            continue
        record["metrics"]["speedup_vs_baseline"] = s
        record["baseline"] = {"variant_slug": base_slug, "metric": metric}
        write_record(record, results_dir)  # same path; atomic replace
