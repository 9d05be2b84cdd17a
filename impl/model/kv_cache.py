"""The self-attention KV cache: one object for all layers, managed in whole AR blocks.

The cache has ``window_blocks`` slots of ``tokens_per_block`` tokens per layer. Keys are
stored after RoPE at absolute positions, so attention is permutation-invariant over slots:
slot order does not matter, only which blocks are resident. That lets the cache evict by
overwriting a slot in place instead of shifting memory, and lets attention read the
resident slots as one contiguous prefix ``[0, num_valid)`` with no gather or copy.

Residency rules (what block ``b`` attends):
- the first ``sink_blocks`` blocks of the stream (attention sink) are never evicted;
- with ``multi_shot_sink``, the first block of the current shot is pinned; as in the
  reference, the pin moves to a cut block once that block is done (while the cut block is
  generated the previous shot's first block is still held), and the old shot's first block
  then becomes ordinary history;
- the current block (written on every denoising step and on the clean re-cache pass);
- the rest of the window holds the most recent other blocks (evict the oldest).
Calling ``begin_block`` again for the current block reuses its slot (overwrite in place);
asking for an older block or skipping a block is an error.

Text K/V for cross-attention is cached per prompt in ``text_contexts``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from impl.config import StreamConfig


@dataclass(frozen=True)
class BlockPlan:
    """Where the block being computed writes, and how many slots attention reads."""

    block: int
    slot: int
    num_valid: int
    tokens_per_block: int

    @property
    def write_range(self) -> tuple[int, int]:
        return self.slot * self.tokens_per_block, (self.slot + 1) * self.tokens_per_block

    @property
    def attend_len(self) -> int:
        return self.num_valid * self.tokens_per_block


class KVCache:
    """Block-slotted K/V storage for every layer, plus a per-prompt text-K/V memo."""

    def __init__(self, *, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 tokens_per_block: int, stream: StreamConfig, dtype: torch.dtype,
                 device: torch.device | str, max_text_contexts: int = 8):
        self.num_slots = stream.window_blocks
        self.tokens_per_block = tokens_per_block
        self.sink_blocks = stream.sink_blocks
        # Pinning needs a non-empty sink: the pin length is the sink length (reference semantics).
        self.pin_shots = stream.multi_shot_sink and stream.sink_blocks > 0
        shape = (num_layers, batch, num_heads, self.num_slots * tokens_per_block, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.text_contexts: OrderedDict[object, object] = OrderedDict()
        self.max_text_contexts = max_text_contexts
        self.reset()

    def reset(self) -> None:
        """Start a new video: forget resident blocks, pins and text contexts (no reallocation)."""
        self.slot_block: list[int] = [-1] * self.num_slots
        self.current_block = -1
        self.pinned_block: int | None = None
        self.text_contexts.clear()

    # ---- block bookkeeping (host-side ints: no device syncs) ----
    @property
    def num_valid(self) -> int:
        return sum(b >= 0 for b in self.slot_block)

    def resident_blocks(self) -> list[int]:
        return sorted(b for b in self.slot_block if b >= 0)

    def begin_block(self, block: int, *, shot_start: bool = False) -> BlockPlan:
        """Plan a forward over ``block``: a new block takes a slot, the current one reuses it."""
        if block == self.current_block:
            slot = self.slot_block.index(block)
        elif block == self.current_block + 1:
            slot = self._free_or_evict()
            self.slot_block[slot] = block
            self.current_block = block
            if shot_start and self.pin_shots and block >= self.sink_blocks:
                self.pinned_block = block
        else:
            raise ValueError(f"KVCache.begin_block: block {block} is not the current block "
                             f"({self.current_block}) or the next one; call reset() for a new video")
        return BlockPlan(block, slot, self.num_valid, self.tokens_per_block)

    def _free_or_evict(self) -> int:
        if -1 in self.slot_block:
            return self.slot_block.index(-1)
        protected = set(range(self.sink_blocks)) | {self.current_block}
        if self.pinned_block is not None:
            protected.add(self.pinned_block)
        candidates = [(b, s) for s, b in enumerate(self.slot_block) if b not in protected]
        # Config validation guarantees a candidate: window >= sink + pin + current + 1.
        return min(candidates)[1]

    # ---- data path ----
    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block's K/V ([B, H, tokens_per_block, D]) into its slot for ``layer``."""
        lo, hi = plan.write_range
        self.k[layer, :, :, lo:hi] = k
        self.v[layer, :, :, lo:hi] = v

    def read(self, layer: int, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of every resident block's K/V for ``layer``: [B, H, num_valid*tpb, D]."""
        n = plan.attend_len
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def text_context(self, key: object, build: Callable[[], object]) -> object:
        """Memoised cross-attention K/V for a prompt; ``build`` runs once per key."""
        if key in self.text_contexts:
            self.text_contexts.move_to_end(key)
            return self.text_contexts[key]
        ctx = build()
        self.text_contexts[key] = ctx
        if len(self.text_contexts) > self.max_text_contexts:
            self.text_contexts.popitem(last=False)
        return ctx

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
