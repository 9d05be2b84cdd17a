"""Uncertainty of repeated measurements: confidence intervals over seeds, spread over repeats.

- Quality metrics are means over independent seeds (:func:`mean_ci95`: Student-t 95% interval
  of the mean); two rows differ measurably only when their intervals separate
  (:func:`intervals_separate`).
- Speed figures are medians of repeated runs (:func:`repeat_summary`: median, min and max); a
  spread wider than :data:`BUSY_SPREAD` of the median says something else ran on the machine
  (:func:`is_busy`).

Pure Python (no scipy): the t quantiles are the standard table, with the Cornish-Fisher
expansion beyond 30 degrees of freedom (within 0.001 of the exact value there).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

__all__ = ["is_number", "t975", "mean_ci95", "intervals_separate", "repeat_summary", "is_busy", "BUSY_SPREAD"]

# Two-sided 95% Student-t quantiles (the 0.975 quantile) for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964

# (max - min) / median of repeated speed runs above which a run is flagged busy: repeats of one
# deterministic workload on an idle machine agree to a few percent.
BUSY_SPREAD = 0.25


def is_number(x: Any) -> bool:
    """A metric value that is a number (int or float, not a bool; NaN and inf included)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% confidence interval) over independent samples (e.g. seeds);
    the half-width is None for a single sample. NaNs are skipped (a metric undefined for a seed)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return float("nan"), None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def intervals_separate(a: float, ha: float | None, b: float, hb: float | None) -> bool:
    """Whether the intervals ``a +- ha`` and ``b +- hb`` do not overlap (a measurable difference);
    False when either has no interval."""
    if ha is None or hb is None or not all(map(math.isfinite, (a, ha, b, hb))):
        return False
    return abs(a - b) > ha + hb


def repeat_summary(values: Sequence[float]) -> dict[str, float]:
    """``median``, ``min`` and ``max`` of repeated measurements of one figure."""
    if not values:
        raise ValueError("repeat_summary: no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def is_busy(values: Sequence[float], spread: float = BUSY_SPREAD) -> bool:
    """Whether repeats of one measurement spread by more than ``spread`` of their median."""
    s = repeat_summary(values)
    return s["median"] > 0 and (s["max"] - s["min"]) / s["median"] > spread
