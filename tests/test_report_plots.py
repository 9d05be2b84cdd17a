"""Report tables and plots (issue 19): a legend defining every column, one commit length, files
readable by others, no empty report, and plots faceted by hardware/preset with short labels, a
baseline line, units and a sensible size."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import pytest

import repro.report as report
from repro.report import columns, plots
from repro.errors import HarnessError
from repro.records import make_record, record_path, write_record

_spec = importlib.util.spec_from_file_location(
    "paper_tables", Path(__file__).resolve().parents[1] / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_tables)

H200 = {"device": "cuda", "gpu_name": "NVIDIA H200", "gpu_count": 1}
CPU = {"device": "cpu"}
RT = {"preset": "wan22_ti2v_5b", "dtype": "bf16", "precision": "fp8", "steps": 2, "kv_cache": "bf16",
      "vae_mode": "sync", "decoder": "wan", "vae_channels_last": False, "vae_compile": False,
      "attention": "sdpa", "compile": True, "cuda_graphs": False, "guidance_scale": 1.0}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _write(root: Path, experiment: str, variant: dict, metrics: dict, hw=H200, commit="abcdef0123456789",
           baseline: str | None = None, benchmark: str = "inference_speed", spec: str = "experiments/x.yaml",
           created: str | None = None, measure: dict | None = None) -> dict:
    from repro.spec import make_slug

    slug = make_slug(variant, sorted(variant))
    rec = make_record(experiment=experiment, benchmark=benchmark, variant=variant, slug=slug, hardware=hw,
                      metrics=metrics, measure=measure or {}, spec=spec, git={"commit": commit, "dirty": False})
    if baseline is not None:
        rec["baseline"] = {"variant_slug": baseline, "metric": "e2e_fps"}
    if created is not None:
        rec["created"] = created
    write_record(rec, root)
    return rec


def _realtime(root: Path) -> None:
    base = make_slug_of(RT)
    rows = [({}, 51.2, 12.8, 27.9), ({"decoder": "tae", "vae_mode": "stream"}, 48.8, 42.3, 17.8),
            ({"decoder": "tae", "vae_mode": "stream", "cuda_graphs": True}, 48.4, 42.2, 22.7),
            ({"precision": "bf16", "steps": 4, "decoder": "tae", "vae_mode": "stream", "cuda_graphs": True},
             26.4, 24.4, 28.8),
            ({"precision": "bf16", "steps": 4}, 27.2, 10.7, 32.9)]
    for change, dit, e2e, mem in rows:
        _write(root, "realtime", {**RT, **change}, {"dit_fps": dit, "e2e_fps": e2e, "peak_mem_gb": mem},
               baseline=base)
    for prec, fps in (("bf16", 360.0), ("fp8", 325.0)):   # a CPU smoke run of the same experiment
        _write(root, "realtime", {**RT, "preset": "tiny", "compile": False, "precision": prec},
               {"dit_fps": fps, "e2e_fps": 9.7}, hw=CPU)


def make_slug_of(variant: dict) -> str:
    from repro.spec import make_slug
    return make_slug(variant, sorted(variant))


# ---------------------------------------------------------------- legends

def test_every_table_column_of_every_benchmark_is_defined():
    from repro.benchmark import get_benchmark, load_all, registered

    assert load_all() == {}
    missing = {}
    for name in registered():
        if name.startswith("repro_test"):   # the harness tests' fake benchmarks
            continue
        bench = get_benchmark(name)
        cols = ["hardware", *bench.variant_fields, *bench.table_metrics, "speedup_vs_baseline", "commit"]
        gaps = columns.undocumented_columns(cols, bench)
        if gaps:
            missing[name] = gaps
    assert not missing, f"document these columns in repro/report/columns.py COLUMN_DOCS: {missing}"


def test_tables_end_with_a_legend_and_use_7_char_commits(tmp_path):
    _realtime(tmp_path)
    report.build_report(tmp_path)
    md = (tmp_path / "tables" / "realtime.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| hardware"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    legend = md[md.index("Columns:"):]
    for c in cols:
        assert f"- `{c}`" in legend, c
    assert "(no definition yet)" not in legend
    assert "Frechet" not in legend and "DiT-only frames per second" in legend
    assert "| abcdef0 |" in md and "abcdef01" not in md
    assert "abcdef0" in (tmp_path / "tables" / "realtime.csv").read_text()


def test_unknown_metric_is_flagged_undocumented():
    assert columns.undocumented_columns(["dit_fps", "brand_new_metric"]) == ["brand_new_metric"]


# ---------------------------------------------------------------- files

def test_report_files_honour_the_umask(tmp_path):
    _realtime(tmp_path)
    old = os.umask(0o027)   # every output honours the user's umask (issue 25 item 11), as open() does
    try:
        rec = _write(tmp_path, "realtime", {**RT, "steps": 4}, {"dit_fps": 30.0, "e2e_fps": 11.0})
        paths = [record_path(rec, tmp_path)]   # a record written under that umask
        assert paths[0].is_file()
        paths += report.build_report(tmp_path)
        out = tmp_path / "tables" / "paper_vs_measured.md"
        assert paper_tables.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    for p in [*paths, out]:
        assert (p.stat().st_mode & 0o777) == 0o640, p
    assert any(p.suffix == ".png" for p in paths) and any(p.suffix == ".md" for p in paths)
    assert not list(tmp_path.rglob(".*.tmp*"))


def test_empty_results_write_nothing_and_say_so(tmp_path, capsys):
    from repro.cli import main

    with pytest.raises(HarnessError, match="no result records"):
        report.build_report(tmp_path)
    assert main(["report", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no result records" in err
    assert main(["report", "--results", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    out = tmp_path / "paper.md"
    assert paper_tables.main(["--results", str(tmp_path), "--out", str(out)]) == 2
    assert "no result records" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- labels

def test_short_labels_name_only_what_differs():
    recs = [{"variant": {**RT, **v}} for v in (
        {}, {"decoder": "tae", "vae_mode": "stream"}, {"precision": "bf16", "steps": 4, "compile": False})]
    order = list(RT)
    labels = report.short_labels(recs, order)
    assert labels == ["fp8 2-step compiled, wan sync", "fp8 2-step compiled, tae stream",
                      "bf16 4-step eager, wan sync"]
    assert report.common_label(recs, order) == "bf16 KV, SDPA, no CUDA graphs, bf16 compute, no CFG, " \
                                               "channels-first, VAE eager"
    # the usual setting is left out unless needed to tell rows apart
    kv = [{"variant": {**RT, "kv_cache": k}} for k in ("bf16", "nvfp4")]
    assert report.short_labels(kv, order) == ["bf16 KV", "nvfp4 KV"]
    sink = [{"variant": {"model": "teacher", "steps": s, "sink": k}} for s, k in ((8, True), (8, False), (4, True))]
    assert report.short_labels(sink) == ["8-step", "8-step no sink", "4-step"]   # "teacher" is common


# ---------------------------------------------------------------- plots

def _overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of texts (figure and row headings, panel titles, axis labels, bar labels) whose
    drawn boxes overlap."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list(fig.texts) + [t for sf in fig.subfigs for t in sf.texts]
    for ax in fig.axes:
        texts += [c for c in ax.get_children() if isinstance(c, Text)] + [ax.xaxis.label, ax.yaxis.label]
    texts = [t for t in texts if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:]
            if ba.overlaps(bb) and ba.intersection(ba, bb).width > 1 and ba.intersection(ba, bb).height > 1]


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report saves, by file name (still written to disk)."""
    saved = {}
    real = report.save_figure

    def keep(fig, path):
        saved[Path(path).name] = fig
        return real(fig, path)

    # bar and scatter plots save through repro.report.plots, the benchmarks' own figures
    # (train_memory, quality's drift curves) through the name the package exports
    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(report, "save_figure", keep)
    return saved


