"""Sequence-parallel (Ulysses) streaming inference, with an optional NVFP4 K/V exchange.

For GPUs without NVFP4 tensor cores the paper runs the block-autoregressive generator with
Ulysses SP. Here SP is a wrapper, not a second model: every rank of an SP group holds the
same :class:`~impl.model.dit.CausalWanDiT` and runs the ordinary
:class:`~impl.pipeline.StreamingPipeline` (blocks, sink, multi-shot RoPE offset and pin,
sampler, re-cache) with an :class:`~impl.parallel.sp_exchange.SPExchange` passed through the
forward, and a :class:`~impl.model.kv_cache.KVCache` of ``num_heads / sp`` heads. The cache
bookkeeping is host-side and identical on every rank, so sink, window eviction and shot pins
behave exactly as on one GPU. What a forward does per rank is described in
:mod:`impl.parallel.sp_exchange`.

- ``kv_cache`` (storage ``bf16`` = model dtype, or ``nvfp4``) and ``kv_comm`` (``plain`` or
  ``nvfp4``; ``auto`` = ``nvfp4`` with NVFP4 storage under SP): a plain exchange reproduces
  one GPU exactly, with either storage (NVFP4: the tensor scale is max-reduced over the SP
  group, so each rank's codes are bit-identical to one GPU's for its heads); the NVFP4
  exchange sends K/V at 0.28x the bytes and stores them without re-quantizing.
- The noise is drawn on the CPU from the seed, so every rank of a group denoises the same
  video; the VAE decodes on the SP root rank only.
- World = sp x dp: DP group g generates videos g, g + dp, g + 2 dp, ... (:func:`dp_shard`),
  video i with seed ``seed + i``, so a video does not depend on the DP size.

Entry point (NCCL on GPUs, gloo on CPU): ``torchrun --nproc-per-node 2 -m
impl.inference.sp --preset tiny --sp-size 2 --kv-cache nvfp4 --shot "a cat::4" --out
outputs/sp``; ``--help`` lists every option. docs/sp_inference.md has the byte formulas.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from impl.config import ConfigError
from impl.io import write_json
from impl.inference.build import Weights, build_pipeline, torch_dtype
from impl.inference.config import InferenceConfig, add_arguments, config_from_args
from impl.model.kv_cache import KVCache
from impl.parallel.groups import ParallelConfigError, ParallelGroups, build_groups, init_distributed
from impl.parallel.sp_exchange import BlockBytes, SPExchange, block_bytes
from impl.pipeline import GenerationResult, parse_shot, shot_prompts
from impl.session import BlockTiming, StreamingSession
from impl.session_inputs import encode_frames, encode_image, resolve_encoder


def config_block_bytes(cfg: InferenceConfig, element_bytes: int, batch: int = 1) -> BlockBytes:
    """Analytic bytes one rank sends per block under ``cfg`` (:func:`impl.parallel.sp_exchange.block_bytes`)."""
    return block_bytes(cfg.stream_preset, cfg.sp_size, element_bytes=element_bytes, kv_cache=cfg.kv_cache,
                       kv_comm=cfg.kv_exchange, batch=batch)


def dp_shard(num_videos: int, dp_size: int, dp_rank: int) -> list[int]:
    """Indices of the videos DP group ``dp_rank`` of ``dp_size`` generates (round robin)."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ParallelConfigError(f"dp_rank: must be in [0, dp_size={dp_size}), got {dp_rank}")
    if num_videos < 0:
        raise ValueError(f"num_videos: must be >= 0, got {num_videos}")
    return list(range(dp_rank, num_videos, dp_size))


