from __future__ import annotations

import re
from pathlib import Path

import pytest

import repro.benchmarks
from test_repro_helpers import FAKE, write_spec
from repro.benchmark import FieldSpec, get_benchmark
from repro.errors import BenchmarkError, SpecError
from repro.spec import load_spec, make_slug

REPO = Path(__file__).resolve().parents[1]


def _err(tmp_path: Path, **kw) -> str:
    path = write_spec(tmp_path / "x.yaml", **kw)
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: "), msg  # always names the file
    return msg


@pytest.mark.parametrize("kw, field, fragment", [
    ({"sweep": {"steps": [4, 3]}}, "sweep.steps[1]", "must be one of [2, 4], got 3"),
    ({"sweep": {"nope": [1]}}, "sweep.nope", "allowed: ['compile', 'mode', 'speed', 'steps']"),
    ({"sweep": {"steps": []}}, "sweep.steps", "must not be empty"),
    ({"sweep": {"steps": 4}}, "sweep.steps", "must be a list"),
    ({"base": {"speed": "fast"}}, "base.speed", "must be of type float"),
    ({"base": {"speed": 0.01}}, "base.speed", "must be >= 0.1"),
    ({"base": {"compile": 1}}, "base.compile", "must be of type bool"),
    ({"base": {"steps": True}}, "base.steps", "must be of type int"),
    ({"measure": {"blocks": 0}}, "measure.blocks", "must be >= 1"),
    ({"measure": {"steps": 4}}, "measure.steps", "unknown measure key 'steps'; allowed: ['blocks', 'warmup_blocks']"),
    ({"bogus": 1}, "bogus", "unknown top-level key"),
    ({"name": "Bad-Name"}, "name", "must match [a-z0-9_]+"),
    ({"benchmark": "no_such_bench"}, "benchmark", "unknown benchmark 'no_such_bench'; registered:"),
    ({"profiles": {"tpu": {}}}, "profiles.tpu", "unknown device class"),
    ({"profiles": {"cpu": {"variant": {"steps": 5}}}}, "profiles.cpu.variant.steps", "got 5"),
    ({"profiles": {"cpu": {"extra": {}}}}, "profiles.cpu.extra", "unknown profile key"),
    ({"sweep": {"steps": [4, 2]}, "profiles": {"cpu": {"variant": {"steps": 2}}}},
     "profiles.cpu.variant.steps", "is also swept"),
    ({"sweep": {"steps": [4, 2]}, "baseline": {"steps": 4, "mode": "other"}}, "baseline",
     "must match exactly one variant on cpu, matches no variant"),
    ({"sweep": {"steps": [4, 2], "mode": ["ok", "other"]}, "baseline": {"steps": 4}}, "baseline",
     "matches 2 variants"),
])
def test_validation_errors_name_the_field(tmp_path, kw, field, fragment):
    msg = _err(tmp_path, **kw)
    assert f": {field}: " in msg, msg
    assert fragment in msg, msg


