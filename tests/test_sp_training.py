"""The measured SP training benchmark: torchrun launches of impl.train under both layouts
(gloo, tiny preset), its summary arithmetic, and its variant checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repro.benchmarks.sp_training import SP_TRAINING, launch_command, run_sp_training, summarize

SPEC = Path(__file__).resolve().parents[1] / "experiments"


def test_summary_of_a_constructed_log():
    log = [{"step": i + 1, "loss": 1.0 / (i + 1), "step_s": s, "tokens_per_s": 1000 / s}
           for i, s in enumerate([9.0, 0.2, 0.4, 0.3])]
    m = summarize(log, {"world_size": 2, "peak_mem_gb_per_rank": [3.0, 5.0]}, warmup_steps=1)
    assert m["step_ms_p50"] == pytest.approx(300.0) and m["step_ms_mean"] == pytest.approx(300.0)
    assert m["tokens_per_s"] == pytest.approx(1000 / 0.3) and m["timed_steps"] == 3
    assert (m["peak_mem_gb_max"], m["peak_mem_gb_min"], m["loss_last"]) == (5.0, 3.0, 0.25)
    cpu = summarize(log, {"world_size": 1, "peak_mem_gb_per_rank": [None]}, warmup_steps=0)
    assert cpu["peak_mem_gb_max"] is None and cpu["timed_steps"] == 4
    with pytest.raises(RuntimeError, match="none after the 4 warm-up"):
        summarize(log, {"world_size": 1, "peak_mem_gb_per_rank": [None]}, warmup_steps=4)


@pytest.mark.parametrize("data", ["latents", "video"])
def test_both_layouts_train_the_same_model_through_torchrun(data):
    """Two gloo ranks per layout, float32: the layouts distribute (and, for raw video, encode)
    the same clip differently, so the losses agree; the per-step log and the summary reach
    the metrics. On latents the balanced run is also sharded (``--sharding fsdp``), so the
    sharded torchrun path is held to the replicated naive one."""
    from repro.spec import load_spec
    spec = load_spec(SPEC / "sp_training.yaml")
    assert {v.values["sp_layout"] for v in spec.expand("cpu")} == {"balanced", "naive"}
    assert {v.values["sharding"] for v in spec.expand("cpu")} == {"none", "fsdp"}
    assert {(v.values["num_layers"], v.values["sharding"]) for v in spec.expand("cuda")} == {(6, "none"), (0, "fsdp")}
    measure = {**SP_TRAINING.measure_defaults(), "warmup_steps": 1, "steps": 2, "timeout_s": 300.0}
    runs = {}
    for layout in ("balanced", "naive"):
        sharding = "fsdp" if data == "latents" and layout == "balanced" else "none"
        variant = {**SP_TRAINING.defaults(), "sp_size": 2, "sp_layout": layout, "frames": 8, "dtype": "fp32",
                   "data": data, "sharding": sharding}
        runs[layout] = run_sp_training(variant, measure, {"device": "cpu"})
    for m in runs.values():
        assert m["ranks"] == 2 and m["timed_steps"] == 2 and m["tokens_per_s"] > 0 and m["step_ms_p50"] > 0
        assert m["peak_mem_gb_max"] is None   # no GPU memory on gloo/CPU
    assert runs["balanced"]["loss_last"] == pytest.approx(runs["naive"]["loss_last"], rel=1e-4)


def test_launch_command_and_variant_errors(tmp_path):
    variant = {**SP_TRAINING.defaults(), "preset": "wan22_ti2v_5b", "num_layers": 6, "sp_size": 4, "frames": 96,
               "precision": "fp8", "sp_layout": "naive", "gradient_checkpointing": False}
    cmd = launch_command(variant, {**SP_TRAINING.measure_defaults(), "warmup_steps": 2, "steps": 5}, tmp_path)
    joined = " ".join(cmd)
    for part in ("--nproc-per-node 4", "-m impl.train", "--sp-layout naive", "--frames 96", "--precision fp8",
                 "--steps 7", "--num-layers 6", "--no-gradient-checkpointing", "--data synthetic-latents",
                 "--sharding none"):
        assert part in joined
    assert "--offload" not in joined
    sharded = " ".join(launch_command({**variant, "sharding": "fsdp", "offload": True}, SP_TRAINING.measure_defaults(),
                                      tmp_path))
    assert "--sharding fsdp" in sharded and "--offload" in sharded
    measure = SP_TRAINING.measure_defaults()
    with pytest.raises(ValueError, match="multiple of sp_size"):
        run_sp_training({**variant, "frames": 48}, measure, {"device": "cpu"})
    with pytest.raises(ValueError, match="attention heads"):
        run_sp_training({**variant, "sp_size": 5, "frames": 200}, measure, {"device": "cpu"})
    assert "--dtype bf16 --precision fp8" in joined
    with pytest.raises(ValueError, match=r"TrainConfig\.precision: 'fp8' .* got dtype 'fp32'"):   # before launching
        run_sp_training({**variant, "dtype": "fp32"}, measure, {"device": "cpu"})
    with pytest.raises(ValueError, match=r"TrainConfig\.offload: .*needs sharding 'fsdp'"):
        run_sp_training({**variant, "offload": True}, measure, {"device": "cpu"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sp_training_nccl_two_gpus():
    measure = {**SP_TRAINING.measure_defaults(), "warmup_steps": 1, "steps": 2, "timeout_s": 600.0}
    for layout in ("balanced", "naive"):
        variant = {**SP_TRAINING.defaults(), "preset": "small", "sp_size": 2, "sp_layout": layout, "frames": 16}
        m = run_sp_training(variant, measure, {"device": "cuda"})
        assert m["peak_mem_gb_max"] > 0 and m["tokens_per_s"] > 0


def test_training_cli_writes_the_metrics_summary(tmp_path):
    from impl.train.__main__ import main
    out = tmp_path / "m.json"
    assert main(["--preset", "tiny", "--frames", "4", "--steps", "1", "--data", "synthetic-latents",
                 "--checkpoint-every", "0", "--out", str(tmp_path / "run"), "--metrics-out", str(out),
                 "--no-progress", "--dtype", "fp32"]) == 0
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 1 and summary["sp_size"] == 1 and len(summary["peak_mem_gb_per_rank"]) == 1
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 1
