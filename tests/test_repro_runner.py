from __future__ import annotations

import json

import pytest

from test_repro_helpers import gemm_spec, write_spec
from repro.cli import main
from repro.errors import RunError, SpecError
from repro.records import load_records
from repro.runner import metric_direction, run_spec, speedup


def test_gemm_end_to_end_cpu(tmp_path):
    spec = gemm_spec(tmp_path / "g.yaml")
    out = tmp_path / "res"
    paths = run_spec(spec, results_dir=out, device="cpu", progress=False)
    assert [p.name for p in paths] == ["dtype-float32__k-16__m-32__n-32.json", "dtype-float32__k-32__m-32__n-32.json"]
    for p in paths:
        assert p.parent == out / "gemm_small" / "cpu"
        r = json.loads(p.read_text())
        assert r["benchmark"] == "gemm_throughput" and r["hardware"]["device"] == "cpu"
        assert r["metrics"]["tflops"] > 0 and r["metrics"]["ms_p50"] > 0
        assert r["measure"] == {"warmup": 1, "repeats": 2, "seed": 0}
        assert "speedup_vs_baseline" not in r["metrics"]  # no baseline declared
    # 2*m*n*k flops must be consistent with the reported time.
    r = json.loads(paths[1].read_text())
    assert r["metrics"]["tflops"] == pytest.approx(2 * 32 * 32 * 32 / (r["metrics"]["ms_p50"] * 1e-3) / 1e12)


def test_only_filter_and_bad_only(tmp_path):
    spec = gemm_spec(tmp_path / "g.yaml")
    paths = run_spec(spec, results_dir=tmp_path / "r", device="cpu", only={"k": "32"}, progress=False)
    assert len(paths) == 1 and "k-32" in paths[0].name
    with pytest.raises(SpecError, match="--only nope: unknown variant key"):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", only={"nope": "1"}, progress=False)
    with pytest.raises(SpecError, match="k=99: no variant has it on cpu; values of k: 16, 32"):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", only={"k": "99"}, progress=False)
    kept = run_spec(spec, results_dir=tmp_path / "x", device="cpu", exclude={"k": "32"}, progress=False)
    assert kept and not any("k-32" in p.name for p in kept)


def test_measure_override_is_typed_validated_and_recorded(tmp_path):
    spec = gemm_spec(tmp_path / "g.yaml")
    paths = run_spec(spec, results_dir=tmp_path / "r", device="cpu", only={"k": "16"}, progress=False,
                     measure={"repeats": "3"})
    assert json.loads(paths[0].read_text())["measure"] == {"warmup": 1, "repeats": 3, "seed": 0}
    with pytest.raises(SpecError, match="--measure nope: unknown measure key"):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False, measure={"nope": "1"})
    with pytest.raises(SpecError, match="--measure repeats: must be >= 1"):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False, measure={"repeats": "0"})
    with pytest.raises(SpecError, match="--measure repeats"):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False, measure={"repeats": "many"})


def test_profile_of_another_device_class(tmp_path):
    spec = write_spec(tmp_path / "p.yaml", sweep={"speed": [1.0]},
                      profiles={"cpu": {"measure": {"blocks": 2}},
                                "cuda": {"variant": {"mode": "other"}, "measure": {"blocks": 16}}})
    rec = json.loads(run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False,
                              profile="cuda")[0].read_text())
    assert rec["variant"]["mode"] == "other" and rec["measure"]["blocks"] == 16
    assert rec["hardware"]["device"] == "cpu"            # records name the hardware that ran
    rec = json.loads(run_spec(spec, results_dir=tmp_path / "r2", device="cpu", progress=False)[0].read_text())
    assert rec["variant"]["mode"] == "ok" and rec["measure"]["blocks"] == 2
    with pytest.raises(SpecError, match="device"):
        run_spec(spec, results_dir=tmp_path / "r3", device="cpu", progress=False, profile="tpu")


def test_failing_variant_others_still_run(tmp_path, capsys):
    spec = write_spec(tmp_path / "f.yaml", sweep={"mode": ["ok", "boom", "other"]})
    with pytest.raises(RunError, match=r"1 of 3 variants failed \(2 recorded\).*mode-boom.*deliberate failure"):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False)
    recs = load_records(tmp_path / "r")
    assert sorted(r["variant"]["mode"] for r in recs) == ["ok", "other"]
    assert "FAILED fake_exp variant mode-boom" in capsys.readouterr().err