class SPInference:
    """One rank's streaming generator under SP (and DP): the one-GPU pipeline, built by
    :func:`impl.inference.build.build_pipeline`, with this rank's exchange passed through.

    Every rank of an SP group calls :meth:`generate` with the same prompts and seed; all get
    the same latents, the SP root also the decoded frames / video. Every rank builds the same
    DiT (same seed or weights); only the SP root builds a VAE."""

    def __init__(self, cfg: InferenceConfig, groups: ParallelGroups, *, device: torch.device | str = "cpu",
                 weights: Weights = Weights(), decode: bool = True):
        if cfg.sp_size != groups.sp_size:
            raise ParallelConfigError(f"sp_size: the config says {cfg.sp_size} but the process groups were "
                                      f"built for {groups.sp_size}")
        self.cfg, self.groups = cfg, groups
        self.exchange = SPExchange(groups.sp_group, groups.sp_size, groups.sp_rank, kv_comm=cfg.kv_exchange,
                                   kv_rule=cfg.kv_rule)
        self.pipeline = build_pipeline(cfg, device, weights, decode=decode and groups.is_sp_root,
                                       sp=self.exchange if groups.sp_size > 1 else None)

    @property
    def cache(self) -> KVCache | None:
        """This rank's KV cache (num_heads / sp heads), after the first generate."""
        return self.pipeline._cache

    def generate(self, prompts: Sequence[str], *, seed: int = 0, noise: torch.Tensor | None = None,
                 decode: bool = True, video_path: str | Path | None = None,
                 on_block: Callable[[BlockTiming], None] | None = None) -> GenerationResult:
        """Generate one video (one prompt per block, as :meth:`StreamingPipeline.generate`).
        ``decode`` / ``video_path`` apply on the SP root only; other ranks return latents."""
        root = self.groups.is_sp_root
        return self.pipeline.generate(prompts, seed=seed, noise=noise, decode=decode and root,
                                      video_path=video_path if root else None, on_block=on_block)

    def session(self, prompt: str, *, image: Any = None, video: torch.Tensor | None = None, decode: bool = True,
                video_path: str | Path | None = None, **options: Any) -> StreamingSession:
        """This rank's :class:`~impl.session.StreamingSession`. Every rank of the SP group opens it
        with the same arguments and makes the same switches between the same pulls (the cache
        bookkeeping and the re-cache forwards then match). The SP root decodes, and encodes
        ``image`` / ``video`` (it holds the VAE) and sends their latents to the group."""
        root = self.groups.is_sp_root
        if image is not None:
            options["image_latent"] = self._encoded_on_root(image, encode_image, options.get("encoder"))
        if video is not None:
            options["latents"] = self._encoded_on_root(video, encode_frames, options.get("encoder"))
        return self.pipeline.session(prompt, decode=decode and root, video_path=video_path if root else None,
                                     **options)

    def _encoded_on_root(self, pixels: Any, encode: Callable, encoder: Any) -> torch.Tensor:
        g = self.groups
        box = [encode(resolve_encoder(self.pipeline, encoder), pixels, self.pipeline.preset).cpu()
               if g.is_sp_root else None]
        if g.sp_size > 1:
            torch.distributed.broadcast_object_list(box, src=g.sp_root_global_rank, group=g.sp_group)
        return box[0]


# ------------------------------------------------------------------ command line

DEFAULT_PROMPT = "A red fox runs through fresh snow in a quiet forest at dawn."


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m impl.inference.sp",
        description="Sequence-parallel streaming video generation (Ulysses SP x data parallel). "
                    "world size = sp_size x dp_size; each DP group generates its share of the videos.",
        epilog="Example: torchrun --nproc-per-node 2 -m impl.inference.sp --preset tiny --sp-size 2 "
               "--kv-cache nvfp4 --shot 'a cat::3' --shot 'a dog::2' --out outputs/sp. Without torchrun it "
               "runs as one process (sp-size 1). Outputs in --out, written by each SP group's root: "
               "video_NNNN.mp4 (with decode), latents_NNNN.pt (--save-latents), timings_NNNN.json; "
               "--metrics-out gets global rank 0's summary (FPS, bytes per block).")
    add_arguments(ap, defaults={"dtype": None, "sp_size": None})
    ap.add_argument("--shot", action="append", default=None, metavar="PROMPT[::BLOCKS]",
                    help="one shot of the (single) video; repeat for multi-shot")
    ap.add_argument("--prompt-file", type=Path, default=None,
                    help="one video per line: shots 'PROMPT[::BLOCKS]' separated by ' | '")
    ap.add_argument("--blocks", type=int, default=4,
                    help="blocks of the default one-shot video when neither --shot nor --prompt-file is given "
                         "(default: 4)")
    ap.add_argument("--weights", default=None, help="diffusers-format Wan2.2-TI2V-5B folder (default: random weights)")
    ap.add_argument("--dit", default=None, help="DiT checkpoint overriding --weights")
    ap.add_argument("--text", default=None, choices=["encoder", "embedding"],
                    help="umT5 encoder, or a fixed random embedding per prompt (default: encoder with "
                         "--weights, else embedding)")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="VAE-decode each block on the SP root rank (default: true)")
    ap.add_argument("--video", action=argparse.BooleanOptionalAction, default=True,
                    help="with --decode, write video_NNNN.mp4 (needs imageio-ffmpeg); --no-video decodes only "
                         "(timing) (default: true)")
    ap.add_argument("--save-latents", action="store_true", help="write latents_NNNN.pt")
    ap.add_argument("--seed", type=int, default=0,
                    help="video i uses seed + i; also the random weights' seed (default: 0)")
    ap.add_argument("--warmup-blocks", type=int, default=0,
                    help="blocks per video left out of the FPS figures (default: 0)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--metrics-out", type=Path, default=None, help="JSON summary written by global rank 0")
    return ap.parse_args(argv)


