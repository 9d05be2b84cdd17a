"""DMD few-step distillation: rollout through the inference pipeline, LoRA-only updates,
critic learning, and DP ranks matching one process."""

import copy

import pytest
import torch

from impl.config import get_preset
from impl.inference.build import pipeline_for_model
from impl.model.dit import CausalWanDiT
from impl.parallel.groups import build_groups
from impl.train.dmd import DMDConfig, DMDTrainer
from impl.model.lora import LoraSpec, add_lora, lora_state_dict
from dist_harness import run_distributed

PRESET = get_preset("tiny")
PROMPTS = ["a red ball", "a red ball", "The scene transitions. a blue cube"]


def _embedder():
    table = {}

    def embed(prompt):
        if prompt not in table:
            g = torch.Generator().manual_seed(len(table) + 1)
            table[prompt] = torch.randn(1, PRESET.text.max_length, PRESET.dit.text_dim, generator=g,
                                        dtype=torch.float64)
        return table[prompt]
    return embed


def _trainer(batch=1, groups=None, **cfg):
    torch.manual_seed(0)
    teacher = CausalWanDiT(PRESET.dit, dtype=torch.float64).requires_grad_(False)
    student = add_lora(copy.deepcopy(teacher), LoraSpec(rank=4, alpha=4))
    critic = add_lora(copy.deepcopy(teacher), LoraSpec(rank=4, alpha=4))
    cfg = {"lr": 1e-3, "lr_critic": 1e-3, **cfg}
    config = DMDConfig(steps=2, batch_size=batch, gen_update_every=1, **cfg)
    return DMDTrainer(teacher, student, critic, PRESET, config, _embedder(), groups=groups)


def test_rollout_without_exit_is_the_inference_pipeline():
    tr = _trainer()
    noise = torch.randn(1, PRESET.dit.in_channels, 3 * PRESET.stream.frames_per_block, *PRESET.latent_hw)
    pipe = pipeline_for_model(tr.student, tr.pipe.cfg, text_embedder=tr.embed)
    ref = pipe.generate(PROMPTS, noise=noise, decode=False).latents
    assert torch.equal(tr.pipe.rollout(PROMPTS, noise, None).cpu(), ref)


def test_generator_gradient_reaches_lora_only_including_cross_attention():
    tr = _trainer()
    loss, stats = tr.generator_loss(PROMPTS, 0)
    loss.backward()
    assert stats["dmd_grad_norm"] > 0
    grads = {n: p.grad for n, p in tr.student.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in tr.teacher.parameters())
    # LoRA A of every targeted linear gets a gradient (B starts at zero, so A's is zero at
    # step 0; B's is not), the cross-attention K/V projections included.
    b_grads = {n: g for n, g in grads.items() if "lora_B" in n}
    assert any("attn2.to_k" in n and g.abs().sum() > 0 for n, g in b_grads.items())
    assert all(g is not None and torch.isfinite(g).all() for g in b_grads.values())


def test_steps_change_the_student_lora_and_the_critic_learns():
    tr = _trainer(lr_critic=1e-2)
    before = {k: v.clone() for k, v in lora_state_dict(tr.student).items()}
    first = float(tr.critic_loss(PROMPTS, 7))
    for _ in range(15):  # the critic fits a fixed rollout (same step's randomness)
        tr.critic_loss(PROMPTS, 7).backward()
        tr.opt_critic.step(10.0)
    assert float(tr.critic_loss(PROMPTS, 7)) < 0.85 * first
    stats = tr.train_step(PROMPTS)
    assert {"critic_loss", "generator_loss", "dmd_grad_norm"} <= set(stats)
    after = lora_state_dict(tr.student)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _dp_step(rank, world):
    tr = _trainer(groups=build_groups(1))
    tr.train_step(PROMPTS)
    return {k: v.clone() for k, v in lora_state_dict(tr.student).items()}, \
        {k: v.clone() for k, v in lora_state_dict(tr.critic).items()}


def test_two_dp_ranks_match_one_process_with_the_whole_batch():
    ref = _trainer(batch=2)
    ref.train_step(PROMPTS)
    ref_s, ref_c = lora_state_dict(ref.student), lora_state_dict(ref.critic)
    for student, critic in run_distributed(_dp_step, 2):
        for k, v in ref_s.items():
            torch.testing.assert_close(student[k], v, rtol=1e-9, atol=1e-12, msg=k)
        for k, v in ref_c.items():
            torch.testing.assert_close(critic[k], v, rtol=1e-9, atol=1e-12, msg=k)


def _fsdp_step(rank, world):
    from impl.parallel.fsdp import gather_lora_state_dict
    tr = _trainer(groups=build_groups(1), sharding="fsdp")
    stats = tr.train_step(PROMPTS)
    return stats, gather_lora_state_dict(tr.student), gather_lora_state_dict(tr.critic)


