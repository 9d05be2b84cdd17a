"""``sp_inference_cost``: analytic per-block time and bytes of Ulysses sequence-parallel (SP)
streaming inference (impl.inference.sp), with a BF16 or an NVFP4 K/V exchange.
Nothing is timed: the numbers follow from the preset's shapes and the rates given as measure
fields, so it runs on any device in milliseconds per variant.

Notation: one AR block of S tokens (7040 for the 5B preset: 8 frames x 880), N layers, H heads
of size D, width d, steps denoising forwards + 1 clean re-cache forward per block (x2 batch
with CFG), sp ranks per SP group, each holding S/sp tokens.

Compute per rank and block: the roofline FLOPs of :func:`repro.roofline.block_flops` (GEMMs
of every layer, self-attention against the full 32-frame window, cross-attention to 512 text
tokens) divided by sp: GEMMs, norms and cross-attention run on the rank's S/sp tokens, self-
attention on its H/sp heads. The patch and time embeddings that every rank repeats are
ignored (< 0.1 % of the FLOPs).
  compute_ms = (gemm / sp) / (gemm_tflops x eff) + (attn / sp) / (attn_tflops x eff)
with ``compute_efficiency`` eff the fraction of the roofline the implementation reaches (one
value for every sp: optimistic at large sp, where each rank's GEMMs shrink to S/sp rows).

Bytes per rank and block: :func:`impl.parallel.sp_exchange.block_bytes` (the same function the
tests check against the bytes the exchange really sends): per forward and layer q, k, v
sequence-to-heads and o heads-to-sequence, each (sp-1)/sp of a [S/sp, d] BF16 tensor, with K
and V at 9/32 of that under the NVFP4 exchange (packed E2M1 + E4M3 scale per 16 values); the
NVFP4 exchange adds one amax all-reduce (2 float32) per layer and forward; per forward an
all-gather of the head output. The KV cache itself never moves.

Communication time (no overlap with compute assumed):
  comm_ms = bytes / link_gbps + collectives x latency_us
where collectives per forward = N x (2 all-to-alls [+ 1 all-reduce with NVFP4]) + 1 all-gather.

NVFP4 exchange work (``quant_ms``): every forward each rank quantizes its K and V (B H S/sp
rows of D = 128) and decodes the K and V it receives (the same number of rows), per layer; a
kernel's time is modelled as fixed + per-row, fitted to the H100 records of the
``nvfp4_kernels`` experiment (quantize mse: 0.313 ms at 168 960 rows, 0.512 ms at 675 840;
dequantize_kv: 0.0806 and 0.151 ms). One-GPU NVFP4 storage costs (commit-pass quantize,
history dequantize) are not part of the exchange and not modelled.

  est_dit_block_ms = compute_ms + comm_ms + quant_ms,  est_dit_fps = 32 frames / block time
  est_e2e_fps = frames / (dit + vae_block_ms): the VAE decodes each block on the SP root in
  the loop (vae_mode sync); est_e2e_fps_overlap = frames / max(dit, vae_block_ms): decode
  overlapped on a side stream / another device.
``nvfp4_breakeven_link_gbps``: the link bandwidth below which the NVFP4 exchange's saved bytes
outweigh its quantize/decode work and extra all-reduces (NVFP4 rows only).
KV memory per rank: the whole window's cache / sp (BF16 2 bytes, NVFP4 9/16 byte per element
plus a float32 per (layer, slot)).
"""

from __future__ import annotations

from typing import Any

from impl.inference.config import InferenceConfig
from impl.parallel.sp_exchange import block_bytes
from impl.inference.sp import config_block_bytes
from repro.benchmark import Benchmark, register
from repro.benchmarks._shared import inference_field, preset_field
from repro.benchmarks._rates import Rates, analytic_label, rate_fields
from repro.roofline import block_flops

BF16 = 2
ROWS_REF = (168960, 675840)     # rows of the nvfp4_kernels H100 records (one and four 5B blocks of K)


def _kernel_ms(rows: float, at_ref: tuple[float, float]) -> float:
    """Linear fit fixed + per-row through the two reference timings."""
    per_row = (at_ref[1] - at_ref[0]) / (ROWS_REF[1] - ROWS_REF[0])
    return at_ref[0] + per_row * (rows - ROWS_REF[0])


def check_variant(variant: dict[str, Any]) -> None:
    InferenceConfig.from_variant(variant)   # every knob, and the SP size against the preset


