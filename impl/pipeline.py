"""Streaming block-autoregressive generation.

For each AR block (``frames_per_block`` latent frames): detect a scene cut (prompt starts with
the scene-cut prefix) and bump the shot's RoPE offset; take the block's noise; run the sampler
(each step is one KV-cached forward that overwrites this block's K/V); run one more forward at
t = 0 on the clean latents so the cache holds clean K/V (re-cache); decode the block with the
streaming VAE and append its frames to the mp4. A per-block timing hook reports DiT and VAE
time.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from impl.config import Preset
from impl.model.attention import TextContext
from impl.model.dit import CausalWanDiT
from impl.model.kv_cache import BlockPlan, KVCache
from impl.sampling import make_sampler

TextEmbedder = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class BlockTiming:
    block: int
    frames: int          # pixel frames this block delivered (0 if not decoded)
    dit_ms: float        # denoising steps + re-cache pass
    vae_ms: float        # streaming decode of this block (0 if not decoded)
    total_ms: float      # wall time of the whole block, host-synchronised


@dataclass
class GenerationResult:
    latents: torch.Tensor                       # [B, C, F, h, w] on the CPU, float32
    frames: torch.Tensor | None                 # [B, 3, T, H, W] in [-1, 1] on the CPU, or None
    timings: list[BlockTiming] = field(default_factory=list)
    video_path: Path | None = None


def shot_prompts(shots: Sequence[tuple[str, int]], scene_cut_prefix: str) -> list[str]:
    """Per-block prompts from ``[(prompt, num_blocks), ...]``; later shots get the scene-cut prefix."""
    prompts: list[str] = []
    for i, (prompt, blocks) in enumerate(shots):
        if blocks < 1:
            raise ValueError(f"shots[{i}]: num_blocks must be >= 1, got {blocks}")
        first = prompt if i == 0 or prompt.startswith(scene_cut_prefix) else scene_cut_prefix + prompt
        prompts += [first] + [prompt] * (blocks - 1)
    return prompts


class _Timer:
    """Elapsed ms between two points: CUDA events on GPU (no sync until read), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


