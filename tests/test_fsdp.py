"""FSDP2 sharding of the trainer (impl/parallel/fsdp.py) on real gloo CPU ranks, float64.

Two launches keep the file fast: four ranks (FSDP x Balanced SP 4 for two steps, then
"killed" after its sharded checkpoint), then two ranks (one-process exactness of loss and
gradients under Balanced and naive SP, that checkpoint resumed resharded 4 -> 2 and trained
on, DP averaging, export, LoRA, FP8 with CPU offload, emulated NVFP4, and the mismatch errors).
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.distributed as dist

from impl.config import ConfigError, get_preset
from impl.model.attention import FullSequence
from impl.model.checkpoint import CheckpointError, load_dit_weights
from impl.model.dit import CausalWanDiT
from impl.parallel.attention import teacher_forcing_core
from impl.parallel.groups import ParallelConfigError, build_groups
from impl.parallel.layout import TeacherForcingLayout
from impl.train.checkpoint import export_dit_weights, list_checkpoints, load_sharded_checkpoint, read_checkpoint_weights
from impl.train.config import TrainConfig
from impl.train.synthetic import SyntheticLatentSource
from impl.train.teacher_forcing import teacher_forcing_loss
from impl.train.trainer import Trainer
from dist_harness import run_distributed
from test_teacher_forcing_sp import FRAMES, _setup

PRESET = get_preset("tiny")


def _source(dtype=torch.float64):
    h, w = PRESET.latent_hw
    return SyntheticLatentSource(PRESET.dit.in_channels, 8, h, w, PRESET.text.max_length, PRESET.dit.text_dim,
                                 frames_per_block=PRESET.stream.frames_per_block, length=4, seed=0, dtype=dtype)


def _cfg(**kw):
    base = dict(frames=8, dtype="fp64", steps=4, lr=1e-3, beta1=0.9, ema_start_step=1, checkpoint_every=2,
                max_checkpoints=2)
    base.update(kw)
    return TrainConfig(**base)


def _full(tensors):
    """Full CPU copies of named (possibly sharded) tensors (collective under FSDP)."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone() for n, t in tensors.items()}


def _run(trainer: Trainer):
    stats = trainer.fit(_source(), progress=False)
    return {"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats],
            "params": _full(trainer.optimizer.master_state()),
            "ema": None if trainer.ema is None else _full(trainer.ema.shadow)}


@functools.lru_cache(maxsize=None)
def _reference():
    """The replicated one-process run every sharded run must reproduce: 4 steps, with a
    snapshot of the state after step 2."""
    trainer = Trainer(_cfg())
    at_two = {}

    def snap(stats):
        if stats.step == 2:
            at_two.update(params=_full(trainer.optimizer.master_state()), ema=_full(trainer.ema.shadow))

    stats = trainer.fit(_source(), progress=False, on_step=snap)
    return {"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats], "at_two": at_two,
            "params": _full(trainer.optimizer.master_state()), "ema": _full(trainer.ema.shadow)}


def _exp_avg(trainer: Trainer) -> torch.Tensor:
    """AdamW's first moment of the last parameter, gathered."""
    p = trainer.optimizer.params[-1]
    return _full({"m": trainer.optimizer.optimizer.state[p]["exp_avg"]})["m"]


def _model_grads(sharded: bool, sp: int, kind: str, checkpointing: bool, lora: bool = False):
    """Loss and full gradients of one teacher-forcing backward of the float64 tiny model."""
    preset, model, inputs, sched = _setup()
    model.gradient_checkpointing = checkpointing
    groups = build_groups(sp) if sharded else build_groups(1)
    if lora:
        from impl.model.lora import LoraSpec, add_lora
        add_lora(model, LoraSpec(rank=4, alpha=4.0))
        for n, p in model.named_parameters():   # B starts at 0: make the LoRA path non-trivial
            if "lora_B" in n:
                torch.nn.init.normal_(p.data, std=0.1, generator=torch.Generator().manual_seed(len(n)))
    if sharded:
        from impl.parallel.fsdp import shard_for_lora, shard_model
        (shard_for_lora if lora else shard_model)(model, groups, "cpu")
    layout = TeacherForcingLayout(FRAMES, preset.stream.frames_per_block, sp, kind)
    core = teacher_forcing_core(layout, preset.tokens_per_frame, "cpu", groups.sp_group)
    out = teacher_forcing_loss(model, layout, groups.sp_rank, inputs, sched, core)
    out.loss.backward()
    loss = out.loss.detach().clone()
    if groups.sp_group is not None:
        dist.all_reduce(loss, group=groups.sp_group)
    named = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), _full(named)