def inference_cost(preset_name: str, sp: int, kv_cache: str, steps: int, *, kv_comm: str = "auto",
                   guidance_scale: float = 1.0, rates: Rates = Rates()) -> dict[str, Any]:
    """All metrics of one variant (formulas in the module docstring)."""
    cfg = InferenceConfig(preset=preset_name, sp_size=sp, kv_cache=kv_cache, kv_comm=kv_comm, steps=steps,
                          guidance_scale=guidance_scale)
    p = cfg.stream_preset
    exchange = cfg.kv_exchange
    dit = p.dit
    cfg_batch = 2 if guidance_scale > 1.0 else 1
    forwards = steps + 1
    fl = block_flops(p, steps, cfg=guidance_scale > 1.0)
    eff = rates.compute_efficiency
    compute_ms = 1e3 * (fl.gemm / sp / (rates.gemm_tflops * 1e12 * eff) + fl.attention / sp / (rates.attn_tflops * 1e12 * eff))

    by = config_block_bytes(cfg, BF16)
    plain = block_bytes(p, sp, element_bytes=BF16, kv_cache="bf16", kv_comm="plain")
    per_forward = dit.num_layers * (2 + (1 if exchange == "nvfp4" else 0)) + 1
    collectives = 0 if sp == 1 else forwards * per_forward + (dit.num_layers if exchange == "plain" and kv_cache == "nvfp4" else 0)
    comm_ms = 1e3 * by.total / (rates.link_gbps * 1e9) + collectives * rates.latency_us * 1e-3

    quant_ms = 0.0
    if exchange == "nvfp4" and sp > 1:
        rows = cfg_batch * dit.num_heads * p.tokens_per_block / sp
        per_layer = 2 * (_kernel_ms(rows, (rates.quantize_ms_1blk, rates.quantize_ms_4blk))
                         + _kernel_ms(rows, (rates.decode_ms_1blk, rates.decode_ms_4blk)))
        quant_ms = forwards * dit.num_layers * per_layer

    dit_ms = compute_ms + comm_ms + quant_ms
    frames = p.vae.temporal_factor * p.stream.frames_per_block
    vae = rates.vae_block_ms
    # KV cache per rank: every layer, K and V, the whole window, num_heads / sp heads.
    elems = dit.num_layers * 2 * cfg_batch * p.stream.kv_window_frames * p.tokens_per_frame * dit.num_heads // sp * dit.head_dim
    kv_bytes = elems * BF16 if kv_cache == "bf16" else elems * 9 // 16 + dit.num_layers * 2 * cfg_batch * p.stream.window_blocks * 4
    out = {
        "tokens_per_rank": p.tokens_per_block // sp,
        "gemm_tflop_per_rank": fl.gemm / sp / 1e12,
        "attn_tflop_per_rank": fl.attention / sp / 1e12,
        "kv_comm": exchange if sp > 1 else "none",
        "comm_bytes_per_block": by.total,
        "comm_bytes_per_block_all_ranks": by.total * sp,
        "comm_kv_bytes_per_block": by.kv,
        "kv_comm_ratio": by.kv / plain.kv if sp > 1 else None,
        "comm_ratio_vs_bf16": by.total / plain.total if sp > 1 else None,
        "collectives_per_block": collectives,
        "compute_ms": compute_ms,
        "comm_ms": comm_ms,
        "quant_ms": quant_ms,
        "est_dit_block_ms": dit_ms,
        "est_dit_fps": frames / (dit_ms / 1e3),
        "est_e2e_fps": frames / ((dit_ms + vae) / 1e3),
        "est_e2e_fps_overlap": frames / (max(dit_ms, vae) / 1e3),
        "kv_mem_gb": kv_bytes / 1e9,
        "nvfp4_breakeven_link_gbps": None,
    }
    if exchange == "nvfp4" and sp > 1:
        saved = plain.total - by.total + 0.0
        extra_ms = quant_ms + forwards * dit.num_layers * rates.latency_us * 1e-3   # + the amax all-reduces
        out["nvfp4_breakeven_link_gbps"] = saved / (extra_ms * 1e-3) / 1e9
    return out


def run_sp_inference_cost(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    check_variant(variant)
    kw = dict(kv_comm=variant["kv_comm"], guidance_scale=variant["guidance_scale"], rates=Rates.from_measure(measure))
    m = inference_cost(variant["preset"], variant["sp_size"], variant["kv_cache"], variant["steps"], **kw)
    one = inference_cost(variant["preset"], 1, variant["kv_cache"], variant["steps"], **kw)
    m["est_speedup_vs_sp1"] = one["est_dit_block_ms"] / m["est_dit_block_ms"]
    return m


def _source_label(record: dict[str, Any]) -> str:
    """The tables' and plots' name for these records: an analytic model and its rates."""
    return analytic_label(record, "GEMM {gemm_tflops} / attention {attn_tflops} TFLOP/s at {compute_efficiency} efficiency, "
                                  "link {link_gbps} GB/s, VAE decode {vae_block_ms} ms per block")


SP_INFERENCE_COST = register(Benchmark(
    name="sp_inference_cost",
    description=("Analytic per-block time and bytes of Ulysses SP streaming inference (one AR block: steps + 1 "
                 "forwards): compute split over the SP ranks at nominal rates x efficiency, all-to-all / "
                 "all-gather bytes per rank (BF16 or NVFP4 K/V exchange), link time + per-collective latency, "
                 "NVFP4 quantize/decode work, KV memory per rank, DiT and end-to-end FPS. Not measured: see "
                 "repro/benchmarks/sp_inference_cost.py for the formulas."),
    variant_fields={
        "preset": preset_field(default="wan22_ti2v_5b"),
        "sp_size": inference_field("sp_size", help="SP ranks (must divide the heads and the block's tokens)"),
        "kv_cache": inference_field("kv_cache"),
        "kv_comm": inference_field("kv_comm"),
        "steps": inference_field("steps"),
        "guidance_scale": inference_field("guidance_scale", help="CFG scale; > 1 doubles the batch"),
    },
    measure_fields=rate_fields("gemm_tflops", "attn_tflops", "link_gbps", "compute_efficiency", "latency_us",
                               "vae_block_ms", "quantize_ms_1blk", "quantize_ms_4blk", "decode_ms_1blk",
                               "decode_ms_4blk"),
    run=run_sp_inference_cost,
    check_variant=check_variant,
    table_metrics=["tokens_per_rank", "comm_bytes_per_block", "comm_kv_bytes_per_block", "kv_comm_ratio",
                   "collectives_per_block", "compute_ms", "comm_ms", "quant_ms", "est_dit_block_ms",
                   "est_dit_fps", "est_e2e_fps_overlap", "kv_mem_gb", "est_speedup_vs_sp1",
                   "nvfp4_breakeven_link_gbps"],
    primary_metric="est_dit_fps",
    plot="est_dit_fps",
    extra={"analytic": _source_label},
))