class StreamingPipeline:
    def __init__(self, model: CausalWanDiT, preset: Preset, *, text_embedder: TextEmbedder,
                 vae=None, device: torch.device | str = "cpu"):
        self.model = model
        self.preset = preset
        self.stream = preset.stream
        self.embed_text = text_embedder
        self.vae = vae
        self.device = torch.device(device)
        self._cache: KVCache | None = None

    # ---- set-up ----
    def cache_for(self, batch: int) -> KVCache:
        """The KV cache, allocated once per batch size and reset between videos."""
        cfg = self.model.cfg
        if self._cache is None or self._cache.k.shape[1] != batch:
            self._cache = None  # free the old one before allocating
            self._cache = KVCache(num_layers=cfg.num_layers, batch=batch, num_heads=cfg.num_heads,
                                  head_dim=cfg.head_dim, tokens_per_block=self.preset.tokens_per_block,
                                  stream=self.stream, dtype=self.model.dtype, device=self.device)
        self._cache.reset()
        return self._cache

    def noise(self, num_blocks: int, *, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Initial noise for the whole video, drawn on the CPU so it is the same on any device."""
        lh, lw = self.preset.latent_hw
        frames = num_blocks * self.stream.frames_per_block
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.model.cfg.in_channels, frames, lh, lw, generator=g)

    def _context(self, cache: KVCache, prompt: str, batch: int, negative: str | None) -> TextContext:
        def build() -> TextContext:
            emb = self.embed_text(prompt).to(self.device).expand(batch, -1, -1)
            if negative is not None:
                emb = torch.cat([emb, self.embed_text(negative).to(self.device).expand(batch, -1, -1)])
            return self.model.encode_text(emb)
        return cache.text_context((prompt, negative), build)

    # ---- the block loop ----
    def _velocity(self, x: torch.Tensor, t: float, ctx: TextContext, pos: torch.Tensor,
                  cache: KVCache, plan: BlockPlan, cfg_scale: float) -> torch.Tensor:
        b, _, f = x.shape[:3]
        inp = torch.cat([x, x]) if cfg_scale > 1.0 else x
        ts = torch.full((inp.shape[0], f), float(t), device=self.device)
        out = self.model(inp.to(self.model.dtype), ts, ctx, frame_positions=pos, cache=cache, plan=plan)
        if cfg_scale > 1.0:
            cond, uncond = out.float().chunk(2)
            return uncond + cfg_scale * (cond - uncond)
        return out.float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, seed: int = 0, noise: torch.Tensor | None = None,
                 negative_prompt: str = "", decode: bool = True, video_path: str | Path | None = None,
                 on_block: Callable[[BlockTiming], None] | None = None,
                 latent_dtype: torch.dtype = torch.float32) -> GenerationResult:
        """Generate ``len(prompts)`` blocks, one prompt per block (see :func:`shot_prompts`)."""
        s = self.stream
        num_blocks = len(prompts)
        if num_blocks < 1:
            raise ValueError("prompts: need at least one block prompt")
        if (decode or video_path is not None) and self.vae is None:
            raise ValueError("decode/video_path need a VAE; build the pipeline with vae=...")
        if noise is None:
            noise = self.noise(num_blocks, seed=seed)
        expect_f = num_blocks * s.frames_per_block
        if noise.dim() != 5 or noise.shape[2] != expect_f or noise.shape[1] != self.model.cfg.in_channels:
            raise ValueError(f"noise: expected [B, {self.model.cfg.in_channels}, {expect_f}, h, w], got {tuple(noise.shape)}")
        batch = noise.shape[0]
        cfg_scale = s.guidance_scale
        negative = negative_prompt if cfg_scale > 1.0 else None
        cache = self.cache_for(batch * (2 if negative is not None else 1))
        decoder = None
        if decode or video_path is not None:
            from impl.model.vae import StreamingDecoder
            decoder = StreamingDecoder(self.vae)
        writer_cm = nullcontext(None)
        if video_path is not None:
            from impl.video_io import Mp4Writer
            writer_cm = Mp4Writer(video_path, fps=self.preset.video.fps)

        timer = _Timer(self.device)
        latents, frames, timings = [], [], []
        shot = 0
        with writer_cm as writer:
            for b, prompt in enumerate(prompts):
                wall0 = time.perf_counter()
                t0 = timer.mark()
                shot_start = b == 0 or prompt.startswith(s.scene_cut_prefix)
                if shot_start and b > 0:
                    shot += 1
                ctx = self._context(cache, prompt, batch, negative)
                plan = cache.begin_block(b, shot_start=shot_start)
                pos = torch.arange(s.frames_per_block) + b * s.frames_per_block + shot * s.shot_rope_offset
                x = noise[:, :, b * s.frames_per_block:(b + 1) * s.frames_per_block].to(self.device, latent_dtype)
                sampler = make_sampler(s.sampler, s.steps, s.shift)
                for t in sampler.timesteps:
                    x = sampler.step(self._velocity(x, t, ctx, pos, cache, plan, cfg_scale), t, x)
                self._velocity(x, 0.0, ctx, pos, cache, plan, cfg_scale)  # re-cache clean K/V
                t1 = timer.mark()
                n_frames, vae_ms = 0, 0.0
                if decoder is not None:
                    block_frames = decoder.decode_block(x)
                    t2 = timer.mark()
                    vae_ms = timer.ms(t1, t2)
                    block_frames = block_frames.float().cpu()
                    n_frames = block_frames.shape[2]
                    frames.append(block_frames)
                    if writer is not None:
                        writer.append(block_frames[0])
                latents.append(x.float().cpu())
                dit_ms = timer.ms(t0, t1)
                timing = BlockTiming(b, n_frames, dit_ms, vae_ms, (time.perf_counter() - wall0) * 1e3)
                timings.append(timing)
                if on_block is not None:
                    on_block(timing)
        return GenerationResult(torch.cat(latents, dim=2), torch.cat(frames, dim=2) if frames else None,
                                timings, Path(video_path) if video_path is not None else None)
