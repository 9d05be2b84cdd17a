"""Shared helpers (no tests) for tests/test_repro_*.py: a fake benchmark and a spec writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from repro.benchmark import Benchmark, FieldSpec, register

FAKE = "repro_test_fake"


def _fake_run(variant: dict[str, Any], measure: dict[str, Any], hw: dict[str, Any]) -> dict[str, Any]:
    if variant["mode"] == "boom":
        raise RuntimeError("deliberate failure for the test")
    # Deterministic "timing": fps proportional to speed, block_ms inversely.
    fps = 10.0 * variant["speed"]
    return {"e2e_fps": fps, "block_ms_p50": 1000.0 / fps, "blocks": measure["blocks"]}


register(Benchmark(
    name=FAKE,
    description="fake benchmark for harness tests",
    variant_fields={
        "mode": FieldSpec(str, "ok", choices=["ok", "boom", "other"]),
        "speed": FieldSpec(float, 1.0, min=0.1),
        "steps": FieldSpec(int, 4, choices=[2, 4]),
        "compile": FieldSpec(bool, False),
    },
    measure_fields={"blocks": FieldSpec(int, 8, min=1), "warmup_blocks": FieldSpec(int, 2, min=0)},
    run=_fake_run,
    table_metrics=["e2e_fps", "block_ms_p50"],
    primary_metric="e2e_fps",
))


def write_spec(path: Path, **overrides: Any) -> Path:
    data: dict[str, Any] = {"name": "fake_exp", "description": "test", "benchmark": FAKE}
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def gemm_spec(path: Path, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "name": "gemm_small", "benchmark": "gemm_throughput",
        "base": {"m": 32, "n": 32, "dtype": "float32"},
        "sweep": {"k": [16, 32]},
        "measure": {"warmup": 1, "repeats": 2},
    }
    data.update(overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
