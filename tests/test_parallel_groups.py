import pytest
import torch.distributed as dist

from impl.parallel.groups import ParallelConfigError, build_groups, single_process
from dist_harness import run_distributed


def _grid(rank, world, sp):
    g = build_groups(sp)
    import torch
    t = torch.tensor([float(rank)])
    if g.sp_group is not None:
        dist.all_reduce(t, group=g.sp_group)
    return (g.sp_rank, g.dp_rank, g.sp_size, g.dp_size, float(t))


def test_groups_split_world_into_consecutive_sp_groups():
    out = run_distributed(_grid, 4, 2)
    assert [o[:4] for o in out] == [(0, 0, 2, 2), (1, 0, 2, 2), (0, 1, 2, 2), (1, 1, 2, 2)]
    assert [o[4] for o in out] == [1.0, 1.0, 5.0, 5.0]  # all-reduce stays inside each SP group


def _bad(rank, world):
    with pytest.raises(ParallelConfigError, match="does not divide"):
        build_groups(3)
    return True


def test_bad_sp_size_is_a_clear_error():
    assert run_distributed(_bad, 2) == [True, True]
    with pytest.raises(ParallelConfigError, match="torchrun"):
        build_groups(2)
    assert build_groups(1) == single_process()
