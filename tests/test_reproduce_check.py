"""repro.reproduce_check: a fresh run's records against the committed ones, with tolerances."""

from __future__ import annotations

import json

from repro.reproduce_check import compare, main, within

HW = {"device": "cpu", "gpu_count": 0}


def _write(folder, slug, metrics, experiment="quality", variant=None):
    path = folder / experiment / "cpu" / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"experiment": experiment, "variant_slug": slug,
                                "variant": {"row": slug} if variant is None else variant, "hardware": HW,
                                "metrics": metrics}))


def test_records_are_matched_by_variant_not_file_name(tmp_path):
    """A committed record written before the spec varied a key keeps its older file name (the key
    filled in by migration); the fresh run names it with the key. They are the same row."""
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    variant = {"model": "teacher", "bf16_attention_steps": "none"}
    _write(committed, "model-teacher", {"q_adherence": 0.5}, variant=variant)
    _write(fresh, "bf16-attention-steps-none__model-teacher", {"q_adherence": 0.9}, variant=variant)
    (problem,) = compare(fresh, committed)
    assert problem.startswith("quality/model-teacher: q_adherence")   # compared, and named by the committed file
    _write(fresh, "bf16-attention-steps-none__model-teacher", {"q_adherence": 0.5},
           variant={**variant, "bf16_attention_steps": "last"})
    assert compare(fresh, committed) == ["quality/model-teacher: no fresh record"]


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


def test_metrics_with_intervals_agree_when_the_intervals_overlap(tmp_path, capsys):
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    _write(committed, "a", {"q_adherence": 0.30, "q_adherence_ci95": 0.05, "vae_last_loss": 0.30,
                            "vae_last_loss_ci95": 0.04, "series_adherence_b00": 0.1})
    # another CPU trains elsewhere: 0.38 vs 0.30 is outside the fixed tolerance, inside the intervals
    _write(fresh, "a", {"q_adherence": 0.38, "q_adherence_ci95": 0.04, "vae_last_loss": 0.39,
                        "vae_last_loss_ci95": 0.06, "series_adherence_b00": 0.9})
    assert not within("q_adherence", 0.38, 0.30, 3.0) and compare(fresh, committed) == []
    assert main(["--fresh", str(fresh), "--committed", str(committed)]) == 0
    out = capsys.readouterr().out
    assert "interval: 2 metric(s)" in out and "overlap" in out and "skipped: 3 metric(s)" in out
    _write(fresh, "a", {"q_adherence": 0.50, "q_adherence_ci95": 0.04, "vae_last_loss": 0.31,
                        "vae_last_loss_ci95": 0.06, "series_adherence_b00": 0.9})
    (problem,) = compare(fresh, committed)
    assert "q_adherence" in problem and "intervals separate" in problem


def test_busy_speed_records_are_not_compared(tmp_path):
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    _write(committed, "a", {"dit_fps": 26.0, "busy": True}, experiment="inference_speed")
    _write(fresh, "a", {"dit_fps": 1079.0, "busy": False}, experiment="inference_speed")
    assert compare(fresh, committed) == []
    _write(committed, "a", {"dit_fps": 26.0, "busy": False}, experiment="inference_speed")
    (problem,) = compare(fresh, committed)
    assert "dit_fps" in problem and "speed tolerance" in problem


def test_folders_without_records_or_of_another_preset_exit_2(tmp_path, capsys):
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    _write(committed, "a", {"q_adherence": 0.5})
    fresh.mkdir()
    assert main(["--fresh", str(fresh), "--committed", str(committed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --fresh") and "no cpu records of inference_speed, quality" in err[0]
    assert main(["--fresh", str(tmp_path / "missing"), "--committed", str(committed)]) == 2
    assert "no such folder" in capsys.readouterr().err
    for folder, preset in ((committed, "tiny"), (fresh, "small")):
        path = folder / "quality" / "cpu" / "a.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"experiment": "quality", "variant_slug": "a", "variant": {"preset": preset},
                                    "hardware": HW, "metrics": {"q_adherence": 0.5}}))
    assert main(["--fresh", str(fresh), "--committed", str(committed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preset small, expected preset tiny" in err[0]
