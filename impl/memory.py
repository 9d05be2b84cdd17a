"""Byte counts of tensors and modules, for the memory columns of every benchmark."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    """All parameters and buffers of ``module``, in bytes."""
    return tensor_bytes((*module.parameters(), *module.buffers()))
