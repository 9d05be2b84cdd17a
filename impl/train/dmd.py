"""DMD distillation of the AR model into a few-step student (LoRA), after the release's stage 2.

Three networks of the same architecture: the frozen **teacher** (real score: the AR
checkpoint, run with CFG), the **student** (generator: base + LoRA) and the **critic** (fake
score: base + its own LoRA). Per step:

- rollout: the student generates a clip through :meth:`StreamingPipeline.rollout` (the
  inference pipeline, KV cache and UniPC step list it will be deployed with), leaving every
  block at one shared random exit step with a differentiable x0 prediction;
- critic: flow matching on the detached rollout (every step);
- generator (every ``gen_update_every`` steps): noise the rollout to a random t, take the
  teacher's CFG x0 prediction and the critic's, and move the student along
  g = (x_fake - x_real) / n, n = mean |x_gen - x_real| per block (DMD with per-block
  normalisation); loss = 0.5 mean((x_gen - sg(x_gen - g))^2), so dL/dx_gen = g / N.

Score networks see the whole clip under the block-causal mask with the same RoPE positions
(shots included) as the rollout. Randomness is a function of (seed, step, sample), so DP
ranks that each hold part of a batch reproduce the single-process batch.

``sharding="fsdp"`` shards the three networks over the ranks with FSDP2
(:func:`impl.parallel.fsdp.shard_for_lora`): the frozen base weights, the memory that matters,
in the compute dtype, the LoRA tensors as masters (float32; float64 for fp64); gradients are reduced in the
backward instead of by ``sync_gradients``. Save LoRA files from
:func:`impl.parallel.fsdp.gather_lora_state_dict` (collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from impl.config import ConfigError, Preset, _require
from impl.inference.build import dtype_name, pipeline_for_model
from impl.inference.config import InferenceConfig
from impl.model.attention import FullSequence
from impl.model.dit import CausalWanDiT
from impl.model.masks import block_visibility_mask
from impl.modes import Sharding, check_choice
from impl.parallel.gradients import sync_gradients
from impl.parallel.groups import ParallelGroups, single_process
from impl.train.flow import FlowSchedule, shared_generator
from impl.train.optim import MasterWeightAdamW

# Random streams of shared_generator: the exit step, then (rollout noise, loss noise, loss t)
# for the generator loss and, separately, for the critic loss (each does its own rollout).
_EXIT = 1
_GEN, _CRITIC = (2, 3, 4), (5, 6, 7)


@dataclass(frozen=True)
class DMDConfig:
    steps: int = 4                     # student sampling steps (4 or 2)
    real_guidance_scale: float = 3.0   # teacher: cond + s (cond - uncond)
    gen_update_every: int = 5          # critic:generator update ratio
    lr: float = 1e-5
    lr_critic: float = 2e-6
    beta1: float = 0.0
    beta2: float = 0.999
    grad_clip: float = 10.0
    t_min: float = 20.0
    t_max: float = 980.0
    batch_size: int = 1                # clips per rank
    negative_prompt: str = ""
    seed: int = 0
    sharding: Sharding = "none"        # none = replicated; fsdp = the three networks sharded (FSDP2)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "DMDConfig.steps", "must be >= 1")
        _require(self.gen_update_every >= 1, "DMDConfig.gen_update_every", "must be >= 1")
        _require(0 <= self.t_min < self.t_max <= 1000, "DMDConfig.t_min/t_max", "need 0 <= t_min < t_max <= 1000")
        _require(self.batch_size >= 1, "DMDConfig.batch_size", "must be >= 1")
        _require(self.lr > 0 and self.lr_critic > 0, "DMDConfig.lr", "learning rates must be > 0")
        check_choice(self.sharding, Sharding, "DMDConfig.sharding")


TextEmbedder = Callable[[str], torch.Tensor]   # prompt -> [1, L, text_dim]


class DMDTrainer:
    def __init__(self, teacher: CausalWanDiT, student: CausalWanDiT, critic: CausalWanDiT, preset: Preset,
                 cfg: DMDConfig, text_embedder: TextEmbedder, *, device: torch.device | str = "cpu",
                 groups: ParallelGroups | None = None):
        if any(p.requires_grad for p in teacher.parameters()):
            raise ConfigError("DMDTrainer: the teacher must be frozen (requires_grad False)")
        self.teacher, self.student, self.critic, self.cfg = teacher, student, critic, cfg
        self.device = torch.device(device)
        self.groups = groups or single_process()
        self.embed = text_embedder
        # The student's rollouts run the deployed inference pipeline: cfg.steps steps, no CFG.
        infer = InferenceConfig(preset=preset, steps=cfg.steps, guidance_scale=1.0, dtype=dtype_name(student.dtype))
        self.pipe = pipeline_for_model(student, infer, self.device, text_embedder=text_embedder)
        self.preset = self.pipe.preset
        self.schedule = FlowSchedule(self.preset.stream.shift)
        betas = (cfg.beta1, cfg.beta2)
        if cfg.sharding == "fsdp":
            from impl.parallel.fsdp import shard_for_lora
            from impl.train.optim import ShardedAdamW
            compute = student.dtype   # read before sharding: afterwards the LoRA shards are float32
            plans = [shard_for_lora(m, self.groups, self.device, compute_dtype=compute)
                     for m in (teacher, student, critic)]
            self.opt_student = ShardedAdamW(student.named_parameters(), plans[1], lr=cfg.lr, betas=betas,
                                            weight_decay=0.0)
            self.opt_critic = ShardedAdamW(critic.named_parameters(), plans[2], lr=cfg.lr_critic, betas=betas,
                                           weight_decay=0.0)
        else:
            self.opt_student = MasterWeightAdamW(student.named_parameters(), lr=cfg.lr, betas=betas, weight_decay=0.0)
            self.opt_critic = MasterWeightAdamW(critic.named_parameters(), lr=cfg.lr_critic, betas=betas,
                                                weight_decay=0.0)
        self._masks: dict[int, torch.Tensor] = {}
        self.step = 0

    # ---- pieces -----------------------------------------------------------------------
    def _sample_gens(self, step: int, stream: int) -> list[torch.Generator]:
        first = self.groups.dp_rank * self.cfg.batch_size
        return [shared_generator(self.cfg.seed, step, stream, first + b) for b in range(self.cfg.batch_size)]

    def _noise(self, prompts: Sequence[str], step: int, stream: int) -> torch.Tensor:
        lh, lw = self.preset.latent_hw
        shape = (1, self.student.cfg.in_channels, len(prompts) * self.preset.stream.frames_per_block, lh, lw)
        return torch.cat([torch.randn(shape, generator=g) for g in self._sample_gens(step, stream)])

    def _sigma(self, step: int, stream: int) -> torch.Tensor:
        """One loss timestep per sample on the shifted grid, clamped to [t_min, t_max] -> sigma [B]."""
        s = self.schedule
        idx = torch.cat([torch.randint(0, s.num_timesteps, (1,), generator=g) for g in self._sample_gens(step, stream)])
        t = s.timesteps[idx].clamp(self.cfg.t_min, self.cfg.t_max)
        return (t / 1000.0).float()

    def _exit_step(self, step: int) -> int:
        g = shared_generator(self.cfg.seed, step, _EXIT)   # the same for every block and rank
        return int(torch.randint(0, self.cfg.steps, (1,), generator=g))

    def _context(self, model: CausalWanDiT, prompts: Sequence[str], batch: int):
        emb = torch.stack([self.embed(p).to(self.device)[0] for p in prompts])   # [G, L, D]
        return model.encode_text(emb[None].expand(batch, -1, -1, -1))

    def score_x0(self, model: CausalWanDiT, x_t: torch.Tensor, sigma: torch.Tensor, prompts: Sequence[str],
                 negative: bool = False) -> torch.Tensor:
        """x0 prediction of a score network on the whole clip (block-causal mask)."""
        b, _, f = x_t.shape[:3]
        fpb = self.preset.stream.frames_per_block
        texts = [self.cfg.negative_prompt] * len(prompts) if negative else list(prompts)
        n = len(prompts)
        if n not in self._masks:   # the same dense mask serves every score call of this length
            self._masks[n] = block_visibility_mask(n, fpb * self.preset.tokens_per_frame, device=self.device)
        mask = self._masks[n]
        t = (sigma * 1000.0)[:, None].expand(b, f).to(self.device)
        v = model(x_t.to(model.dtype), t, self._context(model, texts, b),
                  frame_positions=self.pipe.frame_positions(prompts), call=FullSequence.masked(mask))
        s = sigma.to(self.device)[:, None, None, None, None]
        return x_t - s * v.float()

    def _noised(self, x0: torch.Tensor, step: int, streams: tuple[int, int, int]):
        sigma = self._sigma(step, streams[2])
        gens = self._sample_gens(step, streams[1])
        eps = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens]).to(self.device)
        s = sigma.to(self.device)[:, None, None, None, None]
        return (1 - s) * x0 + s * eps, eps, sigma

    # ---- losses -------------------------------------------------------------------------
    def generator_loss(self, prompts: Sequence[str], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x_gen = self.pipe.rollout(prompts, self._noise(prompts, step, _GEN[0]), self._exit_step(step))
        x_t, _, sigma = self._noised(x_gen.detach(), step, _GEN)
        with torch.no_grad():
            cond = self.score_x0(self.teacher, x_t, sigma, prompts)
            x_real = cond
            if self.cfg.real_guidance_scale:
                uncond = self.score_x0(self.teacher, x_t, sigma, prompts, negative=True)
                x_real = cond + self.cfg.real_guidance_scale * (cond - uncond)
            x_fake = self.score_x0(self.critic, x_t, sigma, prompts)
            fpb = self.preset.stream.frames_per_block
            b, c, f, h, w = x_gen.shape
            blocks = lambda x: x.reshape(b, c, f // fpb, fpb, h, w)   # noqa: E731
            norm = (blocks(x_gen.detach()) - blocks(x_real)).abs().mean(dim=(1, 3, 4, 5), keepdim=True)
            g = torch.nan_to_num(blocks(x_fake - x_real) / norm).reshape(x_gen.shape)
        target = (x_gen - g).detach()
        loss = 0.5 * torch.nn.functional.mse_loss(x_gen.double(), target.double())
        return loss, {"dmd_grad_norm": float(g.norm()), "loss_sigma": float(sigma.mean())}

    def critic_loss(self, prompts: Sequence[str], step: int) -> torch.Tensor:
        with torch.no_grad():
            x_gen = self.pipe.rollout(prompts, self._noise(prompts, step, _CRITIC[0]), self._exit_step(step)).detach()
        x_t, eps, sigma = self._noised(x_gen, step, _CRITIC)
        x0 = self.score_x0(self.critic, x_t, sigma, prompts)
        v = (x_t - x0) / sigma.to(self.device)[:, None, None, None, None]
        return torch.nn.functional.mse_loss(v, eps - x_gen)

    # ---- one step -------------------------------------------------------------------------
    def _reduce_gradients(self, model: CausalWanDiT) -> None:
        if self.cfg.sharding == "none":   # FSDP reduce-scattered them in the backward already
            sync_gradients([p for p in model.parameters() if p.requires_grad], self.groups)

    def train_step(self, prompts: Sequence[str]) -> dict[str, float]:
        """Critic update every step; student update every ``gen_update_every`` steps."""
        step, stats = self.step, {}
        loss_c = self.critic_loss(prompts, step)
        loss_c.backward()
        self._reduce_gradients(self.critic)
        stats["critic_loss"] = float(loss_c.detach())
        stats["critic_grad_norm"] = self.opt_critic.step(self.cfg.grad_clip)
        if step % self.cfg.gen_update_every == 0:
            loss_g, extra = self.generator_loss(prompts, step)
            loss_g.backward()
            self._reduce_gradients(self.student)
            stats.update(extra, generator_loss=float(loss_g.detach()), generator_grad_norm=self.opt_student.step(self.cfg.grad_clip))
        self.step += 1
        return stats
