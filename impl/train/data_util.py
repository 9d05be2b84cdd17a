"""What every module of the training data layer shares: its error type, argument checks and
the seeded generators that make items a pure function of (seed, index[, epoch])."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from impl.config import ConfigError

__all__ = ["DatasetError", "check_int", "check_index", "derive_seed", "seeded_generator"]


class DatasetError(ValueError):
    """A data item is unusable (bad or missing sidecar, too-short video); the message names
    the file and what was expected."""


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int; ConfigError naming ``name`` unless it is an integer >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_index(index: Any, length: int, owner: str) -> int:
    """A sequence index (negative counts from the end) as a position in ``[0, length)``."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"{owner}: index must be an integer, got {type(index).__name__}")
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"{owner}: index {index} out of range for length {length}")
    return i


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (stable across runs and platforms)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