def test_bar_plot_facets_by_hardware_and_preset(tmp_path, figures):
    _realtime(tmp_path)
    paths = report.build_report(tmp_path)
    png = tmp_path / "plots" / "realtime.png"
    assert png in paths
    w, h = _png_size(png)
    assert w <= 1800 and h <= 2000, (w, h)
    fig = figures["realtime.png"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    # one row per (hardware, preset), each with an e2e panel and a DiT-only panel on its own scale,
    # headed across the row by its hardware, preset and shared settings; the CPU rows get a
    # figure of their own (CPU speed is never drawn beside GPU speed)
    assert len(axes) == 2
    heads = [sf.get_suptitle() for sf in fig.subfigs]
    assert len(heads) == 1 and heads[0].startswith("NVIDIA H200, preset wan22_ti2v_5b") and "all rows: " in heads[0]
    assert [ax.get_title(loc="left") for ax in axes] == ["end-to-end generation speed", "DiT-only generation speed"]
    assert not _overlapping_texts(fig)
    cpu = figures["realtime_cpu.png"]
    assert [sf.get_suptitle() for sf in cpu.subfigs][0].startswith("cpu, preset tiny")
    assert len([ax for ax in cpu.axes if ax.get_visible()]) == 2
    assert tmp_path / "plots" / "realtime_cpu.png" in paths
    table = (tmp_path / "tables" / "realtime.md").read_text()
    assert table.index("## GPU records") < table.index("## CPU records")
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels[0] == "fp8 2-step, tae stream"            # best first
    assert "fp8 2-step, wan sync (baseline)" in labels and max(map(len, labels)) < 60
    assert "FPS" in axes[0].get_xlabel() and "frames / s" in axes[0].get_xlabel()
    # a dashed reference line at the baseline's value (the record whose baseline names itself)
    assert any(list(line.get_xdata()) == [12.8, 12.8] for line in axes[0].lines)
    assert any(list(line.get_xdata()) == [51.2, 51.2] for line in axes[1].lines)
    assert "higher is better" in fig.get_suptitle()


def test_a_row_of_two_bars_is_not_squashed(tmp_path, figures):
    for mode, fps in (("sync", 10.3), ("device", 8.1)):
        _write(tmp_path, "vae_second_gpu", {**RT, "preset": "tiny", "vae_mode": mode},
               {"e2e_fps": fps, "dit_fps": 20 * fps}, hw=CPU)
    report.build_report(tmp_path)
    w, h = _png_size(tmp_path / "plots" / "vae_second_gpu.png")
    assert h >= 330, (w, h)       # the heading's lines, two panel titles, x labels and the bars
    fig = figures["vae_second_gpu.png"]
    for ax in fig.axes:           # the bars get at least 1.2 in of the row's height
        assert ax.get_window_extent().height >= 1.2 * plots.PLOT_DPI * 0.75
    assert not _overlapping_texts(fig)


SP_COST = {"preset": "wan22_ti2v_5b", "frames": 96, "halo": 28}
H100_RATES = {"gemm_tflops": 750.0, "attn_tflops": 650.0, "link_gbps": 450.0, "vae_encode_tflops": 322.0}


def test_analytic_models_are_named_by_their_rates_not_the_cpu(tmp_path, figures):
    """A cost model computed on a CPU is labelled as the model with the GPU rates it assumes."""
    root = tmp_path / "h100"
    for sp, layout, step in ((4, "naive", 10.3), (4, "balanced", 8.6)):
        _write(root, "sp_training_cost", {**SP_COST, "sp_size": sp, "sp_layout": layout},
               {"est_step_s": step, "est_tokens_per_s": 1e5 / step}, hw=CPU, benchmark="sp_training_cost",
               measure=H100_RATES)
    _write(tmp_path / "slow", "sp_training_cost", {**SP_COST, "sp_size": 4, "sp_layout": "naive"},
           {"est_step_s": 20.0, "est_tokens_per_s": 5e3}, hw=CPU, benchmark="sp_training_cost",
           measure={**H100_RATES, "link_gbps": 50.0})
    report.build_report(tmp_path / "slow")
    assert "analytic model, assumed rates: " in (tmp_path / "slow" / "tables" / "sp_training_cost.md").read_text()
    report.build_report(root)
    label = ("analytic model, H100 rates: GEMM 750 / attention 650 TFLOP/s, link 450 GB/s, "
             "VAE encode 322 TFLOP/s")
    md = (root / "tables" / "sp_training_cost.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| analytic")]
    assert len(rows) == 2 and all(row.startswith(f"| {label} |") for row in rows)
    assert "| cpu |" not in md
    assert f"| sp_training_cost | 2 | {label} |" in (root / "tables" / "README.md").read_text()
    fig = figures["sp_training_cost.png"]
    assert fig.subfigs[0].get_suptitle().startswith(label)
    assert not _overlapping_texts(fig)


