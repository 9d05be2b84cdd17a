"""Tables (Markdown + CSV, each column defined in a legend) and plots from result records.

One module per idea:

- :mod:`repro.report.build`: the driver, :func:`build_report` (``python -m repro report``)
- :mod:`repro.report.tables`: the table frame, Markdown, 95% intervals and baseline verdicts
- :mod:`repro.report.plots`: bar charts, scatter views, axis labels and titles, saving figures
- :mod:`repro.report.columns`: the column legends (a definition for every column)
- :mod:`repro.report.labels`: numbers, hardware, commits and variants in words
- :mod:`repro.report.groups`: the records' benchmark, panels by hardware and preset, the baseline

What this package exports below is what the CLI, :mod:`repro.paper` and the benchmarks' own
figures (``extra["plots"]`` hooks) use, so they draw and label in the report's style.
"""

from __future__ import annotations

from repro.report.build import build_report
from repro.report.groups import baseline_record, spec_baseline
from repro.report.labels import common_label, fmt_num, hardware_label, short_commit, short_labels
from repro.report.plots import new_figure, save_figure

__all__ = ["baseline_record", "build_report", "common_label", "fmt_num", "hardware_label", "new_figure",
           "save_figure", "short_commit", "short_labels", "spec_baseline"]
