"""Shared pieces of the benchmark suite: the CPU / GPU cases, the timed call, the output checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch


@dataclass(frozen=True)
class Target:
    """Where a benchmark runs and at which size: ``cpu`` (tiny) or ``cuda`` (5B shapes)."""

    name: str            # "cpu" | "cuda"

    @property
    def device(self) -> torch.device:
        return torch.device(self.name)

    @property
    def gpu(self) -> bool:
        return self.name == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: BF16 on the GPU (as the 5B runs), float32 on the CPU."""
        return torch.bfloat16 if self.gpu else torch.float32

    def pick(self, cpu: Any, gpu: Any) -> Any:
        return gpu if self.gpu else cpu

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()


# The two cases every benchmark is parametrized over.
TARGETS = [pytest.param(Target("cpu"), id="cpu"),
           pytest.param(Target("cuda"), id="gpu5b", marks=pytest.mark.gpu)]


ROUND_BUDGET_S = 1.0      # timed seconds per benchmark, about (at least MIN_ROUNDS rounds)
MIN_ROUNDS, MAX_ROUNDS = 3, 200


def run_benchmark(benchmark, target: Target, fn: Callable[[], Any], *, group: str, rounds: int | None = None,
                  warmup: int = 1, **info: Any) -> Any:
    """Time ``fn`` (synchronised on CUDA) after ``warmup`` untimed calls and return its last
    output. Rounds of one call each: ``rounds``, or as many as fit :data:`ROUND_BUDGET_S` by
    the last warm-up call's time (pytest-benchmark's own calibration is fooled by noisy shared
    CPUs: it once ran 1,216 rounds of a 50 ms call)."""
    import time

    def call():
        out = fn()
        target.sync()
        return out

    elapsed = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
    if rounds is None:
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(elapsed, 1e-6))))
    benchmark.group = group
    benchmark.extra_info.update({"device": target.name, "cpu_threads": torch.get_num_threads(),
                                 **{k: _jsonable(v) for k, v in info.items()}})
    if target.gpu and torch.cuda.is_available():
        benchmark.extra_info["gpu_name"] = torch.cuda.get_device_name(0)
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    if target.gpu and torch.cuda.is_available():
        benchmark.extra_info["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return str(v)


def check(t: torch.Tensor, shape: tuple[int, ...] | None = None, *, what: str = "output") -> None:
    """The benchmarked call produced something real: a finite tensor of ``shape``."""
    assert isinstance(t, torch.Tensor), f"{what}: expected a tensor, got {type(t).__name__}"
    if shape is not None:
        assert tuple(t.shape) == tuple(shape), f"{what}: shape {tuple(t.shape)}, expected {tuple(shape)}"
    assert t.numel() > 0, f"{what}: empty"
    assert bool(torch.isfinite(t.float()).all()), f"{what}: not finite"
