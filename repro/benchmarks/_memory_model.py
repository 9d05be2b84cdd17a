"""The analytic memory model of ``train_memory``: per-rank bytes of one teacher-forcing training
step (the benchmark, and the measured step beside it: repro/benchmarks/train_memory.py).

Notation: P parameters (counted on the meta device: P_b per block without the text projections,
P_t the text projections attn2.{to_k, norm_k, to_v} of one layer, P_r the rest, the root), N
layers, W ranks (``gpus``), sp SP ranks of them, n = 2 F T / sp tokens per rank (F latent
frames, T tokens per frame), d width, c = 2 (BF16 compute), m = 4 (float32 master) bytes.

Parameter state per rank, in bytes:

- sharding none: BF16 params c P, float32 master m P, AdamW moments 2 m P (replicated), BF16
  gradients c P from backward to the end of the step; in the step the float32 master gradients
  m P (``MasterWeightAdamW`` casts all of them before clipping) and foreach AdamW's one
  temporary m P (``_foreach_sqrt`` of the second moments; only one parameter's worth when
  AdamW loops, on the CPU), plus two gradient all-reduce buckets when W > 1;
- sharding fsdp: float32 shards m P / W, their gradients m P / W (reduce-scattered during
  backward, freed after the step), AdamW moments 2 m P / W (fused AdamW: no temporary); in
  forward and backward the root stays gathered in BF16 (c P_r) and two layers are gathered at
  a time (the current and the prefetched one, c (P_b + P_t) each); a layer's backward holds its
  unsharded BF16 gradients, their float32 reduce-scatter copy and its output ((c + m) P_b +
  m P_b / W);
- fsdp + offload: the shards, their gradients and AdamW state live in host memory
  (``host_gb``); the GPU keeps the gathered layers and root, their host-to-device staging
  (m (P_b + P_t) / W) and the layer-gradient buffers, and the optimizer steps on the CPU.
- EMA (``ema``): one float32 copy, m P (replicated) or m P / W (sharded, on the host with offload).

Activations per rank (BF16 model, FP32 norms; a flash-style attention kernel keeping q, k, v,
o and its log-sum-exp, which FlexAttention is on CUDA): what the forward leaves for backward is

  saved = blocks + text + head + time + patch + rope, with
  blocks = N x 2 d n (each checkpointed layer's input)  or  N x layer(n) (no checkpointing),
  layer(n) = one layer's saved tensors (``sp_training_cost._layer_act_bytes``, measured there),
  text   = G L (N (12 d + 4) + 2 d_text + 6 d)   (G prompt groups of L tokens),
  head   = n (10 d + 8) + 4 d per local frame     (norm_out input/output/statistics, proj_out input),
  time   = per local frame 2 freq_dim + 20 d (8 d without checkpointing: the blocks' temb6 input
           is only kept as a checkpoint input),
  patch  = n x 2 x C_in x prod(patch)              (the patch embedding's input latents),
  rope   = n x 4 x head_dim                         (the float32 cos / sin tables),

exactly what a CPU forward of this repo's model leaves alive (tests/test_fsdp.py counts
the live storages with a dispatch-mode meter). In backward under checkpointing the layer being
recomputed adds layer(n); the model walks the layers back to front, the saved inputs shrinking
and the gradients growing, and takes the largest sum. Transient backward buffers (attention
gradients, GEMM workspaces), allocator fragmentation and the CUDA context are not modelled:
``model_error`` shows what that leaves out.

Peak per rank = max(backward peak, optimizer-step peak); ``fits_80gb`` compares it with an
80 GB (1e9 B) GPU, ``fits_h200`` with 141 GB.

The leading underscore keeps this module out of the benchmark registry scan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from impl.config import Preset, get_preset
from repro.benchmarks.sp_training_cost import (ACT_HEAD_BYTES_D, TEXT_EMBED_BYTES_D, TEXT_LAYER_BYTES_D,
                                               _layer_act_bytes, make_layout)

C, M = 2, 4                 # BF16 compute and float32 master bytes per element
GB = 1e9
BUCKET_ELEMENTS = 1 << 25   # impl.parallel.gradients.BUCKET_ELEMENTS (kept import-free of impl.parallel)
H200_GB = 141.0


# ------------------------------------------------------------------ parameter counts


@dataclass(frozen=True)
class ParamCounts:
    total: int
    block: int      # one layer, without its text projections
    text: int       # one layer's attn2.to_k, norm_k, to_v
    root: int       # patch embedding, condition embedder, head
    head: int       # the head's part of the root (proj_out, scale_shift_table): its gradients come first
    largest: int    # the largest single tensor
    layers: int


@functools.lru_cache(maxsize=None)
def param_counts(preset_name: str, num_layers: int = 0) -> ParamCounts:
    """Exact parameter counts of the preset's DiT, built on the meta device (no memory)."""
    from impl.model.dit import CausalWanDiT

    dit = get_preset(preset_name).dit
    if num_layers:
        dit = dataclasses.replace(dit, num_layers=num_layers)
    with torch.device("meta"):
        model = CausalWanDiT(dit, device="meta", dtype=torch.bfloat16)
    count = lambda mod: sum(p.numel() for p in mod.parameters())   # noqa: E731
    blk = model.blocks[0]
    text = sum(count(m) for m in (blk.attn2.to_k, blk.attn2.norm_k, blk.attn2.to_v))
    total = count(model)
    root = total - dit.num_layers * count(blk)
    head = count(model.proj_out) + model.scale_shift_table.numel()
    return ParamCounts(total, count(blk) - text, text, root, head, max(p.numel() for p in model.parameters()),
                       dit.num_layers)


