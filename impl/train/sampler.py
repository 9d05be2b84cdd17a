"""Which samples each rank reads: data-parallel sharding and SP-root-only loading.

The data-parallel groups read disjoint samples (:class:`ShardedSampler`); under sequence
parallelism only the SP-root rank of each SP group decodes the video
(:func:`root_only_loader`) and scatters it over its group.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from impl.config import ConfigError
from impl.parallel.groups import ParallelGroups
from impl.train.data_util import check_int, seeded_generator
from impl.train.samples import EpochDataset

__all__ = ["ShardedSampler", "root_only_loader"]


class ShardedSampler:
    """This data-parallel rank's sample indices for one epoch.

    Every epoch all indices are permuted with ``(seed, epoch)`` (or kept in order with
    ``shuffle=False``), cut to ``(dataset_len // dp_size) * dp_size`` — the remainder is dropped
    so every rank takes the same number of steps (with shuffling, different samples are dropped
    each epoch) — and dealt round-robin: rank ``r`` gets positions ``r, r + dp_size, ...``. The
    ranks' indices are disjoint; every rank computes the same permutation, so no communication
    is needed. All SP ranks of one SP group share ``dp_rank`` and thus see the same indices.
    """

    def __init__(self, dataset_len: int, dp_rank: int, dp_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.dataset_len = check_int(dataset_len, "ShardedSampler.dataset_len", 1)
        self.dp_size = check_int(dp_size, "ShardedSampler.dp_size", 1)
        self.dp_rank = check_int(dp_rank, "ShardedSampler.dp_rank", 0)
        if self.dp_rank >= dp_size:
            raise ConfigError(f"ShardedSampler.dp_rank: must be in [0, dp_size={dp_size}), got {dp_rank}")
        if dataset_len < dp_size:
            raise ConfigError(f"ShardedSampler.dataset_len: {dataset_len} samples cannot feed "
                              f"dp_size={dp_size} ranks one sample each")
        self.seed = check_int(seed, "ShardedSampler.seed", 0)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.num_samples = dataset_len // dp_size

    @classmethod
    def for_groups(cls, dataset_len: int, groups: ParallelGroups, seed: int = 0,
                   shuffle: bool = True) -> "ShardedSampler":
        """The sampler of this rank's DP position in ``groups``."""
        return cls(dataset_len, groups.dp_rank, groups.dp_size, seed, shuffle)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int(epoch, "ShardedSampler.set_epoch(epoch)", 0)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        n = self.dataset_len
        if self.shuffle:
            order = torch.randperm(n, generator=seeded_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        return order[:self.num_samples * self.dp_size][self.dp_rank::self.dp_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())


def _keep_item(item: Any) -> Any:
    """DataLoader collate for ``batch_size=None``: pass the sample through unchanged."""
    return item


def root_only_loader(dataset: EpochDataset, groups: ParallelGroups, sampler: Iterable[int], *,
                     epoch: int | None = None, num_workers: int = 0) -> Iterator[Any]:
    """One epoch of samples: ``dataset[i]`` for each sampler index on SP-root ranks, and ``None``
    as many times on the other SP ranks, so all ranks of an SP group step together while only
    the root decodes (it then scatters the data over the SP group).

    ``epoch`` (optional) calls ``set_epoch`` on the sampler and the dataset first.
    ``num_workers > 0`` loads on the root through a ``torch.utils.data.DataLoader`` with that
    many worker processes (one sample at a time, samples kept as they are).
    """
    check_int(num_workers, "root_only_loader.num_workers", 0)
    if epoch is not None:
        for obj in (sampler, dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
    indices = list(sampler)
    return _root_iter(dataset, indices, groups.is_sp_root, num_workers)


def _root_iter(dataset: Any, indices: list[int], is_root: bool, num_workers: int) -> Iterator[Any]:
    if not is_root:
        for _ in indices:
            yield None
        return
    if num_workers == 0:
        for i in indices:
            yield dataset[i]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=indices,
                                         num_workers=num_workers, collate_fn=_keep_item)
    yield from loader