# ------------------------------------------------------------------ launch 1: four ranks

def _four_ranks(rank, world, tmp):
    """FSDP x Balanced SP 4 for 2 steps, "killed" after its step-2 checkpoint."""
    with pytest.raises(ParallelConfigError, match="sp_size=3 does not divide the world size 4"):
        build_groups(3)
    trainer = Trainer(_cfg(steps=2, sp_size=4, sharding="fsdp"), groups=build_groups(4), out_dir=tmp)
    out = _run(trainer)
    out["exp_avg"] = _exp_avg(trainer)
    return out


# ------------------------------------------------------------------ launch 2: two ranks

def _two_ranks(rank, world, tmp):
    from pathlib import Path

    tmp = Path(tmp)
    ckpt_dir = tmp / "w4"
    out = {"grads": {kind: _model_grads(True, 2, kind, kind == "balanced") for kind in ("balanced", "naive")},
           "lora": _model_grads(True, 2, "balanced", True, lora=True)}

    # Mismatches: another model (its config, then its tensors), another sharding.
    other = Trainer(_cfg(num_layers=1, sp_size=2, sharding="fsdp"), groups=build_groups(2), out_dir=ckpt_dir)
    with pytest.raises(ValueError, match="num_layers"):
        other.resume_if_possible()
    with pytest.raises(CheckpointError, match="model tensors do not match .* unexpected: model.blocks.1"):
        load_sharded_checkpoint(ckpt_dir / "checkpoint_000002", other.sharded_state())
    with pytest.raises(ValueError, match="sharding='fsdp'"):
        Trainer(_cfg(sp_size=2), groups=build_groups(2), out_dir=ckpt_dir).resume_if_possible()

    # The four-rank run resumed on two ranks (resharded), and trained on to step 4.
    trainer = Trainer(_cfg(sp_size=2, sharding="fsdp"), groups=build_groups(2), out_dir=ckpt_dir)
    assert trainer.resume_if_possible() and trainer.step == 2
    out["at_two"] = {"params": _full(trainer.optimizer.master_state()), "ema": _full(trainer.ema.shadow),
                     "exp_avg": _exp_avg(trainer)}
    out["resumed"] = _run(trainer)
    out["checkpoints"] = [p.name for p in list_checkpoints(ckpt_dir)]
    trainer.export_weights(tmp / "w.safetensors")
    trainer.export_weights(tmp / "ema.safetensors", ema=True)

    # Two DP replicas (sp 1), two micro-steps each: FSDP's gradient mean over DP (and its
    # accumulation over micro-steps) equals the replicated all-reduce.
    out["dp"] = {s: _run(Trainer(_cfg(steps=2, grad_accum=2, ema_start_step=None, checkpoint_every=0, sharding=s),
                                 groups=build_groups(1))) for s in ("none", "fsdp")}
    # BF16 compute with quantized block linears (their BF16 master weight is the parameter
    # FSDP shards), beside the replicated run: FP8 for two steps with CPU offload, emulated
    # NVFP4 for one.
    for precision, steps in (("fp8", 2), ("nvfp4_emulated", 1)):
        q = dict(frames=8, precision=precision, steps=steps, ema_start_step=1, checkpoint_every=0, sp_size=2)
        out[precision] = {s: _run(Trainer(TrainConfig(**q, sharding=s, offload=s == "fsdp" and precision == "fp8"),
                                          groups=build_groups(2))) for s in ("none", "fsdp")}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    four = run_distributed(_four_ranks, 4, str(tmp / "w4"))
    # What a kill in the middle of writing step 4 leaves (a temporary folder), and a folder
    # without trainer.json: resume must ignore both.
    (tmp / "w4" / ".tmp_checkpoint_000004_dcp" / "dcp").mkdir(parents=True)
    (tmp / "w4" / ".tmp_checkpoint_000004_dcp" / "dcp" / "__0_0.distcp").write_bytes(b"half")
    (tmp / "w4" / "checkpoint_000003").mkdir()
    snapshot = {"meta": json.loads((tmp / "w4" / "checkpoint_000002" / "trainer.json").read_text()),
                "files": sorted(os.listdir(tmp / "w4" / "checkpoint_000002" / "dcp"))}
    two = run_distributed(_two_ranks, 2, str(tmp))
    return tmp, four, two, snapshot


