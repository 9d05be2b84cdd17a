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
impl.parallel.sp_inference --preset tiny --sp-size 2 --kv-cache nvfp4 --shot "a cat::4" --out
outputs/sp``; ``--help`` lists every option. docs/sp_inference.md has the byte formulas.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from impl.config import ConfigError, Preset
from impl.model.dit import CausalWanDiT
from impl.model.kv_cache import KVCache
from impl.parallel.groups import ParallelConfigError, ParallelGroups
from impl.parallel.sp_exchange import KV_COMMS, BlockBytes, SPExchange, block_bytes
from impl.pipeline import BlockTiming, GenerationResult, StreamingPipeline
from impl.quant.config import KV_STORAGES
from impl.quant.nvfp4 import SCALE_RULES

KV_COMM_CHOICES = ("auto",) + KV_COMMS


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def allowed_sp_sizes(preset: Preset) -> list[int]:
    """SP sizes that split both the attention heads and the block's tokens evenly."""
    h, s = preset.dit.num_heads, preset.tokens_per_block
    return [d for d in _divisors(h) if s % d == 0]


def check_sp_inference(preset: Preset, sp_size: int) -> None:
    """Raise :class:`ParallelConfigError` naming the field if ``sp_size`` does not fit the preset."""
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ParallelConfigError(f"sp_size: must be a positive integer, got {sp_size!r}")
    heads, tokens = preset.dit.num_heads, preset.tokens_per_block
    allowed = allowed_sp_sizes(preset)
    if heads % sp_size:
        raise ParallelConfigError(
            f"sp_size={sp_size}: Ulysses splits the dit.num_heads={heads} attention heads over the SP "
            f"ranks, so sp_size must divide it; allowed for preset {preset.name!r}: {allowed}")
    if tokens % sp_size:
        raise ParallelConfigError(
            f"sp_size={sp_size}: the block's {tokens} tokens (stream.frames_per_block="
            f"{preset.stream.frames_per_block} x {preset.tokens_per_frame} tokens per frame) must split "
            f"evenly over the SP ranks; allowed for preset {preset.name!r}: {allowed}")


@dataclass(frozen=True)
class SPInferenceConfig:
    """SP size, KV-cache storage and how K/V cross the all-to-all (see the module docstring)."""

    sp_size: int = 1
    kv_cache: str = "bf16"
    kv_comm: str = "auto"
    kv_rule: str = "mse"

    def __post_init__(self) -> None:
        if not isinstance(self.sp_size, int) or isinstance(self.sp_size, bool) or self.sp_size < 1:
            raise ParallelConfigError(f"sp_size: must be a positive integer, got {self.sp_size!r}")
        if self.kv_cache not in KV_STORAGES:
            raise ParallelConfigError(f"kv_cache: must be one of {KV_STORAGES}, got {self.kv_cache!r}")
        if self.kv_comm not in KV_COMM_CHOICES:
            raise ParallelConfigError(f"kv_comm: must be one of {KV_COMM_CHOICES}, got {self.kv_comm!r}")
        if self.kv_rule not in SCALE_RULES:
            raise ParallelConfigError(f"kv_rule: must be one of {tuple(SCALE_RULES)}, got {self.kv_rule!r}")
        if self.kv_comm == "nvfp4" and self.kv_cache != "nvfp4":
            raise ParallelConfigError("kv_comm: 'nvfp4' sends K/V as NVFP4 codes that are stored as they are, "
                                      "so it needs kv_cache='nvfp4'")

    @property
    def exchange(self) -> str:
        """The K/V exchange actually used: ``auto`` is ``nvfp4`` with NVFP4 storage under SP."""
        if self.kv_comm != "auto":
            return self.kv_comm
        return "nvfp4" if self.kv_cache == "nvfp4" and self.sp_size > 1 else "plain"

    def check(self, preset: Preset) -> None:
        check_sp_inference(preset, self.sp_size)

    def block_bytes(self, preset: Preset, element_bytes: int, batch: int = 1) -> BlockBytes:
        """Analytic bytes one rank sends per block (:func:`impl.parallel.sp_exchange.block_bytes`)."""
        return block_bytes(preset, self.sp_size, element_bytes=element_bytes, kv_cache=self.kv_cache,
                           kv_comm=self.exchange, batch=batch)


