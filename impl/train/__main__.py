"""Teacher-forcing AR training entry point.

    torchrun --nproc-per-node 4 -m impl.train --preset wan22_ti2v_5b --frames 96 --sp-size 4 \\
        --data /data/clips --vae /ckpt/Wan2.2-TI2V-5B --text-encoder /ckpt/Wan2.2-TI2V-5B \\
        --dit /ckpt/Wan2.2-TI2V-5B/transformer --out runs/ar

One process per GPU (NCCL) or, without GPUs, per CPU worker (gloo); plain ``python -m
impl.train`` is a single process. ``--config file.yaml`` holds any TrainConfig fields;
flags override it. ``--data`` is a video folder (mp4 + caption sidecars), ``synthetic-video``
(procedural clips through the VAE) or ``synthetic-latents`` (pre-encoded random latents, no
VAE or text encoder: speed runs). Without ``--vae``/``--text-encoder`` the preset's randomly
initialised ones are used. ``--dtype`` is the compute dtype, ``--precision`` the format of the
block linears (bf16 = not quantized; a config file from before the split that says
``precision: fp32`` loads as ``dtype: fp32``). Checkpoints go to ``--out`` and a rerun
resumes from the newest.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from impl.config import PRESETS, ConfigError
from impl.io import output_problem
from impl.modes import choices
from impl.train.config import LEGACY_DTYPE_PRECISIONS, TrainConfig, upgrade_config_dict

# TrainConfig field -> the help of its --flag. The flag's type and allowed values are the
# field's (its annotation: a Literal lists them); the flags default to None (unset: the --config
# file's value, else TrainConfig's default, which the help shows).
_FLAGS: dict[str, str] = {
    "preset": f"model size preset: {' | '.join(sorted(PRESETS))}",
    "num_layers": "DiT depth override at the preset's width (speed runs); unset: the preset's depth",
    "frames": "latent frames per clip, whole AR blocks (the release trains 96)",
    "dtype": "compute dtype of the DiT, VAE and text encoder",
    "precision": "format of the block linears: bf16 = not quantized (they run in --dtype); the quantized "
                 "formats need --dtype bf16, nvfp4_te a Blackwell GPU",
    "sp_size": "ranks per sequence-parallel group (the world is sp_size x DP replicas)",
    "sp_layout": "teacher-forcing token layout under SP: balanced = each rank holds the clean and noisy "
                 "copy of one chunk; naive = the [clean ; noisy] sequence cut in sp parts",
    "attention_backend": "masked attention core: auto = flex on CUDA, dense elsewhere",
    "sharding": "where parameters, gradients and AdamW state live: none = replicated on every rank; "
                "fsdp = FSDP2 shards over all sp x dp ranks (BF16 compute, float32 master and reduce; "
                "checkpoints are sharded DCP folders that resume on any world size)",
    "batch_size": "clips per rank per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "steps": "optimizer steps to train to (a resumed run continues up to this total)",
    "lr": "AdamW learning rate",
    "checkpoint_every": "optimizer steps between checkpoints (0 = only at the end)",
    "vae_halo": "latents each SP rank encodes before its chunk and drops (>= 27, the VAE encoder's "
                "receptive field, is exact)",
    "seed": "seed of the weights, data, noise and timesteps",
}


def _flag_type(name: str) -> tuple[type, Any]:
    """(type of the --flag, the Literal of its allowed values or None) of TrainConfig field
    ``name``, from the field's annotation (``int | None`` is int)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) is Literal:
        return str, hint
    return next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)), None


