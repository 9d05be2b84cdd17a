"""Flow-matching training schedule of the AR teacher-forcing stage.

1000 training timesteps on the shifted grid sigma_k = s u_k / (1 + (s-1) u_k) with
u = linspace(1, 0, 1001)[:-1] (shift s = 5, sigma_min = 0), t_k = 1000 sigma_k. A noisy
latent is x_t = (1 - sigma) x_0 + sigma eps, the target velocity v = eps - x_0. One timestep
index is drawn uniformly per AR block (every frame of a block shares it), so the shift biases
training toward high noise. The loss of a frame is weighted by the bell-shaped
w(t) = exp(-2 ((t - 500) / 1000)^2) - min, normalised so the 1000 weights average 1.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


class FlowSchedule:
    def __init__(self, shift: float = 5.0, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if shift <= 0:
            raise ValueError(f"shift: must be > 0, got {shift}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps: must be >= 2, got {num_timesteps}")
        self.shift, self.num_timesteps = shift, num_timesteps
        u = torch.linspace(1.0, 0.0, num_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift * u / (1 + (shift - 1) * u)                     # float64 [T]
        self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS
        w = torch.exp(-2 * ((self.timesteps - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
        w = w - w.min()
        self.weights = w * (num_timesteps / w.sum())                           # mean 1

    def sample_block_indices(self, generator: torch.Generator, batch: int, num_blocks: int) -> torch.Tensor:
        """Uniform timestep indices [B, n_blocks] (int64, CPU) from ``generator``."""
        return torch.randint(0, self.num_timesteps, (batch, num_blocks), generator=generator)

    def frame_values(self, table: torch.Tensor, block_index: torch.Tensor, frames_per_block: int) -> torch.Tensor:
        """Per-frame values [B, F] of ``table`` (sigmas, timesteps or weights) for block indices."""
        return table[block_index].repeat_interleave(frames_per_block, dim=1)

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t for latents [B, C, F, h, w] at per-frame sigma [B, F]."""
        s = sigma.to(x0.dtype)[:, None, :, None, None]
        return (1 - s) * x0 + s * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def x0_from_velocity(self, x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x_t.dtype)[:, None, :, None, None]
        return x_t - s * velocity


def shared_generator(seed: int, *streams: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *streams): the same on every rank that passes the same
    numbers, so SP ranks draw identical timesteps and noise without communicating, and a
    resumed run draws exactly what the uninterrupted one would have."""
    h = seed & 0xFFFFFFFF
    for s in streams:
        h = (h * 1_000_003 + (s & 0xFFFFFFFF) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(h)

