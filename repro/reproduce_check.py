"""Does a fresh ``make reproduce`` give the committed CPU records back? Compare two result folders.

    python -m repro.reproduce_check --fresh /tmp/fresh_results --committed results [--hardware cpu]

Every committed record of the checked experiments on that hardware must have a fresh record
with the same variant, and every metric must agree by its rule (first match wins):

- a metric with a 95% confidence interval over seeds in both records (``<metric>_ci95``: the
  quality metrics and the proxy's training losses): the two intervals overlap. The proxy's
  training is chaotic: an ulp of difference in one kernel (another CPU's oneDNN blocking, MKL
  code path or reduction order) grows into another trained model, the way another seed does, so
  bit-for-bit agreement across CPUs is out of reach; overlapping intervals are the criterion the
  quality table uses for "no measurable difference";
- ``series_*`` per-block curves and the ``*_ci95`` widths themselves: not compared (no interval
  of their own; their means and metrics are);
- the same quality metrics without an interval (a one-seed run): the fixed tolerances of
  :data:`QUALITY_TOLERANCES`, meant for the same CPU;
- speed metrics (FPS, milliseconds, TFLOP/s, training seconds): within a factor of
  ``--speed-factor`` (machines and their load differ), unless either record was flagged
  ``busy`` (its repeats spread too far to say anything): then not compared;
- other numbers (memory, counts) to 1% relative; strings and flags equal.

It prints one line per rule: how many metrics it compared, and why they passed. Exit status 0
when everything agrees, 1 with the differences listed, 2 for a folder with no records of the
checked experiments or of another preset than the committed ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from repro.hardware import hardware_tag
from repro.records import load_records
from repro.stats import intervals_separate, is_number

# (metric-name prefix or exact name, absolute tolerance, relative tolerance); first match wins.
# Used only for quality metrics without a confidence interval (a one-seed run on the same CPU).
QUALITY_TOLERANCES: list[tuple[str, float, float]] = [
    ("q_psnr", 1.0, 0.0),            # dB
    ("q_ssim", 0.02, 0.0),
    ("q_adh", 0.03, 0.0),            # adherence in [0, 1]
    ("q_cut_adherence", 0.03, 0.0),
    ("q_switch_adherence", 0.03, 0.0),
    ("q_switch_continuity", 1.0, 0.0),   # dB
    ("q_drift", 0.03, 0.0),
    ("q_shot_consistency", 0.03, 0.0),
    ("q_flicker", 0.01, 0.0),
    ("q_smoothness", 0.01, 0.0),
    ("q_fd", 0.0, 0.10),
    ("q_kid", 0.002, 0.10),
    ("q_", 0.0, 0.05),
]
SPEED_MARKERS = ("fps", "_ms", "ms_", "tflops", "gbps", "tokens_per_s", "step_s", "_s_", "train_s", "wall_s",
                 "speedup", "roofline_fraction", "warmup_s", "dit_fps_shared_gpu", "share")
DEFAULT_EXPERIMENTS = ("inference_speed", "quality")
NOT_COMPARED = ("speedup_vs_baseline", "busy", "busy_metrics", "seeds_used")

# Why each rule passes, printed with its count.
REASONS = {
    "interval": "95% intervals over seeds overlap (|fresh - committed| <= ci95_fresh + ci95_committed): no "
                "measurable difference, the quality table's own criterion; training is chaotic, so another "
                "CPU's kernels act like another seed",
    "quality": "fixed tolerances for metrics without an interval (QUALITY_TOLERANCES: adherence 0.03, PSNR 1 dB, "
               "SSIM 0.02, FD 10%, ...): the same CPU and seed give these back",
    "speed": "within the speed factor: machines and their load differ",
    "other": "within 1% relative (memory, counts) or equal (strings, flags)",
    "skipped": "not compared: per-block curves and interval widths (their means are compared), busy speed "
               "records (their spread says nothing), speedups and flags",
}


class UsageError(ValueError):
    """A folder that cannot be checked (no records, another preset): exit status 2."""


def metric_kind(name: str) -> str:
    if name.startswith(("q_", "series_")):
        return "quality"
    if any(m in name for m in SPEED_MARKERS):
        return "speed"
    return "other"


def within(name: str, fresh: Any, committed: Any, speed_factor: float) -> bool:
    """Whether one metric without an interval agrees (non-numbers must be equal; None only
    matches None)."""
    if not is_number(fresh) or not is_number(committed):
        return fresh == committed
    if not (math.isfinite(fresh) and math.isfinite(committed)):
        return fresh == committed or (math.isnan(fresh) and math.isnan(committed))
    kind = metric_kind(name)
    if kind == "speed":
        lo, hi = sorted((abs(fresh), abs(committed)))
        return hi == 0 or (lo > 0 and hi / lo <= speed_factor)
    if kind == "quality":
        for prefix, abs_tol, rel_tol in QUALITY_TOLERANCES:
            if name.startswith(prefix):
                return abs(fresh - committed) <= abs_tol + rel_tol * abs(committed)
    return abs(fresh - committed) <= 0.01 * max(abs(committed), 1e-12)


def rule_for(name: str, fresh: dict[str, Any], committed: dict[str, Any]) -> str:
    """Which rule compares metric ``name`` of two records' metrics (see the module docstring)."""
    if name in NOT_COMPARED or name.startswith("series_") or name.endswith("_ci95"):
        return "skipped"
    ci = f"{name}_ci95"
    if is_number(fresh.get(ci)) and is_number(committed.get(ci)):
        return "interval"
    kind = metric_kind(name)
    if kind == "speed" and (fresh.get("busy") or committed.get("busy")):
        return "skipped"
    return kind


