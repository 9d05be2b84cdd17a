"""Teacher-forcing AR training entry point.

    torchrun --nproc-per-node 4 -m impl.train --preset wan22_ti2v_5b --frames 96 --sp-size 4 \\
        --data /data/clips --vae /ckpt/Wan2.2-TI2V-5B --text-encoder /ckpt/Wan2.2-TI2V-5B \\
        --dit /ckpt/Wan2.2-TI2V-5B/transformer --out runs/ar

One process per GPU (NCCL) or, without GPUs, per CPU worker (gloo); plain ``python -m
impl.train`` is a single process. ``--config file.yaml`` holds any TrainConfig fields;
flags override it. ``--data`` is a video folder (mp4 + caption sidecars), ``synthetic-video``
(procedural clips through the VAE) or ``synthetic-latents`` (pre-encoded random latents, no
VAE or text encoder: speed runs). Without ``--vae``/``--text-encoder`` the preset's randomly
initialised ones are used. Checkpoints go to ``--out`` and a rerun resumes from the newest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from impl.config import ConfigError

_FLAGS = {  # TrainConfig field -> type of its --flag
    "preset": str, "num_layers": int, "frames": int, "precision": str, "sp_size": int, "sp_layout": str,
    "attention_backend": str, "batch_size": int, "grad_accum": int, "steps": int, "lr": float,
    "checkpoint_every": int, "vae_halo": int, "seed": int,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m impl.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    for name, typ in _FLAGS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=typ, dest=name, default=None)
    ap.add_argument("--compile", action="store_true", default=None, help="torch.compile the block halves")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    ap.add_argument("--data", required=True, help="video folder | synthetic-video | synthetic-latents")
    ap.add_argument("--data-length", type=int, default=64, help="number of synthetic clips")
    ap.add_argument("--vae", help="Wan2.2 VAE (diffusers folder or pipeline root); default: random preset VAE")
    ap.add_argument("--text-encoder", help="umT5 encoder folder or pipeline root; default: random preset encoder")
    ap.add_argument("--dit", help="initial DiT weights (diffusers or original layout)")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint and log folder")
    ap.add_argument("--metrics-out", type=Path,
                    help="JSON summary written by global rank 0 at the end: world size, device, and every "
                         "rank's peak GPU memory (speed runs; the per-step log is OUT/train_log.jsonl)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


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


def build_config(args: argparse.Namespace):
    from impl.train.config import TrainConfig

    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"--config: no such file {args.config}")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {args.config} must hold a mapping of TrainConfig fields")
        values.update(loaded)
    for name in [*_FLAGS, "compile", "gradient_checkpointing"]:
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    return TrainConfig.from_dict(values)


def build_source(args, cfg, preset):
    from impl.train.data import SyntheticLatentSource, SyntheticVideoSource, VideoFolderDataset

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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from impl.config import get_preset
    from impl.model.checkpoint import load_dit_weights
    from impl.parallel.groups import build_groups, init_distributed
    from impl.train.data import SyntheticLatentSource
    from impl.train.encode import ClipEncoder
    from impl.train.trainer import Trainer, build_training_model

    rank, world, device = init_distributed()
    groups = build_groups(cfg.sp_size)
    preset = get_preset(cfg.preset)
    source = build_source(args, cfg, preset)
    encoders = None
    if not isinstance(source, SyntheticLatentSource):
        from impl.model.text_encoder import TextEncoder
        from impl.model.vae import build_vae, load_vae
        from impl.train.trainer import model_dtype
        dtype = model_dtype(cfg.precision)
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
    trainer.fit(source, progress=not args.no_progress, on_step=on_step)
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
