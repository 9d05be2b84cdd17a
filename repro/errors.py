"""Harness error types. The CLI turns these into one-line messages and exit codes."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class for errors the CLI reports without a traceback."""


class SpecError(HarnessError, ValueError):
    """An experiment spec (or a command-line override of it) is invalid; names file and field."""


class BenchmarkError(HarnessError, LookupError):
    """A benchmark is unknown or its module failed to import."""

    def __str__(self) -> str:  # LookupError would otherwise repr() the message like KeyError
        return str(self.args[0]) if self.args else ""


class RunError(HarnessError, RuntimeError):
    """One or more variants of a run failed; the others were still run and recorded."""
