"""repro.reproduce_check: a fresh run's records against the committed ones, with tolerances."""

from __future__ import annotations

import json

from repro.reproduce_check import compare, main, within

HW = {"device": "cpu", "gpu_count": 0}


def _write(folder, slug, metrics, experiment="quality"):
    path = folder / experiment / "cpu" / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"experiment": experiment, "variant_slug": slug, "variant": {}, "hardware": HW,
                                "metrics": metrics}))


def test_tolerances_by_metric_kind():
    assert within("q_psnr_vs_ref", 40.5, 40.0, 3.0) and not within("q_psnr_vs_ref", 42.0, 40.0, 3.0)
    assert within("q_adherence", 0.52, 0.50, 3.0) and not within("q_adherence", 0.6, 0.5, 3.0)
    assert within("dit_fps", 20.0, 50.0, 3.0) and not within("dit_fps", 10.0, 50.0, 3.0)   # speed: loose
    assert within("kv_mem_gb", 1.004, 1.0, 3.0) and not within("kv_mem_gb", 1.1, 1.0, 3.0)
    assert within("top_kernel", "a", "a", 3.0) and not within("top_kernel", "a", "b", 3.0)


def test_compare_reports_missing_and_out_of_tolerance(tmp_path, capsys):
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    _write(committed, "a", {"q_adherence": 0.5, "dit_fps": 10.0})
    _write(committed, "b", {"q_psnr_vs_ref": 30.0})
    _write(fresh, "a", {"q_adherence": 0.51, "dit_fps": 25.0})
    assert compare(fresh, committed) == ["quality/b: no fresh record"]
    _write(fresh, "b", {"q_psnr_vs_ref": 35.0})
    problems = compare(fresh, committed)
    assert len(problems) == 1 and "q_psnr_vs_ref" in problems[0]
    assert main(["--fresh", str(fresh), "--committed", str(committed)]) == 1
    _write(fresh, "b", {"q_psnr_vs_ref": 30.4})
    assert main(["--fresh", str(fresh), "--committed", str(committed)]) == 0
    assert "OK" in capsys.readouterr().err


def test_records_made_with_other_cpu_numerics_are_named(tmp_path):
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    _write(committed, "a", {"q_adherence": 0.5})
    rec = committed / "quality" / "cpu" / "a.json"
    data = json.loads(rec.read_text())
    data["hardware"] = {**HW, "cpu_numerics": {"ATEN_CPU_CAPABILITY": "avx2"}}
    rec.write_text(json.dumps(data))
    _write(fresh, "a", {"q_adherence": 0.5})
    (problem,) = compare(fresh, committed)
    assert "CPU numerics settings differ" in problem and "avx2" in problem