def dp_shard(num_videos: int, dp_size: int, dp_rank: int) -> list[int]:
    """Indices of the videos DP group ``dp_rank`` of ``dp_size`` generates (round robin)."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ParallelConfigError(f"dp_rank: must be in [0, dp_size={dp_size}), got {dp_rank}")
    if num_videos < 0:
        raise ValueError(f"num_videos: must be >= 0, got {num_videos}")
    return list(range(dp_rank, num_videos, dp_size))


def random_text_embedder(preset: Preset, dtype: torch.dtype, device: torch.device | str,
                         seed: int = 0) -> Callable[[str], torch.Tensor]:
    """A fixed random text-encoder output [1, L, text_dim] per prompt, seeded by the prompt's
    CRC32 (identical on every rank and run): stands in for umT5 with random weights, where
    the 5B encoder would only cost memory and start-up time."""
    length, dim = preset.text.max_length, preset.dit.text_dim

    def embed(prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8")))
        return torch.randn(1, length, dim, generator=g).to(device, dtype)

    return embed


class SPInference:
    """One rank's streaming generator under SP (and DP): the plain pipeline with the exchange.

    Every rank of an SP group calls :meth:`generate` with the same prompts and seed; all get
    the same latents, the SP root also the decoded frames / video."""

    def __init__(self, model: CausalWanDiT, preset: Preset, groups: ParallelGroups, *,
                 text_embedder: Callable[[str], torch.Tensor], vae=None,
                 device: torch.device | str = "cpu", config: SPInferenceConfig = SPInferenceConfig()):
        if config.sp_size != groups.sp_size:
            raise ParallelConfigError(f"sp_size: the config says {config.sp_size} but the process groups were "
                                      f"built for {groups.sp_size}")
        config.check(preset)
        self.config, self.groups, self.preset = config, groups, preset
        self.exchange = SPExchange(groups.sp_group, groups.sp_size, groups.sp_rank, kv_comm=config.exchange,
                                   kv_rule=config.kv_rule)
        self.pipeline = StreamingPipeline(
            model, preset, text_embedder=text_embedder, vae=vae if groups.is_sp_root else None, device=device,
            kv_cache=config.kv_cache, kv_rule=config.kv_rule, sp=self.exchange if groups.sp_size > 1 else None)

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


# ------------------------------------------------------------------ command line

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
LINEAR_MODES = ["bf16", "fp8", "nvfp4", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4_te"]
DEFAULT_PROMPT = "A red fox runs through fresh snow in a quiet forest at dawn."


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m impl.parallel.sp_inference",
        description="Sequence-parallel streaming video generation (Ulysses SP x data parallel). "
                    "world size = sp_size x dp_size; each DP group generates its share of the videos.",
        epilog="Example: torchrun --nproc-per-node 2 -m impl.parallel.sp_inference --preset tiny --sp-size 2 "
               "--kv-cache nvfp4 --shot 'a cat::3' --shot 'a dog::2' --out outputs/sp. Without torchrun it "
               "runs as one process (sp-size 1). Outputs in --out, written by each SP group's root: "
               "video_NNNN.mp4 (with decode), latents_NNNN.pt (--save-latents), timings_NNNN.json; "
               "--metrics-out gets global rank 0's summary (FPS, bytes per block).")
    ap.add_argument("--preset", default="tiny", help="model size preset (tiny, small, wan22_ti2v_5b)")
    ap.add_argument("--sp-size", type=int, default=None, help="ranks per SP group (default: the world size)")
    ap.add_argument("--kv-cache", default="bf16", choices=list(KV_STORAGES), help="KV-cache storage")
    ap.add_argument("--kv-comm", default="auto", choices=list(KV_COMM_CHOICES),
                    help="how K/V cross the all-to-all: plain (model dtype), nvfp4 (packed codes + scales, "
                         "needs --kv-cache nvfp4); auto = nvfp4 with an NVFP4 cache under SP")
    ap.add_argument("--kv-rule", default="mse", choices=sorted(SCALE_RULES), help="NVFP4 KV scale rule")
    ap.add_argument("--shot", action="append", default=None, metavar="PROMPT[::BLOCKS]",
                    help="one shot of the (single) video; repeat for multi-shot")
    ap.add_argument("--prompt-file", type=Path, default=None,
                    help="one video per line: shots 'PROMPT[::BLOCKS]' separated by ' | '")
    ap.add_argument("--blocks", type=int, default=4,
                    help="blocks of the default one-shot video when neither --shot nor --prompt-file is given")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: the preset's)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG scale; 1.0 disables CFG")
    ap.add_argument("--precision", default=None, choices=sorted(PRECISIONS),
                    help="model dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--quant", default="bf16", choices=LINEAR_MODES, help="format of the block linears")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks' pure halves")
    ap.add_argument("--weights", default=None, help="diffusers-format Wan2.2-TI2V-5B folder (default: random)")
    ap.add_argument("--dit", default=None, help="DiT checkpoint overriding --weights")
    ap.add_argument("--text", default=None, choices=["encoder", "random"],
                    help="umT5 encoder, or a fixed random embedding per prompt (default: encoder with "
                         "--weights, else random)")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="VAE-decode each block on the SP root rank")
    ap.add_argument("--video", action=argparse.BooleanOptionalAction, default=True,
                    help="with --decode, write video_NNNN.mp4 (needs imageio-ffmpeg); --no-video decodes only "
                         "(timing)")
    ap.add_argument("--vae-mode", default=None, choices=["sync", "stream", "device"], help="VAE decoding mode")
    ap.add_argument("--save-latents", action="store_true", help="write latents_NNNN.pt")
    ap.add_argument("--seed", type=int, default=0, help="video i uses seed + i; also the random weights' seed")
    ap.add_argument("--warmup-blocks", type=int, default=0, help="blocks per video left out of the FPS figures")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--metrics-out", type=Path, default=None, help="JSON summary written by global rank 0")
    return ap.parse_args(argv)


def _videos(args: argparse.Namespace, scene_cut_prefix: str) -> list[list[str]]:
    """Per video, its per-block prompts."""
    from impl.pipeline import parse_shot, shot_prompts
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


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a temp file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _prepare(args: argparse.Namespace):
    """Everything that can fail on bad input, before any process group exists."""
    from impl.config import get_preset
    stream = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                ("vae_mode", args.vae_mode)) if v is not None}
    preset = get_preset(args.preset).replace(stream=stream)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = args.sp_size if args.sp_size is not None else world
    if sp < 1 or world % sp:
        raise ParallelConfigError(f"--sp-size: {sp} must be a positive divisor of the world size {world}")
    config = SPInferenceConfig(sp_size=sp, kv_cache=args.kv_cache, kv_comm=args.kv_comm, kv_rule=args.kv_rule)
    config.check(preset)
    if args.warmup_blocks < 0:
        raise ValueError(f"--warmup-blocks: must be >= 0, got {args.warmup_blocks}")
    videos = _videos(args, preset.stream.scene_cut_prefix)
    return preset, config, videos


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preset, config, videos = _prepare(args)
    except (ConfigError, ParallelConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from impl.parallel.groups import init_distributed
    _, _, device = init_distributed()
    try:
        return _run(args, preset, config, videos, device)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, preset: Preset, config: SPInferenceConfig, videos: list[list[str]], device: torch.device) -> int:
    from impl.parallel.groups import build_groups
    groups = build_groups(config.sp_size)
    dtype = PRECISIONS[args.precision or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)  # same random weights on every rank
    model = CausalWanDiT(preset.dit, device=device, dtype=dtype).eval()
    if args.dit or args.weights:
        from impl.model.checkpoint import load_dit_weights
        load_dit_weights(model, args.dit or args.weights)
    if args.quant != "bf16":
        from impl.quant.apply import quantize_model
        from impl.quant.config import QuantConfig
        quantize_model(model, QuantConfig.for_inference(args.quant))
    if args.compile:
        model.compile_hot_path()
    use_encoder = (args.text or ("encoder" if args.weights else "random")) == "encoder"
    if use_encoder:
        from impl.model.text_encoder import TextEncoder
        text = (TextEncoder.from_pretrained(args.weights, dtype=dtype, device=device, max_length=preset.text.max_length)
                if args.weights else TextEncoder.from_preset(preset.text, dtype=dtype, device=device, seed=args.seed))
        embedder = lambda p: text.encode([p])  # noqa: E731
    else:
        embedder = random_text_embedder(preset, dtype, device, seed=args.seed)
    vae = None
    if args.decode and groups.is_sp_root:  # the VAE lives on the SP root only
        from impl.model.vae import build_vae, load_vae
        vae = (load_vae(args.weights, dtype=dtype, device=device) if args.weights
               else build_vae(preset.vae, dtype=dtype, device=device, seed=args.seed))
    sp = SPInference(model, preset, groups, text_embedder=embedder, vae=vae, device=device, config=config)

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
            _write_json(args.out / f"timings_{i:04d}.json",
                        {"video": i, "prompts": videos[i], "timings": [t.__dict__ for t in timings]})

    if groups.rank == 0:
        ex = sp.exchange
        measured = {k: v // max(blocks_done, 1) for k, v in ex.sent.items()}
        analytic = config.block_bytes(preset, torch.tensor([], dtype=dtype).element_size())
        frames = preset.vae.temporal_factor * preset.stream.frames_per_block
        dit_s = sum(t.dit_ms for t in steady) / 1e3
        metrics = {
            "sp_size": config.sp_size, "dp_size": groups.dp_size, "kv_cache": config.kv_cache,
            "kv_comm": config.exchange, "preset": preset.name, "steps": preset.stream.steps,
            "precision": str(dtype).replace("torch.", ""), "device": str(device),
            "videos": len(mine), "blocks": blocks_done, "measured_blocks": len(steady),
            "dit_fps": frames * len(steady) / dit_s if steady and dit_s > 0 else None,
            "e2e_fps": frames * len(steady) / e2e_s if steady and e2e_s > 0 else None,
            "block_ms_p50": statistics.median(t.total_ms for t in steady) if steady else None,
            "dit_block_ms_p50": statistics.median(t.dit_ms for t in steady) if steady else None,
            "comm_bytes_per_block": sum(measured.values()),
            "comm_bytes_per_block_all_ranks": sum(measured.values()) * config.sp_size,
            "comm_kv_bytes_per_block": measured["kv"],
            "comm_bytes_per_block_analytic": analytic.total,
            "comm_by_category": measured,
            "collectives_per_block": {k: v / max(blocks_done, 1) for k, v in ex.calls.items()},
            "kv_mem_gb": sp.cache.memory_bytes() / 1e9 if sp.cache is not None else None,
        }
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if args.metrics_out is not None:
            _write_json(args.metrics_out, metrics)
        print(json.dumps({k: metrics[k] for k in ("sp_size", "kv_comm", "dit_fps", "e2e_fps",
                                                  "comm_bytes_per_block")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
