"""Distil a light video decoder (pruned LightVAE or tiny TAE) from a trained full VAE.

The student learns to reproduce the teacher VAE's decoded frames from the teacher's own
(normalised) latents of real clips: L1 + MSE between the student's and the teacher's frames
in [-1, 1]. This is how a light decoder is paired with a model whose latent space is fixed (the
release pairs MG-LightVAE with the full Wan2.2 encoder the same way).

A pruned student starts from the teacher: every tensor keeps the first channels of the
teacher's along each dimension (structured pruning by position; the distillation then
recovers what the cut removed). A tiny student starts from random weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from impl.config import require_positive, require_positive_ints
from impl.model.tae import TinyDecoder
from impl.model.vae import denormalize_latents, encode_video
from impl.parallel.sp_vae_encode import frames_uint8_to_float


@dataclass(frozen=True)
class DecoderDistillConfig:
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "batch_size")
        require_positive(self, "lr", "grad_clip")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def init_pruned_from(student: nn.Module, teacher: nn.Module) -> int:
    """Copy into every student tensor the leading slice of the teacher's tensor of the same
    name (a pruned layout has the same names and smaller channel counts); returns how many."""
    teacher_sd = teacher.state_dict()
    copied = 0
    with torch.no_grad():
        for name, dst in student.state_dict().items():
            src = teacher_sd.get(name)
            if src is None or src.dim() != dst.dim() or any(s < d for s, d in zip(src.shape, dst.shape)):
                continue
            dst.copy_(src[tuple(slice(0, n) for n in dst.shape)])
            copied += 1
    return copied


def student_frames(student: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Differentiable decode of a whole clip of normalised latents [B, C, F, h, w] -> [B, 3, T, H, W]."""
    if isinstance(student, TinyDecoder):
        cfg = student.config
        x = z
        if cfg.latents == "raw" and cfg.latents_mean is not None:
            shape = (1, cfg.z_dim, 1, 1, 1)
            x = z * torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(shape) + \
                torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        frames, _ = student.run(list(x.unbind(2)), [])
        return torch.stack(frames[TinyDecoder.FRAMES_TRIMMED:], dim=2) * 2 - 1
    return student.decode(denormalize_latents(student, z)).sample.clamp(-1, 1)


def distill_decoder(student: nn.Module, teacher_vae: nn.Module, source, cfg: DecoderDistillConfig, *,
                    progress: bool = True) -> list[dict[str, float]]:
    """Train ``student`` in place to match ``teacher_vae``'s decoded frames (see the module
    docstring) on random clips of ``source``; returns the per-step losses."""
    p = next(teacher_vae.parameters())
    teacher_vae.eval().requires_grad_(False)
    student.to(p.device).float().train().requires_grad_(True)
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    g = torch.Generator().manual_seed(cfg.seed)
    log: list[dict[str, float]] = []
    for _ in tqdm(range(cfg.steps), desc=f"distil {type(student).__name__}", disable=not progress):
        idx = torch.randint(len(source), (cfg.batch_size,), generator=g).tolist()
        x = frames_uint8_to_float(torch.stack([source[i].frames for i in idx]), p.dtype, p.device)
        with torch.no_grad():
            z = encode_video(teacher_vae, x)
            target = teacher_vae.decode(denormalize_latents(teacher_vae, z)).sample.clamp(-1, 1).float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=p.device.type == "cuda"):
            out = student_frames(student, z.float())
        out = out.float()
        l1 = (out - target).abs().mean()
        mse = (out - target).pow(2).mean()
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        log.append({"loss": float(loss.detach()), "l1": float(l1.detach()), "mse": float(mse.detach())})
    student.eval().requires_grad_(False)
    return log
