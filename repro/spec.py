"""YAML experiment specs: load, validate against the benchmark's fields, expand into variants.

Precedence of variant values: field defaults < ``base`` < ``profiles.<device>.variant`` <
``sweep`` (with ``profiles.<device>.sweep`` replacing whole sweep lists). A key may not be
both pinned by a profile and swept, so nothing is overridden silently.
``sweep`` is one grid (a mapping of key -> values: the cartesian product) or a list of grids
(their union, each variant once), so a spec can vary one factor at a time around a baseline
instead of running every combination. A profile's mapping sweep overrides those keys in every
grid; a profile's list sweep replaces the grids.
If a spec has a ``profiles`` section, the device a run uses must have an entry in it.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repro.benchmark import Benchmark, FieldSpec, get_benchmark
from repro.errors import BenchmarkError, SpecError

TOP_KEYS = ("name", "description", "benchmark", "base", "sweep", "measure", "profiles", "baseline")
PROFILE_KEYS = ("variant", "measure", "sweep")
DEVICE_CLASSES = ("cpu", "cuda")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Variant:
    values: dict[str, Any]
    slug: str


@dataclass(frozen=True)
class Profile:
    variant: dict[str, Any] = field(default_factory=dict)
    measure: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] | list[dict[str, list[Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    benchmark: str
    base: dict[str, Any]
    sweep: list[dict[str, list[Any]]]       # grids; their union is the variant set
    measure: dict[str, Any]
    profiles: dict[str, Profile]
    baseline: dict[str, Any] | None
    path: Path

    def _err(self, where: str, msg: str) -> SpecError:
        return SpecError(f"{self.path}: {where}: {msg}")

    def get_benchmark(self) -> Benchmark:
        return get_benchmark(self.benchmark)

    def profile(self, device_class: str) -> Profile:
        if device_class not in DEVICE_CLASSES:
            raise self._err("device", f"must be one of {list(DEVICE_CLASSES)}, got {device_class!r}")
        if not self.profiles:
            return Profile()  # no profiles section: the spec runs the same everywhere
        if device_class not in self.profiles:
            raise self._err(f"profiles.{device_class}",
                            f"missing; this spec declares profiles for {sorted(self.profiles)} "
                            f"but the run uses device {device_class!r}")
        return self.profiles[device_class]

    def measure_for(self, device_class: str) -> dict[str, Any]:
        bench = self.get_benchmark()
        return {**bench.measure_defaults(), **self.measure, **self.profile(device_class).measure}

    def expand(self, device_class: str) -> list[Variant]:
        """All variants for this device class, fully defaulted, in sweep order."""
        bench = self.get_benchmark()
        prof = self.profile(device_class)
        grids = self.grids(device_class)
        fixed = {**self.base, **prof.variant}
        set_keys = set(fixed).union(*(set(g) for g in grids))
        out: list[Variant] = []
        seen: set[str] = set()
        for grid in grids:
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)):
                values = {**bench.defaults(), **fixed, **dict(zip(keys, combo))}
                if bench.check_variant is not None:
                    try:
                        bench.check_variant(values)
                    except ValueError as exc:
                        raise self._err(f"variant {values}", str(exc)) from None
                if repr(sorted(values.items())) in seen:  # grids may overlap (e.g. the baseline)
                    continue
                seen.add(repr(sorted(values.items())))
                out.append(Variant(values=values, slug=make_slug(values, set_keys)))
        slugs = [v.slug for v in out]
        if len(set(slugs)) != len(slugs):  # sanitising can merge distinct values; disambiguate
            out = [Variant(v.values, f"{v.slug}__{_hash(v.values)}") for v in out]
        return out

    def grids(self, device_class: str) -> list[dict[str, list[Any]]]:
        prof = self.profile(device_class)
        if isinstance(prof.sweep, list):
            return prof.sweep or [{}]
        return [{**grid, **prof.sweep} for grid in (self.sweep or [{}])]

    def baseline_variant(self, device_class: str) -> Variant | None:
        if self.baseline is None:
            return None
        matches = [v for v in self.expand(device_class) if matches_subset(v.values, self.baseline)]
        if len(matches) != 1:
            found = "no variant" if not matches else f"{len(matches)} variants ({[m.slug for m in matches]})"
            raise self._err("baseline", f"{self.baseline} must match exactly one variant on "
                                        f"{device_class}, matches {found}")
        return matches[0]


def matches_subset(values: dict[str, Any], subset: dict[str, Any]) -> bool:
    """True if every key of ``subset`` has the same value in ``values`` (lists mean any-of)."""
    for k, want in subset.items():
        have = values.get(k)
        if isinstance(want, (list, tuple)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _slug_part(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def _hash(values: dict[str, Any]) -> str:
    return hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:8]


def make_slug(values: dict[str, Any], keys: set[str] | list[str]) -> str:
    """Stable filesystem-safe name: sorted ``key-value`` pairs of the keys set or swept."""
    parts = [f"{_slug_part(k)}-{_slug_part(values[k])}" for k in sorted(keys) if k in values]
    slug = "__".join(parts) or "default"
    if len(slug) > 150:  # keep file names short enough for every filesystem
        slug = f"{slug[:140]}__{_hash(values)}"
    return slug


# ---------------------------------------------------------------- validation


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, msg: str) -> SpecError:
        return SpecError(f"{self.path}: {where}: {msg}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {type(value).__name__} {value!r}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(where, f"keys must be strings, got {k!r}")
        return value

    def value(self, fields: dict[str, FieldSpec], key: str, value: Any, where: str) -> Any:
        problem = fields[key].problem(value)
        if problem is not None:
            raise self.fail(where, problem)
        return fields[key].coerce(value)

    def known(self, fields: dict[str, FieldSpec], key: str, where: str, kind: str) -> None:
        if key not in fields:
            raise self.fail(where, f"unknown {kind} key {key!r}; allowed: {sorted(fields)}")

    def values(self, fields: dict[str, FieldSpec], raw: Any, where: str, kind: str) -> dict[str, Any]:
        out = {}
        for k, v in self.mapping(raw, where).items():
            self.known(fields, k, f"{where}.{k}", kind)
            out[k] = self.value(fields, k, v, f"{where}.{k}")
        return out

    def sweeps(self, fields: dict[str, FieldSpec], raw: Any, where: str) -> list[dict[str, list[Any]]]:
        """A mapping (one grid) or a non-empty list of mappings (a union of grids)."""
        if isinstance(raw, list):
            if not raw:
                raise self.fail(where, "a list of grids must not be empty")
            return [self.sweep(fields, g, f"{where}[{i}]") for i, g in enumerate(raw)]
        grid = self.sweep(fields, raw, where)
        return [grid] if grid else []

    def sweep(self, fields: dict[str, FieldSpec], raw: Any, where: str) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for k, lst in self.mapping(raw, where).items():
            self.known(fields, k, f"{where}.{k}", "variant")
            if not isinstance(lst, list):
                raise self.fail(f"{where}.{k}", f"must be a list of values, got {lst!r}")
            if not lst:
                raise self.fail(f"{where}.{k}", "must not be empty")
            vals = [self.value(fields, k, v, f"{where}.{k}[{i}]") for i, v in enumerate(lst)]
            if len(set(map(repr, vals))) != len(vals):
                raise self.fail(f"{where}.{k}", f"contains duplicate values: {lst}")
            out[k] = vals
        return out


def parse_spec(data: Any, path: str | Path) -> Spec:
    """Validate already-parsed YAML ``data`` (``path`` is only used in messages)."""
    path = Path(path)
    c = _Checker(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for k in data:
        if k not in TOP_KEYS:
            raise c.fail(str(k), f"unknown top-level key; allowed: {list(TOP_KEYS)}")
    for k in ("name", "benchmark"):
        if k not in data:
            raise c.fail(k, "required")
    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise c.fail("name", f"must match [a-z0-9_]+, got {name!r}")
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise c.fail("description", f"must be a string, got {description!r}")
    bench_name = data["benchmark"]
    if not isinstance(bench_name, str):
        raise c.fail("benchmark", f"must be a string, got {bench_name!r}")
    try:
        bench = get_benchmark(bench_name)
    except BenchmarkError as exc:
        raise c.fail("benchmark", str(exc)) from None
    vf, mf = bench.variant_fields, bench.measure_fields

    base = c.values(vf, data.get("base"), "base", "variant")
    sweep = c.sweeps(vf, data.get("sweep"), "sweep")
    measure = c.values(mf, data.get("measure"), "measure", "measure")

    profiles: dict[str, Profile] = {}
    for dev, raw in c.mapping(data.get("profiles"), "profiles").items():
        where = f"profiles.{dev}"
        if dev not in DEVICE_CLASSES:
            raise c.fail(where, f"unknown device class; allowed: {list(DEVICE_CLASSES)}")
        raw = c.mapping(raw, where)
        for k in raw:
            if k not in PROFILE_KEYS:
                raise c.fail(f"{where}.{k}", f"unknown profile key; allowed: {list(PROFILE_KEYS)}")
        raw_sweep = raw.get("sweep")
        prof_sweep = (c.sweeps(vf, raw_sweep, f"{where}.sweep") if isinstance(raw_sweep, list)
                      else c.sweep(vf, raw_sweep, f"{where}.sweep"))
        prof = Profile(variant=c.values(vf, raw.get("variant"), f"{where}.variant", "variant"),
                       measure=c.values(mf, raw.get("measure"), f"{where}.measure", "measure"),
                       sweep=prof_sweep)
        swept = set().union(*(set(g) for g in (prof_sweep if isinstance(prof_sweep, list)
                                                else [*sweep, prof_sweep])))
        for k in prof.variant:
            if k in swept:
                raise c.fail(f"{where}.variant.{k}",
                             f"is also swept; restrict the sweep with {where}.sweep.{k} instead")
        profiles[dev] = prof

    baseline = None
    if data.get("baseline") is not None:
        baseline = c.values(vf, data["baseline"], "baseline", "variant")
        if not baseline:
            raise c.fail("baseline", "must name at least one variant key (or be omitted)")

    spec = Spec(name=name, description=description, benchmark=bench_name, base=base, sweep=sweep,
                measure=measure, profiles=profiles, baseline=baseline, path=path)
    # Expand every declared device class now so bad combinations and baselines fail at load.
    for dev in (sorted(profiles) or ["cpu"]):
        spec.expand(dev)
        spec.baseline_variant(dev)
    return spec


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML experiment spec; raises SpecError naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    return parse_spec(data, path)
