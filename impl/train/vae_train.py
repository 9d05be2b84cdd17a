"""Train a small Wan2.2-layout VAE (diffusers ``AutoencoderKLWan``) as a video autoencoder.

The quality proxy needs a VAE whose decoder turns latents back into pixels, and no trained
weights can be downloaded here, so the harness trains its own: reconstruction (L1 + MSE on
frames in [-1, 1]) plus a small KL term on the posterior, over short causal clips (latent 0
encodes one raw frame, every later latent four, as at full size). After training,
:func:`calibrate_latent_stats` writes per-channel latent mean/std into the VAE's config, so
normalised latents are about N(0, 1) for the DiT, as the released Wan2.2 VAE's config does.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from impl.config import ConfigError, _require, require_positive, require_positive_ints
from impl.parallel.sp_vae_encode import frames_uint8_to_float
from impl.train.samples import VideoClip

__all__ = ["VAETrainConfig", "train_vae", "calibrate_latent_stats", "reconstruct"]


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-4
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "batch_size")
        require_positive(self, "lr", "grad_clip")
        for name in ("kl_weight", "mse_weight"):
            _require(getattr(self, name) >= 0, f"VAETrainConfig.{name}", "must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch(source, indices: Sequence[int], device, dtype) -> torch.Tensor:
    clips = [source[i] for i in indices]
    for c in clips:
        if not isinstance(c, VideoClip):
            raise TypeError(f"train_vae: the source must yield VideoClip items, got {type(c).__name__}")
    return frames_uint8_to_float(torch.stack([c.frames for c in clips]), dtype, device)


def train_vae(vae, source, cfg: VAETrainConfig, *, progress: bool = True,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train ``vae`` in place on clips of ``source`` (random items, with replacement); return the
    per-step losses. The clip length is the source's (1 + 4k raw frames)."""
    if len(source) < 1:
        raise ConfigError("train_vae: the source is empty")
    p = next(vae.parameters())
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))  # short warm-up
    g = torch.Generator().manual_seed(cfg.seed)
    # The posterior's noise from its own seeded generator: drawn from the global one, it depended
    # on whatever the process had drawn before (a second run trained another VAE).
    noise = torch.Generator(device=p.device).manual_seed(cfg.seed + 1)
    log: list[dict[str, float]] = []
    for step in tqdm(range(cfg.steps), desc="vae", disable=not progress):
        idx = torch.randint(len(source), (cfg.batch_size,), generator=g).tolist()
        x = _batch(source, idx, p.device, p.dtype)
        # BF16 autocast on CUDA (the float32 masters stay in the optimizer): the Wan VAE's many
        # small convolutions are otherwise slow to train.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=p.device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=noise)).sample
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().float().mean() / x[0].numel()   # per pixel, like the reconstruction terms
        loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        entry = {k: float(v.detach()) for k, v in (("loss", loss), ("l1", l1), ("mse", mse), ("kl", kl))}
        log.append(entry)
        if on_step is not None:
            on_step(step, entry)
    vae.eval().requires_grad_(False)
    return log


@torch.no_grad()
def calibrate_latent_stats(vae, source, num_clips: int = 32) -> tuple[list[float], list[float]]:
    """Set ``vae.config.latents_mean/std`` to the per-channel statistics of posterior means over
    the first ``num_clips`` clips of ``source``; return them."""
    p = next(vae.parameters())
    mus = []
    for i in range(min(num_clips, len(source))):
        x = _batch(source, [i], p.device, p.dtype)
        mus.append(vae.encode(x).latent_dist.mean.float().transpose(0, 1).flatten(1))  # [C, n]
    mu = torch.cat(mus, dim=1)
    mean = mu.mean(dim=1).tolist()
    std = mu.std(dim=1).clamp_min(1e-4).tolist()
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return mean, std


@torch.no_grad()
def reconstruct(vae, frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> its VAE round trip (posterior mean), uint8 [T, H, W, 3]."""
    p = next(vae.parameters())
    x = frames_uint8_to_float(frames.unsqueeze(0), p.dtype, p.device)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()
