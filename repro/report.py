"""Tables (Markdown + CSV, each column defined in a legend) and plots from result records.

Needs no ``impl`` model code: benchmark metadata (which metrics to tabulate, field help) comes
from the registry when it imports, else from the records. Every file goes through
:mod:`impl.io` (atomic, mode 0644). Plots are faceted by hardware and preset (a CPU smoke run
and a 5B GPU run never share an axis), labelled with only the variant keys that differ inside
a panel, and show the spec's baseline as a reference line.
"""

from __future__ import annotations

import math
import numbers
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from impl.io import atomic_path, write_text

from repro.errors import HarnessError
from repro.records import load_records
from repro.stats import intervals_separate

META_COLS = ("hardware",)
TAIL_COLS = ("speedup_vs_baseline", "commit")
COMMIT_LEN = 7   # one commit-hash length in every table (and in paper_vs_measured.md)


def fmt_num(x: Any) -> str:
    """3 significant figures without scientific notation for everyday magnitudes."""
    if x is None:
        return ""
    if isinstance(x, (bool, str)) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return ""
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    if mag >= 6 or mag < -4:
        return f"{x:.3g}"
    return f"{round(x, 2 - mag):.{max(0, 2 - mag)}f}"


def hardware_label(hw: dict[str, Any]) -> str:
    if hw.get("device") == "cuda" and hw.get("gpu_name"):
        count = int(hw.get("gpu_count") or 1)
        return hw["gpu_name"] + (f" x{count}" if count > 1 else "")
    return "cpu"


def source_labels(records: list[dict[str, Any]]) -> list[str]:
    """Where each record's numbers come from, for the tables' hardware column and the plots'
    panels: its hardware (:func:`hardware_label`), or, for a record of an analytic model (its
    benchmark's ``extra["analytic"]`` names it), the model and the rates it assumes; a cost
    model computed on a CPU is not a CPU measurement."""
    bench = _benchmark(records)
    describe = (getattr(bench, "extra", None) or {}).get("analytic")
    return [(describe(r) if describe else None) or hardware_label(r["hardware"]) for r in records]


def short_sha(sha: Any) -> str:
    """A git hash cut to :data:`COMMIT_LEN` characters (anything else as it is)."""
    sha = str(sha or "unknown")
    return sha[:COMMIT_LEN] if re.fullmatch(r"[0-9a-f]{7,40}", sha) else sha


def short_commit(record: dict[str, Any]) -> str:
    return short_sha(record.get("commit")) + ("-dirty" if record.get("dirty") else "")

# ---------------------------------------------------------------- column legends
#
# Every column of every table has a plain-English definition, written under the table. Variant
# columns use the benchmark's FieldSpec help; metrics come from here (taken from the docstrings
# of repro/benchmarks/*.py and repro/quality/*.py). tests/test_report_plots.py fails when a
# benchmark's table metric or variant field has no definition, so new metrics get documented.

