"""``train_memory``: per-rank memory of one teacher-forcing training step, as an analytic model
and, for one-GPU variants with ``measured``, beside the real step's peak.

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
80 GB (1e9 B) GPU, ``fits_h200`` with 141 GB. Measured (``measured``, one rank only): the real
Trainer step on the harness device after ``warmup_steps``; on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps (steady state: AdamW state exists),
on the CPU the parameter state present before the step plus the peak of what the step
allocates (a dispatch-mode storage meter; CPU AdamW loops, so it has no foreach temporary).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._python_dispatch

from impl.config import PRESETS, Preset, get_preset
from repro.benchmark import Benchmark, FieldSpec, register
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


# ------------------------------------------------------------------ measurement


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its storage is what this rank holds)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class LiveStorageMeter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages that ops allocate while active and that are still alive
    (weak references): ``live()`` now, ``peak`` since ``reset()`` (tracked unless
    ``track_peak`` is False: it rescans the live set at every allocation). An output sharing a
    storage with an input (a view, an in-place op) allocates nothing. The CPU stand-in for
    ``torch.cuda.max_memory_allocated``, counting only what the measured code allocates."""

    def __init__(self, track_peak: bool = True):
        super().__init__()
        self.track_peak = track_peak
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._refs: dict[int, tuple[Any, int]] = {}
        self.peak = 0

    @staticmethod
    def _storages(tree) -> dict[int, Any]:
        from torch.utils._pytree import tree_leaves

        out = {}
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = _local(t).untyped_storage()
                out[st._cdata] = st
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = self._storages((args, kwargs))
        out = func(*args, **kwargs)
        added = False
        for key, st in self._storages(out).items():
            old = self._refs.get(key)
            if key not in inputs and (old is None or old[0].expired()):
                self._refs[key] = (self._ref(st), st.nbytes())
                added = True
        if added and self.track_peak:
            self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        for k in [k for k, (r, _) in self._refs.items() if r.expired()]:
            del self._refs[k]
        return sum(n for _, n in self._refs.values())

    def reset(self) -> None:
        self.peak = self.live()