def test_fsdp_with_balanced_sp4_trains_like_one_process(runs):
    _, four, _, snapshot = runs
    ref = _reference()
    for per_rank in four:
        assert per_rank["losses"] == pytest.approx(ref["losses"][:2], rel=1e-10)
        assert per_rank["norms"] == pytest.approx(ref["norms"][:2], rel=1e-10)
        for key in ("params", "ema"):
            for n, t in ref["at_two"][key].items():
                torch.testing.assert_close(per_rank[key][n], t, rtol=1e-9, atol=1e-12, msg=f"{key} {n}")
    assert (snapshot["meta"]["format"], snapshot["meta"]["world_size"], snapshot["meta"]["has_ema"]) == ("dcp", 4, True)
    assert snapshot["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]


def test_fsdp_with_balanced_and_naive_sp_gives_the_one_process_loss_and_gradients(runs):
    ref_loss, ref_grads = _model_grads(False, 1, "balanced", True)
    for per_rank in runs[2]:
        for kind, (loss, grads) in per_rank["grads"].items():
            assert loss == pytest.approx(ref_loss, rel=1e-12), kind
            assert grads.keys() == ref_grads.keys()
            for n, g in ref_grads.items():
                torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-13, msg=f"{kind} {n}")


def test_killed_run_resumes_resharded_and_equals_the_uninterrupted_run(runs):
    tmp, four, two, _ = runs
    ref = _reference()
    for per_rank in two:
        at_two = per_rank["at_two"]
        for key in ("params", "ema"):                       # 4 -> 2 ranks, bit for bit
            for n, t in four[0][key].items():
                assert torch.equal(at_two[key][n], t), (key, n)
        assert torch.equal(at_two["exp_avg"], four[0]["exp_avg"])
        got = per_rank["resumed"]
        assert got["losses"] == pytest.approx(ref["losses"][2:], rel=1e-10)
        for key in ("params", "ema"):
            for n, t in ref[key].items():
                torch.testing.assert_close(got[key][n], t, rtol=1e-9, atol=1e-12, msg=f"{key} {n}")
        assert per_rank["checkpoints"] == ["checkpoint_000002", "checkpoint_000004"]
    assert not (tmp / "w4" / ".tmp_checkpoint_000004_dcp").exists()   # the stale attempt was replaced


def test_fsdp_averages_dp_replicas_like_the_replicated_trainer(runs):
    for per_rank in runs[2]:
        none, fsdp = per_rank["dp"]["none"], per_rank["dp"]["fsdp"]
        assert fsdp["losses"] == pytest.approx(none["losses"], rel=1e-12)
        for n, t in none["params"].items():
            torch.testing.assert_close(fsdp["params"][n], t, rtol=1e-10, atol=1e-13, msg=n)


def test_quantized_linears_and_cpu_offload_train_like_replicated(runs):
    for per_rank in runs[2]:
        for precision in ("fp8", "nvfp4_emulated"):
            none, fsdp = per_rank[precision]["none"], per_rank[precision]["fsdp"]
            # Same BF16 weights and inputs: the first forward is identical; afterwards FSDP
            # reduces gradients in float32 where the replicated path reduces BF16 gradients.
            assert fsdp["losses"][0] == pytest.approx(none["losses"][0], rel=1e-6), precision
            assert fsdp["losses"][1:] == pytest.approx(none["losses"][1:], rel=2e-2), precision
            assert all(t.dtype == torch.float32 for t in fsdp["params"].values())
            assert fsdp["ema"] is not None


