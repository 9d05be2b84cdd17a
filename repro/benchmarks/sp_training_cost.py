"""``sp_training_cost``: analytic per-rank cost of one teacher-forcing training step under
Balanced vs naive sequence parallelism (SP). Nothing is timed: the numbers follow from the
preset's shapes, so the benchmark runs on any device in well under a second per variant.

Notation: F latent frames, T tokens per latent frame (880 at 1280x704), L = F*T,
S = 2L (the teacher-forcing sequence [clean copy of all F frames ; noisy copy]), blocks of
``frames_per_block`` (8) frames, n_b = F/8 blocks, sp SP ranks, n = S/sp tokens per rank,
d width, f FFN width, H heads of size h_d, N layers, T_x = 512 text tokens per prompt.

Mask (teacher forcing, ``impl.parallel.layout.visible``): clean query of block b sees clean
keys of blocks <= b; noisy query of block b sees clean keys of blocks < b and noisy keys of
block b. Allowed (q, k) pairs = (bT)^2 n_b (n_b + 1) with bT = 8T (:func:`mask_pairs`, exact;
the tests count ``impl.parallel.layout.dense_mask`` against it), density over the dense S^2
matrix = (1 + 1/n_b)/4 (``impl.parallel.layout.attention_density``).

Layouts: which (copy, frame) pairs each rank holds is ``impl.parallel.layout.TeacherForcingLayout``
(n = local_len x T tokens per rank); the balanced VAE windows are
``impl.parallel.sp_vae_encode.window_table``. This module only adds the costs:
- balanced: rank r holds the clean AND noisy copies of latent frames [rF/sp, (r+1)F/sp).
  The SP root sends each other rank its raw-frame window as uint8 (H*W*3 bytes per frame) and
  every rank VAE-encodes only its window: latents [a, b) plus a halo of h latents,
  a' = max(0, a-h); raw frames [0, 1+4(b-1)) if a' = 0 else [4(a'-1), 1+4(b-1)).
- naive: the [clean; noisy] sequence is cut into sp equal contiguous parts (ranks r < sp/2
  clean only, the rest noisy only; sp must be 1 or even). The root encodes the whole clip
  (1+4(F-1) raw frames) and sends every other rank the latents of the frames it needs
  (``needed_frames``: its 2F/sp frames; z_dim x h_lat x w_lat BF16 per latent frame), so the
  root's full encode is on the critical path. sp = 1 is the same as balanced. (``impl``'s
  naive layout also accepts odd sp when 2F splits into whole blocks, with one rank holding
  both copies; this model keeps to the even case, where every rank holds one copy, and
  requires the balanced layout's frames % (sp * 8) == 0 for both layouts so every variant has
  its counterpart.)
Both layouts run identical Ulysses self-attention: q, k, v all-to-all (sequence split ->
head split, each rank attends the full S for H/sp heads) and the output back.

Per-rank FLOPs, forward (2 FLOPs per multiply-add; same per-layer GEMM split as
:mod:`repro.roofline`):
- GEMM per layer: self-attn q,k,v,o 8 n d^2; cross-attn q,o 4 n d^2; FFN 4 n d f.
  Cross-attn k,v over the text: 4 G T_x d^2 per layer, with G = n / (8 T) prompt groups:
  ``impl.train.teacher_forcing`` encodes one prompt per local block and copy (a balanced rank's
  clean and noisy copies of a block each get a group), so G is the same in both layouts; text
  embedder 2 G T_x (d_text d + d^2); patch embedding 2 n (48*4) d; head 2 n d (48*4) (the
  head runs on all tokens, the loss only on noisy ones).
- attention per layer: self 4 h_d (H/sp) S^2 density; cross 4 h_d H n T_x.
Training multiplier: blocks (per-block gradient checkpointing) cost forward + backward (2x)
+ recompute (1x) = 4x forward; the parts outside the checkpointed blocks (patch embedding,
head, text embedder and the per-layer text k,v, computed once in ``encode_text``) cost 3x.
Attention backward is counted as 2x forward like the GEMMs (FlashAttention-style kernels
recompute the scores, so the true factor is ~2.5x); the mask is counted exactly, not at
FlexAttention's 128-token tile granularity.

Per-rank communication (bytes sent out of the busiest rank per step; all-to-alls are
symmetric, so sent = received on every rank):
- all-to-all: each of 4 tensors per layer moves (sp-1)/sp of a [n, d] BF16 tensor,
  in forward, recompute and backward: 3 x N x 4 x (sp-1)/sp x n x d x 2 bytes;
- layout data from the root: balanced, the raw uint8 windows of ranks 1..sp-1; naive, the
  latents of ranks 1..sp-1 (per-frame timesteps, seeds and prompt ids are ignored).
The root is the busiest rank, so comm_bytes_per_rank = all-to-all + root data. The DP
gradient all-reduce (FSDP) is the same for both layouts and is excluded.

Activation memory per rank (per-block gradient checkpointing, BF16 model, FP32 norms):
- saved block inputs of all N layers: N n d 2 bytes;
- one layer's full activations during its recompute + backward: n (68 d + 4 f + 8 H + 36)
  + 32 d per local frame + 8 d bytes. Per token: 12 FP32 d-vectors (FP32 LayerNorm/RMSNorm
  inputs and outputs, adaLN and gate products) = 48 d, 10 BF16 d-vectors (linear inputs; the
  q, k, v, o kept by the self-attention kernel; cross-attention q and output) = 20 d, the
  FFN's GELU input and fc2 input in BF16 = 4 f, 9 FP32 norm statistics = 36 B and two FP32 log-sum-exp rows (self and cross) = 8 H;
  per frame the FP32 modulation vectors (32 d B); per layer the FP32 copies of norm2's
  weight and bias (8 d B). This is exactly what ``torch.autograd.graph.saved_tensors_hooks``
  records for this repo's ``CausalWanBlock`` on CPU with a flash-style attention core that
  keeps q, k, v, o and the log-sum-exp (tests/test_sp_training_cost.py re-measures it); fused
  CUDA norms may keep less. Transient gradient buffers and all-to-all staging are ignored;
- head (outside the blocks): 10 d bytes per token (FP32 norm input and output, BF16 proj input);
- text: per prompt group, 12 d + 4 bytes per text token per layer (the BF16 k, v kept as
  checkpoint inputs, the k-norm's FP32 saved tensors) + 2 d_text + 6 d per text token for
  the embedder (also measured with saved-tensor hooks).
Weights, gradients and optimizer states are not activations and are not counted.

Step time per rank (no overlap of compute, communication and VAE encoding assumed):
  est_step_s = GEMM / gemm_tflops + attn / attn_tflops + comm_bytes / link_gbps
               + VAE-encode FLOPs of the rank encoding the most / vae_encode_tflops.
The VAE term is the critical path where the layouts differ: the naive root encodes the whole
clip while the other ranks wait; a balanced rank encodes its window (plus halo). The encode
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the preset's diffusers
``AutoencoderKLWan`` built on the meta device at full resolution (no weights, no data: only
shapes flow), once per preset: the encoder runs the first frame alone and then chunks of 4
raw frames, so a 1+4k-frame window costs first + k x chunk, with first = flops(1 frame) and
chunk = flops(5 frames) - flops(1 frame). Every balanced window (pseudo-prefix included) and
the full clip have 1+4k frames. No VAE encode has been timed on a GPU here, so the rate
``vae_encode_tflops`` (default 322 TFLOP/s) is an assumption taken from the closest measured
record: the full Wan2.2 VAE *decoder* of the same preset on our H100 (results/vae_decode, BF16,
eager, channels-first, commit bca14e5: 531 TFLOP per block in 1.65 s), i.e. the encoder's
convolutions are assumed to run as fast as the decoder's. At the 5B preset that is 12.6 TFLOP
per 4-frame chunk, so ``vae_encode_ms_per_frame`` (reported) = 9.8 ms per raw frame.
"""

