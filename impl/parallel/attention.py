"""Attention cores for full-sequence (training) forwards: (q, k, v) -> o, [B, H, S, D].

:class:`~impl.model.attention.MaskedSDPA` (the model's own) applies a dense boolean mask with
SDPA: exact, any device, memory O(S^2), used on CPU and in tests. :class:`FlexMasked` uses
FlexAttention's block-sparse kernel with the same rule as a ``mask_mod`` (GPU). :class:`Ulysses`
wraps either with the sequence-to-heads exchange for SP. :func:`teacher_forcing_core` picks them for a layout.
"""

from __future__ import annotations

import torch

from impl.model.attention import MaskedSDPA
from impl.modes import TrainAttention, check_choice
from impl.parallel.layout import TeacherForcingLayout, dense_mask, mask_mod
from impl.parallel.ulysses import heads_to_seq, seq_to_heads


class FlexMasked:
    """FlexAttention under a block mask built once per (layout, length); compiled on GPU."""

    def __init__(self, layout: TeacherForcingLayout, tokens_per_frame: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        s = 2 * layout.num_frames * tokens_per_frame
        # _compile: evaluate the mask tile by tile instead of materialising S x S intermediates
        # (tens of GB at training lengths).
        self.block_mask = create_block_mask(mask_mod(layout, tokens_per_frame, device), B=None, H=None,
                                            Q_LEN=s, KV_LEN=s, device=device, _compile=device.type == "cuda")
        self._attend = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend(q, k, v, block_mask=self.block_mask)


class Ulysses:
    """Sequence-split q, k, v -> head-split over the whole sequence -> inner core -> back."""

    def __init__(self, inner, group):
        self.inner, self.group = inner, group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self.group
        o = self.inner(seq_to_heads(q, g), seq_to_heads(k, g), seq_to_heads(v, g))
        return heads_to_seq(o, g)


def teacher_forcing_core(layout: TeacherForcingLayout, tokens_per_frame: int, device: torch.device | str,
                         group=None, backend: TrainAttention = "auto"):
    """The attention core of one SP rank for ``layout``: the mask over the global (post-
    exchange) token order, wrapped in the Ulysses exchange when ``layout.sp_size > 1``.
    ``auto`` = FlexAttention on CUDA, the dense mask elsewhere."""
    check_choice(backend, TrainAttention, "attention_backend")
    device = torch.device(device)
    if backend == "auto":
        backend = "flex" if device.type == "cuda" else "dense"
    inner = (FlexMasked(layout, tokens_per_frame, device) if backend == "flex"
             else MaskedSDPA(dense_mask(layout, tokens_per_frame, device)))
    return Ulysses(inner, group) if layout.sp_size > 1 else inner