def test_exports_load_into_an_inference_model(runs):
    tmp, _, two, _ = runs
    final = two[0]["resumed"]
    for name, key in (("w.safetensors", "params"), ("ema.safetensors", "ema")):
        model = CausalWanDiT(PRESET.dit, dtype=torch.float64)
        load_dit_weights(model, tmp / name)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), final[key][n]), (name, n)
    # Offline, one process, no process group: the sharded checkpoint straight to a file.
    ckpt = tmp / "w4" / "checkpoint_000004"
    for ema, key in ((False, "params"), (True, "ema")):
        weights = read_checkpoint_weights(ckpt, ema=ema)
        assert weights.keys() == final[key].keys()
        assert all(torch.equal(weights[n], t) for n, t in final[key].items())
    out = export_dit_weights(ckpt, tmp / "offline.safetensors", dtype=torch.bfloat16)
    model = CausalWanDiT(PRESET.dit, dtype=torch.bfloat16)
    load_dit_weights(model, out)
    assert all(torch.equal(p.detach(), final["params"][n].bfloat16()) for n, p in model.named_parameters())


def test_shard_for_lora_gives_the_lora_gradients(runs):
    ref_loss, ref_grads = _model_grads(False, 1, "balanced", True, lora=True)
    assert ref_grads and all("lora_" in n for n in ref_grads)
    for per_rank in runs[2]:
        loss, grads = per_rank["lora"]
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-13, msg=n)


# ------------------------------------------------------------------ one process

def test_sharding_config_errors_name_the_field():
    assert (TrainConfig().sharding, TrainConfig().offload) == ("none", False)
    assert TrainConfig(sharding="fsdp", offload=True).offload is True
    with pytest.raises(ConfigError, match=r"^TrainConfig\.sharding: must be one of \['none', 'fsdp'\]"):
        TrainConfig(sharding="zero3")
    with pytest.raises(ConfigError, match=r"^TrainConfig\.offload: .*needs sharding 'fsdp'"):
        TrainConfig(offload=True)
    with pytest.raises(ConfigError, match=r"TrainConfig\.offload: must be a bool"):
        TrainConfig(sharding="fsdp", offload="yes")
    assert TrainConfig.from_dict(TrainConfig(sharding="fsdp").to_dict()).sharding == "fsdp"
    assert not dist.is_initialized()
    with pytest.raises(ParallelConfigError, match="sharding: 'fsdp' needs torch.distributed"):
        Trainer(TrainConfig(frames=8, sharding="fsdp"))


# ------------------------------------------------------------------ the memory model (train_memory)