from __future__ import annotations

import functools
from typing import Any

from impl.config import PRESETS, Preset, get_preset
from impl.parallel.groups import ParallelConfigError
from impl.modes import SPLayout, choices
from impl.parallel.layout import TeacherForcingLayout, attention_density
from impl.parallel.sp_vae_encode import window_table
from repro.benchmark import Benchmark, FieldSpec, register
from repro.benchmarks._rates import Rates, analytic_label, rate_fields
from repro.benchmarks._shared import preset_field

BF16 = 2  # bytes per element

# Per-token bytes of one layer's saved activations (see the module docstring).
ACT_FP32_D = 12
ACT_BF16_D = 10
ACT_FFN_BYTES = 4          # per FFN channel: GELU input + fc2 input, BF16
ACT_STATS_BYTES = 36       # 9 FP32 norm statistics
ACT_LSE_BYTES_PER_HEAD = 8  # FP32 log-sum-exp of self- and cross-attention
ACT_FRAME_BYTES_D = 32     # FP32 modulation vectors per frame
ACT_LAYER_BYTES_D = 8      # FP32 copies of norm2's weight and bias
ACT_HEAD_BYTES_D = 10      # head: FP32 norm input/output + BF16 proj input
TEXT_LAYER_BYTES_D = 12    # per text token per layer per prompt group (+4 B)
TEXT_EMBED_BYTES_D = 6     # per text token per prompt group (+ 2 d_text B)


