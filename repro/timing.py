"""Timing of a device workload: warm-up, then per-call times in ms."""

from __future__ import annotations

import time

import torch


def time_ms(fn, device: str, warmup: int, repeats: int) -> list[float]:
    """Per-call wall times in ms; CUDA events on GPU (host timers would see async launches)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
