"""Ulysses all-to-all: switch attention inputs between sequence-split and head-split.

Before attention each SP rank holds all heads of its own tokens, [B, H, S_local, D];
:func:`seq_to_heads` gives it H/sp heads of every rank's tokens, [B, H/sp, sp*S_local, D],
in rank-major token order (rank 0's tokens, then rank 1's, ...). :func:`heads_to_seq` is the
exact inverse. Both are autograd functions whose backward is the other exchange, so gradients
reach the rank that owns each token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    sp = _group_size(group)
    b, h, s, d = x.shape
    # Chunk i of the heads goes to rank i; what arrives from rank j is rank j's tokens.
    send = x.reshape(b, sp, h // sp, s, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * s, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    sp = _group_size(group)
    b, hl, s_all, d = x.shape
    s = s_all // sp
    # Token chunk j goes back to rank j; what arrives from rank i is head chunk i.
    send = x.reshape(b, hl, sp, s, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, sp * hl, s, d)


class _Exchange(torch.autograd.Function):
    """One all-to-all, ``exchange``, whose backward is its inverse, ``inverse`` (the two
    directions are each other's gradient)."""

    @staticmethod
    def forward(ctx, x, group, exchange, inverse):
        ctx.group, ctx.inverse = group, inverse
        return exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.inverse(grad, ctx.group), None, None, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, S_local, D] on each rank -> [B, H/sp, sp*S_local, D] (rank-major tokens)."""
    sp = _group_size(group)
    if x.dim() != 4 or x.shape[1] % sp:
        raise ValueError(f"seq_to_heads: expected [B, H, S, D] with H divisible by sp={sp}, got {tuple(x.shape)}")
    return x if sp == 1 else _Exchange.apply(x, group, _seq_to_heads, _heads_to_seq)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: [B, H/sp, sp*S_local, D] -> [B, H, S_local, D]."""
    sp = _group_size(group)
    if x.dim() != 4 or x.shape[2] % sp:
        raise ValueError(f"heads_to_seq: expected [B, H/sp, S, D] with S divisible by sp={sp}, got {tuple(x.shape)}")
    return x if sp == 1 else _Exchange.apply(x, group, _heads_to_seq, _seq_to_heads)


def all_to_all_bytes(local_numel: int, element_bytes: int, sp: int) -> int:
    """Bytes one rank sends (and receives) in one exchange of a ``local_numel`` tensor: all but
    its own 1/sp share."""
    return local_numel * element_bytes * (sp - 1) // sp