# ------------------------------------------------------------------ activations


def activation_terms(preset: Preset, frames: int, sp: int, layers: int, checkpointing: bool) -> dict[str, float]:
    """Bytes per rank of the activation model (module docstring): ``saved`` (left by the
    forward), ``layer`` (one layer's tensors, recomputed in backward under checkpointing),
    ``input`` (one checkpointed layer input) and the outer terms."""
    dit = preset.dit
    d, t = dit.dim, preset.tokens_per_frame
    layout = make_layout(preset, frames, sp, "balanced")
    n = layout.local_len * t
    local_frames = layout.local_len
    groups = layout.local_len // preset.stream.frames_per_block
    text_tokens = preset.text.max_length
    layer = _layer_act_bytes(preset, n)
    text = groups * text_tokens * (layers * (TEXT_LAYER_BYTES_D * d + 4) + 2 * dit.text_dim + TEXT_EMBED_BYTES_D * d)
    head = n * (ACT_HEAD_BYTES_D * d + 8) + local_frames * 4 * d
    time_emb = local_frames * (2 * dit.freq_dim + (20 if checkpointing else 8) * d)
    patch = n * C * dit.in_channels * math.prod(dit.patch_size)
    rope = n * 4 * dit.head_dim
    inp = C * n * d
    blocks = layers * (inp if checkpointing else layer)
    outer = text + head + time_emb + patch + rope
    return {"tokens": n, "layer": layer, "input": inp, "blocks": blocks, "text": text, "head": head,
            "time": time_emb, "patch": patch, "rope": rope, "outer": outer, "saved": blocks + outer}


# ------------------------------------------------------------------ the memory model


