"""Error recycling (after Stable-Video-Infinity): train on inputs corrupted by the model's own
past errors, so the AR model learns to recover from the drift it causes at inference.

Two per-rank buffers of per-block errors, bucketed by timestep index: latent errors
(predicted x0 - x0) and noise errors ((predicted v - v) (1 - sigma), which added to eps
approximates the noise the model implicitly assumed). See :class:`ErrorRecyclingConfig` for
the injection rules. Under SP every rank keeps its own buffers and records the errors of the
frames it scores; random decisions come from the step's shared generator, but buffer
contents differ per rank, so SP runs with recycling are not bit-identical to one process.
Buffers live in host memory and are not checkpointed (they refill within a few steps).
"""

from __future__ import annotations

import random

import torch

from impl.train.config import ErrorRecyclingConfig
from impl.train.teacher_forcing import TFInputs, TFOutput


class _Buckets:
    def __init__(self, num_buckets: int, capacity: int, rng: random.Random):
        self.items: list[list[torch.Tensor]] = [[] for _ in range(num_buckets)]
        self.capacity, self.rng = capacity, rng

    def add(self, bucket: int, err: torch.Tensor) -> None:
        items = self.items[bucket]
        if len(items) < self.capacity:
            items.append(err)
        else:  # random replacement keeps old and new errors mixed
            items[self.rng.randrange(self.capacity)] = err

    def nearest(self, bucket: int, g: torch.Generator) -> torch.Tensor | None:
        n = len(self.items)
        for d in range(n):
            for b in (bucket - d, bucket + d):
                if 0 <= b < n and self.items[b]:
                    items = self.items[b]
                    return items[int(torch.randint(len(items), (1,), generator=g))]
        return None

    def any(self, g: torch.Generator) -> torch.Tensor | None:
        full = [b for b, items in enumerate(self.items) if items]
        if not full:
            return None
        return self.nearest(full[int(torch.randint(len(full), (1,), generator=g))], g)

    def __len__(self) -> int:
        return sum(len(i) for i in self.items)


class ErrorRecycler:
    def __init__(self, cfg: ErrorRecyclingConfig, num_timesteps: int, frames_per_block: int, seed: int = 0):
        self.cfg, self.num_timesteps, self.fpb = cfg, num_timesteps, frames_per_block
        rng = random.Random(seed)
        self.latent = _Buckets(cfg.num_buckets, cfg.buffer_size_per_bucket, rng)
        self.noise = _Buckets(cfg.num_buckets, cfg.buffer_size_per_bucket, rng)
        self._rng = rng
        self._clean_step = False

    def bucket(self, timestep_index: int) -> int:
        return min(self.cfg.num_buckets - 1, int(timestep_index) * self.cfg.num_buckets // self.num_timesteps)

    def _scale(self, g: torch.Generator) -> float:
        m = self.cfg.modulate_factor
        return 1.0 + m * (2.0 * float(torch.rand((), generator=g)) - 1.0)

    def inject(self, inputs: TFInputs, g: torch.Generator) -> TFInputs:
        """Return inputs with errors injected (a new TFInputs; ``inputs`` is not modified)."""
        cfg = self.cfg
        self._clean_step = float(torch.rand((), generator=g)) < cfg.clean_prob
        if self._clean_step or len(self.latent) == 0:
            return inputs
        x0 = inputs.x0
        noised, context, noise = x0.clone(), x0.clone(), inputs.noise.clone()
        fpb = self.fpb
        for b in range(x0.shape[0]):
            for j0 in range(0, len(inputs.frames), fpb):
                block = inputs.frames[j0] // fpb
                bucket = self.bucket(inputs.block_index[b, block])
                sl = slice(j0, j0 + fpb)
                if float(torch.rand((), generator=g)) < cfg.latent_inject_prob:
                    e = self.latent.nearest(bucket, g)
                    if e is not None:
                        noised[b, :, sl] += self._scale(g) * e.to(x0)
                if float(torch.rand((), generator=g)) < cfg.noise_inject_prob:
                    e = self.noise.nearest(bucket, g)
                    if e is not None:
                        f = inputs.frames[j0]
                        noise[b, :, f:f + fpb] += self._scale(g) * e.to(noise)
                if float(torch.rand((), generator=g)) < cfg.context_inject_prob:
                    e = self.latent.any(g)
                    if e is not None:
                        context[b, :, sl] += self._scale(g) * e.to(x0)
        return TFInputs(x0, inputs.frames, noise, inputs.block_index, inputs.text, noised, context)

    @torch.no_grad()
    def record(self, out: TFOutput, inputs: TFInputs, sigmas: torch.Tensor | None = None) -> None:
        """Add the per-block errors of the frames this rank scored."""
        if self._clean_step and self._rng.random() >= self.cfg.clean_buffer_update_prob:
            return
        fpb = self.fpb
        for b in range(out.x0_error.shape[0]):
            for j0 in range(0, len(out.noisy_frames), fpb):
                block = out.noisy_frames[j0] // fpb
                bucket = self.bucket(inputs.block_index[b, block])
                sl = slice(j0, j0 + fpb)
                self.latent.add(bucket, out.x0_error[b, :, sl].to("cpu", copy=True))
                self.noise.add(bucket, out.noise_error[b, :, sl].to("cpu", copy=True))