def _train_memory(root: Path) -> None:
    base = {"preset": "wan22_ti2v_5b", "num_layers": 0, "sp_size": 0, "gradient_checkpointing": True,
            "ema": False, "measured": False}
    for gpus in (1, 2, 4, 8):
        for frames in (96, 192, 384):
            for sharding, offload, peak in (("none", False, 120.0), ("fsdp", False, 60.0), ("fsdp", True, 30.0)):
                _write(root, "train_memory", {**base, "gpus": gpus, "frames": frames, "sharding": sharding,
                                              "offload": offload},
                       {"model_peak_gb": peak * frames / 96 / gpus ** 0.5}, hw=CPU, benchmark="train_memory")
    _write(root, "train_memory", {**base, "gpus": 4, "frames": 96, "sharding": "fsdp", "offload": False,
                                  "gradient_checkpointing": False}, {"model_peak_gb": 358.0}, hw=CPU,
           benchmark="train_memory")
    for sharding, model, real in (("none", 0.00296, 0.00308), ("fsdp", 0.00294, 0.00279)):
        _write(root, "train_memory", {**base, "preset": "tiny", "gpus": 1, "frames": 8, "sharding": sharding,
                                      "offload": False, "measured": True},
               {"model_peak_gb": model, "measured_peak_gb": real, "model_error": model / real - 1}, hw=CPU,
               benchmark="train_memory")


