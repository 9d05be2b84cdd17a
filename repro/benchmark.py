"""Benchmark registry: a benchmark declares its typed variant/measure fields and a run function.

Benchmark modules live in ``repro/benchmarks/<module>.py`` and call :func:`register` at import.
:func:`get_benchmark` imports them by name on demand, so a module that fails to import (for
example one that needs ``impl`` pieces not written yet) only errors when it is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from repro.errors import BenchmarkError

_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}

# The registry is the one piece of module-level mutable state (name -> Benchmark).
_REGISTRY: dict[str, "Benchmark"] = {}


@dataclass(frozen=True)
class FieldSpec:
    """One typed knob: ``type`` is int, float, str or bool."""

    type: type
    default: Any
    choices: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"FieldSpec.type must be one of int/float/str/bool, got {self.type!r}")
        # Defaults must pass their own validation, so a bad declaration fails at import.
        problem = self.problem(self.default)
        if problem is not None:
            raise TypeError(f"FieldSpec default {self.default!r}: {problem}")

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.type]

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None if it is."""
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            return f"must be of type {self.type_name}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        if self.min is not None and value < self.min:
            return f"must be >= {self.min}, got {value!r}"
        if self.max is not None and value > self.max:
            return f"must be <= {self.max}, got {value!r}"
        return None

    def coerce(self, value: Any) -> Any:
        """Normalise an accepted value (ints given for float fields become floats)."""
        return float(value) if self.type is float else value

    def parse(self, text: str) -> Any:
        """Parse a command-line string into this field's type (validation is separate)."""
        if self.type is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"must be a bool (true/false), got {text!r}")
        try:
            return self.type(text)
        except ValueError:
            raise ValueError(f"must be of type {self.type_name}, got {text!r}") from None


Metrics = dict[str, Any]
RunFn = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], Metrics]


@dataclass(frozen=True)
class Benchmark:
    """A measurable thing.

    ``run(variant, measure, hardware) -> metrics`` gets fully-defaulted, validated dicts and
    returns a flat dict of metric name -> number. ``primary_metric`` is the one used for
    ``speedup_vs_baseline``; ``plot`` names the metric bar-plotted in reports (defaults to
    the primary metric). ``check_variant`` may raise ValueError for cross-field problems.
    ``extra`` holds report hooks (repro/report/build.py): ``plots(records, plots_dir) -> paths`` draws
    further figures, and with ``bar_plot: False`` replaces the bar chart; ``analytic(record) ->
    label or None`` names a cost model's record by what it assumes instead of its hardware.
    """

    name: str
    description: str
    variant_fields: dict[str, FieldSpec]
    measure_fields: dict[str, FieldSpec]
    run: RunFn
    table_metrics: list[str]
    primary_metric: str
    plot: str | None = None
    check_variant: Callable[[dict[str, Any]], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary_metric not in self.table_metrics:
            raise TypeError(f"Benchmark {self.name}: primary_metric {self.primary_metric!r} "
                            f"must be listed in table_metrics {self.table_metrics}")

    @property
    def plot_metric(self) -> str:
        return self.plot or self.primary_metric

    def defaults(self) -> dict[str, Any]:
        return {k: f.default for k, f in self.variant_fields.items()}

    def measure_defaults(self) -> dict[str, Any]:
        return {k: f.default for k, f in self.measure_fields.items()}


def register(benchmark: Benchmark) -> Benchmark:
    """Add a benchmark to the registry (re-registering the same name replaces it)."""
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def _benchmark_modules() -> list[str]:
    import repro.benchmarks as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _import_module(module: str) -> None:
    """Import ``repro.benchmarks.<module>``; turn any failure into a clear BenchmarkError."""
    full = f"repro.benchmarks.{module}"
    try:
        importlib.import_module(full)
    except Exception as exc:  # any import-time failure of someone else's module
        raise BenchmarkError(f"benchmark module {full} failed to import: "
                             f"{type(exc).__name__}: {exc}") from exc


def load_all() -> dict[str, str]:
    """Import every benchmark module; return {module: error message} for those that failed."""
    errors: dict[str, str] = {}
    for module in _benchmark_modules():
        try:
            _import_module(module)
        except BenchmarkError as exc:
            errors[module] = str(exc)
    return errors


def registered() -> list[str]:
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    """Return the benchmark called ``name``, importing its module on demand.

    First tries the module of the same name (``repro.benchmarks.<name>``); if that module
    does not exist, imports the other benchmark modules (skipping broken ones) and looks again.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    modules = _benchmark_modules()
    if name in modules:
        _import_module(name)  # raises a clear error if this benchmark's module is broken
        if name in _REGISTRY:
            return _REGISTRY[name]
    errors = load_all()
    if name in _REGISTRY:
        return _REGISTRY[name]
    msg = f"unknown benchmark {name!r}; registered: {registered()}"
    if errors:
        msg += "; modules that failed to import: " + "; ".join(errors.values())
    raise BenchmarkError(msg)