def _index(folder: str | Path, hardware: str, experiments: tuple[str, ...], role: str) -> dict[tuple[str, str], dict]:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--{role} {folder}: no such folder (expected a results folder of `make reproduce`)")
    # Keyed by variant, not file name: a record written before the spec varied a key keeps its
    # older slug (the key filled in by migration), and a fresh run names it with the key.
    recs = {(r["experiment"], json.dumps(r.get("variant", {}), sort_keys=True, default=str)): r
            for r in load_records(path) if r["experiment"] in experiments and hardware_tag(r["hardware"]) == hardware}
    if not recs:
        raise UsageError(f"--{role} {folder}: no {hardware} records of {', '.join(experiments)} (expected the "
                         f"results folder of a `make reproduce` run: <folder>/<experiment>/{hardware}/*.json)")
    return recs


def _presets(recs: dict[tuple[str, str], dict]) -> set[str]:
    return {str(r["variant"].get("preset")) for r in recs.values() if r["variant"].get("preset") is not None}


def compare(fresh_dir: str | Path, committed_dir: str | Path, *, hardware: str = "cpu",
            experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS, speed_factor: float = 3.0,
            counts: Counter | None = None) -> list[str]:
    """One line per problem (missing record, metric out of tolerance); empty when they agree.
    ``counts`` (if given) is filled with the number of metrics each rule compared. Raises
    :class:`UsageError` for a folder without such records or with records of another preset."""
    committed = _index(committed_dir, hardware, experiments, "committed")
    fresh = _index(fresh_dir, hardware, experiments, "fresh")
    want, got_presets = _presets(committed), _presets(fresh)
    if want and not (want & got_presets):
        raise UsageError(f"--fresh {fresh_dir}: records of preset {', '.join(sorted(got_presets))}, expected preset "
                         f"{', '.join(sorted(want))} (the committed {hardware} records)")
    counts = Counter() if counts is None else counts
    problems: list[str] = []
    for key, ref in sorted(committed.items()):
        got = fresh.get(key)
        key = (key[0], ref.get("variant_slug") or Path(ref["_path"]).stem)   # named by its file in messages
        if got is None:
            problems.append(f"{key[0]}/{key[1]}: no fresh record")
            continue
        pinned = [ref["hardware"].get("cpu_numerics"), got["hardware"].get("cpu_numerics")]
        if pinned[0] != pinned[1]:   # other CPU kernels: the quality metrics need not agree
            problems.append(f"{key[0]}/{key[1]}: CPU numerics settings differ (fresh {pinned[1]} vs committed "
                            f"{pinned[0]}); run it through `make check-reproduce`")
        fm, cm = got["metrics"], ref["metrics"]
        for name, value in sorted(cm.items()):
            if name not in fm:
                if rule_for(name, cm, cm) != "skipped":
                    problems.append(f"{key[0]}/{key[1]}: {name} missing in the fresh record")
                continue
            rule = rule_for(name, fm, cm)
            counts[rule] += 1
            if rule == "skipped":
                continue
            if rule == "interval":
                ok = not intervals_separate(fm[name], fm[f"{name}_ci95"], value, cm[f"{name}_ci95"])
                detail = f"fresh {fm[name]:.4g} +- {fm[name + '_ci95']:.3g} vs committed {value:.4g} +- " \
                         f"{cm[name + '_ci95']:.3g} (95% intervals separate)"
            else:
                ok = within(name, fm[name], value, speed_factor)
                detail = f"fresh {fm[name]!r} vs committed {value!r} ({rule} tolerance)"
            if not ok:
                problems.append(f"{key[0]}/{key[1]}: {name} {detail}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro.reproduce_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fresh", required=True, help="results folder of the fresh run")
    ap.add_argument("--committed", default="results", help="results folder of the committed records (default: results)")
    ap.add_argument("--hardware", default="cpu", help="hardware tag of the records compared (default: cpu)")
    ap.add_argument("--experiments", default=",".join(DEFAULT_EXPERIMENTS),
                    help=f"comma-separated experiments (default: {','.join(DEFAULT_EXPERIMENTS)})")
    ap.add_argument("--speed-factor", type=float, default=3.0,
                    help="speed metrics may differ by up to this factor (default: 3)")
    args = ap.parse_args(argv)
    if not args.speed_factor >= 1:
        print(f"error: --speed-factor must be >= 1, got {args.speed_factor}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    try:
        problems = compare(args.fresh, args.committed, hardware=args.hardware, counts=counts,
                           experiments=tuple(e for e in args.experiments.split(",") if e),
                           speed_factor=args.speed_factor)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    for rule in ("interval", "quality", "speed", "other", "skipped"):
        if counts[rule]:
            reason = REASONS[rule].replace("the speed factor", f"a factor of {args.speed_factor:g}")
            print(f"{rule}: {counts[rule]} metric(s); {reason}")
    print(f"{'MISMATCH' if problems else 'OK'}: {len(problems)} problem(s) comparing {args.fresh} with "
          f"{args.committed} ({args.hardware})", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
