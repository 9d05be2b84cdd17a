"""Few-step DMD distillation entry point: AR teacher -> standalone student LoRA.

    python -m impl.train.distill --preset tiny --teacher runs/ar/checkpoint_000600 \\
        --sampling-steps 4 --iters 5000 --out runs/dmd4

``--teacher`` is the stage-1 AR model: a trainer checkpoint folder (its ``model.safetensors``)
or any DiT checkpoint ``impl.model.checkpoint`` reads. Student and critic start from it with
their own LoRA (rank/alpha 128/128 by default). Prompts come from ``--prompts FILE`` (one
video per line, block prompts separated by `` | ``; a block starting with the scene-cut
prefix opens a new shot) or from the procedural captions of the synthetic data. The student
and critic LoRA files are written to ``--out`` every ``--save-every`` iterations and at the
end, with the teacher's fingerprint, so ``repro generate --dit TEACHER --lora
student_lora.safetensors --steps N`` runs the few-step model. Single process or torchrun
(data parallel).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Sequence

from impl.config import PRESETS, ConfigError
from impl.io import output_problem, weight_file_format
from impl.modes import DType, Sharding, choices


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m impl.train.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny",
                    help=f"model size preset: {' | '.join(sorted(PRESETS))} (default: tiny)")
    ap.add_argument("--teacher", required=True, type=Path, help="AR checkpoint folder or DiT checkpoint (required)")
    ap.add_argument("--sampling-steps", type=int, default=4, choices=(4, 2),
                    help="student steps per block, 4 or 2: the release's UniPC step lists (default: 4)")
    ap.add_argument("--iters", type=int, default=100, help="distillation iterations (default: 100)")
    ap.add_argument("--blocks", type=int, default=4, help="AR blocks per rollout (default: 4)")
    ap.add_argument("--lora-rank", type=int, default=128, help="LoRA rank of student and critic (default: 128)")
    ap.add_argument("--lora-alpha", type=float, default=128.0, help="LoRA alpha (default: 128.0)")
    ap.add_argument("--lr", type=float, default=1e-5, help="student learning rate (default: 1e-05)")
    ap.add_argument("--lr-critic", type=float, default=2e-6, help="critic learning rate (default: 2e-06)")
    ap.add_argument("--gen-update-every", type=int, default=5,
                    help="critic updates per student update (default: 5)")
    ap.add_argument("--guidance-scale", type=float, default=3.0,
                    help="teacher CFG: cond + s (cond - uncond) (default: 3.0)")
    ap.add_argument("--dtype", default="fp32", choices=choices(DType),
                    help="compute dtype of teacher, student, critic and text encoder (default: fp32)")
    ap.add_argument("--prompts", type=Path,
                    help="text file: one video per line, block prompts split by ' | ' "
                         "(default: the synthetic data's multi-shot captions)")
    ap.add_argument("--text-encoder", help="umT5 folder (default: the preset's random encoder)")
    ap.add_argument("--sharding", default="none", choices=choices(Sharding),
                    help="none: teacher, student and critic replicated on every rank; fsdp: the three sharded "
                         "over all ranks with FSDP2 (frozen base weights in --dtype, LoRA masters in float32) "
                         "(default: none)")
    ap.add_argument("--save-every", type=int, default=50, help="iterations between LoRA saves (default: 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rollouts, the prompts and the LoRA initialisation (default: 0)")
    ap.add_argument("--out", required=True, type=Path, help="folder of the LoRA files and the log (required)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on rank 0)")
    return ap.parse_args(argv)


def read_prompt_file(path: Path, blocks: int) -> list[list[str]]:
    if not path.is_file():
        raise ConfigError(f"--prompts: no such file {path}")
    videos = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(" | ")]
        if any(not p for p in parts):
            raise ConfigError(f"--prompts {path}:{n}: empty block prompt")
        videos.append((parts * blocks)[:blocks] if len(parts) < blocks else parts[:blocks])
    if not videos:
        raise ConfigError(f"--prompts: {path} holds no prompts")
    return videos


def _teacher_file(path: Path) -> Path:
    return path / "model.safetensors" if (path / "model.safetensors").is_file() else path


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors are one line and exit 2, Ctrl-C prints "interrupted" and exits 130."""
    from impl.io import run_command
    return run_command(lambda: _main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = output_problem(args.out)
    if problem is not None:   # before any model is built
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    import torch
    from tqdm.auto import tqdm

    from impl.config import get_preset
    from impl.inference.build import torch_dtype
    from impl.model.checkpoint import CheckpointError, load_dit_weights
    from impl.model.dit import CausalWanDiT
    from impl.model.text_encoder import TextEncoder
    from impl.parallel.fsdp import gather_lora_state_dict
    from impl.parallel.groups import build_groups, init_distributed
    from impl.train.synthetic import SyntheticVideoSource
    from impl.train.dmd import DMDConfig, DMDTrainer
    from impl.model.lora import LoraSpec, add_lora, base_fingerprint
    from impl.model.lora_files import save_lora

    try:
        preset = get_preset(args.preset)
        cfg = DMDConfig(steps=args.sampling_steps, real_guidance_scale=args.guidance_scale,
                        gen_update_every=args.gen_update_every, lr=args.lr, lr_critic=args.lr_critic, seed=args.seed,
                        sharding=args.sharding)
        spec = LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha)
        videos = read_prompt_file(args.prompts, args.blocks) if args.prompts else None
        if not args.teacher.exists():
            raise ConfigError(f"--teacher: no such checkpoint {args.teacher}")
        teacher_file = _teacher_file(args.teacher)
        if teacher_file.is_file() and weight_file_format(teacher_file) is None:   # cheap, before any model
            raise ConfigError(f"--teacher: {teacher_file}: neither a safetensors nor a torch.save file "
                              f"(truncated or corrupt?)")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank, _, device = init_distributed(single_rank_group=args.sharding == "fsdp")
    groups = build_groups(1)
    dtype = torch_dtype(args.dtype)
    teacher = CausalWanDiT(preset.dit, device=device, dtype=dtype)
    try:
        load_dit_weights(teacher, _teacher_file(args.teacher))
    except CheckpointError as exc:   # corrupt, or a checkpoint of another model
        print(f"error: --teacher: {exc}", file=sys.stderr)
        return 2
    teacher.requires_grad_(False).eval()
    base_hash = base_fingerprint(teacher)
    torch.manual_seed(args.seed)   # peft draws LoRA A from the global generator: same --seed, same LoRA
    student = add_lora(copy.deepcopy(teacher), spec)
    critic = add_lora(copy.deepcopy(teacher), spec)
    text = TextEncoder.from_pretrained(args.text_encoder, dtype=dtype, device=device) if args.text_encoder else \
        TextEncoder.from_preset(preset.text, dtype=dtype, device=device)
    if videos is None:   # procedural multi-shot captions
        fpb = preset.stream.frames_per_block
        synth = SyntheticVideoSource(args.blocks * fpb, fpb, preset.video.height, preset.video.width,
                                     length=64, seed=args.seed, shots_per_clip=2)
        videos = [synth[i].block_prompts for i in range(len(synth))]
    trainer = DMDTrainer(teacher, student, critic, preset, cfg, lambda p: text([p]), device=device, groups=groups)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        # Sharded LoRA tensors are gathered by every rank (collective); rank 0 writes.
        states = [gather_lora_state_dict(m) if cfg.sharding == "fsdp" else None for m in (student, critic)]
        if rank != 0:
            return
        meta = {"sampling_steps": cfg.steps, "teacher": str(args.teacher), "preset": args.preset}
        save_lora(args.out / "student_lora.safetensors", student, spec, steps=step, base_hash=base_hash,
                  extra={**meta, "role": "student"}, state=states[0])
        save_lora(args.out / "critic_lora.safetensors", critic, spec, steps=step, base_hash=base_hash,
                  extra={**meta, "role": "critic"}, state=states[1])

    log = args.out / "distill_log.jsonl"
    for it in tqdm(range(args.iters), desc="distill", disable=args.no_progress or rank != 0):
        prompts = videos[(it * groups.dp_size + groups.dp_rank) % len(videos)]
        stats = trainer.train_step(prompts)
        if rank == 0:
            with log.open("a") as f:
                f.write(json.dumps({"iter": it + 1, **stats}) + "\n")
        if (it + 1) % args.save_every == 0 or it + 1 == args.iters:
            save(it + 1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