def test_fsdp_sharded_dmd_matches_one_replicated_process():
    """Two ranks, teacher / student / critic sharded over both (FSDP2, float64 masters): the
    step's losses, gradient norms and updated LoRA tensors equal one process with the batch."""
    ref = _trainer(batch=2)
    ref_stats = ref.train_step(PROMPTS)
    ref_s, ref_c = lora_state_dict(ref.student), lora_state_dict(ref.critic)
    for stats, student, critic in run_distributed(_fsdp_step, 2):
        for k in ("critic_grad_norm", "generator_grad_norm"):
            assert stats[k] == pytest.approx(ref_stats[k], rel=1e-9), k
        assert set(student) == set(ref_s) and set(critic) == set(ref_c)
        for k, v in ref_s.items():
            torch.testing.assert_close(student[k], v, rtol=1e-9, atol=1e-12, msg=k)
        for k, v in ref_c.items():
            torch.testing.assert_close(critic[k], v, rtol=1e-9, atol=1e-12, msg=k)


def test_config_errors():
    with pytest.raises(Exception, match="t_min"):
        DMDConfig(t_min=990, t_max=980)
    teacher = CausalWanDiT(PRESET.dit, dtype=torch.float64)
    with pytest.raises(Exception, match="frozen"):
        DMDTrainer(teacher, teacher, teacher, PRESET, DMDConfig(), _embedder())


def test_distill_cli_writes_a_lora_that_generate_runs(tmp_path):
    """AR checkpoint -> distill -> student LoRA file -> few-step generation (fp8 merges first)."""
    from impl.train.config import TrainConfig
    from impl.train.synthetic import SyntheticLatentSource
    from impl.train.distill import main as distill
    from impl.model.lora_files import read_lora_metadata
    from impl.train.trainer import Trainer
    from repro.cli import main as repro_main

    h, w = PRESET.latent_hw
    src = SyntheticLatentSource(PRESET.dit.in_channels, 8, h, w, PRESET.text.max_length, PRESET.dit.text_dim,
                                frames_per_block=PRESET.stream.frames_per_block, length=1)
    Trainer(TrainConfig(frames=8, dtype="fp32", steps=1), out_dir=tmp_path / "ar").fit(src, progress=False)
    ckpt = tmp_path / "ar" / "checkpoint_000001"
    out = tmp_path / "dmd"
    assert distill(["--teacher", str(ckpt), "--sampling-steps", "2", "--iters", "2", "--blocks", "2",
                    "--lora-rank", "4", "--lora-alpha", "4", "--gen-update-every", "1", "--out", str(out),
                    "--no-progress"]) == 0
    spec, meta = read_lora_metadata(out / "student_lora.safetensors")
    assert spec.rank == 4 and meta["training_steps"] == "2" and meta["role"] == "student"
    # --sharding fsdp in one process (a world of one): the same LoRA, gathered from the shards
    assert distill(["--teacher", str(ckpt), "--sampling-steps", "2", "--iters", "2", "--blocks", "2",
                    "--lora-rank", "4", "--lora-alpha", "4", "--gen-update-every", "1", "--sharding", "fsdp",
                    "--out", str(tmp_path / "dmd_fsdp"), "--no-progress"]) == 0
    assert not torch.distributed.is_initialized()
    from safetensors.torch import load_file
    plain, sharded = (load_file(d / "student_lora.safetensors") for d in (out, tmp_path / "dmd_fsdp"))
    assert set(plain) == set(sharded)
    for k in plain:
        torch.testing.assert_close(sharded[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)
    for quant in ("bf16", "fp8"):
        assert repro_main(["generate", "--shot", "a red ball::2", "--dit", str(ckpt / "model.safetensors"),
                           "--lora", str(out / "student_lora.safetensors"), "--steps", "2", "--precision", quant,
                           "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path / f"{quant}.mp4")]) == 0
    assert distill(["--teacher", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_lora_fewstep_benchmark_runs_on_cpu():
    from repro.benchmarks.lora_fewstep import LORA_FEWSTEP

    measure = {**LORA_FEWSTEP.measure_defaults(), "ar_steps": 1, "distill_iters": 1, "videos": 1, "reference_steps": 4}
    hw = {"device": "cpu"}
    teacher = LORA_FEWSTEP.run({"preset": "tiny", "distilled": False, "steps": 4}, measure, hw)
    assert teacher["q_psnr_vs_teacher"] == float("inf")   # the reference itself: same weights, steps, noise
    student = LORA_FEWSTEP.run({"preset": "tiny", "distilled": True, "steps": 2}, measure, hw)
    assert student["dit_fps"] > 0 and 0 < student["q_psnr_vs_teacher"] < float("inf") and student["distill_s"] > 0
    with pytest.raises(ValueError, match="few-step"):
        LORA_FEWSTEP.check_variant({"preset": "tiny", "distilled": True, "steps": 8})
