"""The teacher-forcing AR loss of one SP rank.

Every rank of an SP group draws the same per-block timesteps and the same clip-sized noise
(:func:`impl.train.flow.shared_generator`), builds its local part of the [clean ; noisy]
sequence from the layout, runs the one DiT forward with an attention core that sees the
whole sequence (Ulysses exchange + teacher-forcing mask), and scores the noisy frames it
holds. Local losses are divided by the clip's total frame count, so summing them over the
SP group gives the single-process loss, and summing parameter gradients over the group gives
the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impl.model.attention import AttentionCore, FullSequence
from impl.model.dit import CausalWanDiT
from impl.parallel.layout import NOISY, TeacherForcingLayout
from impl.train.flow import FlowSchedule


@dataclass
class TFInputs:
    """One clip as one SP rank sees it.

    x0: clean latents [B, C, n, h, w] of ``frames`` (sorted global frame indices: at least the
      layout's ``needed_frames(rank)``). noise: [B, C, F, h, w] for the whole clip (identical
      on every rank). block_index: timestep indices [B, n_blocks]. text: per-block text states
      [B, n_blocks, L, text_dim]. Error recycling may replace what is noised (``noised_x0``) and
      the clean-context copy (``context_x0``), both shaped like x0; targets always use x0.
    """

    x0: torch.Tensor
    frames: list[int]
    noise: torch.Tensor
    block_index: torch.Tensor
    text: torch.Tensor
    noised_x0: torch.Tensor | None = None
    context_x0: torch.Tensor | None = None


@dataclass
class TFOutput:
    loss: torch.Tensor             # this rank's share of the clip loss (sum over ranks = loss)
    frame_loss: torch.Tensor       # [B, k] unweighted MSE of the k noisy frames held here
    noisy_frames: list[int]        # their global frame indices
    x0_error: torch.Tensor         # [B, C, k, h, w] predicted x0 - x0 (detached), for error recycling
    noise_error: torch.Tensor      # [B, C, k, h, w] (predicted v - v)(1 - sigma) (detached)


def teacher_forcing_loss(model: CausalWanDiT, layout: TeacherForcingLayout, rank: int, inputs: TFInputs,
                         schedule: FlowSchedule, core: AttentionCore,
                         clean_timestep: float = 0.0) -> TFOutput:
    fpb = layout.frames_per_block
    local = layout.rank_frames(rank)
    where = {f: i for i, f in enumerate(inputs.frames)}
    missing = [f for _, f in local if f not in where]
    if missing:
        raise ValueError(f"teacher_forcing_loss: rank {rank} needs clean latents of frames {missing}")
    frames = [f for _, f in local]
    copies = torch.tensor([c for c, _ in local])
    noisy_pos = torch.nonzero(copies == NOISY).flatten().tolist()
    noisy_frames = [frames[i] for i in noisy_pos]

    pick = [where[f] for f in frames]
    x0 = inputs.x0[:, :, pick]
    noised = x0 if inputs.noised_x0 is None else inputs.noised_x0[:, :, pick]
    context = x0 if inputs.context_x0 is None else inputs.context_x0[:, :, pick]
    noise = inputs.noise[:, :, frames].to(x0)
    sigma_all = schedule.frame_values(schedule.sigmas, inputs.block_index, fpb)       # [B, F] float64
    t_all = schedule.frame_values(schedule.timesteps, inputs.block_index, fpb)
    sigma, t = sigma_all[:, frames].to(x0.device), t_all[:, frames].to(x0.device)
    is_noisy = (copies == NOISY).to(x0.device)
    x_t = schedule.add_noise(noised, noise, sigma)
    latents = torch.where(is_noisy[None, None, :, None, None], x_t, context)
    timesteps = torch.where(is_noisy[None], t, torch.full_like(t, clean_timestep))

    # One prompt group per local block (a rank's frames are whole blocks of one copy).
    block_ids = [frames[i] // fpb for i in range(0, len(frames), fpb)]
    text = model.encode_text(inputs.text[:, block_ids].to(x0.device))
    out = model(latents, timesteps, text, frame_positions=torch.tensor(frames), call=FullSequence(core))

    pred = out[:, :, noisy_pos].to(torch.promote_types(out.dtype, torch.float32))
    x0_n, noise_n = x0[:, :, noisy_pos].to(pred.dtype), noise[:, :, noisy_pos].to(pred.dtype)
    target = schedule.target(x0_n, noise_n)
    frame_loss = (pred - target).pow(2).mean(dim=(1, 3, 4))                              # [B, k]
    w_all = schedule.frame_values(schedule.weights, inputs.block_index, fpb)
    w = w_all[:, noisy_frames].to(device=pred.device, dtype=pred.dtype)
    b = x0.shape[0]
    loss = (frame_loss * w).sum() / (b * layout.num_frames)
    with torch.no_grad():
        s = sigma[:, noisy_pos].to(pred.dtype)[:, None, :, None, None]
        x_t_n = x_t[:, :, noisy_pos].to(pred.dtype)
        x0_error = (x_t_n - s * pred) - x0_n
        noise_error = (pred - target) * (1 - s)
    return TFOutput(loss, frame_loss.detach(), noisy_frames, x0_error, noise_error)
