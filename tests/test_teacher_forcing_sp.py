"""Balanced and naive SP teacher forcing equal one process: loss and gradients (float64)."""

import numpy as np
import pytest
import torch

from impl.config import get_preset
from impl.model.dit import CausalWanDiT
from impl.parallel.attention import teacher_forcing_core
from impl.parallel.gradients import sp_all_reduce_sum, sync_gradients
from impl.parallel.groups import ParallelConfigError, build_groups
from impl.parallel.layout import CLEAN, NOISY, TeacherForcingLayout, attention_density, dense_mask
from impl.train.flow import FlowSchedule, shared_generator
from impl.train.teacher_forcing import TFInputs, teacher_forcing_loss
from dist_harness import run_distributed

FRAMES = 8


def _setup():
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = CausalWanDiT(preset.dit, dtype=torch.float64)
    h, w = preset.latent_hw
    g = shared_generator(1, 0)
    fpb = preset.stream.frames_per_block
    x0 = torch.randn(1, preset.dit.in_channels, FRAMES, h, w, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sched = FlowSchedule()
    idx = sched.sample_block_indices(g, 1, FRAMES // fpb)
    text = torch.randn(1, FRAMES // fpb, preset.text.max_length, preset.dit.text_dim, generator=g,
                       dtype=torch.float64)
    return preset, model, TFInputs(x0, list(range(FRAMES)), noise, idx, text), sched


def _loss_and_grads(rank, world, sp, kind):
    preset, model, inputs, sched = _setup()
    groups = build_groups(sp)
    layout = TeacherForcingLayout(FRAMES, preset.stream.frames_per_block, sp, kind)
    core = teacher_forcing_core(layout, preset.tokens_per_frame, "cpu", groups.sp_group)
    out = teacher_forcing_loss(model, layout, groups.sp_rank, inputs, sched, core)
    out.loss.backward()
    sync_gradients(model.parameters(), groups)
    total = sp_all_reduce_sum(out.loss, groups)
    return float(total), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_layout_tokens_and_mask():
    bal = TeacherForcingLayout(8, 2, 2, "balanced")
    assert bal.rank_frames(1) == [(CLEAN, 4), (CLEAN, 5), (CLEAN, 6), (CLEAN, 7), (NOISY, 4), (NOISY, 5),
                                  (NOISY, 6), (NOISY, 7)]
    nai = TeacherForcingLayout(8, 2, 2, "naive")
    assert {c for c, _ in nai.rank_frames(0)} == {CLEAN} and {c for c, _ in nai.rank_frames(1)} == {NOISY}
    assert nai.needed_frames(1) == list(range(8))
    m = dense_mask(TeacherForcingLayout(8, 2, 1), 1)
    assert m.float().mean().item() == pytest.approx(attention_density(TeacherForcingLayout(8, 2, 1)))
    # Under balanced SP the mask is the plain mask with rows and columns permuted.
    plain = TeacherForcingLayout(8, 2, 1).global_frames()
    perm = [plain.index(cf) for cf in bal.global_frames()]
    assert torch.equal(dense_mask(bal, 1), m[perm][:, perm])


def test_reference_check_tf_mask_agrees():
    """Our natural mask equals the rule of shared/reference/check_tf_mask.py's plain mask."""
    layout = TeacherForcingLayout(18, 3, 3, "balanced")
    nat = dense_mask(layout, 2).numpy()
    L, bs = 18 * 2, 3 * 2
    idx = np.arange(2 * L)
    q, k = idx[:, None], idx[None, :]
    qc, kc = q < L, k < L
    qb, kb = np.where(qc, q, q - L) // bs, np.where(kc, k, k - L) // bs
    plain = (qc & kc & (k < (qb + 1) * bs)) | (~qc & ~kc & (qb == kb)) | (~qc & kc & (k < qb * bs)) | (q == k)
    order = [(c, f) for c, f in layout.global_frames()]
    tok = np.array([c * L + f * 2 + j for c, f in order for j in range(2)])
    assert np.array_equal(nat, plain[np.ix_(tok, tok)])


def _both_layouts(rank, world, sp):
    # Fresh parameters per layout: gradients must not accumulate across the two runs.
    return [_loss_and_grads(rank, world, sp, kind) for kind in ("balanced", "naive")]


@pytest.mark.parametrize("sp", [2, 4])
def test_sp_equals_single_process(sp):
    """Balanced and naive SP give the one-process loss and gradients (float64, real gloo ranks)."""
    ref_loss, ref_grads = _loss_and_grads(0, 1, 1, "balanced")
    for per_rank in run_distributed(_both_layouts, sp, sp):
        for loss, grads in per_rank:
            assert loss == pytest.approx(ref_loss, rel=1e-12)
            for name, g in ref_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13, msg=name)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ParallelConfigError, match="whole"):
        TeacherForcingLayout(8, 2, 3, "balanced")
    with pytest.raises(ParallelConfigError, match="sp_layout"):
        TeacherForcingLayout(8, 2, 2, "ring")
