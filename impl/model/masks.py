"""Dense boolean attention masks for full-sequence forwards (True = may attend)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def block_visibility_mask(num_blocks: int, tokens_per_block: int,
                          visible: Callable[[int], Iterable[int]] | None = None,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """[S, S] mask over ``num_blocks`` blocks: query block i sees the key blocks ``visible(i)``.

    Default ``visible`` is block-causal: blocks 0..i (bidirectional inside a block).
    """
    vis = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    for i in range(num_blocks):
        keys = range(i + 1) if visible is None else list(visible(i))
        if any(not 0 <= k <= i for k in keys):
            raise ValueError(f"block {i}: visible blocks must lie in [0, {i}], got {sorted(keys)}")
        vis[i, list(keys)] = True
    return vis.repeat_interleave(tokens_per_block, 0).repeat_interleave(tokens_per_block, 1).to(device)