COLUMN_DOCS: dict[str, str] = {
    # harness columns
    "hardware": "the device that ran the variant: GPU model (with the count when more than one) or cpu; for an "
                "analytic model's row, the model and the rates it assumes (computed, not measured on a device)",
    "commit": "the code's git commit (first 7 hex digits); `-dirty` means tracked files outside the harness "
              "outputs (results/, .cache/, .benchmarks/) differed from it when the record was written",
    "speedup_vs_baseline": "this variant's primary metric over the spec's baseline variant's, both measured in "
                           "the same run (for times: baseline time / this time), so > 1 is better; empty when "
                           "the baseline did not run in that invocation",
    # common variant keys (used when a record's benchmark cannot be imported, or a field has no help)
    "preset": "model size preset",
    "precision": "format of the block linears (bf16 = not quantized)",
    "steps": "sampler (denoising) steps per AR block",
    "kv_cache": "KV-cache storage format",
    "vae_mode": "where the VAE decodes: in the DiT loop (sync), on a side CUDA stream, or on another device",
    "compile": "torch.compile of the hot path",
    "guidance_scale": "CFG scale (1.0 = no CFG)",
    # streaming inference (inference_speed, realtime, vae_second_gpu)
    "dit_fps": "DiT-only frames per second: video frames of the timed blocks / their DiT time (denoising steps "
               "plus the KV re-cache pass, CUDA-event timed); VAE decode not included",
    "e2e_fps": "end-to-end frames per second: video frames of the timed blocks / wall time from the end of the "
               "warm-up blocks' DiT loop to the last frame delivered (VAE decode, host copies and the drain "
               "of async decodes included)",
    "roofline_fps": "the DiT FPS the block's FLOPs would reach at the GEMM and attention TFLOP/s measured in the "
                    "same run at this preset's shapes (repro.roofline)",
    "roofline_fraction": "dit_fps / roofline_fps: how close the DiT runs to the measured hardware rates "
                         "(1 = at the roofline)",
    "block_ms_p50": "median wall time of one timed AR block in the generation loop (DiT, plus the decode in "
                    "sync mode), ms",
    "block_ms_p90": "90th percentile of the same per-block wall time, ms",
    "dit_block_ms_p50": "median DiT time (denoising plus re-cache) of one timed block, ms",
    "vae_block_ms_p50": "median VAE decode time of one block, ms (CUDA events on the stream that decodes, "
                        "perf_counter on a CPU)",
    "peak_mem_gb": "peak allocated GPU memory of the run, GB (10^9 bytes); CUDA only",
    "weight_mem_gb": "bytes of all DiT parameters and buffers in their storage formats, GB",
    "block_linear_weight_gb": "bytes of the transformer blocks' linear weights in their storage format "
                              "(BF16, FP8 or packed NVFP4 codes + scales), GB",
    "kv_mem_gb": "bytes of the KV cache for the whole attention window (sink included), GB",
    # live sessions (interactive)
    "ttff_ms": "time to first frame: from opening the session to the first decoded block in hand (the first "
               "block's denoising, clean pass and decode), ms",
    "switch_latency_ms_p50": "median time from a prompt switch to the first decoded block of the new prompt in "
                             "hand (re-cache, the block's DiT and its decode; in async VAE modes also the blocks "
                             "already in flight), ms",
    "switch_latency_ms_max": "the longest such switch latency, ms",
    "recache_ms_p50": "median time of the KV re-cache forwards of a switch alone (0 without re-cache), ms",
    "switching_fps": "video frames pulled / wall time from the first switch to the last block (the stream's "
                     "steady rate with the switches' cost in it)",
    # training memory model (train_memory)
    "model_peak_gb": "modelled peak GPU memory per rank of one training step: the larger of the backward peak and "
                     "the optimizer-step peak, GB (10^9 bytes)",
    "measured_peak_gb": "measured peak memory of the real step on this device (one rank, measured variants only; "
                        "CUDA: max_memory_allocated over the timed steps), GB",
    "model_error": "model_peak_gb / measured_peak_gb - 1 (what the model leaves out: transient backward buffers, "
                   "allocator fragmentation)",
    "param_gb": "BF16 parameters plus their float32 master copy per rank (sharded with FSDP), GB",
    "grad_gb": "gradients per rank (BF16 from backward; float32 shards with FSDP), GB",
    "optimizer_gb": "AdamW moments (two float32 copies) plus its temporary, per rank, GB",
    "gathered_gb": "FSDP: the gathered BF16 root and two gathered layers, plus one layer's unsharded gradients in "
                   "backward, GB",
    "activation_gb": "activations per rank: what the forward saves for backward plus the layer being recomputed "
                     "under checkpointing, GB",
    "act_mb_per_frame": "activation_gb per latent frame of the clip, MB",
    "step_peak_gb": "modelled memory during the optimizer step (parameter state plus the step's transients), GB",
    "backward_peak_gb": "modelled memory at the backward peak (parameter state, gathered layers, saved "
                        "activations and growing gradients), GB",
    "host_gb": "host (CPU) memory of the offloaded shards, gradients and AdamW state with fsdp + offload, GB",
    "fits_80gb": "whether model_peak_gb fits an 80 GB (80e9 bytes) GPU",
    "measured_step_s": "median wall time of the measured optimizer steps, s",
    # quality proxy (repro/quality/evaluate.py)
    "q_adherence": "prompt adherence: per block, the mean of colour, shape, background and motion adherence "
                   "read by the harness-trained detector, averaged over blocks and videos (0-1, higher is "
                   "better)",
    "q_adh_color": "adherence of the object's colour: the detector's mean class probability of the prompt's "
                   "colour over the block (0-1)",
    "q_adh_shape": "adherence of the object's shape, as for colour (0-1)",
    "q_adh_background": "adherence of the background colour, as for colour (0-1)",
    "q_adh_motion": "motion adherence: the share of blocks whose detected centre moves along the prompt's axis "
                    "faster than a third of the slowest object (and the prompt's way in a shot's first block)",
    "q_flicker": "VBench temporal flickering: (255 - mean absolute pixel change between consecutive frames) / "
                 "255, 1 = static; higher is steadier (real motion also lowers it)",
    "q_smoothness": "VBench-style motion smoothness without weights: (255 - mean error of each odd frame against "
                    "the blend of its neighbours) / 255; 1 for static or constant-velocity change",
    "q_fd": "Frechet distance between per-block features of the generated videos and of real procedural "
            "videos on the detector's embedding (FID/FVD-style; lower = closer to real)",
    "q_kid": "kernel inception distance (KID, polynomial-kernel MMD) on the same features (lower = closer to "
             "real)",
    "q_shot_consistency": "share of consecutive block pairs inside a shot whose detected colour and shape stay "
                          "the same (0-1)",
    "q_cut_adherence": "prompt adherence on the blocks that open a new shot (the first block after a prompt switch)",
    "q_switch_adherence": "prompt adherence on the first two blocks of each new shot (how soon a switch takes effect)",
    "q_switch_continuity": "PSNR between the last frame before a shot boundary and the first after it, dB (a hard "
                           "cut is low, a continuous switch high; the real row is the ground truth's cut)",
    "q_drift_adherence": "adherence of the last third of the blocks minus that of the first third (negative: the "
                         "video drifts away from its prompts over the rollout)",
    "q_psnr_vs_ref": "PSNR of the decoded video against the reference variant (the BF16 teacher at "
                     "reference_steps, BF16 KV, sink on) from the same noise, dB",
    "q_ssim_vs_ref": "SSIM against the same reference video (0-1, 1 = identical)",
    "q_psnr_vs_teacher": "PSNR of the decoded frames against the teacher's reference_steps-step video from the "
                         "same noise, dB",
    "q_latent_rmse_vs_teacher": "RMS difference of the latents against the teacher's reference latents from the "
                                "same noise (lower = closer)",
    "distill_s": "wall time of the DMD distillation of the student, s (0 for rows without distillation)",
    # kernels and layers
    "tflops": "useful FLOPs of one call / its median time, TFLOP/s",
    "ms_p50": "median time of one call, ms",
    "ms_p90": "90th percentile of the time of one call, ms",
    # training
    "step_s": "median wall time of one optimizer step, s",
    "tokens_per_s": "clean + noisy tokens of the clip processed per second at the median step",
    "gemm_share": "share of the profiled step's GPU kernel time spent in GEMMs",
    "attention_share": "share of the profiled step's GPU kernel time spent in attention kernels",
    "quantize_share": "share of the profiled step's GPU kernel time spent quantizing (FP8 / NVFP4)",
    "norm_elementwise_share": "share of the profiled step's GPU kernel time in norms and elementwise kernels",
    "params_b": "parameters of the trained model, billions",
    "step_ms_p50": "median optimizer-step wall time over the timed steps on rank 0 (the SP ranks synchronise "
                   "in every all-to-all, so it is the group's step), ms",
    "step_ms_mean": "mean optimizer-step wall time over the timed steps, ms",
    "peak_mem_gb_max": "highest peak allocated GPU memory over the ranks, GB (CUDA only)",
    "peak_mem_gb_min": "lowest peak allocated GPU memory over the ranks, GB (the naive layout's ranks differ)",
    "loss_last": "training loss at the last timed step",
    # VAE decode
    "decode_fps": "video frames / summed decode time of the timed blocks (decoder alone)",
    "vae_block_ms_p90": "90th percentile of the decode time of one block, ms",
    "ms_per_latent_frame": "median block decode time / latent frames per block, ms",
    "decode_tflop_per_block": "FLOPs of one steady-state block decode (FlopCounterMode on an extra eager block), "
                              "TFLOP",
    "decode_tflops": "decode_tflop_per_block / median block time, TFLOP/s",
    "conv_share": "share of one profiled block's kernel time spent in convolution kernels (layout transforms "
                  "included)",
    # SP inference (measured and analytic)
    "comm_bytes_per_block": "bytes one rank sends per AR block in the SP exchange",
    "comm_kv_bytes_per_block": "the K and V part of comm_bytes_per_block",
    "comm_bytes_per_block_analytic": "the analytic count of the same bytes (impl.parallel.sp_exchange.block_bytes)",
    "tokens_per_rank": "tokens each rank holds: one block's tokens / sp_size (inference), or the teacher-forcing "
                       "sequence / sp_size (training)",
    "kv_comm_ratio": "K/V bytes of this exchange over the BF16 exchange's (9/32 with NVFP4 codes + scales)",
    "collectives_per_block": "collective calls per block (all-to-alls, all-reduces, all-gathers)",
    "compute_ms": "modelled compute time per rank and block (roofline FLOPs / sp at the given rates and "
                  "efficiency), ms",
    "comm_ms": "modelled communication time per block: bytes / link bandwidth + collectives x latency, ms",
    "quant_ms": "modelled NVFP4 quantize + decode time of the K/V exchange per block, ms",
    "est_dit_block_ms": "compute_ms + comm_ms + quant_ms, ms",
    "est_dit_fps": "32 video frames / est_dit_block_ms (modelled DiT-only FPS)",
    "est_e2e_fps_overlap": "video frames / max(DiT block time, VAE block time): modelled end-to-end FPS with the "
                           "decode overlapped on a side stream or another device",
    "est_speedup_vs_sp1": "modelled DiT block time at SP 1 / this one",
    "nvfp4_breakeven_link_gbps": "link bandwidth below which the NVFP4 exchange's saved bytes outweigh its "
                                 "quantize/decode work and extra all-reduces, GB/s (NVFP4 rows only)",
    # SP training (analytic)
    "gemm_tflop_per_rank": "GEMM TFLOP per rank and training step (forward, recompute and backward)",
    "attn_tflop_per_rank": "attention TFLOP per rank and training step (mask counted exactly)",
    "vae_raw_frames_max_rank": "raw video frames the busiest rank VAE-encodes per step",
    "vae_encode_tflop_max_rank": "VAE-encode TFLOP of the busiest rank per step",
    "vae_s": "modelled VAE-encode time of the busiest rank per step: vae_encode_tflop_max_rank / the assumed "
             "encode rate, s (on the critical path: the other ranks wait for it)",
    "comm_bytes_per_rank": "bytes the busiest rank (the root) sends per step: all-to-alls plus layout data",
    "activation_mem_gb": "activation memory per rank under per-block gradient checkpointing, GB",
    "est_step_s": "modelled step time per rank: GEMM + attention at the given rates + communication + VAE "
                  "encode, s",
    "est_tokens_per_s": "teacher-forcing sequence tokens / est_step_s",
    "est_speedup_vs_naive": "est_step_s of the naive layout / this one (same SP size and frames)",
}

