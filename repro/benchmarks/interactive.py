"""``interactive``: latency of a live session (impl/session.py): first frame, prompt switches.

A random-weight pipeline (speed does not depend on weight values; a fixed random embedding
per prompt, as in ``inference_speed``) first runs a three-block warm-up session with one switch
(one-time costs: allocation, kernel selection, compilation). Then one timed session, pulled block by block as
the live page does:
- ``ttff_ms``: time to first frame, from opening the session to the first decoded block in
  hand (the first block's denoising, clean pass and decode);
- ``warmup_blocks`` more blocks fill the KV window; then ``switches`` prompt switches of kind
  ``switch`` (``recache``: continuous with the KV re-cache; ``direct``: continuous, text K/V
  only; ``cut``: scene cut), one every ``blocks_per_switch`` blocks;
- ``switch_latency_ms_p50 / _max``: from calling ``switch`` to the first decoded block of the
  new prompt in hand (re-cache, the block's DiT and its decode; in the async VAE modes also the
  blocks already in flight);
- ``recache_ms_p50``: the re-cache forwards alone (0 without re-cache);
- ``switching_fps``: pixel frames pulled / wall time from the first switch to the last
  block (the stream's steady rate with the switches' cost in it); ``block_ms_p50``: wall time
  of a pull without a switch.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.modes import SwitchMode, choices
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._shared import SPEED_PRESETS, STREAM_SEED, finish_gpu_run, inference_fields, preset_field, vae_device_for

PROMPTS = ("a red fox runs through fresh snow", "a grey owl glides over a frozen lake",
           "a lighthouse on a cliff in a storm", "a paper boat drifts down a rainy street")


def run_interactive(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(hardware["device"])
    cfg = InferenceConfig.from_variant(variant, vae_device=vae_device_for(variant["vae_mode"], device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pipe = build_pipeline(cfg, device, Weights(text="embedding", seed=measure["seed"]))
    mode, every = variant["switch"], measure["blocks_per_switch"]
    with pipe.session(PROMPTS[0], seed=measure["seed"], max_blocks=3) as warm:   # every code path once
        next(warm)
        warm.switch(PROMPTS[1], mode)
        list(warm)
    latencies, recache, plain, frames = [], [], [], 0

    def pull(session, timed: bool = True):
        t0 = time.perf_counter()
        block = next(session)
        if timed:
            plain.append((time.perf_counter() - t0) * 1e3)
        return block

    t_open = time.perf_counter()
    # Unbounded: in the async VAE modes the DiT runs ahead of the pulls, so a fixed block count
    # would end the stream early; close() then drops the blocks computed ahead.
    with pipe.session(PROMPTS[0], seed=measure["seed"]) as session:
        first = next(session)
        ttff_ms = (time.perf_counter() - t_open) * 1e3
        for _ in range(measure["warmup_blocks"]):
            pull(session)
        t_window = time.perf_counter()
        for i in range(measure["switches"]):
            t0 = time.perf_counter()
            session.switch(PROMPTS[(i + 1) % len(PROMPTS)], mode)
            block = pull(session, timed=False)
            frames += block.timing.frames
            while block.switch is None:      # async decode: blocks computed before the switch
                block = pull(session, timed=False)
                frames += block.timing.frames
            latencies.append((time.perf_counter() - t0) * 1e3)
            recache.append(block.switch_ms)
            for _ in range(every - 1):
                frames += pull(session).timing.frames
        window_s = time.perf_counter() - t_window
    metrics = {
        "ttff_ms": ttff_ms,
        "switch_latency_ms_p50": statistics.median(latencies),
        "switch_latency_ms_max": max(latencies),
        "recache_ms_p50": statistics.median(recache),   # ~0 for direct switches and cuts
        "block_ms_p50": statistics.median(plain) if plain else None,
        "switching_fps": frames / window_s,
        "first_block_frames": first.timing.frames,
        "switches": len(latencies),
    }
    del pipe, session, warm
    return finish_gpu_run(metrics, device)


def _check(variant: dict[str, Any]) -> None:
    InferenceConfig.from_variant(variant)   # cross-field rules name the field


INTERACTIVE = register(Benchmark(
    name="interactive",
    description="Live-session latency: time to first frame, prompt-switch latency with and without the KV "
                "re-cache (and scene cuts), re-cache cost, FPS during switches; per decoder and precision.",
    variant_fields={
        "preset": preset_field(SPEED_PRESETS),
        **inference_fields("dtype", "precision", "steps", "kv_cache", "decoder", "vae_mode", "compile"),
        "switch": FieldSpec(str, "recache", choices=list(choices(SwitchMode)),
                            help="kind of prompt switch: continuous with KV re-cache, continuous without, scene cut"),
    },
    measure_fields={
        "warmup_blocks": FieldSpec(int, 4, min=0, help="blocks after the first one, before the first switch"),
        "switches": FieldSpec(int, 4, min=1, help="prompt switches timed"),
        "blocks_per_switch": FieldSpec(int, 2, min=1, help="blocks from one switch to the next"),
        "seed": STREAM_SEED,
    },
    run=run_interactive,
    check_variant=_check,
    table_metrics=["ttff_ms", "switch_latency_ms_p50", "switch_latency_ms_max", "recache_ms_p50", "block_ms_p50",
                   "switching_fps", "peak_mem_gb"],
    primary_metric="switch_latency_ms_p50",
    plot="switch_latency_ms_p50",
))
