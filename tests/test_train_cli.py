"""The training entry point and the raw-video path (VAE + text encoder) under SP."""

import json

import pytest
import torch

from impl.config import get_preset
from impl.model.text_encoder import TextEncoder
from impl.model.vae import build_vae
from impl.parallel.groups import build_groups
from impl.train.__main__ import build_config, build_parser, main, parse_args
from impl.train.config import TrainConfig
from impl.train.encode import ClipEncoder
from impl.train.synthetic import SyntheticVideoSource
from impl.train.trainer import Trainer
from dist_harness import run_distributed

ARGS = ["--preset", "tiny", "--frames", "8", "--dtype", "fp32", "--data", "synthetic-video",
        "--data-length", "2", "--no-progress"]


def test_cli_trains_checkpoints_and_resumes(tmp_path):
    assert main([*ARGS, "--steps", "2", "--checkpoint-every", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoint_000002" / "model.safetensors").is_file()
    assert main([*ARGS, "--steps", "3", "--out", str(tmp_path)]) == 0     # resumes at step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_cli_rejects_bad_config(tmp_path, capsys):
    assert main([*ARGS, "--precision", "int4", "--out", str(tmp_path)]) == 2
    assert "precision" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1\n")
    assert main([*ARGS, "--config", str(cfg), "--out", str(tmp_path)]) == 2


def test_cli_dtype_and_precision_flags(tmp_path, capsys):
    cfg = build_config(parse_args(["--dtype", "fp64", "--data", "synthetic-latents", "--out", str(tmp_path)]))
    assert (cfg.dtype, cfg.precision) == ("fp64", "bf16")
    cfg = build_config(parse_args(["--precision", "fp8", "--data", "synthetic-latents", "--out", str(tmp_path)]))
    assert (cfg.dtype, cfg.precision) == ("bf16", "fp8")
    # The old spelling of a dtype as --precision is refused with the new flag named.
    assert main([*ARGS, "--precision", "fp64", "--out", str(tmp_path)]) == 2
    assert "use --dtype fp64" in capsys.readouterr().err
    assert main([*ARGS, "--precision", "fp8", "--out", str(tmp_path)]) == 2      # ARGS has --dtype fp32
    assert "TrainConfig.precision" in capsys.readouterr().err
    # A config file from before the split loads with its dtype; flags still override it.
    old = tmp_path / "old.yaml"
    old.write_text("precision: fp32\nframes: 16\n")
    cfg = build_config(parse_args(["--config", str(old), "--data", "synthetic-latents", "--out", str(tmp_path)]))
    assert (cfg.dtype, cfg.precision, cfg.frames) == ("fp32", "bf16", 16)
    cfg = build_config(parse_args(["--config", str(old), "--dtype", "fp64", "--data", "x", "--out", str(tmp_path)]))
    assert (cfg.dtype, cfg.precision) == ("fp64", "bf16")


def test_cli_help_lists_allowed_values_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("one of bf16, fp32, fp64 (default: bf16)", "one of bf16, fp8, nvfp4_emulated, nvfp4_te (default: bf16)",
                 "one of balanced, naive (default: balanced)", "one of auto, dense, flex (default: auto)",
                 "(default: 600)", "(default: 28)"):
        assert part in text
    flags = [a for a in build_parser()._actions if a.dest != "help"]
    undocumented = [a.dest for a in flags if not a.help or not ("(default:" in a.help or "(required)" in a.help)]
    assert flags and not undocumented


def _video_loss(rank, world, sp, kind):
    preset = get_preset("tiny")
    groups = build_groups(sp)
    enc = ClipEncoder(build_vae(preset.vae, dtype=torch.float64, seed=0),
                      TextEncoder.from_preset(preset.text, dtype=torch.float64), halo=28)
    cfg = TrainConfig(frames=8, dtype="fp64", steps=1, sp_size=sp, sp_layout=kind, ema_start_step=None)
    trainer = Trainer(cfg, groups=groups, encoders=enc)
    src = SyntheticVideoSource(8, preset.stream.frames_per_block, preset.video.height, preset.video.width,
                               length=2, seed=0, shots_per_clip=2)
    return [s.loss for s in trainer.fit(src, progress=False)]


def test_video_clips_through_sp_encoding_match_one_process():
    ref = _video_loss(0, 1, 1, "balanced")
    for kind in ("balanced", "naive"):
        for losses in run_distributed(_video_loss, 2, 2, kind):
            assert losses == pytest.approx(ref, rel=1e-10)


def test_cli_sharding_flags_train_sharded_checkpoints_and_resume(tmp_path, capsys):
    cfg = build_config(parse_args(["--sharding", "fsdp", "--offload", "--data", "synthetic-latents",
                                   "--out", str(tmp_path)]))
    assert (cfg.sharding, cfg.offload) == ("fsdp", True)
    assert build_config(parse_args(["--data", "x", "--out", str(tmp_path)])).sharding == "none"
    assert main([*ARGS, "--offload", "--out", str(tmp_path / "bad")]) == 2       # offload needs fsdp
    assert "TrainConfig.offload" in capsys.readouterr().err
    assert main([*ARGS, "--sharding", "zero3", "--out", str(tmp_path / "bad")]) == 2
    assert "TrainConfig.sharding: must be one of ['none', 'fsdp']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one of none, fsdp (default: none)" in text and "--offload" in text

    # One process: a world-of-one group for FSDP, sharded (DCP) checkpoints, resume.
    out = tmp_path / "run"
    assert main([*ARGS, "--sharding", "fsdp", "--steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    meta = json.loads((out / "checkpoint_000002" / "trainer.json").read_text())
    assert meta["format"] == "dcp" and meta["config"]["sharding"] == "fsdp"
    assert (out / "checkpoint_000002" / "dcp" / ".metadata").is_file()
    assert main([*ARGS, "--sharding", "fsdp", "--steps", "3", "--out", str(out)]) == 0
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not torch.distributed.is_initialized()      # the CLI tears its group down