def test_train_memory_figure_reads_at_a_glance(tmp_path, figures):
    """Not 39 bars in one panel: a panel per GPU count, peak over clip length, a line per sharding
    setting and the GPUs' memory; the measured rows beside the model; the model rows labelled as
    the model, not as the CPU that computed them."""
    _train_memory(tmp_path)
    paths = report.build_report(tmp_path)
    png = tmp_path / "plots" / "train_memory.png"
    assert paths.count(png) == 1
    w, h = _png_size(png)
    assert w <= 1800 and h <= 1200, (w, h)
    fig = figures["train_memory.png"]
    assert "model_peak_gb" not in fig.get_suptitle() and "lower is better" in fig.get_suptitle()
    curves, measured = fig.subfigs
    assert curves.get_suptitle().startswith("analytic memory model (no device), preset wan22_ti2v_5b")
    assert [ax.get_title() for ax in curves.axes] == ["1 GPU (SP 1)", "2 GPUs (SP 2)", "4 GPUs (SP 4)",
                                                      "8 GPUs (SP 8)"]
    assert len(curves.axes[0].lines) == 3 + 2      # three sharding lines, the 80 and 141 GB marks
    assert len(curves.axes[2].lines) == 4 + 2      # and the no-checkpointing control
    legend = [t.get_text() for t in curves.legends[0].get_texts()]
    assert legend == ["replicated (sharding none)", "FSDP", "FSDP + CPU offload", "FSDP no checkpointing",
                      "80 GB (H100)", "141 GB (H200)"]
    ticks = [t.get_text() for t in measured.axes[0].get_yticklabels()]
    assert ticks == ["cpu, preset tiny, replicated (sharding none) (model error -3.9%)",
                     "cpu, preset tiny, FSDP (model error +5.4%)"]
    assert "(MB)" in measured.axes[0].get_xlabel()
    assert not _overlapping_texts(fig)
    md = (tmp_path / "tables" / "train_memory.md").read_text()
    assert md.count("| analytic memory model (no device) |") == 37 and md.count("| cpu |") == 2