def _flag_help(text: str, kind: Any, default: Any) -> str:
    allowed = f"; one of {', '.join(choices(kind))}" if kind is not None else ""
    return f"{text}{allowed} (default: {'unset' if default is None else default})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m impl.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML file of TrainConfig fields; flags override it (default: none)")
    defaults = TrainConfig().to_dict()
    for name, text in _FLAGS.items():
        typ, kind = _flag_type(name)
        # Allowed values are checked by TrainConfig, so a bad value is a ConfigError naming the field.
        ap.add_argument("--" + name.replace("_", "-"), type=typ, dest=name, default=None,
                        metavar=typ.__name__.upper() if kind is None else "{" + ",".join(choices(kind)) + "}",
                        help=_flag_help(text, kind, defaults[name]))
    ap.add_argument("--compile", action="store_true", default=None,
                    help="torch.compile the blocks' pure halves (norms, projections, FFN) (default: off)")
    ap.add_argument("--offload", action="store_true", default=None,
                    help="with --sharding fsdp: keep the sharded parameters, gradients and AdamW state in CPU "
                         "memory (the optimizer steps on the CPU; GPU memory holds the gathered blocks and "
                         "activations) (default: off)")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None,
                    help="keep every block's activations instead of recomputing them in backward "
                         "(default: checkpointing on)")
    ap.add_argument("--data", required=True,
                    help="a video folder (mp4 + .txt/.json caption sidecars) | synthetic-video | synthetic-latents "
                         "(required)")
    ap.add_argument("--data-length", type=int, default=64, help="number of synthetic clips (default: 64)")
    ap.add_argument("--vae", help="Wan2.2 VAE (diffusers folder or pipeline root) (default: random preset VAE)")
    ap.add_argument("--text-encoder",
                    help="umT5 encoder folder or pipeline root (default: random preset encoder)")
    ap.add_argument("--dit", help="initial DiT weights, diffusers or original layout (default: random)")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint and log folder (required)")
    ap.add_argument("--metrics-out", type=Path,
                    help="JSON summary written by global rank 0 at the end: world size, device, and every "
                         "rank's peak GPU memory (speed runs; the per-step log is OUT/train_log.jsonl) "
                         "(default: none)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on rank 0)")
    return ap


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_summary(cfg, device, world: int) -> dict[str, Any]:
    """Collective: every rank's peak allocated GPU memory (None on CPU), gathered on all ranks."""
    import torch

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peaks = [peak]
    if torch.distributed.is_initialized():
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
    return {"world_size": world, "sp_size": cfg.sp_size, "dp_size": world // cfg.sp_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_mem_gb_per_rank": peaks}


def build_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"--config: no such file {args.config}")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {args.config} must hold a mapping of TrainConfig fields")
        values.update(upgrade_config_dict(loaded))   # an old file's precision: fp32 is its dtype
    if args.precision in LEGACY_DTYPE_PRECISIONS:   # old command lines: say so instead of reinterpreting
        raise ConfigError(f"--precision: {args.precision} is a compute dtype, not a block-linear format; "
                          f"use --dtype {args.precision}")
    for name in [*_FLAGS, "compile", "gradient_checkpointing", "offload"]:
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    return TrainConfig.from_dict(values)


def build_source(args, cfg, preset):
    from impl.train.synthetic import SyntheticLatentSource, SyntheticVideoSource
    from impl.train.video_folder import VideoFolderDataset

    fpb = preset.stream.frames_per_block
    h, w = preset.video.height, preset.video.width
    if args.data == "synthetic-latents":
        lh, lw = preset.latent_hw
        return SyntheticLatentSource(preset.dit.in_channels, cfg.frames, lh, lw, preset.text.max_length,
                                     preset.dit.text_dim, frames_per_block=fpb, length=args.data_length, seed=cfg.seed)
    if args.data == "synthetic-video":
        return SyntheticVideoSource(cfg.frames, fpb, h, w, length=args.data_length, seed=cfg.seed)
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data: {args.data!r} is neither a folder nor synthetic-video / synthetic-latents")
    return VideoFolderDataset(args.data, cfg.frames, fpb, h, w, seed=cfg.seed)