class _FlashLike(torch.autograd.Function):
    """What FlexAttention keeps for backward on CUDA: q, k, v, o and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        ctx.save_for_backward(q, k, v, o, torch.empty(q.shape[:-1], dtype=torch.float32))
        return o

    @staticmethod
    def backward(ctx, grad):  # never called
        raise NotImplementedError


@pytest.mark.parametrize("preset_name, frames", [("tiny", 8), ("small", 4)])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_activation_model_equals_what_the_forward_leaves_alive(preset_name, frames, checkpointing):
    """Every byte the forward keeps for backward (counted by the dispatch-mode storage meter),
    under Balanced SP 1: the blocks, text, head, time and patch terms of train_memory."""
    from repro.benchmarks._memory_model import activation_terms
    from repro.benchmarks._one_rank import LiveStorageMeter

    preset = get_preset(preset_name)
    dit = preset.dit
    torch.manual_seed(0)
    model = CausalWanDiT(dit, dtype=torch.bfloat16)
    model.gradient_checkpointing = checkpointing
    layout = TeacherForcingLayout(frames, preset.stream.frames_per_block, 1, "balanced")
    local = [f for _, f in layout.rank_frames(0)]
    h, w = preset.latent_hw
    latents = torch.randn(1, dit.in_channels, len(local), h, w, dtype=torch.bfloat16)
    timesteps = torch.rand(1, len(local)) * 1000
    groups = len(local) // preset.stream.frames_per_block
    text_all = torch.randn(1, groups, preset.text.max_length, dit.text_dim, dtype=torch.bfloat16)
    meter = LiveStorageMeter(track_peak=False)
    with meter:   # the loss builds the model's latents and picks each block's prompt: both copies
        x, text = latents * 1, text_all[:, list(range(groups))]
        out = model(x, timesteps, model.encode_text(text), frame_positions=torch.tensor(local),
                    call=FullSequence(_FlashLike.apply))
        del x, text
        saved = meter.live() - out.untyped_storage().nbytes()
    assert saved == activation_terms(preset, frames, 1, dit.num_layers, checkpointing)["saved"]


def test_memory_model_scales_as_the_sharding_says():
    from repro.benchmarks._memory_model import memory_model, param_counts

    P = param_counts("wan22_ti2v_5b").total
    assert 4.9e9 < P < 5.1e9
    run = functools.partial(memory_model, "wan22_ti2v_5b", checkpointing=True)
    none1 = run(frames=24, gpus=1, sp_size=1, sharding="none", offload=False)
    # The replicated step: BF16 params + grads, float32 master + master grads, AdamW moments and
    # foreach AdamW's temporary = 24 bytes per parameter at the optimizer step (the 120 GB).
    assert none1["model_peak_gb"] == none1["step_peak_gb"] == pytest.approx(24 * P / 1e9)
    assert not none1["fits_80gb"] and none1["fits_h200"]
    for gpus, frames in ((2, 48), (4, 96), (8, 192)):
        none = run(frames=frames, gpus=gpus, sp_size=gpus, sharding="none", offload=False)
        fsdp = run(frames=frames, gpus=gpus, sp_size=gpus, sharding="fsdp", offload=False)
        off = run(frames=frames, gpus=gpus, sp_size=gpus, sharding="fsdp", offload=True)
        assert none["param_gb"] == none1["param_gb"] and none["optimizer_gb"] == none1["optimizer_gb"]
        assert fsdp["optimizer_gb"] == pytest.approx(8 * P / gpus / 1e9)       # sharded over all ranks
        assert fsdp["param_gb"] == fsdp["grad_gb"] == pytest.approx(4 * P / gpus / 1e9)
        assert none["activation_gb"] == fsdp["activation_gb"] == none1["activation_gb"]   # same tokens/rank
        assert off["step_peak_gb"] == 0 and off["host_gb"] == pytest.approx(16 * P / gpus / 1e9)
        assert off["model_peak_gb"] < fsdp["model_peak_gb"] < none["model_peak_gb"]
    sp4 = run(frames=96, gpus=4, sp_size=4, sharding="fsdp", offload=False)
    assert sp4["fits_80gb"] and not run(frames=96, gpus=4, sp_size=4, sharding="none", offload=False)["fits_80gb"]
    no_ckpt = memory_model("wan22_ti2v_5b", frames=24, gpus=1, sp_size=1, sharding="fsdp", offload=False,
                           checkpointing=False)
    assert no_ckpt["activation_gb"] > 10 * none1["activation_gb"]
    with pytest.raises(ValueError, match="offload"):
        run(frames=24, gpus=1, sp_size=1, sharding="none", offload=True)
    with pytest.raises(ValueError, match="sp_size"):
        run(frames=24, gpus=4, sp_size=3, sharding="fsdp", offload=False)


def test_train_memory_spec_and_the_measured_cpu_step():
    from repro.benchmarks.train_memory import TRAIN_MEMORY, check_variant, run_train_memory
    from repro.spec import load_spec

    spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "experiments", "train_memory.yaml"))
    for device in ("cpu", "cuda"):
        variants = [v.values for v in spec.expand(device)]
        measured = [v for v in variants if v["measured"]]
        assert {(v["sharding"], v["offload"]) for v in variants if not v["measured"]} == {
            ("none", False), ("fsdp", False), ("fsdp", True)}
        assert measured and all(v["gpus"] == 1 for v in measured)
    assert {v.values["preset"] for v in spec.expand("cuda") if v.values["measured"]} == {"wan22_ti2v_5b"}
    bad = {**TRAIN_MEMORY.defaults(), "gpus": 2, "measured": True}
    with pytest.raises(ValueError, match="measured: the harness runs one process"):
        check_variant(bad)
    # The real replicated step of the tiny model on the CPU, beside the model's prediction.
    variant = {**TRAIN_MEMORY.defaults(), "preset": "tiny", "frames": 8, "measured": True}
    m = run_train_memory(variant, {"warmup_steps": 1, "steps": 1, "seed": 0}, {"device": "cpu"})
    assert abs(m["model_error"]) < 0.1, m
