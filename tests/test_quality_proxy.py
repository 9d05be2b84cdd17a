"""The quality proxy end to end on CPU: procedural data, detector, scoring, training CLI, benchmark.

Sizes are the smallest that exercise every path (a few training steps per piece); what the
trained pieces are worth is measured by the `quality` experiment, not here.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from test_repro_helpers import write_spec
from impl.train.procedural import (BACKGROUND_COLORS, DIRECTIONS, OBJECT_COLORS, SHAPES, ProceduralVideoSource,
                                   caption_attributes)
from repro.quality.detector import DetectorConfig, accuracy, frame_batches, train_detector
from repro.quality.evaluate import block_frame_ranges, make_eval_set, real_block_features, score_videos
from repro.errors import SpecError
from repro.records import load_records
from repro.runner import run_spec

PREFIX = "The scene changes. "


def _source(**kw):
    args = dict(length=6, seed=5, shots_per_clip=3, scene_cut_prefix=PREFIX)
    args.update(kw)
    return ProceduralVideoSource(12, 2, 48, 64, **args)


def test_procedural_clips_are_deterministic_per_seed_and_index():
    a, b = _source(), _source()
    for i in (4, 0, 2):   # any access order
        assert torch.equal(a[i].frames, b[i].frames) and a.block_prompts(i) == b.block_prompts(i)
    assert a[0].frames.shape == (1 + 4 * 11, 48, 64, 3) and a[0].frames.dtype == torch.uint8
    assert not torch.equal(a[0].frames, a[1].frames)
    assert not torch.equal(a[0].frames, _source(seed=6)[0].frames)


def test_scene_cuts_change_scene_and_caption_on_block_starts():
    src = _source()
    for i in range(len(src)):
        prompts, scenes, truth = src.block_prompts(i), src.scenes(i), src.truth(i)
        cuts = [j for j, p in enumerate(prompts) if p.startswith(PREFIX)]
        assert len(cuts) == len(scenes) - 1 == 2 and 0 not in cuts
        shot = 0
        for j, p in enumerate(prompts):
            shot += j in cuts
            assert caption_attributes(p) == scenes[shot].attributes()
        for k in range(1, len(scenes)):   # a cut always changes the object colour and the background
            assert scenes[k].color != scenes[k - 1].color and scenes[k].background != scenes[k - 1].background
        # the shot index steps exactly on the first raw frame of each cut block
        steps = (torch.nonzero(truth.shot[1:] != truth.shot[:-1]).flatten() + 1).tolist()
        assert steps == [1 + 4 * (2 * j - 1) for j in cuts]


def test_objects_bounce_inside_the_frame_on_long_clips():
    src = ProceduralVideoSource(200, 2, 32, 32, length=3, seed=1)
    for i in range(3):
        t = src.truth(i)
        assert bool(((t.center > 0) & (t.center < 1)).all())
        d = t.center[1:] - t.center[:-1]
        moving = (d.abs().sum(-1) > 1e-6) & (t.motion[1:] == t.motion[:-1]).all(-1)
        # the per-frame motion direction is the sign of the centre's displacement (bounces flip it)
        assert bool(((d * t.motion[1:]).sum(-1)[moving] > 0).all())
        assert (t.motion[:, 0] * t.motion[:, 1] == 0).all()     # axis-aligned
    assert src[0].frames.shape[0] == 1 + 4 * 199


def test_caption_attributes_round_trip_and_errors():
    cap = "The scene changes. A blue triangle moves up over a striped navy background."
    assert caption_attributes(cap) == {"color": "blue", "shape": "triangle", "direction": "up",
                                       "background": "navy", "style": "striped"}
    with pytest.raises(ValueError, match="not a procedural caption"):
        caption_attributes("a cat on a sofa")
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        caption_attributes("A purple circle moves up over a grey background.")
    assert len(OBJECT_COLORS) == 6 and len(SHAPES) == 3 and len(BACKGROUND_COLORS) == 4 and len(DIRECTIONS) == 4


@pytest.fixture(scope="module")
def detector():
    """A detector fitted briefly on 64x64 one-block clips (colour is the easy attribute)."""
    src = ProceduralVideoSource(2, 2, 64, 64, length=144, seed=7)
    frames, targets = frame_batches(src, range(120))
    model, losses = train_detector(frames, targets, DetectorConfig(steps=400, batch_size=32, seed=0), progress=False)
    assert losses[-1] < losses[0]
    return model, src


def test_detector_reads_held_out_colours(detector):
    model, src = detector
    frames, targets = frame_batches(src, range(120, 144))
    acc = accuracy(model.detect(frames), targets)
    assert acc["color"] > 0.75 and acc["background"] > 0.75     # chance: 1/6 and 1/4


def test_correct_prompt_scores_higher_than_a_wrong_one(detector):
    model, _ = detector
    src = ProceduralVideoSource(4, 2, 64, 64, length=6, seed=11, shots_per_clip=1)
    right = make_eval_set(src)
    wrong_colour = {c: list(OBJECT_COLORS)[(k + 3) % 6] for k, c in enumerate(OBJECT_COLORS)}
    wrong = replace(right, attributes=[[{**a, "color": wrong_colour[a["color"]]} for a in video]
                                       for video in right.attributes])
    ranges = block_frame_ranges(right.num_blocks, right.frames_per_block, right.temporal_factor)
    real = real_block_features(right.real, ranges, model)
    good, series = score_videos(right.real, right, model, real)
    bad, _ = score_videos(right.real, wrong, model, real)
    assert good["q_adh_color"] >= 0.75 and bad["q_adh_color"] <= 0.25
    assert good["q_adherence"] > bad["q_adherence"]
    assert good["q_fd"] == bad["q_fd"]                         # distances do not read prompts
    assert len(series["adherence"]) == right.num_blocks
    # a static video flickers less than the truth and its motion matches no prompt
    static = [v[:1].expand_as(v).clone() for v in right.real]
    still, _ = score_videos(static, right, model, real)
    assert still["q_flicker"] == 1.0 and still["q_adh_motion"] == 0.0 and good["q_adh_motion"] > 0.5
    with pytest.raises(ValueError, match="frames"):
        score_videos([v[:-1] for v in right.real], right, model, real)


def test_switch_metrics_tell_a_hard_cut_from_a_continuous_video(detector):
    model, _ = detector
    src = ProceduralVideoSource(4, 2, 64, 64, length=4, seed=12, shots_per_clip=2)
    es = make_eval_set(src)
    assert any(len(set(s)) > 1 for s in es.shot)
    real = real_block_features(es.real, block_frame_ranges(es.num_blocks, es.frames_per_block, es.temporal_factor),
                               model)
    truth, _ = score_videos(es.real, es, model, real)                    # procedural shots: hard cuts
    static, _ = score_videos([v[:1].expand_as(v).clone() for v in es.real], es, model, real)
    assert static["q_switch_continuity"] == 100.0 > truth["q_switch_continuity"]
    assert 0.0 <= truth["q_switch_adherence"] <= 1.0 and truth["q_switch_adherence"] == truth["q_switch_adherence"]


TINY = dict(vae_steps=2, vae_batch=1, detector_steps=4, detector_clips=8, train_clips=2, clip_blocks=2,
            ar_steps=2, ar_batch=1, distill_iters=1, lora_rank=2, videos=1, eval_blocks=2, eval_shots=1,
            real_videos=2, reference_steps=4, seeds=1)


def _spec(tmp_path, sweep):
    measure = {**TINY, "cache_dir": str(tmp_path / "cache")}
    return write_spec(tmp_path / "q.yaml", name="quality_test", benchmark="quality",
                      base={"preset": "tiny", "steps": 4}, sweep=sweep, measure=measure,
                      baseline={"model": "teacher", "steps": 4, "kv_cache": "bf16", "precision": "bf16"})


def test_quality_benchmark_runs_every_kind_of_variant(tmp_path):
    spec = _spec(tmp_path, [{"model": ["real"]}, {"model": ["teacher"], "kv_cache": ["bf16", "nvfp4"]},
                            {"model": ["lora"], "steps": [2], "precision": ["nvfp4_emulated"]}])
    run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False)
    recs = {(r["variant"]["model"], r["variant"]["kv_cache"]): r for r in load_records(tmp_path / "r")}
    assert set(recs) == {("real", "bf16"), ("teacher", "bf16"), ("teacher", "nvfp4"), ("lora", "bf16")}
    ref, kv, lora, real = (recs[k]["metrics"] for k in [("teacher", "bf16"), ("teacher", "nvfp4"),
                                                        ("lora", "bf16"), ("real", "bf16")])
    for m in (ref, kv, lora, real):
        assert 0 <= m["q_adherence"] <= 1 and 0 < m["q_flicker"] <= 1 and m["q_fd"] >= 0
        assert m["series_adherence_b00"] is not None and "series_adherence_b01" in m
        assert m["train_device_vae"] == "cpu" and m["train_device_detector"] == "cpu"
        assert (m["train_s_teacher"] > 0) if m is not real else "train_s_teacher" not in m
    assert "q_psnr_vs_ref" not in ref and kv["q_psnr_vs_ref"] > 0 and "dit_fps" not in real
    assert lora["train_device_lora"] == "cpu" and "detector_color" in real
    # the pieces are cached: a second run retrains nothing (same training records, same files)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    # (a run that shares the device records its DiT speed under another name)
    shared = run_spec(spec, results_dir=tmp_path / "r2", device="cpu", progress=False, only={"model": "teacher"},
                      measure={"shared_device": "true"})
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    m = json.loads(shared[0].read_text())["metrics"]
    assert "dit_fps" not in m and m["dit_fps_shared_gpu"] > 0
    from repro.report import build_report
    assert any(p.name.endswith("_drift_cpu.png") for p in build_report(tmp_path / "r"))


def test_quality_rows_average_seeds_with_intervals(tmp_path):
    spec = _spec(tmp_path, [{"model": ["teacher"], "kv_cache": ["bf16", "nvfp4"]}])
    run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False, measure={"seeds": "2"})
    recs = load_records(tmp_path / "r")
    # two seeds: two proxies trained (their own VAE, detector, teacher), one row each variant
    assert len(list((tmp_path / "cache" / "tiny").glob("vae-*"))) == 2 and len(recs) == 2
    for r in recs:
        m = r["metrics"]
        assert m["seeds_used"] == 2 and m["q_adherence_ci95"] >= 0 and m["q_fd_ci95"] >= 0
        assert "series_adherence_b00" in m and "series_adherence_b00_ci95" not in m
    from repro.report import build_report
    build_report(tmp_path / "r")
    table = (tmp_path / "r" / "tables" / "quality_test.md").read_text()
    assert " ± " in table and "| baseline |" in table and "`vs_baseline`" in table
    assert "q_adherence_ci95" in (tmp_path / "r" / "tables" / "quality_test.csv").read_text()


def test_combine_seeds_means_intervals_and_strings():
    from repro.benchmarks.quality import combine_seeds
    out = combine_seeds([{"q_adherence": 0.2, "series_x_b00": 1.0, "train_device_vae": "cpu", "q_kid": None,
                          "vae_last_loss": 0.3, "train_s_vae": 10.0},
                         {"q_adherence": 0.4, "series_x_b00": 3.0, "train_device_vae": "cpu", "q_kid": 0.5,
                          "vae_last_loss": 0.5, "train_s_vae": 12.0}])
    assert out["vae_last_loss_ci95"] > 0 and out["train_s_vae"] == 11.0 and "train_s_vae_ci95" not in out
    assert out["q_adherence"] == pytest.approx(0.3) and out["q_adherence_ci95"] == pytest.approx(12.706 * 0.1)
    assert out["series_x_b00"] == 2.0 and "series_x_b00_ci95" not in out and out["train_device_vae"] == "cpu"
    assert out["q_kid"] == 0.5 and out["q_kid_ci95"] is None and out["seeds_used"] == 2
    assert "busy" not in out   # no speed among the metrics
    # a speed: the median over the seeds with its spread, and busy when the seeds' speeds spread
    steady = combine_seeds([{"dit_fps": 100.0}, {"dit_fps": 104.0}, {"dit_fps": 101.0}])
    assert (steady["dit_fps"], steady["dit_fps_min"], steady["dit_fps_max"]) == (101.0, 100.0, 104.0)
    assert steady["busy"] is False and "dit_fps_ci95" not in steady
    loaded = combine_seeds([{"dit_fps": 100.0}, {"dit_fps": 30.0}, {"dit_fps": 98.0}])
    assert loaded["busy"] is True and loaded["busy_metrics"] == "dit_fps"


def test_quality_variant_errors(tmp_path):
    with pytest.raises(SpecError, match="do not apply"):
        run_spec(_spec(tmp_path, [{"model": ["real"], "kv_cache": ["nvfp4"]}]), results_dir=tmp_path / "r",
                 device="cpu", progress=False)
    with pytest.raises(SpecError, match="steps <= 4"):
        run_spec(_spec(tmp_path, [{"model": ["lora"], "steps": [8]}]), results_dir=tmp_path / "r",
                 device="cpu", progress=False)


def test_proxy_training_cli(tmp_path, capsys):
    from repro.quality.proxy import main
    args = ["--device", "cpu", "--no-progress", "--measure", f"cache_dir={tmp_path / 'c'}"]
    args += [x for k, v in TINY.items() if k not in ("videos", "eval_blocks", "eval_shots", "real_videos",
                                                       "reference_steps") for x in ("--measure", f"{k}={v}")]
    assert main(args + ["--pieces", "vae", "teacher"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["piece"] for x in lines] == ["vae", "teacher"] and all(x["device"] == "cpu" for x in lines)
    info = json.loads(next((tmp_path / "c" / "tiny").glob("teacher_bf16-*/info.json")).read_text())
    assert info["device"] == "cpu" and info["train_config"]["steps"] == 2
    assert main(args + ["--spec", "lora_fewstep"]) == 2
    assert "not 'quality'" in capsys.readouterr().err
    assert main(args + ["--measure", "ar_steps=0"]) == 2
    assert "ar_steps" in capsys.readouterr().err


def test_portable_cpu_kernels_turn_onednn_off_on_cpu_only():
    from repro.quality.proxy import portable_cpu_kernels
    before = torch.backends.mkldnn.enabled
    with portable_cpu_kernels("cpu"):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == before
    with portable_cpu_kernels("cuda"):
        assert torch.backends.mkldnn.enabled == before
