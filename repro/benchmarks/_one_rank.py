"""One rank of the AR trainer (:class:`impl.train.trainer.Trainer`, sp_size 1) on pre-encoded
synthetic latents (no VAE or text encoder: they are not part of the step), set up and stepped by
one piece of code: ``train_step`` times these steps and ``train_memory`` reports their peak
memory, so the measured peak comes from the step that is timed.

Peak memory of the steps (:func:`one_rank_steps`): on CUDA ``torch.cuda.max_memory_allocated``,
once over the trainer's build and the warm-up steps and once over the timed steps (steady
state: the AdamW state exists); on the CPU, where there is no allocator to ask, optionally
(``meter_cpu``) the parameter state present before the timed steps plus the peak of what they
allocate (:class:`LiveStorageMeter`, a dispatch-mode storage meter that also slows them down).

The leading underscore keeps this module out of the benchmark registry scan.
"""

from __future__ import annotations

import dataclasses
import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.utils._python_dispatch

from impl.config import get_preset
from impl.train.config import TrainConfig

CLIPS = 4    # synthetic clips the sampler cycles over (all of one shape)
# TrainConfig fields a one-rank benchmark run fixes itself, whatever its variant holds.
_FIXED = {"sp_size", "steps", "seed", "ema_start_step"}


def train_config(variant: dict[str, Any], seed: int) -> TrainConfig:
    """The one-rank TrainConfig of a benchmark variant: the variant's keys that are TrainConfig
    fields (``num_layers`` 0 = the preset's depth), an EMA from the first step when the variant
    says ``ema``, and no step limit."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - _FIXED
    values = {k: v for k, v in variant.items() if k in names}
    if "num_layers" in values:
        values["num_layers"] = values["num_layers"] or None
    return TrainConfig(**values, steps=10**9, seed=seed, ema_start_step=0 if variant.get("ema") else None)


@dataclass
class StepRun:
    """What :func:`one_rank_steps` ran: the trainer and its data (for one more step, e.g. under
    the profiler), the timed steps' stats and the peaks in bytes (None where not measured)."""
    trainer: Any
    source: Any
    sampler: Any
    stats: list
    peak_bytes: int | None            # the timed steps
    warmup_peak_bytes: int | None     # the trainer's build and the warm-up steps (CUDA)

    def step(self):
        return self.trainer.train_step(self.source, self.sampler)


@contextmanager
def one_rank_steps(variant: dict[str, Any], measure: dict[str, Any], device: torch.device, *,
                   meter_cpu: bool = False) -> Iterator[StepRun]:
    """Build the rank's trainer for ``variant``, run ``measure["warmup_steps"]`` untimed steps
    and ``measure["steps"]`` timed ones (seed ``measure["seed"]``). On exit the trainer is
    dropped and the device's cached memory returned, so the next variant starts empty."""
    from impl.train.sampler import ShardedSampler
    from impl.train.synthetic import SyntheticLatentSource
    from impl.train.trainer import Trainer

    cfg = train_config(variant, measure["seed"])
    preset = get_preset(cfg.preset)
    if cfg.sharding == "fsdp":
        from impl.parallel.groups import init_single_rank_group
        init_single_rank_group(device)   # FSDP shards over a device mesh, here a world of one
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, device=device)
    h, w = preset.latent_hw
    source = SyntheticLatentSource(preset.dit.in_channels, cfg.frames, h, w, preset.text.max_length,
                                   preset.dit.text_dim, frames_per_block=preset.stream.frames_per_block,
                                   length=CLIPS, seed=measure["seed"])
    sampler = ShardedSampler(len(source), 0, 1, seed=measure["seed"])
    run = StepRun(trainer, source, sampler, [], None, None)
    for _ in range(measure["warmup_steps"]):
        run.step()
    if cuda:
        run.warmup_peak_bytes = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run.stats = [run.step() for _ in range(measure["steps"])]
        run.peak_bytes = torch.cuda.max_memory_allocated(device)
    elif meter_cpu:
        before = _state_bytes(trainer)
        meter = LiveStorageMeter()
        with meter:
            meter.reset()
            run.stats = [run.step() for _ in range(measure["steps"])]
        run.peak_bytes = before + meter.peak
    else:
        run.stats = [run.step() for _ in range(measure["steps"])]
    del trainer, source, sampler
    try:
        yield run
    finally:
        run.trainer = run.source = run.sampler = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


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
