"""The LongLive-2.0 reproduction harness: specs, runner, records, reports and CLI.

Nothing here imports ``impl`` at module level, so the harness (and reports over
existing records) work even when the system package is incomplete.
"""

from __future__ import annotations

__all__ = ["benchmark", "hardware", "records", "report", "runner", "spec", "paper"]