def _state_bytes(trainer) -> int:
    """Bytes of the parameter state a rank holds before a step: parameters (local shards),
    master copies, AdamW moments, EMA (distinct storages)."""
    seen: dict[int, int] = {}
    tensors = [*trainer.model.parameters(), *trainer.optimizer.master_state().values()]
    for st in trainer.optimizer.optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    if trainer.ema is not None:
        tensors += list(trainer.ema.shadow.values())
    for t in tensors:
        s = _local(t).untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def measure_step(variant: dict[str, Any], measure: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of the real one-rank step (see the module docstring)."""
    from impl.parallel.groups import init_single_rank_group
    from impl.train.config import TrainConfig
    from impl.train.sampler import ShardedSampler
    from impl.train.synthetic import SyntheticLatentSource
    from impl.train.trainer import Trainer

    preset = get_preset(variant["preset"])
    if variant["sharding"] == "fsdp":
        init_single_rank_group(device)   # FSDP shards over a mesh, even a world of one
    cfg = TrainConfig(preset=variant["preset"], num_layers=variant["num_layers"] or None, frames=variant["frames"],
                      gradient_checkpointing=variant["gradient_checkpointing"], sharding=variant["sharding"],
                      offload=variant["offload"], steps=10**9, ema_start_step=0 if variant["ema"] else None,
                      seed=measure["seed"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, device=device)
    h, w = preset.latent_hw
    source = SyntheticLatentSource(preset.dit.in_channels, cfg.frames, h, w, preset.text.max_length,
                                   preset.dit.text_dim, frames_per_block=preset.stream.frames_per_block,
                                   length=2, seed=measure["seed"])
    sampler = ShardedSampler(len(source), 0, 1, seed=measure["seed"])
    for _ in range(measure["warmup_steps"]):
        trainer.train_step(source, sampler)
    metrics: dict[str, Any] = {}
    if cuda:
        metrics["measured_init_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
        torch.cuda.reset_peak_memory_stats(device)
        stats = [trainer.train_step(source, sampler) for _ in range(measure["steps"])]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = _state_bytes(trainer)
        meter = LiveStorageMeter()
        with meter:
            meter.reset()
            stats = [trainer.train_step(source, sampler) for _ in range(measure["steps"])]
        peak = before + meter.peak
    metrics.update(measured_peak_gb=peak / GB, measured_step_s=statistics.median(s.step_s for s in stats),
                   measured_host_peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB)
    del trainer, source
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return metrics


# ------------------------------------------------------------------ the benchmark


def check_variant(variant: dict[str, Any]) -> None:
    gpus, sp = variant["gpus"], variant["sp_size"] or variant["gpus"]
    if gpus % sp:
        raise ValueError(f"sp_size: must divide gpus; got sp_size {sp}, gpus {gpus}")
    if variant["offload"] and variant["sharding"] != "fsdp":
        raise ValueError("offload: CPU offload moves FSDP shards; it needs sharding 'fsdp'")
    if variant["measured"] and gpus != 1:
        raise ValueError(f"measured: the harness runs one process, so only gpus 1 is measured here "
                         f"(multi-GPU peaks: the sp_training benchmark); got gpus {gpus}")
    preset = get_preset(variant["preset"])
    heads, fpb = preset.dit.num_heads, preset.stream.frames_per_block
    if heads % sp:
        raise ValueError(f"sp_size: must divide the {heads} attention heads; got {sp}")
    if variant["frames"] % (sp * fpb):
        raise ValueError(f"frames: must be a multiple of sp_size * frames_per_block = {sp * fpb} (whole "
                         f"blocks per rank); got {variant['frames']}")


def run_train_memory(variant: dict[str, Any], measure: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    check_variant(variant)
    device = torch.device(hardware["device"])
    sp = variant["sp_size"] or variant["gpus"]
    t0 = time.perf_counter()
    metrics = memory_model(variant["preset"], frames=variant["frames"], gpus=variant["gpus"], sp_size=sp,
                           sharding=variant["sharding"], offload=variant["offload"],
                           checkpointing=variant["gradient_checkpointing"], ema=variant["ema"],
                           num_layers=variant["num_layers"],
                           foreach=device.type == "cuda" if variant["measured"] else True)
    metrics["model_s"] = time.perf_counter() - t0
    if variant["measured"]:
        metrics.update(measure_step(variant, measure, device))
        metrics["model_error"] = metrics["model_peak_gb"] / metrics["measured_peak_gb"] - 1.0
    return metrics


# ------------------------------------------------------------------ report: figure and labels

# The GPU memory lines drawn in the figure: (GB, label).
_GPU_LINES = ((80.0, "80 GB (H100)"), (H200_GB, f"{H200_GB:g} GB (H200)"))


def _source_label(record: dict[str, Any]) -> str | None:
    """Tables and plots name a modelled-only row as the model, not the CPU that computed it."""
    return None if record["variant"].get("measured") else "analytic memory model (no device)"


def _series_label(variant: dict[str, Any]) -> str:
    words = ["replicated (sharding none)" if variant.get("sharding") == "none" else "FSDP"]
    if variant.get("offload"):
        words.append("+ CPU offload")
    if not variant.get("gradient_checkpointing", True):
        words.append("no checkpointing")
    if variant.get("ema"):
        words.append("+ EMA")
    return " ".join(words)


def memory_plots(records: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """``train_memory.png`` in place of the generic bar chart: one row per preset of the modelled
    rows, a panel per GPU count with the modelled peak per rank over the clip length, a line per
    sharding setting, and the 80 / 141 GB lines; then the measured rows, the model's peak beside
    the measured one."""
    from matplotlib.lines import Line2D

    from repro.report import _new_figure, fmt_num, hardware_label, save_figure

    modelled = [r for r in records if not r["variant"].get("measured")]
    measured = [r for r in records if r["variant"].get("measured") and "measured_peak_gb" in r["metrics"]]
    presets = sorted({str(r["variant"].get("preset")) for r in modelled})
    width = 15.0
    row_h = [4.0] * len(presets) + ([1.4 + 0.55 * len(measured)] if measured else [])
    if not row_h:
        return []
    fig = _new_figure(width, sum(row_h) + 0.5)
    rows = list(fig.subfigures(len(row_h), 1, squeeze=False, height_ratios=row_h)[:, 0])
    colors = {"replicated": "tab:red", "FSDP": "tab:blue", "FSDP + CPU offload": "tab:green"}
    rank = {name: i for i, name in enumerate(colors)}
    labels = sorted({_series_label(r["variant"]) for r in modelled},   # lines first, in the colours' order
                    key=lambda s: ("no checkpointing" in s, rank.get(s.split(" no ")[0].replace(" (sharding none)", ""), 9), s))
    style = {}
    for lab in labels:
        base = lab.split(" no checkpointing")[0].replace(" (sharding none)", "")
        ckpt = "no checkpointing" not in lab
        style[lab] = dict(color=colors.get(base, "tab:gray"), marker="o" if ckpt else "X", ms=6 if ckpt else 9,
                          ls="-" if ckpt else "none", lw=1.6)
    for sf, preset in zip(rows, presets):
        recs = [r for r in modelled if str(r["variant"].get("preset")) == preset]
        gpus = sorted({int(r["variant"]["gpus"]) for r in recs})
        axes = sf.subplots(1, len(gpus), squeeze=False, sharey=True)[0]
        frames = sorted({int(r["variant"]["frames"]) for r in recs})
        for ax, g in zip(axes, gpus):
            for lab in labels:
                pts = sorted((int(r["variant"]["frames"]), float(r["metrics"]["model_peak_gb"]))
                             for r in recs if int(r["variant"]["gpus"]) == g and _series_label(r["variant"]) == lab)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], **style[lab])
            for gb, _ in _GPU_LINES:
                ax.axhline(gb, color="black", ls="--" if gb == 80.0 else ":", lw=1.0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.set_xlim(frames[0] / 1.3, frames[-1] * 1.3)
            ax.minorticks_off()
            ax.set_xlabel("latent frames per clip", fontsize=9)
            sps = sorted({int(r["variant"]["sp_size"] or g) for r in recs if int(r["variant"]["gpus"]) == g})
            ax.set_title(f"{g} GPU{'s' if g > 1 else ''} (SP {', '.join(map(str, sps))})", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("modelled peak memory per rank (GB)", fontsize=9)
        handles = [Line2D([], [], **style[lab], label=lab) for lab in labels]
        handles += [Line2D([], [], color="black", ls="--" if gb == 80.0 else ":", lw=1.0, label=name)
                    for gb, name in _GPU_LINES]
        sf.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
        sf.suptitle(f"analytic memory model (no device), preset {preset}: BF16 compute, float32 master weights "
                    f"and AdamW; checkpointing per block unless marked X", fontsize=10, x=0.01, ha="left")
    if measured:
        measured.sort(key=lambda r: (hardware_label(r["hardware"]), str(r["variant"].get("preset")),
                                     rank.get(_series_label(r["variant"]).replace(" (sharding none)", ""), 9)))
        sf = rows[-1]
        ax = sf.subplots(1, 1)
        names = [f"{hardware_label(r['hardware'])}, preset {r['variant'].get('preset')}, "
                 f"{_series_label(r['variant'])} (model error {100 * r['metrics']['model_error']:+.1f}%)"
                 for r in measured]
        small = max(float(r["metrics"]["measured_peak_gb"]) for r in measured) < 1.0   # a tiny preset: MB
        scale, unit = (1e3, "MB") if small else (1.0, "GB")
        ys = list(range(len(measured)))
        for off, key, color, what in ((-0.18, "model_peak_gb", "tab:blue", "model"),
                                      (0.18, "measured_peak_gb", "tab:orange", "measured")):
            vals = [float(r["metrics"][key]) * scale for r in measured]
            bars = ax.barh([y + off for y in ys], vals, height=0.34, color=color, label=what)
            ax.bar_label(bars, labels=[fmt_num(v) for v in vals], padding=3, fontsize=8)
        ax.set_yticks(ys, names, fontsize=9)
        ax.set_ylim(len(ys) - 0.5, -0.5)
        ax.margins(x=0.12)
        ax.set_xlabel(f"peak memory of one training step, one rank ({unit})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        sf.legend(loc="outside right center", fontsize=9, frameon=False)
        sf.suptitle("the model against the measured step (measured: true, one rank)", fontsize=10, x=0.01,
                    ha="left")
    fig.suptitle("train_memory: peak memory per rank of one teacher-forcing training step (lower is better)",
                 fontsize=12)
    path = plots_dir / "train_memory.png"
    save_figure(fig, path)
    return [path]


TRAIN_MEMORY = register(Benchmark(
    name="train_memory",
    description=("Per-rank memory of one teacher-forcing training step, analytic (parameters, gradients, "
                 "AdamW state, master weights, gathered FSDP layers, activations with and without "
                 "checkpointing, CPU offload) for sharding none vs FSDP over 1-8 GPUs, with the real "
                 "one-rank step's peak beside it where measured. See repro/benchmarks/train_memory.py."),
    variant_fields={
        "preset": FieldSpec(str, "wan22_ti2v_5b", choices=sorted(PRESETS), help="model size preset"),
        "num_layers": FieldSpec(int, 0, min=0, help="depth override (0 = the preset's depth)"),
        "frames": FieldSpec(int, 24, min=1, help="latent frames per clip (teacher forcing doubles the tokens)"),
        "gpus": FieldSpec(int, 1, min=1, max=64, help="ranks = GPUs (FSDP shards over all of them)"),
        "sp_size": FieldSpec(int, 0, min=0, help="SP ranks per group (0 = all gpus); the rest is DP"),
        "sharding": FieldSpec(str, "none", choices=["none", "fsdp"],
                              help="none = replicated master weights and AdamW; fsdp = sharded over every rank"),
        "offload": FieldSpec(bool, False, help="fsdp: shards, gradients and AdamW state in host memory"),
        "gradient_checkpointing": FieldSpec(bool, True, help="per-block activation checkpointing"),
        "ema": FieldSpec(bool, False, help="keep a float32 EMA of the weights"),
        "measured": FieldSpec(bool, False, help="also run the real step on this device (gpus 1) and report its peak"),
    },
    measure_fields={
        "warmup_steps": FieldSpec(int, 1, min=1, help="steps before measuring (AdamW state, compilation)"),
        "steps": FieldSpec(int, 2, min=1, help="measured optimizer steps"),
        "seed": FieldSpec(int, 0, min=0),
    },
    run=run_train_memory,
    check_variant=check_variant,
    table_metrics=["model_peak_gb", "measured_peak_gb", "model_error", "param_gb", "grad_gb", "optimizer_gb",
                   "gathered_gb", "activation_gb", "act_mb_per_frame", "step_peak_gb", "backward_peak_gb",
                   "host_gb", "fits_80gb", "measured_step_s"],
    primary_metric="model_peak_gb",
    extra={"plots": memory_plots, "bar_plot": False, "analytic": _source_label},
))