def test_speed_vs_memory_and_quality_scatter(tmp_path, figures):
    _realtime(tmp_path)
    for steps, fps, q in ((8, 100.0, 0.63), (4, 180.0, 0.61), (2, 300.0, 0.54)):
        _write(tmp_path, "quality", {"preset": "tiny", "model": "teacher", "steps": steps},
               {"dit_fps": fps, "q_adherence": q, "q_fd": 30.0 / q}, hw=CPU, benchmark="quality",
               spec="experiments/quality.yaml")
    report.build_report(tmp_path)
    mem = tmp_path / "plots" / "realtime_speed_vs_memory.png"
    qual = tmp_path / "plots" / "quality_speed_vs_quality.png"
    for p in (mem, qual):
        w, h = _png_size(p)
        assert w <= 1800 and h <= 1800, (p, w, h)
    fig = figures[mem.name]
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert {ax.get_xlabel() for ax in axes} == {"peak GPU memory (GB)"}
    assert {ax.get_ylabel() for ax in axes} == {"end-to-end FPS (frames / s)", "DiT-only FPS (frames / s)"}
    qaxes = [ax for ax in figures[qual.name].axes if ax.get_visible() and ax.axison]
    assert [ax.get_ylabel() for ax in qaxes] == ["prompt adherence (0-1)", "Frechet distance to real videos"]


def test_spec_baseline_line_without_speedups(tmp_path):
    """Records of a run without the baseline's speedups still get the spec's baseline line."""
    spec = tmp_path / "s.yaml"
    spec.write_text("baseline: {precision: bf16, steps: 4}\n")
    recs = [_write(tmp_path / "r", "inference_speed", {"preset": "tiny", "precision": p, "steps": s},
                   {"dit_fps": f, "e2e_fps": f / 2}, hw=CPU, spec=str(spec))
            for p, s, f in (("bf16", 4, 10.0), ("fp8", 2, 20.0))]
    base = report.spec_baseline(recs)
    assert report.baseline_record(recs, base)["variant"]["precision"] == "bf16"


def test_drift_plot_stays_readable_with_many_variants(tmp_path, figures):
    import itertools

    combos = [("teacher", p, k, st, sink) for p, k, st, sink in
              itertools.product(["bf16", "nvfp4_emulated"], ["bf16", "nvfp4"], [8, 4, 2], [True, False])][:12]
    combos += [("lora", p, k, st, True) for p, k, st in itertools.product(["bf16", "nvfp4_emulated"],
                                                                             ["bf16", "nvfp4"], [4, 2])][:6]
    for i, (model, prec, kv, steps, sink) in enumerate(combos):
        metrics = {"q_adherence": 0.5, **{f"series_adherence_b{b:02d}": 0.5 + 0.01 * i for b in range(8)},
                   **{f"series_flicker_b{b:02d}": 0.99 for b in range(8)}}
        variant = {"preset": "tiny", "model": model, "train_precision": "bf16", "precision": prec, "kv_cache": kv,
                   "decoder": "wan", "attention": "sdpa", "steps": steps, "sink": sink}
        _write(tmp_path, "quality", variant, metrics, hw=CPU, benchmark="quality",
               spec="experiments/quality.yaml", commit=f"{i:07d}")
    report.build_report(tmp_path)
    png = tmp_path / "plots" / "quality_drift_cpu.png"
    w, h = _png_size(png)
    assert w <= 1800 and h <= 2000, (w, h)
    legends = [ax.get_legend() for ax in figures[png.name].axes if ax.get_legend() is not None]
    rows = [[t.get_text() for t in leg.get_texts()] for leg in legends]
    # rows of at most five variants, each against the baseline; every other variant drawn once
    assert len(rows) >= 4 and all(len(r) <= 6 and r[0].endswith("(baseline)") for r in rows), rows
    others = [lab for r in rows for lab in r[1:]]
    assert len(others) == 17 and len(set(others)) == 17 and max(map(len, others)) <= 60, others
    assert not any("=" in lab for lab in others)   # readable words, not key=value dumps
    for leg in legends:   # inside a row no two lines share a colour or a marker
        handles = leg.legend_handles
        assert len({h.get_color() for h in handles}) == len(handles)
        assert len({h.get_marker() for h in handles[1:]}) == len(handles) - 1