# Definitions that differ by benchmark (a metric name used with another meaning there).
BENCHMARK_COLUMN_DOCS: dict[str, dict[str, str]] = {
    "interactive": {
        "block_ms_p50": "median wall time of pulling one block without a switch, ms",
    },
    "gemm_throughput": {
        "tflops": "2 m n k / median matmul time, TFLOP/s",
        "ms_p50": "median time of one matmul, ms",
        "ms_p90": "90th percentile of the time of one matmul, ms",
    },
    "attention_kernels": {
        "ms_p50": "median time of the whole attention call (FP8 quantization of Q, K, V included), ms; CUDA-event "
                  "timed over calls rotating input sets, so no call hits a warm L2",
        "kernel_ms_p50": "median time of the kernel alone on operands quantized beforehand (SDPA: the same call), "
                         "ms",
        "sdpa_ms_p50": "median time of SDPA on the same inputs in the same run, ms",
        "tflops": "4 M N D H / ms_p50 (M queries, N keys, H heads of size D), TFLOP/s",
        "kernel_tflops": "4 M N D H / kernel_ms_p50, TFLOP/s",
        "fp8_kv_ms_p50": "median time of the call with K and V given as FP8 codes, as an FP8 KV cache holds "
                         "them (only Q is quantized in the call: the streaming forward with kv_cache fp8), ms",
        "fp8_kv_tflops": "4 M N D H / fp8_kv_ms_p50, TFLOP/s",
        "speedup_vs_sdpa": "sdpa_ms_p50 / ms_p50 (> 1: faster than SDPA)",
        "fp8_kv_speedup_vs_sdpa": "sdpa_ms_p50 / fp8_kv_ms_p50",
        "sqnr_vs_sdpa_db": "signal-to-quantization-noise ratio of the output against SDPA on random normal "
                           "inputs, dB (higher = closer)",
        "layer_sqnr_min_db": "with source model: the lowest per-layer output SQNR against SDPA at the 5B shapes, dB",
        "layer_sqnr_median_db": "with source model: the median per-layer output SQNR against SDPA, dB",
    },
    "nvfp4_kernels": {
        "ms_p50": "median time of one call, amortised over calls_per_timing back-to-back calls, ms",
        "gbps": "fewest bytes the op must move (input read once, output written once) / ms_p50, GB/s",
        "copy_gbps": "bandwidth of a large device-to-device copy in the same process (bytes read + written), GB/s",
        "fraction_of_copy": "gbps / copy_gbps (1 = as fast as a plain copy)",
        "mbytes_moved": "bytes the op must move per call, MB",
    },
    "quant_linear": {
        "tflops": "2 m N K / ms_p50, TFLOP/s",
        "ms_p50": "median forward time of the layer, activation quantization included, ms",
        "bf16_ms_p50": "median forward time of the BF16 nn.Linear at the same shape in the same process, ms",
        "speedup_vs_bf16": "bf16_ms_p50 / ms_p50 (> 1: faster than BF16)",
        "weight_mb": "bytes of the layer's weights in its storage format, MB",
        "rel_err_vs_bf16": "relative L2 error of the output against the BF16 layer: |out - ref| / |ref|",
    },
    "sp_inference": {
        "dit_fps": "video frames / DiT time of the timed blocks on rank 0 (the SP root)",
        "e2e_fps": "video frames / wall time after the warm-up blocks, the VAE decode on the root included",
        "block_ms_p50": "median wall time of one timed block on rank 0, ms",
        "kv_mem_gb": "bytes of one rank's KV cache (num_heads / sp heads), GB",
        "peak_mem_gb": "peak allocated GPU memory of rank 0, GB (CUDA only)",
    },
    "sp_inference_cost": {
        "comm_bytes_per_block": "bytes one rank sends per block (analytic: q, k, v, o all-to-alls, all-gather, "
                                "NVFP4 amax all-reduces)",
        "kv_mem_gb": "KV cache per rank: the whole window's cache / sp, GB",
    },
    "vae_decode": {
        "vae_block_ms_p50": "median decode time of one timed block, ms (CUDA events on GPU, perf_counter on CPU)",
        "peak_mem_gb": "peak allocated GPU memory of the decode, GB (CUDA only)",
    },
    "train_step": {
        "peak_mem_gb": "peak allocated GPU memory of the training run, GB (CUDA only)",
    },
    "lora_fewstep": {
        "dit_fps": "video frames / DiT time (denoising + re-cache) of the evaluation videos",
    },
    "quality": {
        "dit_fps": "video frames / DiT time of the evaluation videos (empty where other runs shared the device: "
                   "those records keep it as dit_fps_shared_gpu)",
    },
}


def column_doc(column: str, benchmark: str | None = None, fields: dict[str, Any] | None = None) -> str | None:
    """The plain-English definition of a table column, or None when it has none."""
    if column.endswith("_ci95"):
        base = column_doc(column[:-len("_ci95")], benchmark, fields)
        return (f"half-width of the Student-t 95% confidence interval of `{column[:-5]}` over the seeds "
                f"(mean +- this; Markdown tables show it as `mean ± ci95`)") if base else None
    if column in _SPREAD_DOCS:
        return _SPREAD_DOCS[column]
    doc = _plain_column_doc(column, benchmark, fields)
    if doc is None and column.endswith(("_min", "_max")) and _plain_column_doc(column[:-4], benchmark, fields):
        which = "fastest" if column.endswith("_max") == ("fps" in column) else "slowest"
        return f"`{column[:-4]}` of the {which} of the repeated runs (the column itself is their median)"
    return doc


def _plain_column_doc(column: str, benchmark: str | None, fields: dict[str, Any] | None) -> str | None:
    if benchmark and column in BENCHMARK_COLUMN_DOCS.get(benchmark, {}):
        return BENCHMARK_COLUMN_DOCS[benchmark][column]
    field = (fields or {}).get(column)
    if field is not None and getattr(field, "help", ""):
        return str(field.help)
    return COLUMN_DOCS.get(column)


