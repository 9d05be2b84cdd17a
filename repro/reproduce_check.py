"""Does a fresh ``make reproduce`` give the committed CPU records back? Compare two result folders.

    python -m repro.reproduce_check --fresh /tmp/fresh_results --committed results [--hardware cpu]

Every committed record of the checked experiments on that hardware must have a fresh record
with the same variant, and every metric must agree within its tolerance:
- quality metrics (``q_*``) tightly: the proxy is trained and scored deterministically for a
  given torch build, CPU instruction set and thread count (``make reproduce`` pins them);
- speed metrics (FPS, milliseconds, TFLOP/s) loosely: within a factor of ``--speed-factor``
  (machines and their load differ);
- other numbers (memory, counts) to 1% relative.
Exit status 0 when everything matches, 1 with a table of the differences otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from repro.hardware import hardware_tag
from repro.records import load_records

# (metric-name prefix or exact name, absolute tolerance, relative tolerance); first match wins.
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
    ("series_", 0.05, 0.05),
]
SPEED_MARKERS = ("fps", "_ms", "ms_", "tflops", "gbps", "tokens_per_s", "step_s", "_s_", "train_s", "wall_s",
                 "speedup", "roofline_fraction", "warmup_s", "dit_fps_shared_gpu", "share", "busy")
DEFAULT_EXPERIMENTS = ("inference_speed", "quality")


def metric_kind(name: str) -> str:
    if name.startswith(("q_", "series_")):
        return "quality"
    if any(m in name for m in SPEED_MARKERS):
        return "speed"
    return "other"


def within(name: str, fresh: Any, committed: Any, speed_factor: float) -> bool:
    """Whether one metric agrees (non-numbers must be equal; None only matches None)."""
    if not isinstance(fresh, (int, float)) or not isinstance(committed, (int, float)) or \
            isinstance(fresh, bool) or isinstance(committed, bool):
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


def compare(fresh_dir: str | Path, committed_dir: str | Path, *, hardware: str = "cpu",
            experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS, speed_factor: float = 3.0) -> list[str]:
    """One line per problem (missing record, metric out of tolerance); empty when they agree."""
    def index(folder):
        return {(r["experiment"], r.get("variant_slug") or Path(r["_path"]).stem): r
                for r in load_records(folder)
                if r["experiment"] in experiments and hardware_tag(r["hardware"]) == hardware}

    fresh, committed = index(fresh_dir), index(committed_dir)
    if not committed:
        return [f"{committed_dir}: no committed {hardware} records of {list(experiments)}"]
    problems: list[str] = []
    for key, ref in sorted(committed.items()):
        got = fresh.get(key)
        if got is None:
            problems.append(f"{key[0]}/{key[1]}: no fresh record")
            continue
        pinned = [ref["hardware"].get("cpu_numerics"), got["hardware"].get("cpu_numerics")]
        if pinned[0] != pinned[1]:   # other CPU kernels: the quality metrics need not agree
            problems.append(f"{key[0]}/{key[1]}: CPU numerics settings differ (fresh {pinned[1]} vs committed "
                            f"{pinned[0]}); run it through `make check-reproduce`")
        for name, value in sorted(ref["metrics"].items()):
            if name == "speedup_vs_baseline":
                continue
            if name not in got["metrics"]:
                problems.append(f"{key[0]}/{key[1]}: {name} missing in the fresh record")
            elif not within(name, got["metrics"][name], value, speed_factor):
                problems.append(f"{key[0]}/{key[1]}: {name} fresh {got['metrics'][name]!r} vs committed {value!r} "
                                f"({metric_kind(name)} tolerance)")
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
    problems = compare(args.fresh, args.committed, hardware=args.hardware,
                       experiments=tuple(e for e in args.experiments.split(",") if e), speed_factor=args.speed_factor)
    for line in problems:
        print(line)
    print(f"{'MISMATCH' if problems else 'OK'}: {len(problems)} problem(s) comparing {args.fresh} with "
          f"{args.committed} ({args.hardware})", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
