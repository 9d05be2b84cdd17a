"""The teacher-forcing trainer: learning, exact resume, SP and DP runs, clear config errors."""

import json

import pytest
import torch

from impl.config import ConfigError, get_preset
from impl.modes import DType, SPLayout, TrainAttention, TrainPrecision, choices
from impl.parallel.groups import ParallelConfigError, build_groups
from impl.train.checkpoint import list_checkpoints
from impl.train.config import ErrorRecyclingConfig, TrainConfig
from impl.train.flow import FlowSchedule, shared_generator
from impl.train.synthetic import SyntheticLatentSource
from impl.train.teacher_forcing import TFInputs, teacher_forcing_loss
from impl.train.trainer import Trainer
from dist_harness import run_distributed

PRESET = get_preset("tiny")


def _source(frames=8, length=2, seed=0, dtype=torch.float32):
    h, w = PRESET.latent_hw
    return SyntheticLatentSource(PRESET.dit.in_channels, frames, h, w, PRESET.text.max_length, PRESET.dit.text_dim,
                                 frames_per_block=PRESET.stream.frames_per_block, length=length, seed=seed, dtype=dtype)


def _eval_loss(trainer: Trainer, sample) -> float:
    """Loss at fixed noise and timesteps (the training loss is too noisy to compare)."""
    sched = FlowSchedule()
    g = shared_generator(123, 0)
    x0 = sample.latents[None].to(trainer.model.dtype)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    idx = sched.sample_block_indices(g, 1, trainer.layout.num_blocks)
    inputs = TFInputs(x0, list(range(x0.shape[2])), noise, idx, sample.text[None].to(x0.dtype))
    with torch.no_grad():
        return float(teacher_forcing_loss(trainer.model, trainer.layout, 0, inputs, sched, trainer.core).loss)


def test_training_lowers_the_loss():
    cfg = TrainConfig(frames=8, dtype="fp32", steps=40, lr=2e-3, beta1=0.9, ema_start_step=None,
                      gradient_checkpointing=False)
    src = _source(length=1)
    trainer = Trainer(cfg)
    before = _eval_loss(trainer, src[0])
    trainer.fit(src, progress=False)
    after = _eval_loss(trainer, src[0])
    assert after < 0.85 * before, (before, after)


def _cfg(**kw):
    base = dict(frames=8, dtype="fp64", steps=4, lr=1e-3, beta1=0.9, ema_start_step=1, checkpoint_every=2,
                max_checkpoints=2)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_continues_identically(tmp_path):
    src = _source(length=3, dtype=torch.float64)
    straight = Trainer(_cfg())
    straight.fit(src, progress=False)

    first = Trainer(_cfg(steps=2), out_dir=tmp_path)
    first.fit(src, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_000002"]
    resumed = Trainer(_cfg(), out_dir=tmp_path)   # picks up checkpoint_000002
    resumed.fit(src, progress=False)
    assert resumed.step == 4
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    for n, t in straight.ema.shadow.items():
        assert torch.equal(t, resumed.ema.shadow[n]), n
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_000002", "checkpoint_000004"]


def test_checkpoint_of_another_config_is_refused(tmp_path):
    Trainer(_cfg(steps=2), out_dir=tmp_path).fit(_source(dtype=torch.float64), progress=False)
    with pytest.raises(ValueError, match="frames"):
        Trainer(_cfg(frames=16, steps=4), out_dir=tmp_path).fit(_source(frames=16, dtype=torch.float64), progress=False)


def _make_checkpoint_old_style(folder):
    """Rewrite a checkpoint's config as written before dtype was split from precision."""
    meta_path = folder / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["precision"] = meta["config"].pop("dtype")   # fp64 was a precision then
    meta_path.write_text(json.dumps(meta))


def test_checkpoint_from_before_the_dtype_split_resumes(tmp_path):
    src = _source(length=3, dtype=torch.float64)
    straight = Trainer(_cfg())
    straight.fit(src, progress=False)
    Trainer(_cfg(steps=2), out_dir=tmp_path).fit(src, progress=False)
    _make_checkpoint_old_style(tmp_path / "checkpoint_000002")
    with pytest.raises(ValueError, match="dtype='fp64'"):      # the old fp64 run is not a bf16 run
        Trainer(_cfg(dtype="bf16"), out_dir=tmp_path).fit(_source(length=3), progress=False)
    resumed = Trainer(_cfg(), out_dir=tmp_path)
    resumed.fit(src, progress=False)
    assert resumed.step == 4
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_bf16_master_weights_and_error_recycling_run():
    cfg = TrainConfig(frames=8, precision="bf16", steps=3, ema_start_step=None,
                      error_recycling=ErrorRecyclingConfig(enabled=True, clean_prob=0.0))
    trainer = Trainer(cfg)
    stats = trainer.fit(_source(), progress=False)
    assert len(stats) == 3 and all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert trainer.optimizer.master[0].dtype == torch.float32 and trainer.model.dtype == torch.bfloat16
    assert len(trainer.recycler.latent) > 0


def _train_sp(rank, world, sp, kind, steps):
    groups = build_groups(sp)
    trainer = Trainer(_cfg(steps=steps, sp_size=sp, sp_layout=kind, ema_start_step=None), groups=groups)
    stats = trainer.fit(_source(length=4, dtype=torch.float64), progress=False)
    return [s.loss for s in stats], {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_sp_training_matches_one_process():
    ref_losses, ref_params = _train_sp(0, 1, 1, "balanced", 2)
    for kind in ("balanced", "naive"):
        for losses, params in run_distributed(_train_sp, 2, 2, kind, 2):
            assert losses == pytest.approx(ref_losses, rel=1e-10)
            for n, p in ref_params.items():
                torch.testing.assert_close(params[n], p, rtol=1e-9, atol=1e-12, msg=n)


def test_sp_times_dp_replicas_stay_in_sync():
    out = run_distributed(_train_sp, 4, 2, "balanced", 2)
    for losses, params in out[1:]:
        assert losses == pytest.approx(out[0][0], rel=1e-12)   # the DP-averaged loss
        for n, p in out[0][1].items():
            assert torch.equal(params[n], p), n


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="int4")
    with pytest.raises(ConfigError, match="sp_layout"):
        TrainConfig(sp_layout="ring")
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"lr": 1e-4, "learning_rate": 1})
    with pytest.raises(ParallelConfigError, match="process groups"):
        Trainer(TrainConfig(sp_size=2))
    with pytest.raises(ConfigError, match="TrainConfig.frames: must be whole AR blocks"):   # in the config itself
        TrainConfig(frames=7)