def check_outputs(args: argparse.Namespace) -> None:
    """--out / --metrics-out must be writable: checked before any model is built (ConfigError)."""
    for flag, path, folder in (("--out", args.out, True), ("--metrics-out", args.metrics_out, False)):
        problem = None if path is None else output_problem(path, folder=folder)
        if problem is not None:
            raise ConfigError(f"{flag} {path}: {problem}")


def say(text: str) -> None:
    print(text, file=sys.stderr)


def train_summary(trainer: Any, history: list) -> str:
    """One line at the end of a run: the steps trained, the last loss, where the weights are."""
    from impl.train.checkpoint import list_checkpoints
    found = list_checkpoints(trainer.out_dir)
    where = f"checkpoint {found[-1]}" if found else f"no checkpoint in {trainer.out_dir}"
    if not history:
        return f"nothing to train: step {trainer.step} already reaches --steps {trainer.cfg.steps}; {where}"
    first = history[0].step
    seconds = sum(s.step_s for s in history)
    return (f"trained steps {first}-{history[-1].step} of {trainer.cfg.steps} in {seconds:.1f} s; "
            f"final loss {history[-1].loss:.4g}; {where}")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors are one line and exit 2, Ctrl-C prints "interrupted" and exits 130."""
    from impl.io import run_command
    return run_command(lambda: _main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    from impl.config import get_preset
    from impl.model.checkpoint import CheckpointError
    from impl.train.checkpoint import CorruptCheckpoint
    from impl.train.data_util import DatasetError

    args = parse_args(argv)
    try:
        cfg = build_config(args)
        check_outputs(args)
        preset = get_preset(cfg.preset)
        source = build_source(args, cfg, preset)    # a missing or empty --data folder fails here
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"error: --data: {exc}", file=sys.stderr)
        return 2
    try:
        return _train(args, cfg, preset, source)
    except CorruptCheckpoint as exc:    # a runtime failure: the file is named, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError) as exc:   # --dit / a checkpoint that does not fit this run
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, cfg: TrainConfig, preset: Any, source: Any) -> int:
    import torch

    from impl.model.checkpoint import load_dit_weights
    from impl.parallel.groups import build_groups, init_distributed
    from impl.train.synthetic import SyntheticLatentSource
    from impl.train.encode import ClipEncoder
    from impl.train.trainer import Trainer, build_training_model

    rank, world, device = init_distributed(single_rank_group=cfg.sharding == "fsdp")   # FSDP needs a group
    groups = build_groups(cfg.sp_size)
    encoders = None
    if not isinstance(source, SyntheticLatentSource):
        from impl.model.text_encoder import TextEncoder
        from impl.model.vae import build_vae, load_vae
        from impl.inference.build import torch_dtype
        dtype = torch_dtype(cfg.dtype)
        vae = load_vae(args.vae, dtype=dtype, device=device) if args.vae else \
            build_vae(preset.vae, dtype=dtype, device=device, seed=cfg.seed)
        text = TextEncoder.from_pretrained(args.text_encoder, dtype=dtype, device=device) if args.text_encoder else \
            TextEncoder.from_preset(preset.text, dtype=dtype, device=device)
        encoders = ClipEncoder(vae, text, cfg.vae_halo)
    model = build_training_model(cfg, preset, device)
    if args.dit:
        load_dit_weights(model, args.dit)
    trainer = Trainer(cfg, device=device, groups=groups, out_dir=args.out, model=model, encoders=encoders)
    log_path = args.out / "train_log.jsonl"

    def on_step(s) -> None:
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": s.step, "loss": s.loss, "grad_norm": s.grad_norm, "step_s": s.step_s,
                                    "tokens_per_s": s.tokens / s.step_s}) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    history = trainer.fit(source, progress=not args.no_progress, on_step=on_step, on_resume=say if rank == 0 else None)
    if rank == 0:
        print(train_summary(trainer, history), file=sys.stderr)
    if args.metrics_out is not None:
        summary = run_summary(cfg, device, world)
        if rank == 0:
            args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
            args.metrics_out.write_text(json.dumps(summary, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
