"""repro.stats: Student-t intervals over seeds, interval separation, spread of repeats."""

from __future__ import annotations

import math
import statistics

import pytest

from repro.stats import intervals_separate, is_busy, mean_ci95, repeat_summary, t975


def test_t_quantiles_match_the_table_and_approach_the_normal():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert abs(t975(31) - 2.0395) < 2e-3 and abs(t975(120) - 1.980) < 1e-3 and t975(10_000) > 1.959
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_mean_ci95_over_seeds():
    mean, half = mean_ci95([0.30, 0.40, 0.50])
    assert mean == pytest.approx(0.40) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert mean_ci95([0.5]) == (0.5, None)                        # one seed: no interval
    assert mean_ci95([1.0, float("nan"), 3.0])[0] == 2.0          # undefined for a seed: skipped
    assert math.isnan(mean_ci95([])[0])


def test_intervals_separate_only_when_they_do_not_overlap():
    assert intervals_separate(1.0, 0.1, 1.5, 0.1) and intervals_separate(1.5, 0.1, 1.0, 0.1)
    assert not intervals_separate(1.0, 0.3, 1.5, 0.3)
    assert not intervals_separate(1.0, None, 5.0, 0.1)            # no interval, no claim


def test_repeat_summary_and_busy_flag():
    assert repeat_summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert not is_busy([100.0, 102.0, 98.0]) and is_busy([100.0, 60.0, 101.0])
    assert statistics.median([1, 2]) == repeat_summary([1.0, 2.0])["median"]
    with pytest.raises(ValueError):
        repeat_summary([])