def test_dtype_and_precision_are_separate_validated_fields():
    assert (TrainConfig().dtype, TrainConfig().precision) == ("bf16", "bf16")
    for dtype in choices(DType):                 # every dtype trains unquantized
        assert TrainConfig(dtype=dtype).dtype == dtype
    for precision in choices(TrainPrecision):    # every format trains in bf16
        assert TrainConfig(precision=precision).precision == precision
    for field, bad in (("dtype", "fp16"), ("precision", "fp32"), ("precision", "nvfp4_weight_only"),
                       ("sp_layout", "ring"), ("attention_backend", "sdpa")):
        with pytest.raises(ConfigError, match=rf"^TrainConfig\.{field}: must be one of .*got '{bad}'"):
            TrainConfig(**{field: bad})
    for kind, field in ((SPLayout, "sp_layout"), (TrainAttention, "attention_backend")):
        for value in choices(kind):
            assert getattr(TrainConfig(**{field: value}), field) == value
    for precision in ("fp8", "nvfp4_emulated", "nvfp4_te"):
        for dtype in ("fp32", "fp64"):
            with pytest.raises(ConfigError, match=rf"TrainConfig\.precision: '{precision}' .* dtype 'bf16', "
                                                  rf"got dtype '{dtype}'"):
                TrainConfig(dtype=dtype, precision=precision)


def test_from_dict_reads_configs_from_before_the_dtype_split():
    for old in ("fp32", "fp64"):
        cfg = TrainConfig.from_dict({"precision": old})
        assert (cfg.dtype, cfg.precision) == (old, "bf16")
        assert TrainConfig.from_dict(TrainConfig(dtype=old).to_dict()) == TrainConfig(dtype=old)   # round trip
    assert TrainConfig.from_dict({"precision": "fp32", "frames": 16, "lr": 1e-4}) == \
        TrainConfig(dtype="fp32", precision="bf16", frames=16, lr=1e-4)
    assert TrainConfig.from_dict({"precision": "fp8"}) == TrainConfig(dtype="bf16", precision="fp8")
    assert TrainConfig.from_dict({}) == TrainConfig()
    with pytest.raises(ConfigError, match="TrainConfig.precision"):   # a new dict means what it says
        TrainConfig.from_dict({"dtype": "fp32", "precision": "fp32"})
