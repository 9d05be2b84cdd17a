"""Teacher-forcing AR trainer: one loop for every dtype, precision, SP size and layout.

Per optimizer step and micro-step, each rank: takes its sample (DP-sharded, deterministic in
the step), turns it into the clean latents its layout needs (VAE encode with the SP halo, or a
pre-encoded latent sample), draws the shared per-block timesteps and clip noise, runs
:func:`~impl.train.teacher_forcing.teacher_forcing_loss` and back-propagates. Gradients are
summed over SP ranks and averaged over DP replicas, clipped, and AdamW updates float32
master weights. All randomness is a function of (seed, step), so a resumed run continues
exactly where the interrupted one would have been (the step is the whole RNG state).

``sharding`` none replicates the parameters, master weights and AdamW state on every rank
(gradients all-reduced after backward, single-file checkpoints from rank 0); ``fsdp`` shards
all three over every dp x sp rank (:mod:`impl.parallel.fsdp`: gradients reduce-scattered in
backward with the same sum-over-SP / mean-over-DP convention, sharded DCP checkpoints that
resume on any world size).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from impl.config import Preset, get_preset
from impl.inference.build import torch_dtype
from impl.model.dit import CausalWanDiT
from impl.parallel.attention import teacher_forcing_core
from impl.parallel.gradients import sp_all_reduce_sum, sync_gradients
from impl.parallel.groups import ParallelConfigError, ParallelGroups, single_process
from impl.parallel.layout import TeacherForcingLayout
from impl.train.checkpoint import (SHARDED, SINGLE_FILE, CorruptCheckpoint, TrainState, WeightsView, checkpoint_format,
                                   checkpoint_meta, list_checkpoints, load_checkpoint, load_sharded_checkpoint,
                                   save_checkpoint, save_sharded_checkpoint)
from impl.train.config import TrainConfig, upgrade_config_dict
from impl.train.error_recycling import ErrorRecycler
from impl.train.flow import FlowSchedule, shared_generator
from impl.train.optim import EMA, MasterWeightAdamW, ShardedAdamW
from impl.train.sampler import ShardedSampler
from impl.train.samples import LatentSample
from impl.train.synthetic import SyntheticLatentSource
from impl.train.teacher_forcing import TFInputs, teacher_forcing_loss

log = logging.getLogger(__name__)

# Fields a checkpoint must share with the run that resumes it.
_RESUME_FIELDS = ("preset", "num_layers", "frames", "dtype", "precision")


def build_training_model(cfg: TrainConfig, preset: Preset, device: torch.device) -> CausalWanDiT:
    """The DiT in the run's dtype, its block linears in the run's precision (quantized ones keep
    BF16 master weights)."""
    dit_cfg = preset.dit
    if cfg.num_layers is not None:
        dit_cfg = dataclasses.replace(dit_cfg, num_layers=cfg.num_layers)
    torch.manual_seed(cfg.seed)
    model = CausalWanDiT(dit_cfg, device=device, dtype=torch_dtype(cfg.dtype))
    if cfg.precision != "bf16":
        from impl.quant.apply import quantize_model
        from impl.quant.config import QuantConfig
        quantize_model(model, QuantConfig.for_training(cfg.precision))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        model.compile_hot_path()
    return model.train()


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    step_s: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Owns the model, optimizer, EMA, layout and attention core of one rank.

    ``encoders`` turns a raw :class:`VideoClip` into latents and text states; it is only
    needed for video sources (see :class:`impl.train.encode.ClipEncoder`).
    """

    def __init__(self, cfg: TrainConfig, *, device: torch.device | str = "cpu",
                 groups: ParallelGroups | None = None, out_dir: str | Path | None = None,
                 model: CausalWanDiT | None = None, encoders: Any = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.groups = groups or single_process()
        if self.groups.sp_size != cfg.sp_size:
            raise ParallelConfigError(f"sp_size: config says {cfg.sp_size} but the process groups have "
                                      f"{self.groups.sp_size}")
        self.preset = get_preset(cfg.preset)
        fpb = self.preset.stream.frames_per_block
        self.layout = TeacherForcingLayout(cfg.frames, fpb, cfg.sp_size, cfg.sp_layout)
        self.model = model if model is not None else build_training_model(cfg, self.preset, self.device)
        heads = self.model.cfg.num_heads
        if heads % cfg.sp_size:
            raise ParallelConfigError(f"sp_size: {cfg.sp_size} does not divide the {heads} attention heads")
        self.schedule = FlowSchedule(cfg.shift)
        self.core = teacher_forcing_core(self.layout, self.preset.tokens_per_frame, self.device,
                                         self.groups.sp_group, cfg.attention_backend)
        # The compute dtype, read before sharding (afterwards the registered parameters
        # outside a forward are the float32 shards).
        self.dtype = self.model.dtype
        adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.plan = None
        if cfg.sharding == "fsdp":
            from impl.parallel.fsdp import shard_model
            self.plan = shard_model(self.model, self.groups, self.device, offload=cfg.offload)
            self.optimizer: MasterWeightAdamW | ShardedAdamW = ShardedAdamW(self.model.named_parameters(),
                                                                           self.plan, **adamw)
        else:
            self.optimizer = MasterWeightAdamW(self.model.named_parameters(), **adamw)
        self.ema: EMA | None = None
        self.recycler = ErrorRecycler(cfg.error_recycling, self.schedule.num_timesteps, fpb, cfg.seed) \
            if cfg.error_recycling.enabled else None
        self.encoders = encoders
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.step = 0
        self.resumed_from: Path | None = None                       # set by resume_if_possible
        self.skipped_checkpoints: list[tuple[Path, str]] = []       # (path, why) it skipped

    # ---- data -------------------------------------------------------------------------
    def _sample_index(self, sampler: ShardedSampler, position: int) -> int:
        n = len(sampler)
        sampler.set_epoch(position // n)
        return sampler.indices()[position % n]

    def _fetch(self, source, sampler: ShardedSampler, micro: int) -> list[Any]:
        """This rank's items of micro-step ``micro`` (None on non-root SP ranks for video sources)."""
        b = self.cfg.batch_size
        items = []
        for j in range(b):
            idx = self._sample_index(sampler, micro * b + j)
            # Pre-encoded synthetic latents are small and deterministic: every rank reads them.
            # Video is decoded by the SP root only and reaches the others through the encoder.
            replicated = isinstance(source, SyntheticLatentSource)
            items.append(source[idx] if replicated or self.groups.is_sp_root else None)
        return items

    def _inputs(self, items: list[Any], micro: int) -> TFInputs:
        cfg, dev = self.cfg, self.device
        dtype = self.dtype
        if isinstance(items[0], LatentSample):
            x0 = torch.stack([s.latents for s in items]).to(dev, dtype)
            text = torch.stack([s.text for s in items])
            frames = list(range(cfg.frames))
            if x0.shape[2] != cfg.frames:
                raise ValueError(f"latent sample has {x0.shape[2]} frames, the config trains on {cfg.frames}")
        else:
            if self.encoders is None:
                raise ValueError("video clips need encoders (VAE + text encoder); pass Trainer(encoders=...)")
            x0, frames, text = self.encoders.encode(items, self.layout, self.groups)
            x0 = x0.to(dev, dtype)
        g = shared_generator(cfg.seed, micro, self.groups.dp_rank)
        b = x0.shape[0]
        c, (h, w) = x0.shape[1], x0.shape[3:]
        noise = torch.randn(b, c, cfg.frames, h, w, generator=g, dtype=torch.float32 if dtype != torch.float64
                            else torch.float64)
        block_index = self.schedule.sample_block_indices(g, b, self.layout.num_blocks)
        inputs = TFInputs(x0, frames, noise.to(dev), block_index, text.to(dev, dtype))
        if self.recycler is not None:
            inputs = self.recycler.inject(inputs, g)
        return inputs

    # ---- one optimizer step ---------------------------------------------------------------
    def train_step(self, source, sampler: ShardedSampler) -> StepStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for a in range(cfg.grad_accum):
            micro = self.step * cfg.grad_accum + a
            inputs = self._inputs(self._fetch(source, sampler, micro), micro)
            out = teacher_forcing_loss(self.model, self.layout, self.groups.sp_rank, inputs, self.schedule,
                                       self.core)
            (out.loss / cfg.grad_accum).backward()
            loss_sum += sp_all_reduce_sum(out.loss, self.groups).double().cpu() / cfg.grad_accum
            if self.recycler is not None:
                self.recycler.record(out, inputs)
        if self.plan is None:   # FSDP reduce-scattered them during backward
            sync_gradients(self.model.parameters(), self.groups)
        grad_norm = self.optimizer.step(cfg.grad_clip)
        self.step += 1
        if cfg.ema_start_step is not None and self.step >= cfg.ema_start_step:
            if self.ema is None:
                self.ema = EMA(self.optimizer.master_state(), cfg.ema_decay)
            else:
                self.ema.update(self.optimizer.master_state())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tokens = 2 * cfg.frames * self.preset.tokens_per_frame * cfg.batch_size * cfg.grad_accum * self.groups.dp_size
        loss = float(loss_sum)
        if self.groups.dp_group is not None:
            t = torch.tensor([loss], dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, group=self.groups.dp_group)
            loss = float(t) / self.groups.dp_size
        return StepStats(self.step, loss, grad_norm, time.perf_counter() - t0, tokens)

    # ---- loop, checkpoints ------------------------------------------------------------------
    def fit(self, source, *, progress: bool = True, on_step: Callable[[StepStats], None] | None = None,
            on_resume: Callable[[str], None] | None = None) -> list[StepStats]:
        """Train until ``cfg.steps`` optimizer steps (resuming from ``out_dir`` if it holds a
        checkpoint; ``on_resume`` gets one line per skipped corrupt checkpoint and one saying
        which checkpoint it resumed from, at which step). Returns this call's step statistics."""
        cfg = self.cfg
        if self.out_dir is not None:
            path = self.resume_if_possible()
            if path is not None and on_resume is not None:
                for bad, reason in self.skipped_checkpoints:
                    on_resume(f"warning: skipped checkpoint {bad}: {reason}")
                on_resume(f"resumed from {path} at step {self.step}" +
                          (" (the newest intact checkpoint)" if self.skipped_checkpoints else ""))
        sampler = ShardedSampler(len(source), self.groups.dp_rank, self.groups.dp_size, seed=cfg.seed)
        history: list[StepStats] = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not progress or self.groups.rank != 0)
        while self.step < cfg.steps:
            stats = self.train_step(source, sampler)
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"step {stats.step}: loss is {stats.loss}; stopping")
            history.append(stats)
            if on_step is not None:
                on_step(stats)
            bar.update(1)
            if stats.step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{stats.loss:.4g}", gnorm=f"{stats.grad_norm:.3g}",
                                tok_s=f"{stats.tokens / stats.step_s:.3g}")
            last = self.step == cfg.steps
            if self.out_dir is not None and (last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
                self.save()
        bar.close()
        return history

    def _meta(self) -> dict[str, Any]:
        meta = {"config": self.cfg.to_dict(), "world_size": self.groups.world_size,
                "sp_size": self.groups.sp_size, "dp_size": self.groups.dp_size}
        if self.recycler is not None:
            meta["error_recycling"] = "per-rank buffers are not saved; they refill after resume"
        return meta

    def state(self) -> TrainState:
        """The replicated (sharding none) state, as one rank holds it in full."""
        if self.plan is not None:
            raise ValueError("Trainer.state: a sharded run's state is per rank; see sharded_state()")
        return TrainState(self.step, self.optimizer.master_state(), self.optimizer.optimizer_tensors(),
                          None if self.ema is None else self.ema.shadow, self._meta())

    def sharded_state(self) -> dict[str, Any]:
        """This rank's shards of the model, AdamW state and EMA, as DCP saves and loads them."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if self.ema is not None:
            state["ema"] = self.ema.shadow
        return state

    def save(self) -> Path | None:
        """Sharding none: rank 0 writes (parameters are replicated) and every rank waits.
        Sharding fsdp: every rank writes its shards (collective)."""
        if self.plan is not None:
            path = save_sharded_checkpoint(self.out_dir, self.step, self.sharded_state(),
                                           {**self._meta(), "has_ema": self.ema is not None}, self.cfg.max_checkpoints)
            if self.groups.rank == 0:
                log.info("saved %s", path)
            return path
        path = None
        if self.groups.rank == 0:
            path = save_checkpoint(self.out_dir, self.state(), self.cfg.max_checkpoints)
            log.info("saved %s", path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return path

    def _check_compatible(self, path: Path, meta: dict[str, Any]) -> None:
        saved = upgrade_config_dict(meta.get("config", {}))
        if "precision" in saved:
            saved.setdefault("dtype", "bf16")   # written before the split and not fp32/fp64: bf16
        for key in _RESUME_FIELDS:
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ValueError(f"checkpoint {path} was trained with {key}={saved[key]!r}, "
                                 f"this run has {getattr(self.cfg, key)!r}")
        fmt, want = checkpoint_format(meta), SHARDED if self.plan is not None else SINGLE_FILE
        if fmt != want:
            written = "fsdp" if fmt == SHARDED else "none"
            raise ValueError(f"checkpoint {path} was written with sharding={written!r} ({fmt} format), this run "
                             f"has sharding={self.cfg.sharding!r}; resume it with sharding={written!r} (any world "
                             f"size for fsdp), or start from its weights: python -m impl.train.checkpoint export")

    def load(self, path: str | Path) -> None:
        path = Path(path)
        meta = checkpoint_meta(path)
        self._check_compatible(path, meta)
        if self.plan is not None:
            self._load_sharded(path, meta)
            return
        st = load_checkpoint(path)
        self.optimizer.load_master_state({k: v.to(self.device) for k, v in st.model.items()})
        self.optimizer.load_optimizer_tensors(st.optimizer)
        if st.ema is not None:
            self.ema = EMA(self.optimizer.master_state(), self.cfg.ema_decay)
            for n, t in st.ema.items():
                self.ema.shadow[n].copy_(t)
        self.step = st.step

    def _load_sharded(self, path: Path, meta: dict[str, Any]) -> None:
        """Collective. DCP reshards each tensor from the checkpoint's mesh to this one."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        self.ema = EMA(self.optimizer.master_state(), self.cfg.ema_decay) if meta.get("has_ema") else None
        state = self.sharded_state()
        load_sharded_checkpoint(path, state)
        set_state_dict(self.model, self.optimizer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.step = int(meta["step"])
        if meta.get("world_size") != self.groups.world_size and self.groups.rank == 0:
            log.info("resharded %s from %s to %d ranks", path, meta.get("world_size"), self.groups.world_size)

    def export_weights(self, path: str | Path, *, ema: bool = False, dtype: torch.dtype | None = None) -> Path | None:
        """Write the master weights (or the EMA) as one diffusers-layout safetensors file for
        inference (``dtype`` casts; None keeps float32). Collective under fsdp (the shards are
        gathered one tensor at a time); rank 0 writes and returns the path, others None."""
        from impl.model.checkpoint import save_dit_weights

        if ema and self.ema is None:
            raise ValueError("export_weights: the EMA has not started (ema_start_step)")
        if self.plan is not None:
            from impl.parallel.fsdp import full_model_state_dict, full_tensors
            tensors = full_tensors(self.ema.shadow) if ema else full_model_state_dict(self.model)
        else:
            source = self.ema.shadow if ema else self.optimizer.master_state()
            tensors = {k: v.detach().cpu() for k, v in source.items()}
        out = None
        if self.groups.rank == 0:
            if dtype is not None:
                tensors = {k: v.to(dtype) for k, v in tensors.items()}
            out = save_dit_weights(WeightsView(tensors), path, metadata={"step": self.step, "ema": ema})
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return out

    def resume_if_possible(self) -> Path | None:
        """Load the newest intact checkpoint of ``out_dir``; returns its path (None: none there).

        A checkpoint with a truncated or corrupt file (:class:`CorruptCheckpoint`) is skipped
        for the next older one, and recorded in ``self.skipped_checkpoints`` as (path, reason);
        if none is intact the newest one's error is raised, naming the file."""
        found = list_checkpoints(self.out_dir) if self.out_dir is not None else []
        self.skipped_checkpoints = []
        for path in reversed(found):
            try:
                self.load(path)
            except CorruptCheckpoint as exc:
                if self.plan is not None:   # sharded: one rank falling back alone would desynchronise them
                    raise
                self.skipped_checkpoints.append((path, str(exc)))
                continue
            for bad, reason in self.skipped_checkpoints:
                log.warning("skipped %s: %s", bad, reason)
            log.info("resumed from %s at step %d", path, self.step)
            self.resumed_from = path
            return path
        if self.skipped_checkpoints:
            raise CorruptCheckpoint(f"{self.skipped_checkpoints[0][1]}; no older intact checkpoint in "
                                    f"{self.out_dir} to resume from (move the bad one away to start over)")
        return None
