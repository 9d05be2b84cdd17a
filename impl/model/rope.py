"""3-D rotary position embedding with absolute temporal positions.

head_dim is split into (time, height, width) parts exactly as diffusers' ``WanRotaryPosEmbed``
(and the original Wan: 22/21/21 complex pairs at head_dim 128). Angles are computed
analytically in float64 from the positions, so temporal positions are unbounded (no 1024-row
table) and a per-shot offset is just a larger position.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from impl.config import DiTConfig


class Rope3D:
    """Builds (cos, sin) tables for token grids and applies them to q/k."""

    def __init__(self, cfg: DiTConfig):
        self.split = cfg.rope_split
        # Per-axis inverse frequencies theta^(-2i/d), float64 like the reference tables.
        self.inv_freq = [
            cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in self.split
        ]
        # The tables of the last few blocks: a block's denoising steps and re-cache pass reuse
        # them, so each block builds and uploads its tables once.
        self._memo: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def tables(self, frame_positions: torch.Tensor, grid_hw: tuple[int, int],
               dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [F*H*W, head_dim/2] for tokens ordered (frame, row, column).

        ``frame_positions`` holds the temporal RoPE position of each latent frame (absolute
        frame index plus the multi-shot offset).
        """
        key = (tuple(frame_positions.tolist()), tuple(grid_hw), dtype, str(device))
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        tables = self._build(frame_positions, grid_hw, dtype, torch.device(device))
        self._memo[key] = tables
        if len(self._memo) > 4:
            self._memo.popitem(last=False)
        return tables

    def _build(self, frame_positions: torch.Tensor, grid_hw: tuple[int, int], dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gh, gw = grid_hw
        t = frame_positions.to(torch.float64).cpu()
        f = t.numel()
        ang_t = torch.outer(t, self.inv_freq[0])                                   # [F, dt/2]
        ang_h = torch.outer(torch.arange(gh, dtype=torch.float64), self.inv_freq[1])
        ang_w = torch.outer(torch.arange(gw, dtype=torch.float64), self.inv_freq[2])
        angles = torch.cat([
            ang_t[:, None, None, :].expand(f, gh, gw, -1),
            ang_h[None, :, None, :].expand(f, gh, gw, -1),
            ang_w[None, None, :, :].expand(f, gh, gw, -1),
        ], dim=-1).reshape(f * gh * gw, -1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        if device.type == "cuda":  # pinned + non_blocking: no host sync in the forward
            return cos.pin_memory().to(device, non_blocking=True), sin.pin_memory().to(device, non_blocking=True)
        return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (2j, 2j+1) of the last dim. x: [B, S, H, D]; cos/sin: [S, D/2].

    Computed in the tables' dtype (float32 for bf16 activations, float64 in exactness tests).
    """
    xr = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x_even, x_odd = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x_even * c - x_odd * s, x_even * s + x_odd * c], dim=-1)
    return out.flatten(-2).to(x.dtype)
