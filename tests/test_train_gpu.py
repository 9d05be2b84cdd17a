"""GPU-only checks of the training path (skipped without CUDA)."""

import pytest
import torch

from impl.config import get_preset
from impl.parallel.attention import FlexMasked, MaskedSDPA
from impl.parallel.layout import TeacherForcingLayout, dense_mask
from impl.train.config import TrainConfig
from impl.train.synthetic import SyntheticLatentSource
from impl.train.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind,sp", [("balanced", 1), ("balanced", 2), ("naive", 2)])
def test_flex_teacher_forcing_mask_equals_dense(kind, sp):
    """FlexAttention's block mask gives the dense-mask attention (the layout order after the
    Ulysses exchange, lengths that are not multiples of 128)."""
    layout = TeacherForcingLayout(12, 3, sp, kind)
    tpf = 37
    s = 2 * 12 * tpf
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, s, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    dense = MaskedSDPA(dense_mask(layout, tpf, "cuda"))(q, k, v)
    flex = FlexMasked(layout, tpf, torch.device("cuda"))(q, k, v)
    torch.testing.assert_close(flex.float(), dense.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp8", "nvfp4_emulated"])
def test_training_steps_on_gpu(precision):
    preset = get_preset("tiny")
    h, w = preset.latent_hw
    src = SyntheticLatentSource(preset.dit.in_channels, 8, h, w, preset.text.max_length, preset.dit.text_dim,
                                frames_per_block=preset.stream.frames_per_block, length=2, seed=0)
    trainer = Trainer(TrainConfig(frames=8, precision=precision, steps=3, ema_start_step=1), device="cuda")
    stats = trainer.fit(src, progress=False)
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert trainer.ema is not None and next(iter(trainer.ema.shadow.values())).is_cuda
