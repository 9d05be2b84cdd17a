"""What a training data source yields, and the interface the trainer and loaders read.

A source has ``len``, ``source[i]`` and ``set_epoch(epoch)``; its items are a
:class:`VideoClip` (raw frames, encoded during the step) or a :class:`LatentSample`
(pre-encoded latents and text states).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from impl.config import ConfigError
from impl.train.data_util import check_index, check_int

__all__ = ["EpochDataset", "VideoClip", "LatentSample", "InMemorySource"]


class EpochDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class VideoClip:
    """One training clip: ``frames`` uint8 [T, H, W, 3] with T = 1 + 4 (F - 1), one prompt per
    AR block, the source id and the raw frame of the source where the clip starts."""

    frames: torch.Tensor
    block_prompts: list[str]
    key: str
    start_frame: int = 0

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, torch.Tensor) or f.dtype != torch.uint8 or f.dim() != 4 or f.shape[-1] != 3:
            raise ValueError(f"VideoClip.frames ({self.key}): expected a uint8 tensor [T, H, W, 3], got "
                             f"{getattr(f, 'dtype', type(f).__name__)} {tuple(getattr(f, 'shape', ()))}")
        if not self.block_prompts or not all(isinstance(p, str) and p for p in self.block_prompts):
            raise ValueError(f"VideoClip.block_prompts ({self.key}): needs at least one non-empty string, "
                             f"got {self.block_prompts!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.block_prompts)


@dataclass
class LatentSample:
    """A pre-encoded sample: normalised latents [C, F, h, w], per-block text embeddings
    [n_blocks, text_len, text_dim] and the prompts they stand for."""

    latents: torch.Tensor
    text: torch.Tensor
    block_prompts: list[str]
    key: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.block_prompts)


class InMemorySource:
    """A list of pre-built samples (e.g. :class:`LatentSample` items encoded once by the caller)
    with the dataset interface the trainer reads."""

    def __init__(self, items: Sequence[Any]) -> None:
        if len(items) == 0:
            raise ConfigError("InMemorySource: needs at least one item")
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[check_index(index, len(self), "InMemorySource")]

    def set_epoch(self, epoch: int) -> None:
        check_int(epoch, "InMemorySource.set_epoch(epoch)", 0)