def test_missing_required_and_bad_yaml(tmp_path):
    p = tmp_path / "y.yaml"
    p.write_text("description: x\nbenchmark: " + FAKE + "\n")
    with pytest.raises(SpecError, match=r"y\.yaml: name: required"):
        load_spec(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(p)
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")


def test_expand_order_defaults_and_precedence(tmp_path):
    spec = load_spec(write_spec(
        tmp_path / "x.yaml", base={"speed": 2}, sweep={"steps": [4, 2], "mode": ["ok", "other"]},
        measure={"blocks": 3},
        profiles={"cpu": {"variant": {"compile": True}, "measure": {"blocks": 1}},
                  "cuda": {"sweep": {"steps": [2]}}}))
    cpu = spec.expand("cpu")
    # Cartesian product in declaration order: steps outer, mode inner.
    assert [(v.values["steps"], v.values["mode"]) for v in cpu] == [(4, "ok"), (4, "other"), (2, "ok"), (2, "other")]
    for v in cpu:
        assert v.values["speed"] == 2.0 and isinstance(v.values["speed"], float)  # int coerced
        assert v.values["compile"] is True
        assert set(v.values) == {"mode", "speed", "steps", "compile"}  # fully defaulted
    assert spec.measure_for("cpu") == {"blocks": 1, "warmup_blocks": 2}
    cuda = spec.expand("cuda")
    assert [(v.values["steps"], v.values["mode"], v.values["compile"]) for v in cuda] == [(2, "ok", False), (2, "other", False)]
    assert spec.measure_for("cuda") == {"blocks": 3, "warmup_blocks": 2}


def test_missing_profile_for_device_is_an_error(tmp_path):
    spec = load_spec(write_spec(tmp_path / "x.yaml", profiles={"cpu": {}}))
    assert len(spec.expand("cpu")) == 1
    with pytest.raises(SpecError, match=r"x\.yaml: profiles\.cuda: missing.*\['cpu'\]"):
        spec.expand("cuda")
    # No profiles section at all: runs the same everywhere.
    spec2 = load_spec(write_spec(tmp_path / "y.yaml"))
    assert spec2.expand("cuda")[0].values == spec2.expand("cpu")[0].values


def test_slug_stable_and_safe(tmp_path):
    spec = load_spec(write_spec(tmp_path / "x.yaml", base={"speed": 1.5}, sweep={"steps": [4, 2]}))
    slugs = [v.slug for v in spec.expand("cpu")]
    assert slugs == ["speed-1.5__steps-4", "speed-1.5__steps-2"]
    assert slugs == [v.slug for v in load_spec(spec.path).expand("cpu")]  # stable across loads
    # Key order of the values does not matter; unsafe characters are replaced.
    assert make_slug({"b": 1, "a": "x/y z"}, {"a", "b"}) == make_slug({"a": "x/y z", "b": 1}, ["b", "a"])
    assert re.fullmatch(r"[A-Za-z0-9._-]+", make_slug({"a": "x/y z", "b": True}, {"a", "b"}))
    assert make_slug({"a": 1}, set()) == "default"
    assert len(make_slug({f"k{i}": "v" * 20 for i in range(20)}, {f"k{i}" for i in range(20)})) <= 150


def test_repo_gemm_spec_is_valid():
    spec = load_spec(REPO / "experiments" / "gemm_throughput.yaml")
    cpu = spec.expand("cpu")
    assert cpu and all(v.values["dtype"] == "float32" and v.values["m"] <= 512 for v in cpu)
    cuda = spec.expand("cuda")
    assert all(v.values["m"] == 7040 and v.values["dtype"] == "bfloat16" for v in cuda)
    assert {(v.values["n"], v.values["k"]) for v in cuda} >= {(3072, 3072), (14336, 3072), (3072, 14336)}
    assert spec.baseline is None


def test_fieldspec_rejects_bad_default():
    with pytest.raises(TypeError):
        FieldSpec(int, 0, min=1)


def test_broken_benchmark_module_is_isolated(tmp_path, monkeypatch):
    (tmp_path / "broken_bench.py").write_text("import impl_module_that_does_not_exist\n")
    monkeypatch.setattr(repro.benchmarks, "__path__", [*repro.benchmarks.__path__, str(tmp_path)])
    with pytest.raises(BenchmarkError, match=r"repro\.benchmarks\.broken_bench failed to import: "
                                             r"ModuleNotFoundError"):
        get_benchmark("broken_bench")
    assert get_benchmark("gemm_throughput").name == "gemm_throughput"  # others unaffected
    with pytest.raises(BenchmarkError, match=r"unknown benchmark 'zzz'; registered: .*gemm_throughput"):
        get_benchmark("zzz")


def test_sweep_list_is_a_union_of_grids_without_duplicates(tmp_path):
    path = write_spec(tmp_path / "u.yaml", sweep=[{"steps": [4, 2]}, {"mode": ["ok", "other"], "compile": [True]},
                                                  {"steps": [4]}],
                      baseline={"steps": 4, "mode": "ok", "compile": False})
    spec = load_spec(path)
    got = [(v.values["steps"], v.values["mode"], v.values["compile"]) for v in spec.expand("cpu")]
    assert got == [(4, "ok", False), (2, "ok", False), (4, "ok", True), (4, "other", True)]
    slugs = [v.slug for v in spec.expand("cpu")]
    assert len(set(slugs)) == 4 and all("steps-" in s and "mode-" in s for s in slugs)
    # a profile's list replaces the grids; its mapping overrides keys in each grid
    path = write_spec(tmp_path / "p.yaml", sweep=[{"steps": [4, 2]}, {"mode": ["other"]}],
                      profiles={"cpu": {"sweep": {"steps": [2]}}, "cuda": {"sweep": [{"speed": [2.0, 3.0]}]}})
    spec = load_spec(path)
    assert [(v.values["steps"], v.values["mode"]) for v in spec.expand("cpu")] == [(2, "ok"), (2, "other")]
    assert [v.values["speed"] for v in spec.expand("cuda")] == [2.0, 3.0]
    assert "sweep[1].nope" in _err(tmp_path, sweep=[{"steps": [4]}, {"nope": [1]}])
    assert "must not be empty" in _err(tmp_path, sweep=[])


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_loads_and_expands(path):
    """Each experiment file names a known benchmark, expands on both device classes, and
    (loading checks it) its baseline matches exactly one variant there."""
    spec = load_spec(path)
    assert spec.name == path.stem
    for device_class in ("cpu", "cuda"):
        assert spec.expand(device_class), f"{path.name}: no variants on {device_class}"
