"""Gradient synchronisation for SP x DP training.

The convention, for every sharding: each SP rank back-propagates only its own tokens (its
loss is its share of the clip loss), so a parameter's full gradient is the SUM of the SP
ranks' gradients; DP replicas see different samples and are AVERAGED. Both are one world
reduction (sum) divided by the DP size, :func:`gradient_divide_factor`.

- Replicated parameters (sharding none): :func:`sync_gradients` all-reduces in flat buckets.
- FSDP (impl.parallel.fsdp): the reduce-scatter over the flattened dp x sp mesh sums over
  all ranks and divides by the same factor (``FSDPModule.set_gradient_divide_factor``),
  so each rank ends up with its shard of exactly the gradient this module computes.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from impl.parallel.groups import ParallelGroups

BUCKET_ELEMENTS = 1 << 25


def gradient_divide_factor(groups: ParallelGroups) -> int:
    """What the world-summed gradient is divided by: the DP size (SP ranks are summed)."""
    return groups.dp_size


def sync_gradients(params: Iterable[torch.nn.Parameter], groups: ParallelGroups) -> int:
    """All-reduce the gradients of ``params`` in place; returns the bytes reduced per rank.
    Parameters without a gradient get a zero one first, so every rank reduces the same list."""
    if groups.world_size == 1:
        return 0
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    sent = 0
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal sent
        if not bucket:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in bucket:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = _flatten_dense_tensors(same)
            dist.all_reduce(flat)
            if gradient_divide_factor(groups) > 1:
                flat.div_(gradient_divide_factor(groups))
            for g, new in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(new)
            sent += flat.numel() * flat.element_size()
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= BUCKET_ELEMENTS:
            flush()
            size = 0
    flush()
    return sent


def sp_all_reduce_sum(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Sum of ``x`` over this rank's SP group (a copy; ``x`` is untouched)."""
    y = x.detach().clone()
    if groups.sp_group is not None:
        dist.all_reduce(y, group=groups.sp_group)
    return y