_SPREAD_DOCS = {
    "vs_baseline": "metrics whose 95% interval over seeds separates from the baseline row's (same hardware and "
                   "preset), with the direction (`adherence lower`); `no measurable difference` where every interval "
                   "overlaps the baseline's; empty where a row or its baseline has no intervals",
    "busy": "the repeated runs spread by more than 25% of their median (or a block's p90 exceeded 3x its p50): "
            "something else ran on the machine, so the speed figures of this row say little",
}


def _benchmark(records: list[dict[str, Any]]) -> Any:
    """The records' registered benchmark, or None (with a warning) when it cannot be imported."""
    name = next((r.get("benchmark") for r in records if r.get("benchmark")), None)
    if not name:
        return None
    try:
        from repro.benchmark import get_benchmark

        return get_benchmark(name)
    except Exception as exc:  # e.g. impl/ not importable: reports still work from records
        warnings.warn(f"benchmark {name!r} unavailable ({exc}); tabulating all metrics", stacklevel=3)
        return None


def _benchmark_columns(records: list[dict[str, Any]]) -> tuple[list[str], str | None, str, Any]:
    """(table metrics, plot metric, description, extra plot function or None) from the registry,
    else from the records."""
    bench = _benchmark(records)
    if bench is not None:
        return list(bench.table_metrics), bench.plot_metric, bench.description, bench.extra.get("plots")
    present: list[str] = []
    for r in records:
        for k in r["metrics"]:
            if k not in present and k != "speedup_vs_baseline":
                present.append(k)
    return present, (present[0] if present else None), "", None


