"""One teacher-forcing training step (forward, backward, AdamW) on synthetic latents."""

import math

import pytest
import torch

from _bench import TARGETS, run_benchmark
from impl.config import get_preset
from impl.train.config import TrainConfig
from impl.train.sampler import ShardedSampler
from impl.train.synthetic import SyntheticLatentSource
from impl.train.trainer import Trainer


@pytest.mark.parametrize("target", TARGETS)
def test_train_step(benchmark, target):
    # CPU: tiny preset, 4 latent frames (2 AR blocks), fp32. GPU: 5B width (3072, 24 heads, FFN
    # 14336) at 2 of 30 layers, 8 latent frames, BF16, gradient checkpointing, FlexAttention mask
    name = target.pick("tiny", "wan22_ti2v_5b")
    cfg = TrainConfig(preset=name, num_layers=target.pick(None, 2), frames=target.pick(4, 8), dtype=target.pick("fp32", "bf16"),
                      steps=10 ** 6, lr=1e-4, ema_start_step=None, checkpoint_every=0,
                      gradient_checkpointing=target.gpu)
    preset = get_preset(name)
    h, w = preset.latent_hw
    source = SyntheticLatentSource(preset.dit.in_channels, cfg.frames, h, w, preset.text.max_length,
                                   preset.dit.text_dim, frames_per_block=preset.stream.frames_per_block, length=2,
                                   seed=0, dtype=target.dtype)
    trainer = Trainer(cfg, device=target.device)
    sampler = ShardedSampler(len(source), 0, 1, seed=cfg.seed)
    before = [p.detach().clone() for p in trainer.model.parameters()][:4]
    stats = run_benchmark(benchmark, target, lambda: trainer.train_step(source, sampler), group="train-step",
                          rounds=target.pick(None, 5), preset=name, frames=cfg.frames, layers=trainer.model.cfg.num_layers)
    assert math.isfinite(stats.loss) and stats.loss > 0 and math.isfinite(stats.grad_norm) and stats.grad_norm > 0
    assert stats.tokens == 2 * cfg.frames * preset.tokens_per_frame
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))   # it trained
