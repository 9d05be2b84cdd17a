from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from test_repro_helpers import write_spec
from repro.records import make_record, write_record
from repro.report import build_report, fmt_num
from repro.runner import run_spec

from repro.paper import PAPER_NUMBERS

# paper_tables.py is a script at the repo root: load it by path so the test works from any cwd.
_spec = importlib.util.spec_from_file_location(
    "paper_tables", Path(__file__).resolve().parents[1] / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_tables)


def test_report_writes_tables_and_plots(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", sweep={"speed": [1.0, 2.0], "steps": [4, 2]},
                      baseline={"speed": 1.0, "steps": 4})
    res = tmp_path / "res"
    run_spec(spec, results_dir=res, device="cpu", progress=False)
    paths = build_report(res)
    names = {p.relative_to(res).as_posix() for p in paths}
    assert names == {"tables/fake_exp.md", "tables/fake_exp.csv", "plots/fake_exp.png", "tables/README.md"}
    png = (res / "plots" / "fake_exp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    df = pd.read_csv(res / "tables" / "fake_exp.csv")
    assert list(df.columns) == ["hardware", "mode", "speed", "steps", "compile", "e2e_fps", "block_ms_p50",
                                "speedup_vs_baseline", "commit"]
    assert len(df) == 4 and set(df["hardware"]) == {"cpu"}
    # Stable sort by variant keys: speed then steps ascending.
    assert list(zip(df["speed"], df["steps"])) == [(1.0, 2), (1.0, 4), (2.0, 2), (2.0, 4)]
    assert df.loc[(df.speed == 2.0), "speedup_vs_baseline"].tolist() == pytest.approx([2.0, 2.0])
    md = (res / "tables" / "fake_exp.md").read_text()
    assert "| hardware | mode | speed | steps | compile | e2e_fps | block_ms_p50 | speedup_vs_baseline | commit |" in md
    assert "| 20.0 | 50.0 | 2.00 |" in md  # 3 significant figures
    assert "[fake_exp.md](fake_exp.md)" in (res / "tables" / "README.md").read_text()
    assert not list(res.rglob(".*"))  # no temp files


def test_report_without_registered_benchmark(tmp_path):
    # Records of a benchmark whose module cannot be imported still tabulate all metrics.
    hw = {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}
    for steps, fps in ((4, 24.81234), (2, 45.7)):
        write_record(make_record(experiment="inference_speed", benchmark="not_importable_bench",
                                 variant={"precision": "bf16", "steps": steps}, slug=f"steps-{steps}",
                                 hardware=hw, metrics={"e2e_fps": fps, "dit_fps": fps * 2}, measure={},
                                 spec="experiments/inference_speed.yaml",
                                 git={"commit": "0123456789abcdef", "dirty": True}), tmp_path)
    with pytest.warns(UserWarning, match="not_importable_bench"):
        build_report(tmp_path)
    md = (tmp_path / "tables" / "inference_speed.md").read_text()
    assert "| NVIDIA H100 80GB HBM3 | bf16 | 2 | 45.7 | 91.4 | 01234567-dirty |" in md
    assert "| NVIDIA H100 80GB HBM3 | bf16 | 4 | 24.8 | 49.6 | 01234567-dirty |" in md
    assert (tmp_path / "plots" / "inference_speed.png").exists()


def test_report_empty_results(tmp_path):
    paths = build_report(tmp_path)
    assert [p.name for p in paths] == ["README.md"]
    assert "no records yet" in paths[0].read_text()


def test_fmt_num():
    assert [fmt_num(x) for x in (754.3, 1234.5, 0.01234, 1.0, 12.345, None, 3)] == \
        ["754", "1230", "0.0123", "1.00", "12.3", "", "3"]


def test_paper_tables(tmp_path, capsys):
    out = tmp_path / "paper.md"
    assert paper_tables.main(["--results", str(tmp_path / "none"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    for num in ("24.8 FPS", "29.7 FPS", "45.7 FPS", "up to 1.84x", "up to 2.15x", "20.7 FPS", "85.06", "84.51", "83.14"):
        assert num in text, num
    assert "not measured yet" in text and "| H100 |" in text
    assert len(PAPER_NUMBERS) == 9

    # A matching record shows up with its hardware and commit; the best (max) one is chosen.
    res = tmp_path / "res"
    hw = {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}
    for slug, fps in (("a", 20.0), ("b", 26.5)):
        write_record(make_record(experiment="inference_speed", benchmark="inference_speed",
                                 variant={"preset": "wan22_ti2v_5b", "precision": "bf16", "steps": 4,
                                          "vae_mode": slug}, slug=slug, hardware=hw,
                                 metrics={"e2e_fps": fps}, measure={}, spec="x",
                                 git={"commit": "feedbeef00", "dirty": False}), res)
    paper_tables.main(["--results", str(res), "--out", str(out)])
    row = next(line for line in out.read_text().splitlines() if "BF16 inference FPS" in line)
    assert "26.5 FPS on NVIDIA H100 80GB HBM3" in row and "feedbeef" in row and "24.8 FPS" in row
