"""Column legends: the plain-English definition of every table column.

Every column of every table has a definition, written under the table (:func:`legend_markdown`).
Variant columns use the benchmark's FieldSpec help; metrics come from here (taken from the
docstrings of repro/benchmarks/*.py and repro/quality/*.py); a metric used with another meaning
by one benchmark is defined in :data:`BENCHMARK_COLUMN_DOCS`. tests/test_report_plots.py fails
when a benchmark's table metric or variant field has no definition, so new metrics get documented.
"""

from __future__ import annotations

from typing import Any

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
