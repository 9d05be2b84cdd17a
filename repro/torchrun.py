"""Launching one measured variant as ``torchrun --standalone`` from the (single-process) harness.

The SP benchmarks (``sp_inference``, ``sp_training``) run each variant as a torchrun job over
``ranks`` processes: NCCL with one GPU per rank on CUDA, gloo on the CPU (even on a GPU host,
with the cores split between the ranks). The job writes its results into a temporary folder,
which the caller reads before it is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def torchrun_prefix(ranks: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node ranks``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]


def torchrun_env(ranks: int, hardware: dict[str, Any]) -> dict[str, str]:
    """The job's environment; on CUDA, a clear error when the host has fewer than ``ranks`` GPUs."""
    env = dict(os.environ)
    if hardware["device"] == "cuda":
        import torch
        found = torch.cuda.device_count()
        if found < ranks:
            raise ValueError(f"sp_size: {ranks} ranks need {ranks} GPUs on this host, found {found}")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even on a GPU host
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    return env


def run_torchrun(command: Callable[[Path], list[str]], ranks: int, env: dict[str, str], *, timeout_s: float,
                 required: Sequence[str], read: Callable[[Path], T], prefix: str) -> T:
    """Run ``command(out)`` in a temporary folder ``out`` and return ``read(out)``; a failed job,
    or one that left any of the ``required`` files (relative to ``out``) unwritten, raises
    RuntimeError with the tail of its output."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        out = Path(tmp)
        proc = subprocess.run(command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not all((out / name).exists() for name in required):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"torchrun with {ranks} rank(s) failed (exit {proc.returncode}):\n{tail}")
        return read(out)
