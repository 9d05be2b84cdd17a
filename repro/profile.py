"""``python -m repro profile``: where the time of one steady-state AR block goes.

Builds the pipeline through the one builder (random weights at the preset's size, every
inference knob a flag of :class:`impl.inference.config.InferenceConfig`), generates ``--warmup-blocks`` blocks, then profiles the next block's DiT work (denoising
steps + re-cache) with ``torch.profiler``. GPU kernel time is grouped into phases (GEMM,
attention, convolution, NVFP4/FP8 quantization, norms and elementwise, copies, other); the
gap between the block's wall time and the summed kernel time is reported as idle (launch
overhead, host syncs). Prints a table and writes the full summary as JSON.
"""

from __future__ import annotations

import argparse
import re
import time

from impl.inference.config import add_arguments as add_inference_arguments
from impl.inference.config import config_from_args
from impl.io import write_json

PHASES = [  # first match wins; matched against lower-case kernel names
    # Convolutions (the VAE; the DiT's patch embedding): cuDNN/CUTLASS fprop/dgrad/wgrad and
    # implicit-GEMM kernels, cuDNN's NCHW<->NHWC layout transforms, CPU aten conv ops. Never
    # an attention kernel (cuDNN SDPA kernels say "cudnn" and "fprop" too), one of inductor's
    # fused "triton_..._convolution" elementwise kernels, nor a "convert".
    ("conv", re.compile(r"^(?!triton)(?!.*(sdpa|flash|fmha|attention|scaled_dot_product))"
                        r".*(conv(?!ert)|cudnn|fprop|dgrad|wgrad|implicit_gemm|winograd|im2col|vol2col"
                        r"|nchwtonhwc|nhwctonchw)")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn|scaled_dot_product")),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|_mm_|matmul|wo_mm|splitk|^aten::(addmm|mm|bmm|linear)$")),
    ("quantize", re.compile(r"nvfp4|quant|fp8|e4m3|scaled")),
    ("norm_elementwise", re.compile(r"elementwise|vectorized|norm|reduce|triton|cat|copy_kernel|index|rope")),
    ("memcpy", re.compile(r"memcpy|memset")),
]


def phase_of(kernel: str) -> str:
    name = kernel.lower()
    for phase, pattern in PHASES:
        if pattern.search(name):
            return phase
    return "other"


def kernel_times_ms(prof, device_type: str) -> dict[str, float]:
    """Kernel name -> total ms from a finished ``torch.profiler.profile``.

    GPU (``device_type`` "cuda"): self time of device kernels. CPU: self time of aten ops
    (the "kernels" there).
    """
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        if device_type == "cuda":
            us = getattr(ev, "self_device_time_total", None)
            us = getattr(ev, "self_cuda_time_total", 0.0) if us is None else us
            keep = str(getattr(ev, "device_type", "")).endswith("CUDA")
        else:
            us, keep = ev.self_cpu_time_total, ev.key.startswith("aten::")
        if keep and us:
            kernels[ev.key] = kernels.get(ev.key, 0.0) + us / 1e3
    return kernels


def phase_times_ms(kernels: dict[str, float]) -> dict[str, float]:
    """Sum :func:`kernel_times_ms` per :func:`phase_of` phase (phases with no kernel left out)."""
    phases: dict[str, float] = {}
    for name, ms in kernels.items():
        phases[phase_of(name)] = phases.get(phase_of(name), 0.0) + ms
    return phases


def _commit(given: str | None) -> str:
    from repro.records import git_state
    state = git_state()
    if given and (state["commit"] == "unknown" or (state.get("dirty") and not state["commit"].startswith(given))):
        return given   # a tree copy without (or with stale) git metadata: trust the caller
    return state["commit"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_inference_arguments(ap, skip=("sp_size", "kv_comm", "vae_mode", "vae_device", "vae_queue_depth"))
    ap.add_argument("--warmup-blocks", type=int, default=4, help="blocks generated before the profiled one (default: 4)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed, >= 1 (default: 15)")
    ap.add_argument("--out", default=None, metavar="JSON",
                    help="JSON summary path, checked for writability before the model is built (default: print only)")
    ap.add_argument("--commit", default=None, metavar="SHA",
                    help="commit to record when the tree has no git metadata (a copy on a remote GPU) "
                         "(default: the checkout's HEAD)")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad arguments before anything is built (ValueError / HarnessError: one line)."""
    from repro.records import check_output_file

    if args.warmup_blocks < 1:
        raise ValueError(f"--warmup-blocks: must be >= 1 (the profiled block follows them), got {args.warmup_blocks}")
    if args.top < 1:
        raise ValueError(f"--top: must be >= 1, got {args.top}")
    if args.out:
        check_output_file(args.out, "--out")


def run(args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from impl.inference.build import Weights, build_pipeline

    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config_from_args(args)
    # Random weights and a fixed random embedding per prompt: the profile is of the DiT's block.
    pipe = build_pipeline(cfg, device, Weights(text="embedding"), decode=False)
    prompts = ["a profiled prompt"] * (args.warmup_blocks + 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    dit_ms: dict[int, float] = {}

    def on_block(t) -> None:  # start profiling once the warm-up blocks are done
        dit_ms[t.block] = t.dit_ms
        if t.block == args.warmup_blocks - 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof.__enter__()

    t0 = time.perf_counter()
    pipe.generate(prompts, decode=False, on_block=on_block)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    block_ms = dit_ms[args.warmup_blocks]

    kernels = kernel_times_ms(prof, device.type)
    phases = phase_times_ms(kernels)
    busy = sum(phases.values())
    phases["idle_or_host"] = max(0.0, block_ms - busy)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]
    summary = {"preset": cfg.preset_name, "dtype": cfg.dtype, "precision": cfg.precision, "kv_cache": cfg.kv_cache,
               "compile": cfg.compile, "steps": pipe.stream.steps, "block_dit_ms": block_ms, "kernel_ms": busy,
               "phases_ms": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
               "top_kernels_ms": dict(top), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "wall_s": time.perf_counter() - t0,
               "commit": _commit(args.commit), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"block DiT time {block_ms:.1f} ms, kernels {busy:.1f} ms")
    for phase, ms in summary["phases_ms"].items():
        print(f"  {phase:<18}{ms:>10.1f} ms  {100 * ms / block_ms:5.1f}%")
    print("top kernels:")
    for name, ms in top:
        print(f"  {ms:>9.1f} ms  {name[:110]}")
    if args.out:
        write_json(args.out, summary)
    return summary