def test_speedup_against_baseline(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", sweep={"speed": [1.0, 2.5, 0.5]}, baseline={"speed": 1.0})
    run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False)
    by_speed = {r["variant"]["speed"]: r for r in load_records(tmp_path / "r")}
    assert by_speed[1.0]["metrics"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert by_speed[2.5]["metrics"]["speedup_vs_baseline"] == pytest.approx(2.5)
    assert by_speed[0.5]["metrics"]["speedup_vs_baseline"] == pytest.approx(0.5)
    assert by_speed[2.5]["baseline"]["metric"] == "e2e_fps"
    # A filter that leaves the baseline out still runs it, so speedups stay same-run.
    run_spec(spec, results_dir=tmp_path / "r2", device="cpu", only={"speed": "2.5"}, progress=False)
    by_speed = {r["variant"]["speed"]: r for r in load_records(tmp_path / "r2")}
    assert sorted(by_speed) == [1.0, 2.5]
    assert by_speed[2.5]["metrics"]["speedup_vs_baseline"] == pytest.approx(2.5)


def test_a_run_cut_short_keeps_the_speedups_it_measured(tmp_path, monkeypatch):
    """A device call's deadline (or Ctrl-C) stops a run mid-spec: the rows written by then carry
    their speedup against the baseline, which runs first."""
    import dataclasses

    import repro.benchmark as benchmark_module
    from test_repro_helpers import FAKE

    bench = benchmark_module.get_benchmark(FAKE)
    calls = []

    def run_until_the_third(variant, measure, hw):
        calls.append(variant["speed"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return bench.run(variant, measure, hw)

    monkeypatch.setitem(benchmark_module._REGISTRY, FAKE, dataclasses.replace(bench, run=run_until_the_third))
    spec = write_spec(tmp_path / "s.yaml", sweep={"speed": [1.0, 2.5, 0.5]}, baseline={"speed": 1.0})
    with pytest.raises(KeyboardInterrupt):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False)
    by_speed = {r["variant"]["speed"]: r for r in load_records(tmp_path / "r")}
    assert sorted(by_speed) == [1.0, 2.5]
    assert by_speed[2.5]["metrics"]["speedup_vs_baseline"] == pytest.approx(2.5)


def test_speedup_direction():
    assert metric_direction("e2e_fps") == "higher" and metric_direction("tflops") == "higher"
    assert metric_direction("tokens_per_s") == "higher"
    assert metric_direction("step_s") == "lower" and metric_direction("block_ms_p50") == "lower"
    assert metric_direction("ms_p50") == "lower" and metric_direction("peak_mem_gb") is None
    assert speedup("block_ms_p50", 50.0, 100.0) == 2.0
    assert speedup("e2e_fps", 30.0, 15.0) == 2.0


def test_cli_exit_codes(tmp_path, capsys):
    bad = write_spec(tmp_path / "bad.yaml", sweep={"steps": [3]})
    assert main(["run", str(bad), "--results", str(tmp_path / "r"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.steps[0]" in err and "Traceback" not in err
    fail = write_spec(tmp_path / "fail.yaml", sweep={"mode": ["boom"]})
    assert main(["run", str(fail), "--results", str(tmp_path / "r"), "--device", "cpu", "--no-progress"]) == 1
    assert main(["run", str(gemm_spec(tmp_path / "g.yaml")), "--results", str(tmp_path / "r"),
                 "--device", "cpu", "--only", "k=16", "--no-progress"]) == 0
    assert "k-16" in capsys.readouterr().out
    assert main(["specs", "--dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "[repro_test_fake]  test" in listing and "[gemm_throughput]" in listing


def test_commit_flag_overrides_stale_dirty_git_metadata(tmp_path, monkeypatch):
    import repro.runner as runner
    spec = write_spec(tmp_path / "s.yaml")
    monkeypatch.setattr(runner, "git_state", lambda exclude=(): {"commit": "a" * 40, "dirty": True})
    run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False, commit="b" * 7)
    (rec,) = load_records(tmp_path / "r")
    assert rec["commit"] == "b" * 7 and "stale" in rec["commit_source"]
    monkeypatch.setattr(runner, "git_state", lambda exclude=(): {"commit": "a" * 40, "dirty": False})
    run_spec(spec, results_dir=tmp_path / "r2", device="cpu", progress=False, commit="b" * 7)
    (rec,) = load_records(tmp_path / "r2")
    assert rec["commit"] == "a" * 40      # a clean checkout's own HEAD wins