def _videos(args: argparse.Namespace, scene_cut_prefix: str) -> list[list[str]]:
    """Per video, its per-block prompts."""
    if args.shot and args.prompt_file:
        raise ValueError("--shot and --prompt-file: give one or the other")
    if args.prompt_file:
        try:
            lines = [ln.strip() for ln in args.prompt_file.read_text(encoding="utf-8").splitlines()]
        except OSError as exc:
            raise ValueError(f"--prompt-file: cannot read {args.prompt_file}: {exc.strerror or exc}") from None
        shots = [[parse_shot(s.strip()) for s in ln.split(" | ")] for ln in lines if ln]
        if not shots:
            raise ValueError(f"--prompt-file: {args.prompt_file} has no prompts")
    elif args.shot:
        shots = [[parse_shot(s) for s in args.shot]]
    else:
        if args.blocks < 1:
            raise ValueError(f"--blocks: must be >= 1, got {args.blocks}")
        shots = [[(DEFAULT_PROMPT, args.blocks)]]
    return [shot_prompts(v, scene_cut_prefix) for v in shots]


def _prepare(args: argparse.Namespace) -> tuple[InferenceConfig, list[list[str]]]:
    """Everything that can fail on bad input, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = args.sp_size if args.sp_size is not None else world
    if sp < 1 or world % sp:
        raise ParallelConfigError(f"--sp-size: {sp} must be a positive divisor of the world size {world}")
    # The dtype default depends on the device, known only after init; validate with a stand-in.
    cfg = config_from_args(args, sp_size=sp, dtype=args.dtype or "fp32")
    if args.warmup_blocks < 0:
        raise ValueError(f"--warmup-blocks: must be >= 0, got {args.warmup_blocks}")
    return cfg, _videos(args, cfg.stream_preset.stream.scene_cut_prefix)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, videos = _prepare(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    _, _, device = init_distributed()
    if args.dtype is None:
        cfg = cfg.replace(dtype="bf16" if device.type == "cuda" else "fp32")
    try:
        return _run(args, cfg, videos, device)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, cfg: InferenceConfig, videos: list[list[str]], device: torch.device) -> int:
    groups = build_groups(cfg.sp_size)
    text = args.text or ("encoder" if args.weights else "embedding")
    weights = Weights(root=args.weights, dit=args.dit, text=text, seed=args.seed)
    sp = SPInference(cfg, groups, device=device, weights=weights, decode=args.decode)

    mine = dp_shard(len(videos), groups.dp_size, groups.dp_rank)
    steady: list[BlockTiming] = []
    e2e_s, blocks_done = 0.0, 0
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in mine:
        timings: list[BlockTiming] = []
        path = args.out / f"video_{i:04d}.mp4" if args.decode and args.video else None
        wall0 = time.perf_counter()
        result = sp.generate(videos[i], seed=args.seed + i, decode=args.decode, video_path=path,
                             on_block=timings.append)
        wall = time.perf_counter() - wall0
        blocks_done += len(videos[i])
        warm = timings[:args.warmup_blocks]
        steady += timings[args.warmup_blocks:]
        e2e_s += wall - sum(t.total_ms for t in warm) / 1e3
        if groups.is_sp_root:
            if args.save_latents:
                torch.save(result.latents, args.out / f"latents_{i:04d}.pt")
            write_json(args.out / f"timings_{i:04d}.json",
                       {"video": i, "prompts": videos[i], "timings": [t.__dict__ for t in timings]})

    if groups.rank == 0:
        ex = sp.exchange
        preset = cfg.stream_preset
        measured = {k: v // max(blocks_done, 1) for k, v in ex.sent.items()}
        analytic = config_block_bytes(cfg, torch.tensor([], dtype=torch_dtype(cfg.dtype)).element_size())
        frames = preset.vae.temporal_factor * preset.stream.frames_per_block
        dit_s = sum(t.dit_ms for t in steady) / 1e3
        metrics = {
            "sp_size": cfg.sp_size, "dp_size": groups.dp_size, "kv_cache": cfg.kv_cache,
            "kv_comm": cfg.kv_exchange, "preset": preset.name, "steps": preset.stream.steps,
            "dtype": cfg.dtype, "precision": cfg.precision, "device": str(device),
            "videos": len(mine), "blocks": blocks_done, "measured_blocks": len(steady),
            "dit_fps": frames * len(steady) / dit_s if steady and dit_s > 0 else None,
            "e2e_fps": frames * len(steady) / e2e_s if steady and e2e_s > 0 else None,
            "block_ms_p50": statistics.median(t.total_ms for t in steady) if steady else None,
            "dit_block_ms_p50": statistics.median(t.dit_ms for t in steady) if steady else None,
            "comm_bytes_per_block": sum(measured.values()),
            "comm_bytes_per_block_all_ranks": sum(measured.values()) * cfg.sp_size,
            "comm_kv_bytes_per_block": measured["kv"],
            "comm_bytes_per_block_analytic": analytic.total,
            "comm_by_category": measured,
            "collectives_per_block": {k: v / max(blocks_done, 1) for k, v in ex.calls.items()},
            "kv_mem_gb": sp.cache.memory_bytes() / 1e9 if sp.cache is not None else None,
        }
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if args.metrics_out is not None:
            write_json(args.metrics_out, metrics)
        print(json.dumps({k: metrics[k] for k in ("sp_size", "kv_comm", "dit_fps", "e2e_fps",
                                                  "comm_bytes_per_block")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
