"""pytest-benchmark suite of the hot kernels and stages (``make bench-pytest``).

It lives outside ``tests/`` (pytest's ``testpaths``), so ``make test`` never collects it; every
item here also gets the ``bench`` marker. Each benchmark has a CPU case at tiny sizes (run by
default) and a ``gpu`` case at the 5B model's shapes (skipped without CUDA). Every timed call
is checked afterwards (finite output of the expected shape), so a benchmark cannot silently
time nothing. On CUDA every timed call ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent.resolve()


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.bench)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip)


# CPU threads for the timed calls: 1 by default. The suite's CPU sizes are op-overhead bound, and on
# a small shared machine (2 cores here, other jobs running) intra-op threads oversubscribe: the tiny
# Wan decoder took 0.2 s a block with one thread and 2-4 s with two. BENCH_CPU_THREADS=N overrides.
CPU_THREADS = int(os.environ.get("BENCH_CPU_THREADS", "1"))


@pytest.fixture(autouse=True)
def _cpu_threads(request):
    if _HERE not in Path(request.node.path).resolve().parents:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_benchmark_update_commit_info(config, commit_info):
    """``dirty`` as the harness counts it (repro.records.git_state): the run's own outputs under
    results/ do not count, so a `make bench` after other specs wrote records stays clean."""
    from repro.records import git_state

    state = git_state()
    if state["dirty"] is not None:
        commit_info["dirty"] = state["dirty"]
