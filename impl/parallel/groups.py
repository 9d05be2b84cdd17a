"""Process groups for sequence parallelism (SP) x data parallelism (DP).

world = sp x dp. SP group g holds ranks [g*sp, (g+1)*sp): consecutive ranks, so on one host
the all-to-all stays on the fastest links. DP group k holds ranks {g*sp + k}: the ranks with
the same SP position, which see the same shard layout of different samples.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from impl.errors import ConfigError


class ParallelConfigError(ConfigError):
    """An SP/DP size that does not fit the world, the model or the clip."""


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the SP x DP grid. ``sp_group``/``dp_group`` are None when the
    corresponding size is 1 (no communication needed) or when not distributed."""

    rank: int
    world_size: int
    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def is_sp_root(self) -> bool:
        return self.sp_rank == 0

    @property
    def sp_root_global_rank(self) -> int:
        return self.rank - self.sp_rank


def single_process() -> ParallelGroups:
    """The trivial grid of a non-distributed run."""
    return ParallelGroups(0, 1, 1, 0, 1, 0, None, None)


def build_groups(sp_size: int) -> ParallelGroups:
    """Split the initialised default group into SP groups of ``sp_size`` consecutive ranks.

    Every rank must call this (``new_group`` is collective). Without an initialised process
    group, ``sp_size`` must be 1 and the single-process grid is returned.
    """
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ParallelConfigError(f"sp_size: must be a positive integer, got {sp_size!r}")
    if not dist.is_available() or not dist.is_initialized():
        if sp_size != 1:
            raise ParallelConfigError(f"sp_size={sp_size} needs torch.distributed to be initialised "
                                      f"(launch with torchrun --nproc-per-node N)")
        return single_process()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size:
        raise ParallelConfigError(f"sp_size={sp_size} does not divide the world size {world}")
    dp_size = world // sp_size
    sp_group = dp_group = None
    for g in range(dp_size):  # every rank creates every group, in the same order
        ranks = list(range(g * sp_size, (g + 1) * sp_size))
        pg = dist.new_group(ranks) if sp_size > 1 else None
        if rank in ranks:
            sp_group = pg
    for k in range(sp_size):
        ranks = list(range(k, world, sp_size))
        pg = dist.new_group(ranks) if dp_size > 1 else None
        if rank in ranks:
            dp_group = pg
    return ParallelGroups(rank, world, sp_size, rank % sp_size, dp_size, rank // sp_size, sp_group, dp_group)


def init_single_rank_group(device: torch.device | str, timeout_s: float = 600.0) -> None:
    """A process group of this process alone (in-memory store), for code that needs one even
    without torchrun: FSDP2 shards over a device mesh, so one-GPU FSDP (with or without CPU
    offload) runs in a world of 1. No-op when a group is already initialised."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=timeout_s))


def init_distributed(backend: str | None = None, timeout_s: float = 600.0, *,
                     single_rank_group: bool = False) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    NCCL with one GPU per local rank when CUDA is available, gloo on CPU. Returns
    (rank, world_size, device). Without torchrun's variables this is a single process, with
    a world-of-1 group if ``single_rank_group`` (FSDP needs one; see init_single_rank_group).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if single_rank_group:
            init_single_rank_group(device, timeout_s)
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ParallelConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device