# ------------------------------------------------------------------ shapes and layouts


def make_layout(preset: Preset, frames: int, sp: int, kind: str) -> TeacherForcingLayout:
    """The implementation's teacher-forcing SP layout for ``frames`` latent frames."""
    return TeacherForcingLayout(num_frames=frames, frames_per_block=preset.stream.frames_per_block,
                                sp_size=sp, kind=kind)


def mask_pairs(layout: TeacherForcingLayout, tokens_per_frame: int) -> int:
    """Allowed (query, key) token pairs of the layout's teacher-forcing mask, exactly:
    (bT)^2 n_b (n_b + 1) with bT = frames_per_block x tokens_per_frame. The same in every layout
    (only the token order differs); the tests count ``impl.parallel.layout.dense_mask`` against it
    (closed form: building the mask here would cost ~0.1 s per variant)."""
    bt = layout.frames_per_block * tokens_per_frame
    return bt * bt * layout.num_blocks * (layout.num_blocks + 1)


# ------------------------------------------------------------------ VAE encode FLOPs


@functools.lru_cache(maxsize=None)
def vae_encode_flops(preset_name: str) -> tuple[float, float]:
    """(FLOPs of the first raw frame, FLOPs of each further chunk of temporal_factor (4) raw
    frames) of the preset's VAE encoder at the preset's resolution, counted on the meta device
    (see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from impl.model.vae import build_vae

    preset = get_preset(preset_name)
    with torch.device("meta"):
        vae = build_vae(preset.vae, dtype=torch.bfloat16, device="meta")
    counts = []
    for t in (1, 1 + preset.vae.temporal_factor):
        x = torch.empty(1, 3, t, preset.video.height, preset.video.width, device="meta", dtype=torch.bfloat16)
        with FlopCounterMode(display=False) as counter:
            vae.encode(x)
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1] - counts[0]


def vae_window_flops(preset_name: str, raw_frames: int) -> float:
    """Encode FLOPs of a window of ``raw_frames`` = 1 + 4k frames (0 for an empty window)."""
    t = get_preset(preset_name).vae.temporal_factor
    if raw_frames == 0:
        return 0.0
    if raw_frames < 0 or (raw_frames - 1) % t:
        raise ValueError(f"a VAE window has 1 + {t}k raw frames, got {raw_frames}")
    first, chunk = vae_encode_flops(preset_name)
    return first + (raw_frames - 1) // t * chunk


# ------------------------------------------------------------------ the cost model


def check_variant(variant: dict[str, Any]) -> None:
    """Cross-field checks; ValueError messages name the field and what is allowed."""
    preset = get_preset(variant["preset"])
    sp, frames, layout = variant["sp_size"], variant["frames"], variant["sp_layout"]
    heads, fpb = preset.dit.num_heads, preset.stream.frames_per_block
    if sp < 1:
        raise ValueError(f"sp_size: must be >= 1, got {sp}")
    if heads % sp:
        raise ValueError(f"sp_size: Ulysses splits the {heads} attention heads over the SP ranks, so "
                         f"sp_size must divide {heads}; got {sp}")
    try:  # both layouts are held to the balanced split: whole blocks per rank
        make_layout(preset, frames, sp, "balanced")
    except ParallelConfigError as err:
        raise ValueError(f"frames: must be a positive multiple of sp_size * frames_per_block = "
                         f"{sp} * {fpb} = {sp * fpb} so every rank holds whole {fpb}-frame blocks; "
                         f"got {frames}") from err
    if layout not in choices(SPLayout):
        raise ValueError(f"sp_layout: must be one of {list(choices(SPLayout))}, got {layout!r}")
    if layout == "naive" and sp > 1:
        naive = make_layout(preset, frames, sp, "naive")
        if any(len({c for c, _ in naive.rank_frames(r)}) > 1 for r in range(sp)):  # iff sp is odd
            raise ValueError(f"sp_layout: naive cuts [clean; noisy] into sp_size equal parts at the "
                             f"clean/noisy boundary, so sp_size must be 1 or even; got {sp}")
    if variant.get("halo", 0) < 0:
        raise ValueError(f"halo: must be >= 0 latents, got {variant.get('halo')}")


def _layer_act_bytes(preset: Preset, tokens: int) -> float:
    d, f, h = preset.dit.dim, preset.dit.ffn_dim, preset.dit.num_heads
    per_token = (4 * ACT_FP32_D + BF16 * ACT_BF16_D) * d + ACT_FFN_BYTES * f + ACT_LSE_BYTES_PER_HEAD * h + ACT_STATS_BYTES
    frames = tokens / preset.tokens_per_frame
    return tokens * per_token + frames * ACT_FRAME_BYTES_D * d + ACT_LAYER_BYTES_D * d


def training_cost(preset_name: str, frames: int, sp_size: int, sp_layout: str, *, halo: int = 28,
                  rates: Rates = Rates()) -> dict[str, Any]:
    """All metrics of one variant (see the module docstring for every formula)."""
    variant = {"preset": preset_name, "frames": frames, "sp_size": sp_size, "sp_layout": sp_layout,
               "halo": halo}
    check_variant(variant)
    p = get_preset(preset_name)
    dit = p.dit
    d, f, heads, hd, layers = dit.dim, dit.ffn_dim, dit.num_heads, dit.head_dim, dit.num_layers
    text_tokens = p.text.max_length
    t_frame = p.tokens_per_frame
    fpb = p.stream.frames_per_block
    sp = sp_size
    layout = make_layout(p, frames, sp, sp_layout)
    seq = 2 * frames * t_frame
    n = layout.local_len * t_frame
    patch = dit.in_channels * dit.patch_size[0] * dit.patch_size[1] * dit.patch_size[2]
    groups = layout.local_len // fpb       # prompt groups: one per local block and copy

    # ---- FLOPs per rank (forward), then x4 (blocks) / x3 (outside the blocks)
    density = attention_density(layout)
    pairs = mask_pairs(layout, t_frame)
    gemm_block_fwd = layers * (8 * n * d * d + 4 * n * d * d + 4 * n * d * f)
    attn_fwd = layers * (4 * hd * (heads // sp) * pairs + 4 * hd * heads * n * text_tokens)
    outer_fwd = (layers * 4 * groups * text_tokens * d * d                   # text k, v
                 + 2 * groups * text_tokens * (dit.text_dim * d + d * d)      # text embedder
                 + 2 * n * patch * d + 2 * n * d * patch)                    # patch embed, head
    gemm = 4 * gemm_block_fwd + 3 * outer_fwd     # same on every rank, in both layouts
    attn = 4 * attn_fwd

    # ---- VAE encode and layout data movement
    frame_bytes = p.video.height * p.video.width * 3                     # raw uint8 frame
    lh, lw = p.latent_hw
    latent_bytes = p.vae.z_dim * lh * lw * BF16                           # one latent frame, BF16
    if sp_layout == "balanced" or sp == 1:
        raw = [w.raw_frames for w in window_table(frames, sp, halo, p.vae.temporal_factor)]
        data_root = sum(raw[1:]) * frame_bytes
    else:
        raw = [p.raw_frames(frames)] + [0] * (sp - 1)
        data_root = sum(len(layout.needed_frames(r)) for r in range(1, sp)) * latent_bytes
    vae_flops = [vae_window_flops(preset_name, r) for r in raw]

    # ---- communication: Ulysses all-to-alls (fwd, recompute, bwd) + root data
    a2a = 3 * layers * 4 * (sp - 1) / sp * n * d * BF16
    comm = a2a + data_root

    # ---- activation memory per rank
    act = (layers * n * d * BF16 + _layer_act_bytes(p, n) + ACT_HEAD_BYTES_D * n * d
           + groups * text_tokens * (layers * (TEXT_LAYER_BYTES_D * d + 4)
                                                 + 2 * dit.text_dim + TEXT_EMBED_BYTES_D * d))

    # ---- step time
    gemm_s = gemm / (rates.gemm_tflops * 1e12)
    attn_s = attn / (rates.attn_tflops * 1e12)
    comm_s = comm / (rates.link_gbps * 1e9)
    vae_s = max(vae_flops) / (rates.vae_encode_tflops * 1e12)
    step = gemm_s + attn_s + comm_s + vae_s
    return {
        "tokens_per_rank": n,
        "tokens_global": seq,
        "mask_density": density,
        "gemm_tflop_per_rank": gemm / 1e12,
        "attn_tflop_per_rank": attn / 1e12,
        "vae_raw_frames_max_rank": max(raw),
        "vae_raw_frames_total": sum(raw),
        "vae_encode_tflop_max_rank": max(vae_flops) / 1e12,
        "vae_encode_tflop_total": sum(vae_flops) / 1e12,
        "vae_tflop_per_chunk": vae_encode_flops(preset_name)[1] / 1e12,
        "comm_a2a_bytes_per_rank": a2a,
        "comm_data_bytes_root": data_root,
        "comm_bytes_per_rank": comm,
        "activation_mem_gb": act / 1e9,
        "gemm_s": gemm_s,
        "attn_s": attn_s,
        "comm_s": comm_s,
        "vae_s": vae_s,
        "vae_encode_ms_per_frame": (vae_encode_flops(preset_name)[1] / p.vae.temporal_factor
                                    / (rates.vae_encode_tflops * 1e12) * 1e3),
        "est_step_s": step,
        "est_tokens_per_s": seq / step,
    }


def _source_label(record: dict[str, Any]) -> str:
    """The tables' and plots' name for these records: an analytic model and its rates."""
    return analytic_label(record, "GEMM {gemm_tflops} / attention {attn_tflops} TFLOP/s, link {link_gbps} GB/s, "
                                  "VAE encode {vae_encode_tflops} TFLOP/s")


def run_sp_training_cost(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    check_variant(variant)
    kw = dict(halo=variant["halo"], rates=Rates.from_measure(measure))
    args = (variant["preset"], variant["frames"], variant["sp_size"])
    metrics = training_cost(*args, variant["sp_layout"], **kw)
    sp = variant["sp_size"]
    if variant["sp_layout"] == "naive" or sp == 1:
        metrics["est_speedup_vs_naive"] = 1.0
    elif sp % 2:
        metrics["est_speedup_vs_naive"] = None  # no naive layout for an odd SP size (check_variant)
    else:
        metrics["est_speedup_vs_naive"] = training_cost(*args, "naive", **kw)["est_step_s"] / metrics["est_step_s"]
    return metrics


SP_TRAINING_COST = register(Benchmark(
    name="sp_training_cost",
    description=("Analytic per-rank cost of one teacher-forcing training step (forward, backward, "
                 "checkpoint recompute) under Balanced vs naive sequence parallelism: tokens, GEMM and "
                 "attention TFLOP, VAE encode critical path, bytes sent by the busiest rank (Ulysses "
                 "all-to-alls + layout data; DP all-reduce excluded), activation memory and an "
                 "estimated step time at H100 rates (VAE encode at the Wan2.2 VAE decoder's measured "
                 "H100 rate, an assumption). "
                 "Not measured: see repro/benchmarks/sp_training_cost.py for the formulas."),
    variant_fields={
        "preset": preset_field(default="wan22_ti2v_5b"),
        "frames": FieldSpec(int, 96, min=1, help="latent frames F (multiple of sp_size * frames_per_block)"),
        "sp_size": FieldSpec(int, 4, min=1, help="sequence-parallel ranks (must divide the head count)"),
        "sp_layout": FieldSpec(str, "balanced", choices=list(choices(SPLayout)),
                               help="balanced: clean+noisy of the same frames per rank; naive: contiguous "
                                    "cut of [clean; noisy] (sp_size 1 or even)"),
        "halo": FieldSpec(int, 28, min=0, help="balanced VAE halo in latents (exact from 27)"),
    },
    measure_fields=rate_fields("gemm_tflops", "attn_tflops", "link_gbps", "vae_encode_tflops"),
    run=run_sp_training_cost,
    check_variant=check_variant,
    table_metrics=["tokens_per_rank", "gemm_tflop_per_rank", "attn_tflop_per_rank", "vae_raw_frames_max_rank",
                   "vae_encode_tflop_max_rank", "vae_s", "comm_bytes_per_rank", "activation_mem_gb", "est_step_s",
                   "est_tokens_per_s", "est_speedup_vs_naive"],
    primary_metric="est_tokens_per_s",
    plot="est_step_s",
    extra={"analytic": _source_label},
))