def _sort_key(value: Any) -> tuple:
    # Mixed types across records (None, numbers, strings) must still sort deterministically.
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def experiment_frame(records: list[dict[str, Any]], metrics: list[str]) -> pd.DataFrame:
    """One row per record: hardware, variant keys, metrics, speedup (if any), commit."""
    vkeys: list[str] = []
    for r in records:
        for k in r["variant"]:
            if k not in vkeys:
                vkeys.append(k)
    rows = []
    for r, source in zip(records, source_labels(records)):
        row: dict[str, Any] = {"hardware": source}
        row.update({k: r["variant"].get(k) for k in vkeys})
        row.update({m: r["metrics"].get(m) for m in metrics})
        if any("speedup_vs_baseline" in x["metrics"] for x in records):
            row["speedup_vs_baseline"] = r["metrics"].get("speedup_vs_baseline")
        row["commit"] = short_commit(r)
        rows.append(row)
    order = ["hardware", *vkeys]
    rows.sort(key=lambda row: tuple(_sort_key(row[c]) for c in order))  # list.sort is stable
    cols = ["hardware", *vkeys, *metrics]
    if rows and "speedup_vs_baseline" in rows[0]:
        cols.append("speedup_vs_baseline")
    cols.append("commit")
    return pd.DataFrame(rows, columns=cols)


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---"
                         for c in df.columns) + "|"
    body = ["| " + " | ".join(fmt_num(v) if not isinstance(v, str) else v for v in row) + " |"
            for row in df.astype(object).itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def undocumented_columns(columns: list[str], benchmark: Any = None) -> list[str]:
    """Columns of a table that have no definition (a test keeps this empty)."""
    name = getattr(benchmark, "name", None)
    fields = getattr(benchmark, "variant_fields", None)
    return [c for c in columns if column_doc(c, name, fields) is None]


def legend_markdown(columns: list[str], benchmark: Any = None) -> str:
    """The "Columns" legend written under a table: one line per column."""
    name = getattr(benchmark, "name", None)
    fields = getattr(benchmark, "variant_fields", None) or {}
    lines = ["Columns:", ""]
    for c in columns:
        doc = column_doc(c, name, fields)
        if c == "speedup_vs_baseline" and benchmark is not None and doc:
            doc = doc.replace("primary metric", f"primary metric `{benchmark.primary_metric}`")
        kind = " (variant)" if c in fields else ""
        lines.append(f"- `{c}`{kind}: {doc if doc else '(no definition yet)'}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot labels

PLOT_DPI = 110
FIG_WIDTH_IN = 11.0        # 1210 px: every figure stays well under 1800 px wide
WIDE_FIG_WIDTH_IN = 14.0   # 1540 px: two panels side by side
MAX_FIG_WIDTH_IN = 16.0    # 1760 px: three scatter panels and their legend

AXIS_LABELS: dict[str, str] = {
    "e2e_fps": "end-to-end FPS (video frames / s, VAE decode included)",
    "dit_fps": "DiT-only FPS (video frames / s, no decode)",
    "tflops": "throughput (TFLOP/s)",
    "fraction_of_copy": "bandwidth as a fraction of a device copy",
    "decode_fps": "decode FPS (video frames / s)",
    "tokens_per_s": "training throughput (tokens / s)",
    "est_dit_fps": "modelled DiT-only FPS (video frames / s)",
    "est_step_s": "modelled step time per rank (s)",
    "peak_mem_gb": "peak GPU memory (GB)",
    "q_adherence": "prompt adherence (0-1)",
    "q_fd": "Frechet distance to real videos",
    "q_psnr_vs_ref": "PSNR vs the BF16 reference (dB)",
    "q_psnr_vs_teacher": "PSNR vs the teacher's many-step video (dB)",
    "q_flicker": "temporal flickering score (1 = static)",
    "switch_latency_ms_p50": "median prompt-switch latency to the new prompt's first block (ms)",
}

SHORT_AXIS_LABELS: dict[str, str] = {
    "e2e_fps": "end-to-end FPS (frames / s)",
    "dit_fps": "DiT-only FPS (frames / s)",
}

PLOT_TITLES: dict[str, str] = {
    "e2e_fps": "end-to-end generation speed",
    "dit_fps": "DiT-only generation speed",
    "tflops": "kernel throughput",
    "fraction_of_copy": "NVFP4 kernel bandwidth against a device copy",
    "decode_fps": "VAE decode speed",
    "tokens_per_s": "training throughput",
    "est_dit_fps": "modelled SP inference speed",
    "est_step_s": "modelled SP training step time",
    "q_adherence": "prompt adherence of the quality proxy",
    "q_fd": "distance to real videos",
    "q_psnr_vs_ref": "fidelity to the BF16 reference",
    "q_psnr_vs_teacher": "fidelity to the teacher's many-step video",
    "peak_mem_gb": "peak GPU memory",
    "switch_latency_ms_p50": "prompt-switch latency of a live session",
}

_UNITS = ((r"(^|_)fps$", "frames / s"), (r"_ms(_p\d+)?$", "ms"), (r"(^|_)s$", "s"), (r"_gb(_\w+)?$", "GB"),
          (r"tflops$", "TFLOP/s"), (r"_db$", "dB"), (r"_mb$", "MB"), (r"per_s$", "1 / s"))


def axis_label(metric: str) -> str:
    """An axis label with units for ``metric``."""
    if metric in AXIS_LABELS:
        return AXIS_LABELS[metric]
    for pattern, unit in _UNITS:
        if re.search(pattern, metric):
            return f"{metric} ({unit})"
    return metric


def _direction(metric: str) -> str | None:
    if metric.startswith("q_"):
        return "lower" if metric in ("q_fd", "q_kid", "q_latent_rmse_vs_teacher") else "higher"
    if metric == "ttff_ms" or metric.startswith("switch_latency_ms"):
        return "lower"
    if metric.endswith("fraction_of_copy"):
        return "higher"
    from repro.runner import metric_direction

    return metric_direction(metric)


def plot_title(experiment: str, metric: str) -> str:
    what = PLOT_TITLES.get(metric, metric)
    better = _direction(metric)
    return f"{experiment}: {what}" + (f" ({better} is better)" if better else "")


_PRECISION_WORDS = {"bf16": "bf16", "fp8": "fp8", "nvfp4": "nvfp4", "nvfp4_weight_only": "nvfp4 weight-only",
                    "nvfp4_emulated": "nvfp4 W4A4 emulated", "nvfp4_te": "nvfp4 TE"}
_VALUE_WORDS: dict[str, dict[Any, str]] = {
    "precision": _PRECISION_WORDS,
    "mode": _PRECISION_WORDS,
    "attention": {"sdpa": "SDPA", "fa3": "FA3 BF16", "fa3_fp8": "FA3 FP8", "fp8_triton": "fp8 attn (Triton)",
                  "fp8_cudnn": "fp8 attn (cuDNN)", "fp8_emulated": "fp8 attn (emulated)"},
    "bf16_attention_steps": {"none": "one attention kernel every step", "last": "BF16 attn last step",
                             "first": "BF16 attn first step"},
    "frame_format": {"float32": "float32 frames", "uint8": "uint8 frames"},
    "train_precision": {"bf16": "bf16-trained", "nvfp4_emulated": "nvfp4-trained"},
    "model": {"real": "ground truth", "teacher": "teacher", "lora": "LoRA student"},
    "vae_mode": {"sync": "sync", "stream": "stream", "device": "other device"},
    "decoder": {"wan": "wan", "lightvae_p50": "lightvae-50%", "lightvae_p75": "lightvae-75%", "tae": "tae"},
}
_FORMATS = {"steps": "{}-step", "kv_cache": "{} KV", "sp_size": "SP {}", "frames": "{} frames", "keys": "{} keys",
            "num_layers": "{} layers", "m": "m={}", "n": "n={}", "k": "k={}", "rows": "{} rows", "cols": "{} cols",
            "heads": "{} heads", "tokens_per_block": "{} tokens/slot", "halo": "halo {}", "dtype": "{} compute",
            "kv_comm": "{} K/V exchange", "source": "{} inputs",
            "shape": "{}", "sp_layout": "{}", "rule": "{}", "op": "{}", "data": "{} data", "preset": "{}",
            "attention_backend": "{} attention"}
# bool key -> (word when true, word when false)
_BOOL_WORDS = {"compile": ("compiled", "eager"), "cuda_graphs": ("CUDA graphs", "no CUDA graphs"),
               "vae_channels_last": ("channels-last", "channels-first"), "channels_last": ("channels-last", "channels-first"),
               "vae_compile": ("VAE compiled", "VAE eager"), "cudnn_benchmark": ("cuDNN autotune", "no autotune"),
               "sink": ("sink", "no sink"), "distilled": ("DMD student", "teacher"),
               "gradient_checkpointing": ("checkpointing", "no checkpointing")}
# The usual setting of a key, left out of a label unless it is needed to tell rows apart, so a
# label names what is special about a row ("nvfp4 KV", "no sink") rather than everything.
_QUIET = {("kv_cache", "bf16"), ("bf16_attention_steps", "none"), ("sink", True), ("cuda_graphs", False), ("vae_channels_last", False),
          ("vae_compile", False), ("channels_last", False), ("cudnn_benchmark", False),
          ("train_precision", "bf16"), ("gradient_checkpointing", True)}
# Keys named first in a label (then the benchmark's field order), so related words stay together.
_LABEL_ORDER = ("model", "distilled", "train_precision", "mode", "precision", "steps", "compile", "kv_cache",
                "attention", "cuda_graphs", "sink")
_VAE_KEYS = ("decoder", "vae_mode", "vae_channels_last", "vae_compile", "frame_format")


def _phrase(key: str, value: Any, explicit: bool = False) -> str:
    if value is None:
        return ""
    if not explicit and (key, value) in _QUIET:
        return ""
    if isinstance(value, bool):
        yes, no = _BOOL_WORDS.get(key, (key.replace("_", " "), f"no {key.replace('_', ' ')}"))
        return yes if value else no
    if key == "num_layers" and value == 0:
        return "the preset's depth"
    if key == "guidance_scale":
        return "no CFG" if float(value) == 1.0 else f"CFG {fmt_num(value)}"
    if value in _VALUE_WORDS.get(key, {}):
        return _VALUE_WORDS[key][value]
    if key in _FORMATS:
        return _FORMATS[key].format(fmt_num(value) if isinstance(value, float) else value)
    return f"{key}={fmt_num(value) if isinstance(value, float) else value}"


def _phrases(variant: dict[str, Any], keys: list[str], explicit: bool, sep: str = " ") -> str:
    """DiT settings, then (after a comma) the decoder's, each in a fixed order."""
    main = [p for k in keys if k not in _VAE_KEYS for p in [_phrase(k, variant.get(k), explicit)] if p]
    vae = [p for k in _VAE_KEYS if k in keys for p in [_phrase(k, variant.get(k), explicit)] if p]
    return ", ".join(part for part in (sep.join(main), sep.join(vae)) if part)


def _key_order(records: list[dict[str, Any]], order: list[str] | None) -> list[str]:
    keys = [k for k in _LABEL_ORDER if any(k in r["variant"] for r in records)]
    keys += [k for k in (order or []) if k not in keys]
    for r in records:
        keys += [k for k in r["variant"] if k not in keys]
    return keys


def short_labels(records: list[dict[str, Any]], order: list[str] | None = None) -> list[str]:
    """One short, readable label per record naming only the variant keys that differ between
    ``records``, e.g. ``"fp8 2-step compiled, tae stream"`` (``order``: key order, e.g. the
    benchmark's field order). Labels are unique whenever the variants are."""
    keys = _key_order(records, order)
    varying = [k for k in keys if len({repr(r["variant"].get(k)) for r in records}) > 1]
    if not varying:
        return ["(one variant)"] * len(records)
    labels = [_phrases(r["variant"], varying, explicit=False) for r in records]
    ids = [repr(sorted(r["variant"].items())) for r in records]
    for i, lab in enumerate(labels):   # spell out the usual settings only where needed
        if not lab or any(labels[j] == lab and ids[j] != ids[i] for j in range(len(records))):
            labels[i] = _phrases(records[i]["variant"], varying, explicit=True)
    if all(labels) and len({(lab, i) for lab, i in zip(labels, ids)}) == len(set(labels)) == len(set(ids)):
        return labels
    return [", ".join(f"{k}={r['variant'].get(k)}" for k in varying) for r in records]


def common_label(records: list[dict[str, Any]], order: list[str] | None = None,
                 skip: tuple[str, ...] = ("preset",)) -> str:
    """The settings every record shares (for a panel subtitle)."""
    keys = [k for k in _key_order(records, order) if k not in skip]
    same = [k for k in keys if len({repr(r["variant"].get(k)) for r in records}) == 1]
    return _phrases(records[0]["variant"], same, explicit=True, sep=", ") if records else ""


def variant_labels(records: list[dict[str, Any]]) -> list[str]:
    """A ``key=value`` label per record naming the variant keys that differ between the records."""
    keys = sorted({k for r in records for k in r["variant"]})
    varying = [k for k in keys if len({repr(r["variant"].get(k)) for r in records}) > 1]
    if not varying:
        return ["default"] * len(records)
    return [", ".join(f"{k}={r['variant'].get(k)}" for k in varying) for r in records]


def facet_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Records split by (hardware or analytic model, preset): one panel each; the CPU last."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r, source in zip(records, source_labels(records)):
        preset = r["variant"].get("preset")
        groups.setdefault((source, "" if preset is None else str(preset)), []).append(r)

    def order(item):
        (hw, preset), _ = item
        return (hw == "cpu", hw, preset)
    return [(hw + (f", preset {preset}" if preset else ""), recs) for (hw, preset), recs in sorted(groups.items(), key=order)]


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_baseline(record: dict[str, Any]) -> bool:
    base = record.get("baseline")
    return isinstance(base, dict) and base.get("variant_slug") == record.get("variant_slug")


def _wrap(text: str, width: int = 120) -> str:
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- plots

def bar_plot(records: list[dict[str, Any]], metric: str, title: str, path: Path, *,
             order: list[str] | None = None, companion: str | None = None,
             baseline: dict[str, Any] | None = None) -> Path | None:
    """Horizontal bars of ``metric``, one row of panels per (hardware, preset), best value on top.

    Each row is a subfigure headed by its hardware (or the analytic model's rates), preset and
    the settings all its bars share, across the whole row, so no panel title sits under it.
    ``companion`` (e.g. ``dit_fps`` beside ``e2e_fps``) gets its own panel to the right, with
    its own scale, where recorded. The spec's baseline variant (the record whose ``baseline``
    names itself, else the one matching ``baseline``, see :func:`spec_baseline`) is
    drawn in orange with a dashed reference line at its value. Returns None when no record has
    ``metric``."""
    recs = [r for r in records if _num(r["metrics"].get(metric))]
    if not recs:
        return None
    groups = facet_groups(recs)
    pair = companion is not None and any(_num(r["metrics"].get(companion)) for r in recs)
    metrics = [metric, companion] if pair else [metric]
    width = WIDE_FIG_WIDTH_IN if pair else FIG_WIDTH_IN
    heads = []
    for gtitle, grecs in groups:
        base = _baseline_record(grecs, baseline)
        sub = common_label(grecs, order)
        chars = width * _CHARS_PER_IN
        head = gtitle if len(gtitle) < chars else gtitle.replace(", preset ", "\npreset ", 1)  # a long model label
        note = "(orange: the spec's baseline; dashed line at its value)" if base is not None else ""
        if note:
            head += (" " if len(head.split("\n")[-1]) + len(note) < chars else "\n") + note
        if any(_num(r["metrics"].get(f"{metric}_ci95")) for r in grecs):
            head += "\nerror bars: 95% confidence intervals over seeds"
        elif any(_num(r["metrics"].get(f"{metric}_min")) for r in grecs):
            head += "\nwhiskers: fastest and slowest of the repeated runs (bars: their median)"
        heads.append((head + (f"\nall rows: {sub}" if sub else ""), base))
    # a row: its heading, the panel titles and x labels, and at least four bars' height
    heights = [_BAR_ROW_FIXED_IN + _TITLE_LINE_IN * _wrapped_lines(h, width) + _BAR_IN * max(len(g), 4)
               for (h, _), (_, g) in zip(heads, groups)]
    fig = _new_figure(width, sum(heights) + 0.4)
    rows = fig.subfigures(len(groups), 1, squeeze=False, height_ratios=heights)[:, 0]
    higher = _direction(metric) != "lower"
    for sf, (head, base), (_, grecs) in zip(rows, heads, groups):
        labels = short_labels(grecs, order)
        bars_of = sorted(zip(grecs, labels), key=lambda t: float(t[0]["metrics"][metric]), reverse=higher)
        ys = list(range(len(bars_of)))
        axes = sf.subplots(1, len(metrics), squeeze=False)[0]
        for j, (ax, m) in enumerate(zip(axes, metrics)):
            vals = [float(r["metrics"][m]) if _num(r["metrics"].get(m)) else float("nan") for r, _ in bars_of]
            # 95% intervals over seeds (quality) as error bars, where recorded; else the min-max
            # range of repeated runs (speed)
            errs = [float(r["metrics"][f"{m}_ci95"]) if _num(r["metrics"].get(f"{m}_ci95")) else 0.0 for r, _ in bars_of]
            spans = [(v - float(r["metrics"][f"{m}_min"]), float(r["metrics"][f"{m}_max"]) - v)
                     if _num(r["metrics"].get(f"{m}_min")) and _num(r["metrics"].get(f"{m}_max")) else (e, e)
                     for (r, _), v, e in zip(bars_of, vals, errs)]
            xerr = [[lo for lo, _ in spans], [hi for _, hi in spans]] if any(lo or hi for lo, hi in spans) else None
            colors = ["tab:orange" if r is base else ("tab:blue" if j == 0 else "tab:cyan") for r, _ in bars_of]
            ax.barh(ys, vals, height=0.7, color=colors, zorder=2,
                    xerr=xerr, error_kw={"ecolor": "black", "capsize": 3, "lw": 1})
            # Value labels past the bar (and its error bar) on a white box above the baseline line,
            # so the line never runs through a number.
            for y, v, e, (lo, hi) in zip(ys, vals, errs, spans):
                if math.isfinite(v):
                    ax.annotate(fmt_num(v) + (f" ± {fmt_num(e)}" if e else ""), (v + hi if v >= 0 else v - lo, y),
                                xytext=(4 if v >= 0 else -4, 0), textcoords="offset points", va="center",
                                ha="left" if v >= 0 else "right", fontsize=8, zorder=4,
                                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})
            if base is not None and _num(base["metrics"].get(m)):
                bv = float(base["metrics"][m])
                ax.axvline(bv, color="tab:orange", ls="--", lw=1.2, zorder=1)
            ax.set_yticks(ys)
            ax.set_yticklabels([lab + (" (baseline)" if r is base else "") for r, lab in bars_of] if j == 0 else [],
                               fontsize=9)
            for tick, (r, _) in zip(ax.get_yticklabels(), bars_of):
                if r is base:
                    tick.set_color("tab:orange")
            ax.set_ylim(len(bars_of) - 0.5, -0.5)   # best on top
            ax.set_xlabel(axis_label(m), fontsize=9)
            ax.margins(x=0.24 if xerr else 0.16)
            if all(v >= 0 for v in vals if math.isfinite(v)):
                ax.set_xlim(left=0)   # an error bar below zero is cut, not an axis of negative values
            ax.grid(axis="x", alpha=0.3)
            if pair:   # the figure title names the first metric; two panels each say what they show
                ax.set_title(PLOT_TITLES.get(m, m), fontsize=10, loc="left")
        sf.suptitle(_wrap_lines(head, width), fontsize=10, x=0.01, ha="left")
    fig.suptitle(title, fontsize=12)
    save_figure(fig, path)
    return path


_BAR_ROW_FIXED_IN = 1.0   # per bar-plot row: panel titles, x tick labels and the x label, inches
_TITLE_LINE_IN = 0.2      # one line of a row heading at fontsize 10
_BAR_IN = 0.3             # one bar
_CHARS_PER_IN = 12        # characters of fontsize-10 text per inch of figure width (a little under)


def _wrap_lines(text: str, width_in: float) -> str:
    """``text`` wrapped line by line to fit a figure ``width_in`` inches wide."""
    chars = int(width_in * _CHARS_PER_IN)
    return "\n".join(_wrap(line, chars) for line in text.split("\n"))


def _wrapped_lines(text: str, width_in: float) -> int:
    return _wrap_lines(text, width_in).count("\n") + 1


def _baseline_record(records: list[dict[str, Any]], subset: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec's baseline among ``records``: the record whose ``baseline`` names itself (a run
    that measured its speedups), else the one record matching ``subset`` (:func:`spec_baseline`),
    or None."""
    own = [r for r in records if _is_baseline(r)]
    if own:
        return own[0]
    if subset:
        defaults = subset.get("defaults", {})
        hits = [r for r in records if all(r["variant"].get(k, defaults.get(k)) == v
                                          for k, v in subset["values"].items())]
        if len(hits) == 1:
            return hits[0]
    return None


def spec_baseline(records: list[dict[str, Any]], bench: Any = None) -> dict[str, Any] | None:
    """The ``baseline`` mapping of the spec the records name (``record["spec"]``); a key that a
    record lacks (written before the field existed) matches the field's default. None if the spec
    has no baseline or its file is gone."""
    from repro.records import REPO_ROOT

    spec = next((r.get("spec") for r in records if r.get("spec")), None)
    if not spec:
        return None
    path = Path(spec) if Path(spec).is_absolute() else REPO_ROOT / spec
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError):
        return None
    base = data.get("baseline") if isinstance(data, dict) else None
    if not isinstance(base, dict) or not base:
        return None
    fields = getattr(bench, "variant_fields", {}) or {}
    return {"values": base, "defaults": {k: f.default for k, f in fields.items()}}


def scatter_plot(records: list[dict[str, Any]], x_metric: str, y_metrics: list[str], title: str, path: Path, *,
                 order: list[str] | None = None, baseline: dict[str, Any] | None = None) -> Path | None:
    """One row per (hardware, preset) with at least two records that have ``x_metric`` and a
    ``y_metrics`` value; one panel per y metric; markers named in a legend beside the row (the
    baseline, as in :func:`bar_plot`, outlined in black)."""
    from matplotlib.lines import Line2D
    import matplotlib

    groups = []
    for gtitle, grecs in facet_groups(records):
        ys = [m for m in y_metrics if sum(1 for r in grecs if _num(r["metrics"].get(x_metric))
                                            and _num(r["metrics"].get(m))) >= 2]
        if ys:
            groups.append((gtitle, [r for r in grecs if _num(r["metrics"].get(x_metric))], ys))
    if not groups:
        return None
    cols = max(len(ys) for _, _, ys in groups)
    row_h = [max(3.6, 0.22 * len(g) + 1.2) for _, g, _ in groups]
    fig = _new_figure(min(4.8 * cols + 4.2, MAX_FIG_WIDTH_IN), sum(row_h) + 0.5)
    sub = fig.subfigures(len(groups), 1, squeeze=False, height_ratios=row_h)[:, 0]
    cmap = matplotlib.colormaps["tab20"]
    markers = "oDs^vP*Xh<>p"
    for sf, (gtitle, grecs, ys) in zip(sub, groups):
        higher = _direction(ys[0]) != "lower"
        grecs = sorted(grecs, key=lambda r: float(r["metrics"][ys[0]]) if _num(r["metrics"].get(ys[0]))
                       else -math.inf, reverse=higher)      # legend order: best first
        labels = short_labels(grecs, order)
        base = _baseline_record(grecs, baseline)
        style = [(cmap((2 * i) % 20 + (i // 10) % 2), markers[i % len(markers)]) for i in range(len(grecs))]
        axes = sf.subplots(1, cols + 1, squeeze=False, width_ratios=[1] * cols + [0.9])[0]
        for ax, m in zip(axes, ys):
            for r, (c, mk) in zip(grecs, style):
                if _num(r["metrics"].get(m)):
                    ax.scatter([r["metrics"][x_metric]], [r["metrics"][m]], color=c, marker=mk, s=60,
                               edgecolors="black" if r is base else "none", linewidths=1.2, zorder=3)
            ax.set_xlabel(SHORT_AXIS_LABELS.get(x_metric, axis_label(x_metric)), fontsize=9)
            ax.set_ylabel(SHORT_AXIS_LABELS.get(m, axis_label(m)), fontsize=9)
            ax.grid(alpha=0.3)
            better = _direction(m)
            ax.set_title(PLOT_TITLES.get(m, m) + (f" ({better} is better)" if better else ""), fontsize=10)
        for ax in axes[len(ys):cols]:
            ax.set_visible(False)
        leg = axes[-1]
        leg.axis("off")
        handles = [Line2D([], [], ls="", marker=mk, color=c, ms=8,
                          markeredgecolor="black" if r is base else c,
                          label=lab + (" (baseline)" if r is base else ""))
                   for r, lab, (c, mk) in zip(grecs, labels, style)]
        leg.legend(handles=handles, loc="center left", fontsize=8, frameon=False)
        common = common_label(grecs, order)
        sf.suptitle(gtitle + (f"; all points: {_wrap(common, 120)}" if common else ""), fontsize=10, x=0.01,
                    ha="left")
    fig.suptitle(title, fontsize=12)
    save_figure(fig, path)
    return path


# Quality metrics drawn against speed, in order of preference (up to three panels).
_QUALITY_VIEW = ("q_adherence", "q_fd", "q_psnr_vs_ref", "q_psnr_vs_teacher")


def extra_report_plots(experiment: str, records: list[dict[str, Any]], bench: Any, plots_dir: Path,
                       suffix: str = "") -> list[Path]:
    """The views beyond the bar chart: speed vs peak memory where records have both, and speed vs
    quality where a spec measures both."""
    order = list(getattr(bench, "variant_fields", {}) or [])
    baseline = spec_baseline(records, bench)
    out: list[Path] = []
    speed = [m for m in ("e2e_fps", "dit_fps") if any(_num(r["metrics"].get(m)) for r in records)]
    if speed and any(_num(r["metrics"].get("peak_mem_gb")) for r in records):
        # x = memory, one panel per speed metric: which paths are fast AND small
        p = scatter_plot([r for r in records if _num(r["metrics"].get("peak_mem_gb"))], "peak_mem_gb",
                         speed, f"{experiment}: speed vs peak GPU memory (up and to the left is better)",
                         plots_dir / f"{experiment}_speed_vs_memory{suffix}.png", order=order, baseline=baseline)
        if p is not None:
            out.append(p)
    quality = [m for m in _QUALITY_VIEW if any(_num(r["metrics"].get(m)) for r in records)][:3]
    qspeed = next((m for m in ("dit_fps", "e2e_fps") if any(_num(r["metrics"].get(m)) for r in records)), None)
    if quality and qspeed:
        p = scatter_plot(records, qspeed, quality, f"{experiment}: quality vs speed",
                         plots_dir / f"{experiment}_speed_vs_quality{suffix}.png", order=order, baseline=baseline)
        if p is not None:
            out.append(p)
    return out


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` (PNG) atomically, mode 0644 (through impl.io)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI)
    return path


# ---------------------------------------------------------------- device classes and intervals

def device_parts(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The records split into GPU and CPU ones (GPU first, empty parts left out): a CPU smoke run's
    speed is never set beside a GPU's in one table or figure."""
    gpu = [r for r in records if r["hardware"].get("device") == "cuda"]
    cpu = [r for r in records if r["hardware"].get("device") != "cuda"]
    return [(kind, part) for kind, part in (("GPU", gpu), ("CPU", cpu)) if part]


def interval_columns(records: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """``<metric>_ci95`` of the table metrics that some record has (quality: over seeds)."""
    return [f"{m}_ci95" for m in metrics if any(_num(r["metrics"].get(f"{m}_ci95")) for r in records)]


def _verdict(record: dict[str, Any], base: dict[str, Any] | None, metrics: list[str]) -> str | None:
    if base is None:
        return None
    if record is base:
        return "baseline"
    pairs = [(m, record["metrics"].get(m), record["metrics"].get(f"{m}_ci95"), base["metrics"].get(m),
              base["metrics"].get(f"{m}_ci95")) for m in metrics]
    pairs = [p for p in pairs if all(_num(x) for x in p[1:])]
    if not pairs:
        return None
    real = [f"{m.removeprefix('q_')} {'higher' if a > b else 'lower'}" for m, a, ha, b, hb in pairs
            if intervals_separate(float(a), float(ha), float(b), float(hb))]
    return ", ".join(real) if real else "no measurable difference"


def with_verdicts(records: list[dict[str, Any]], metrics: list[str], bench: Any = None) -> list[dict[str, Any]]:
    """The records with ``vs_baseline`` added to their metrics where intervals are recorded: the
    metrics whose 95% interval separates from the baseline's (same hardware and preset), or
    "no measurable difference"."""
    if not interval_columns(records, metrics):
        return records
    baseline = spec_baseline(records, bench)
    out = []
    for _, group in facet_groups(records):
        base = _baseline_record(group, baseline)
        out += [{**r, "metrics": {**r["metrics"], "vs_baseline": _verdict(r, base, metrics)}} for r in group]
    return out


def interval_markdown(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """``mean ± ci95`` cells in place of each metric and its ``_ci95`` column (Markdown tables)."""
    out = df.copy()
    for m in metrics:
        ci = f"{m}_ci95"
        if ci in out.columns and m in out.columns:
            out[m] = [(fmt_num(v) + (f" ± {fmt_num(h)}" if _num(h) else "")) if _num(v) else ""
                      for v, h in zip(out[m], out[ci])]
            out = out.drop(columns=[ci])
    return out


# ---------------------------------------------------------------- the report

_COMPANIONS = {"e2e_fps": "dit_fps"}   # drawn as a lighter second bar beside the plot metric


def build_report(results_dir: str | Path = "results") -> list[Path]:
    """Write tables/<exp>.md|.csv, plots/<exp>*.png and tables/README.md; return written paths.

    Raises :class:`HarnessError` (and writes nothing) when ``results_dir`` holds no records."""
    root = Path(results_dir)
    if not root.is_dir():
        raise HarnessError(f"--results {root}: no such folder; run an experiment first "
                           f"(`python -m repro run SPEC --results {root}`)")
    records = load_records(root)
    if not records:
        raise HarnessError(f"--results {root}: no result records under this folder (nothing to tabulate); "
                           f"run an experiment first (`python -m repro run SPEC --results {root}`)")
    by_exp: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_exp.setdefault(r["experiment"], []).append(r)
    out: list[Path] = []
    index = ["# Result tables", "", "Generated by `python -m repro report`; do not edit by hand. Each table "
             "ends with a legend defining its columns.", "",
             "| experiment | records | hardware | table | csv | plots |", "|---|---:|---|---|---|---|"]
    for exp in sorted(by_exp):
        recs = by_exp[exp]
        bench = _benchmark(recs)
        metrics, plot_metric, description, extra_plots = _benchmark_columns(recs)
        recs = with_verdicts(recs, metrics, bench)
        columns = metrics + interval_columns(recs, metrics)
        if any(r["metrics"].get("vs_baseline") for r in recs):
            columns.append("vs_baseline")
        df = experiment_frame(recs, columns)
        md = [f"# {exp}", ""]
        if description:
            md += [description, ""]
        parts = device_parts(recs)
        for kind, part in parts:   # CPU rows never share a table with GPU rows
            if len(parts) > 1:
                md += [f"## {kind} records" + (" (a CPU smoke run: not comparable with the GPU rows)"
                                               if kind == "CPU" else ""), ""]
            md += [to_markdown(interval_markdown(experiment_frame(part, columns), metrics))]
        md += [legend_markdown(list(interval_markdown(df, metrics).columns), bench)]
        out.append(write_text(root / "tables" / f"{exp}.md", "\n".join(md)))
        csv_path = root / "tables" / f"{exp}.csv"
        out.append(write_text(csv_path, df.to_csv(index=False)))
        plots: list[Path] = []
        for kind, part in parts:   # one figure per device class: CPU speed never beside GPU speed
            suffix = "_cpu" if kind == "CPU" and len(parts) > 1 else ""
            if plot_metric and (bench is None or bench.extra.get("bar_plot", True)):   # or its own figure
                order = list(getattr(bench, "variant_fields", {}) or [])
                png = bar_plot(part, plot_metric, plot_title(exp, plot_metric) + (", CPU" if suffix else ""),
                               root / "plots" / f"{exp}{suffix}.png", order=order,
                               companion=_COMPANIONS.get(plot_metric), baseline=spec_baseline(part, bench))
                plots += [png] if png is not None else []
            plots += extra_report_plots(exp, part, bench, root / "plots", suffix=suffix)
        if extra_plots is not None:   # benchmark-specific figures (e.g. drift curves, one per hardware)
            plots += extra_plots(recs, root / "plots")
        out += plots
        hws = ", ".join(dict.fromkeys(df["hardware"]))
        links = ", ".join(f"[{p.name}](../plots/{p.name})" for p in plots)
        index.append(f"| {exp} | {len(recs)} | {hws} | [{exp}.md]({exp}.md) | [{exp}.csv]({exp}.csv) | {links} |")
    out.append(write_text(root / "tables" / "README.md", "\n".join(index) + "\n"))
    return out
