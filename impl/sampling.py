"""Flow-matching samplers with the official release's step lists.

The release builds its grid as sigma_i = linspace(0.999, 0, n+1)[:-1], shifts it with
sigma' = s*sigma / (1 + (s-1)*sigma) (s = 5) and feeds the DiT t = int64(1000*sigma')
(truncation): 4 steps -> 999, 937, 833, 624; 2 steps -> 999, 833. diffusers' own flow grid
starts from 1.0 and rounds (999, 937, 833, 625 with slightly different sigmas), so we pass
the unshifted release grid as ``sigmas=`` and let diffusers shift and truncate it.

A sampler is single-use: make a new one per AR block, so multistep history never leaks
across blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

SIGMA_MAX = 0.999
NUM_TRAIN_TIMESTEPS = 1000


def base_sigmas(steps: int) -> np.ndarray:
    """The release's unshifted grid: linspace(0.999, 0, steps + 1) without the final 0."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    return np.linspace(SIGMA_MAX, 0.0, steps + 1, dtype=np.float64)[:-1]


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def official_sigmas(steps: int, shift: float = 5.0) -> np.ndarray:
    """Shifted sigmas with the trailing 0 (float64)."""
    return np.append(shift_sigmas(base_sigmas(steps), shift), 0.0)


def official_timesteps(steps: int, shift: float = 5.0) -> list[int]:
    """Timesteps the DiT sees: int64 truncation of 1000 * shifted sigma."""
    return (NUM_TRAIN_TIMESTEPS * shift_sigmas(base_sigmas(steps), shift)).astype(np.int64).tolist()


class UniPCSampler:
    """diffusers' UniPC (bh2, order 2, x0-predicting, UniC corrector, flow sigmas) on the release grid."""

    def __init__(self, steps: int, shift: float = 5.0):
        self.scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
            predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
        self.scheduler.set_timesteps(sigmas=base_sigmas(steps))
        self.timesteps: list[int] = self.scheduler.timesteps.tolist()

    def step(self, velocity: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(velocity.to(x.dtype), t, x, return_dict=False)[0]


class EulerSampler:
    """First-order flow Euler: x <- x + (sigma_next - sigma) * v on the same grid."""

    def __init__(self, steps: int, shift: float = 5.0):
        self.sigmas = official_sigmas(steps, shift)
        self.timesteps = official_timesteps(steps, shift)
        self._index = 0

    def step(self, velocity: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        if self._index >= len(self.timesteps) or self.timesteps[self._index] != t:
            raise ValueError(f"EulerSampler.step: expected timestep "
                             f"{self.timesteps[self._index] if self._index < len(self.timesteps) else None}, got {t}")
        d_sigma = self.sigmas[self._index + 1] - self.sigmas[self._index]
        self._index += 1
        return x + d_sigma * velocity.to(x.dtype)


SAMPLERS = {"unipc": UniPCSampler, "euler": EulerSampler}


def make_sampler(kind: str, steps: int, shift: float = 5.0) -> UniPCSampler | EulerSampler:
    if kind not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {kind!r}; allowed: {sorted(SAMPLERS)}")
    return SAMPLERS[kind](steps, shift)
