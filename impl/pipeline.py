"""Streaming block-autoregressive generation.

The block loop lives in :class:`impl.session.StreamingSession` (:meth:`StreamingPipeline.session`),
pulled block by block, with prompt switches between blocks; :meth:`StreamingPipeline.generate` is
its offline client. For each AR block (``frames_per_block`` latent frames): detect a scene cut
(prompt starts with the scene-cut prefix) and bump the shot's RoPE offset; take the block's
noise; run the sampler (each step is one KV-cached forward that overwrites this block's K/V);
run one more forward at t = 0 on the clean latents so the cache holds clean K/V (re-cache);
hand the block to the VAE block decoder (impl/vae_decode.py), which appends its frames to the
mp4 as they arrive. A per-block timing hook reports DiT and VAE time.

The pipeline is built by :func:`impl.inference.build.build_pipeline` from one
:class:`~impl.inference.config.InferenceConfig`, which it keeps: ``cfg.stream_preset`` gives the
block geometry and sampler, ``cfg.kv_cache`` the cache's storage, ``cfg.vae_mode`` the decode
("sync" decodes in the DiT loop; "stream", a side CUDA stream, and "device", a worker with the
VAE on ``vae_device``, overlap the decode of block k with the DiT of later blocks, which waits
only when ``vae_queue_depth`` blocks are still decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from impl.inference.config import InferenceConfig
from impl.model.attention import CachedBlock, SequenceParallel, TextContext
from impl.model.dit import CausalWanDiT
from impl.model.kv_cache import BlockPlan, KVCache
from impl.modes import SwitchMode, check_choice
from impl.sampling import make_sampler, official_sigmas
from impl.session import BlockTiming, StreamingSession, follow_prompts

TextEmbedder = Callable[[str], torch.Tensor]


@dataclass
class GenerationResult:
    latents: torch.Tensor                       # [B, C, F, h, w] on the CPU, float32
    frames: torch.Tensor | None                 # [B, 3, T, H, W] in [-1, 1] on the CPU, or None
    timings: list[BlockTiming] = field(default_factory=list)
    video_path: Path | None = None


def parse_shot(text: str) -> tuple[str, int]:
    """A command-line shot: ``"PROMPT"`` (one block) or ``"PROMPT::BLOCKS"``."""
    prompt, sep, blocks = text.rpartition("::")
    if not sep:
        return text, 1
    if not blocks.isdigit() or int(blocks) < 1:
        raise ValueError(f"shot {text!r}: BLOCKS after '::' must be a positive integer")
    return prompt, int(blocks)


def shot_prompts(shots: Sequence[tuple[str, int]], scene_cut_prefix: str) -> list[str]:
    """Per-block prompts from ``[(prompt, num_blocks), ...]``; later shots get the scene-cut prefix."""
    prompts: list[str] = []
    for i, (prompt, blocks) in enumerate(shots):
        if blocks < 1:
            raise ValueError(f"shots[{i}]: num_blocks must be >= 1, got {blocks}")
        first = prompt if i == 0 or prompt.startswith(scene_cut_prefix) else scene_cut_prefix + prompt
        prompts += [first] + [prompt] * (blocks - 1)
    return prompts


class StreamingPipeline:
    """Block-AR generation with one DiT, one KV cache and one VAE block decoder.

    Build it with :func:`impl.inference.build.build_pipeline` (or ``pipeline_for_model`` for a
    model you own); the constructor trusts that ``cfg`` describes ``model``."""

    def __init__(self, model: CausalWanDiT, cfg: InferenceConfig, *, text_embedder: TextEmbedder,
                 vae=None, device: torch.device | str = "cpu", sp: SequenceParallel | None = None):
        self.model = model
        self.cfg = cfg
        self.preset = cfg.stream_preset
        self.stream = self.preset.stream
        self.embed_text = text_embedder
        self.vae = vae
        self.device = torch.device(device)
        self._cache: KVCache | None = None
        # Sequence-parallel inference (impl.inference.sp): every forward goes through
        # the exchange, and this rank's cache holds num_heads / sp heads of every token.
        self.sp = sp
        self._session = None   # weakref to the open StreamingSession: one at a time (one cache)
        # bf16_attention_steps: those denoising steps run the FP8 backend's BF16 sibling.
        self._bf16_steps = cfg.bf16_attention_step_indices()
        self._attention = {False: model.attention_backend}
        if self._bf16_steps:
            from impl.model.attention_backends import attention_fn, backend
            self._attention[True] = attention_fn(backend(cfg.attention).precise, self.device, model.cfg.head_dim)

    # ---- set-up ----
    def cache_for(self, batch: int) -> KVCache:
        """The KV cache, allocated once per batch size and reset between videos."""
        dit = self.model.cfg
        if self._cache is None or self._cache.batch != batch:
            self._cache = None  # free the old one before allocating
            sp_size = 1 if self.sp is None else self.sp.size
            self._cache = KVCache(num_layers=dit.num_layers, batch=batch, num_heads=dit.num_heads // sp_size,
                                  head_dim=dit.head_dim, tokens_per_block=self.preset.tokens_per_block,
                                  stream=self.stream, dtype=self.model.dtype, device=self.device,
                                  storage=self.cfg.kv_cache, kv_rule=self.cfg.kv_rule,
                                  amax_reduce=None if self.sp is None else self.sp.reduce_max)
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
                  cache: KVCache, plan: BlockPlan, cfg_scale: float, held: int = 0) -> torch.Tensor:
        """The (CFG-combined) flow prediction at timestep ``t``; the first ``held`` frames get
        t = 0 (clean conditioning frames: the image of image-to-video)."""
        b, _, f = x.shape[:3]
        inp = torch.cat([x, x]) if cfg_scale > 1.0 else x
        ts = torch.full((inp.shape[0], f), float(t), device=self.device)
        if held:
            ts[:, :held] = 0.0
        out = self.model(inp.to(self.model.dtype), ts, ctx, frame_positions=pos, call=CachedBlock(cache, plan, self.sp))
        if cfg_scale > 1.0:
            cond, uncond = out.float().chunk(2)
            return uncond + cfg_scale * (cond - uncond)
        return out.float()

    def _shots(self, prompts: Sequence[str]):
        """(block, prompt, shot_start, shot index) per block: a block opens a new shot when it is
        the first or its prompt starts with the scene-cut prefix."""
        shot = 0
        for b, prompt in enumerate(prompts):
            shot_start = b == 0 or prompt.startswith(self.stream.scene_cut_prefix)
            if shot_start and b > 0:
                shot += 1
            yield b, prompt, shot_start, shot

    def _block_positions(self, block: int, shot: int) -> torch.Tensor:
        """Temporal RoPE positions of a block's frames: absolute index plus the shot offset."""
        s = self.stream
        return torch.arange(s.frames_per_block) + block * s.frames_per_block + shot * s.shot_rope_offset

    def _denoise_block(self, x: torch.Tensor, ctx: TextContext, pos: torch.Tensor, cache: KVCache,
                       plan: BlockPlan, cfg_scale: float, exit_step: int | None = None,
                       clean: torch.Tensor | None = None) -> torch.Tensor:
        """Run the sampler over one block, then the clean re-cache pass.

        ``exit_step`` (few-step distillation rollouts): stop at that step and return the
        model's x0 prediction there, computed with autograd enabled (the earlier steps and the
        re-cache pass never track gradients).
        ``clean`` [B, C, k, h, w] (image-to-video): the block's first k latent frames, held clean
        through every step (t = 0 for them, put back after each sampler step), as Wan2.2 TI2V does."""
        s = self.stream
        held = 0 if clean is None else clean.shape[2]
        if held and exit_step is not None:
            raise ValueError("_denoise_block: clean conditioning frames and exit_step do not combine")
        if held:
            clean = clean.to(x.device, x.dtype)
            x = torch.cat([clean, x[:, :, held:]], dim=2)
        sampler = make_sampler(s.sampler, s.steps, s.shift)
        for i, t in enumerate(sampler.timesteps):
            self._attention_for(i)
            # Denoising steps only attend: later blocks see the re-cache pass's K/V.
            if i == exit_step:
                with torch.enable_grad():
                    v = self._velocity(x, t, ctx, pos, cache, plan.attention_only(), cfg_scale)
                    x0 = x - float(official_sigmas(s.steps, s.shift)[i]) * v
                self._attention_for(None)
                self._velocity(x0.detach(), 0.0, ctx, pos, cache, plan, cfg_scale)
                return x0
            x = sampler.step(self._velocity(x, t, ctx, pos, cache, plan.attention_only(), cfg_scale, held), t, x)
            if held:
                x = torch.cat([clean, x[:, :, held:]], dim=2)
        self._attention_for(None)
        self._velocity(x, 0.0, ctx, pos, cache, plan, cfg_scale)  # re-cache clean K/V
        return x

    def _attention_for(self, step: int | None) -> None:
        """Set the self-attention kernel for denoising step ``step`` (None: the re-cache pass).
        A no-op unless ``bf16_attention_steps`` names some steps."""
        if self._bf16_steps:
            self.model.set_attention_backend(self._attention[step in self._bf16_steps])

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], noise: torch.Tensor, exit_step: int | None) -> torch.Tensor:
        """Generate latents [B, C, F, h, w] exactly like :meth:`generate` (same cache, sampler and
        shots, no decode), stopping each block at ``exit_step`` with a differentiable x0
        prediction (None: the full sampler, no gradients). Used by DMD distillation."""
        s = self.stream
        if exit_step is not None and not 0 <= exit_step < s.steps:
            raise ValueError(f"exit_step: must be in [0, {s.steps}) or None, got {exit_step}")
        fpb = s.frames_per_block
        if noise.dim() != 5 or noise.shape[2] != len(prompts) * fpb:
            raise ValueError(f"noise: expected [B, C, {len(prompts) * fpb}, h, w], got {tuple(noise.shape)}")
        if s.guidance_scale > 1.0:
            raise ValueError("rollout: the student runs without CFG (guidance_scale 1.0)")
        batch = noise.shape[0]
        cache = self.cache_for(batch)
        out = []
        for b, prompt, shot_start, shot in self._shots(prompts):
            # Text K/V with autograd (not the cache's memo): LoRA on the cross-attention
            # projections must see the generator loss's gradient too.
            with torch.enable_grad():
                ctx = self.model.encode_text(self.embed_text(prompt).to(self.device).expand(batch, -1, -1))
            plan = cache.begin_block(b, shot_start=shot_start)
            x = noise[:, :, b * fpb:(b + 1) * fpb].to(self.device, torch.float32)
            out.append(self._denoise_block(x, ctx, self._block_positions(b, shot), cache, plan, 1.0, exit_step))
        with torch.enable_grad():  # keep the exit steps' graphs through the concatenation
            return torch.cat(out, dim=2)

    def frame_positions(self, prompts: Sequence[str]) -> torch.Tensor:
        """RoPE positions of every frame of a video with these block prompts (shots included)."""
        return torch.cat([self._block_positions(b, shot) for b, _, _, shot in self._shots(prompts)])

    def session(self, prompt: str, **options) -> StreamingSession:
        """Open a :class:`impl.session.StreamingSession` on this pipeline (one at a time): pull
        its blocks one by one and switch its prompt between pulls. ``options`` are the
        session's (seed, noise, max_blocks, image, video, latents, decode, ...)."""
        return StreamingSession(self, prompt, **options)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, seed: int = 0, noise: torch.Tensor | None = None,
                 negative_prompt: str = "", decode: bool | None = None, video_path: str | Path | None = None,
                 on_block: Callable[[BlockTiming], None] | None = None,
                 latent_dtype: torch.dtype = torch.float32, shot_switch: SwitchMode = "cut") -> GenerationResult:
        """Generate ``len(prompts)`` blocks, one prompt per block (see :func:`shot_prompts`).
        ``decode`` (default: whenever the pipeline has a VAE) decodes each block to frames.

        A client of :meth:`session`: a block whose prompt starts with the scene-cut prefix opens
        a new shot, by a scene cut or, with ``shot_switch`` ``recache`` / ``direct``, by that
        continuous switch to the prompt without its prefix; any other prompt change is a direct
        switch (text K/V only, no re-cache)."""
        check_choice(shot_switch, SwitchMode, "shot_switch")
        s = self.stream
        if decode is None:
            decode = self.vae is not None
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
        with self.session(prompts[0], noise=noise, negative_prompt=negative_prompt,
                          decode=decode or video_path is not None, video_path=video_path, on_block=on_block,
                          latent_dtype=latent_dtype) as session:
            blocks = list(follow_prompts(session, prompts, shot_switch))
        blocks += session.pop_ready()   # the blocks whose decode finished while the session closed
        frames = [blk.frames for blk in blocks if blk.frames is not None]
        return GenerationResult(torch.cat([blk.latents for blk in blocks], dim=2),
                                torch.cat(frames, dim=2) if frames else None,
                                [blk.timing for blk in blocks], Path(video_path) if video_path is not None else None)
