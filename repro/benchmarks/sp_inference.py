"""``sp_inference``: measured FPS and bytes per block of sequence-parallel streaming inference.

The harness runs one process, so each variant launches ``torchrun --standalone
--nproc-per-node sp_size -m impl.inference.sp`` (NCCL, one GPU per rank, on CUDA;
gloo on the CPU) and reads the JSON summary global rank 0 writes. One video of
``warmup_blocks + blocks`` AR blocks is generated with random weights and a fixed random
text embedding per prompt (speed does not depend on either):
- ``dit_fps``: pixel frames / DiT time of the measured blocks on rank 0 (the SP root);
- ``e2e_fps``: pixel frames / wall time after the warm-up blocks, VAE decode on the root
  included (``decode``; frames are decoded, not written to a file);
- ``comm_bytes_per_block``: bytes one rank sent per block, counted by the exchange, with the
  analytic count of :func:`impl.parallel.sp_exchange.block_bytes` next to it.
A CUDA variant needs ``sp_size`` GPUs on this host and fails with a clear error otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from impl.inference.config import InferenceConfig
from repro.benchmark import Benchmark, register
from repro.benchmarks._shared import SPEED_PRESETS, TORCHRUN_TIMEOUT, inference_field, inference_fields, preset_field, stream_fields
from repro.torchrun import run_torchrun, torchrun_env, torchrun_prefix


def _check(variant: dict[str, Any]) -> None:
    InferenceConfig.from_variant(variant)   # every knob and the SP size against the preset


def launch_command(variant: dict[str, Any], measure: dict[str, Any], out: Path) -> list[str]:
    """The torchrun command line of one variant."""
    cmd = [*torchrun_prefix(variant["sp_size"]), "-m", "impl.inference.sp",
           "--preset", variant["preset"], "--sp-size", str(variant["sp_size"]),
           "--kv-cache", variant["kv_cache"], "--kv-comm", variant["kv_comm"],
           "--steps", str(variant["steps"]), "--dtype", variant["dtype"],
           "--precision", variant["precision"], "--text", "embedding",
           "--blocks", str(measure["warmup_blocks"] + measure["blocks"]),
           "--warmup-blocks", str(measure["warmup_blocks"]), "--seed", str(measure["seed"]),
           "--out", str(out / "outputs"), "--metrics-out", str(out / "metrics.json"),
           "--decode" if measure["decode"] else "--no-decode", "--no-video"]
    if variant["compile"]:
        cmd.append("--compile")
    return cmd


def run_sp_inference(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    _check(variant)
    sp = variant["sp_size"]
    env = torchrun_env(sp, hardware)
    if hardware["device"] == "cuda" and variant["dtype"] == "fp64":
        raise ValueError("dtype: fp64 is for CPU exactness runs; use bf16 or fp32 on CUDA")
    m = run_torchrun(lambda out: launch_command(variant, measure, out), sp, env, timeout_s=measure["timeout_s"],
                     required=["metrics.json"], read=lambda out: json.loads((out / "metrics.json").read_text()),
                     prefix="sp_inference_")
    by_category = m.pop("comm_by_category")
    m.pop("collectives_per_block")
    metrics = {k: v for k, v in m.items() if v is None or isinstance(v, (int, float, str))}
    metrics.update({f"comm_{k}_bytes_per_block": v for k, v in by_category.items() if k != "kv"})
    metrics["comm_bytes_match_analytic"] = m["comm_bytes_per_block"] == m["comm_bytes_per_block_analytic"]
    for drop in ("sp_size", "steps", "kv_cache", "preset", "dtype", "precision"):   # variant keys, already in the record
        metrics.pop(drop, None)
    return metrics


SP_INFERENCE = register(Benchmark(
    name="sp_inference",
    description=("Measured Ulysses SP streaming inference: torchrun with sp_size ranks (NCCL on GPUs, gloo on "
                 "CPU), DiT-only and end-to-end FPS on the SP root, bytes per block sent by each rank "
                 "(BF16 vs NVFP4 K/V exchange) against the analytic count, KV memory per rank."),
    variant_fields={
        "preset": preset_field(SPEED_PRESETS),
        "sp_size": inference_field("sp_size", max=64, help="SP ranks = GPUs used (one SP group)"),
        **inference_fields("kv_cache", "kv_comm", "steps", "dtype", "precision", "compile"),
    },
    measure_fields={
        **stream_fields(min_warmup=0),
        "timeout_s": TORCHRUN_TIMEOUT,
    },
    run=run_sp_inference,
    check_variant=_check,
    table_metrics=["dit_fps", "e2e_fps", "dit_block_ms_p50", "block_ms_p50", "comm_bytes_per_block",
                   "comm_kv_bytes_per_block", "comm_bytes_per_block_analytic", "kv_mem_gb", "peak_mem_gb"],
    primary_metric="dit_fps",
    plot="dit_fps",
))