def memory_model(preset_name: str, *, frames: int, gpus: int, sp_size: int, sharding: str, offload: bool,
                 checkpointing: bool, ema: bool = False, num_layers: int = 0, foreach: bool = True) -> dict[str, Any]:
    """Per-rank bytes of one steady-state training step (see the module docstring); the
    returned dict holds GB (1e9 B) figures."""
    if sharding not in ("none", "fsdp"):
        raise ValueError(f"sharding: must be 'none' or 'fsdp', got {sharding!r}")
    if offload and sharding != "fsdp":
        raise ValueError("offload: CPU offload moves FSDP shards; it needs sharding 'fsdp'")
    if gpus % sp_size:
        raise ValueError(f"sp_size: {sp_size} does not divide gpus={gpus}")
    preset = get_preset(preset_name)
    pc = param_counts(preset_name, num_layers)
    P, N, W = pc.total, pc.layers, gpus
    act = activation_terms(preset, frames, sp_size, N, checkpointing)
    layer_params = pc.block + pc.text

    if sharding == "none":
        params, master, optim = C * P, M * P, 2 * M * P
        ema_b = M * P if ema else 0
        grads_full = C * P
        grad_bytes, per_param_grad = C, C
        gathered = block_grad = 0.0
        step_extra = grads_full + M * P + (M * P if foreach else M * pc.largest)
        step_extra += 2 * C * min(P, BUCKET_ELEMENTS) if W > 1 else 0
        gpu_state = params + master + optim + ema_b
        host = 0.0
    else:
        shard = P / W
        params, master, optim = M * shard, 0.0, 2 * M * shard
        ema_b = M * shard if ema else 0
        grads_full = M * shard
        per_param_grad = M / W
        gathered = C * pc.root + 2 * C * layer_params
        # A layer's unsharded BF16 gradients and, with W > 1, their float32 reduce-scatter input
        # (at W = 1 that buffer becomes the sharded gradient itself).
        block_grad = C * pc.block + (M * pc.block if W > 1 else 0.0)
        adam_tmp = 0.0                                # ShardedAdamW is fused
        if offload:
            gathered += M * layer_params / W          # the next unit's shard, copied to the GPU
            gpu_state, host = 0.0, params + optim + ema_b + grads_full + adam_tmp
            step_extra = 0.0
            per_param_grad = 0.0                      # sharded gradients go straight to the host
        else:
            gpu_state, host = params + optim + ema_b, 0.0
            step_extra = grads_full + adam_tmp

    # Backward: the head first (everything saved), then layer N-1 down to 0 (saved inputs or
    # layer activations shrink, gradients grow; the head's activations are gone), then the text,
    # time and patch embeddings, which the forward ran first and backward reaches last.
    # A replicated layer's gradients accumulate in place as its backward runs; an FSDP layer's
    # are its unsharded buffers (block_grad) until its reduce-scatter adds them to the shards.
    early = act["text"] + act["time"] + act["patch"] + act["rope"]
    own = 0 if sharding == "fsdp" else 1
    bwd = act["saved"] + per_param_grad * pc.head
    for i in range(N - 1, -1, -1):
        held = early + (i + 1) * (act["input"] if checkpointing else act["layer"])
        if checkpointing:
            held += act["layer"]
        done = pc.head + (N - 1 - i + own) * layer_params
        bwd = max(bwd, held + per_param_grad * done + block_grad)
    bwd = max(bwd, early + per_param_grad * P)
    backward_peak = gpu_state + gathered + bwd
    step_peak = gpu_state + step_extra
    peak = max(backward_peak, step_peak)
    act_peak = act["saved"] + (act["layer"] if checkpointing else 0.0)
    return {
        "params_b": P / 1e9,
        "param_gb": (params + master) / GB,
        "grad_gb": grads_full / GB,
        "optimizer_gb": optim / GB,
        "ema_gb": ema_b / GB,
        "gathered_gb": (gathered + block_grad) / GB,
        "activation_gb": act_peak / GB,
        "act_saved_gb": act["saved"] / GB,
        "act_mb_per_frame": act_peak / frames / 1e6,
        "tokens_per_rank": act["tokens"],
        "step_transient_gb": step_extra / GB,
        "backward_peak_gb": backward_peak / GB,
        "step_peak_gb": step_peak / GB,
        "model_peak_gb": peak / GB,
        "host_gb": host / GB,
        "fits_80gb": peak / GB <= 80.0,
        "fits_h200": peak / GB <= H200_GB,
    }
