"""The analytic Balanced-vs-naive SP training cost model (repro/benchmarks/sp_training_cost.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from impl.config import DiTConfig, get_preset
from impl.parallel.layout import TeacherForcingLayout, dense_mask
from repro.benchmarks import sp_training_cost as sc
from repro.spec import load_spec

CPU = {"device": "cpu"}
MEASURE = {"gemm_tflops": 750.0, "attn_tflops": 650.0, "link_gbps": 450.0, "vae_encode_tflops": 322.0}
SPEC = Path(__file__).resolve().parents[1] / "experiments" / "sp_training_cost.yaml"


def _variant(**kw):
    return {**sc.SP_TRAINING_COST.defaults(), **kw}


def _run(measure=None, **kw):
    return sc.run_sp_training_cost(_variant(**kw), {**MEASURE, **(measure or {})}, CPU)


def _brute_force_mask(n_blocks: int, block_tokens: int) -> np.ndarray:
    """[clean; noisy] teacher-forcing mask built token by token from the rule."""
    s = 2 * n_blocks * block_tokens
    idx = np.arange(s)
    noisy = idx >= s // 2
    block = (idx % (s // 2)) // block_tokens
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = block[:, None], block[None, :]
    clean_q = ~qn & ~kn & (kb <= qb)
    noisy_q = qn & ((~kn & (kb < qb)) | (kn & (kb == qb)))
    return clean_q | noisy_q


def test_mask_pairs_match_brute_force_and_the_layout_mask():
    for n_blocks, fpb, t in [(1, 1, 3), (4, 1, 5), (4, 2, 3), (7, 1, 2)]:
        expect = int(_brute_force_mask(n_blocks, fpb * t).sum())
        for kind, sp in [("balanced", 1), ("naive", 1), ("balanced", n_blocks), ("naive", 2)]:
            lay = TeacherForcingLayout(n_blocks * fpb, fpb, sp, kind)
            assert sc.mask_pairs(lay, t) == expect == int(dense_mask(lay, t).sum())
    assert _run(frames=96, sp_size=4)["mask_density"] == pytest.approx(0.2708, abs=1e-4)  # code study 3.2


def test_tokens_and_attention_flops_match_brute_force():
    p = get_preset("tiny")                       # 4 tokens/frame, 2 frames/block, 4 heads
    t, fpb = p.tokens_per_frame, p.stream.frames_per_block
    frames = 4 * fpb                             # 4 blocks
    mask = _brute_force_mask(4, fpb * t)
    for sp in (1, 2, 4):
        for layout in ("balanced", "naive"):
            m = sc.training_cost("tiny", frames, sp, layout)
            assert m["tokens_per_rank"] * sp == m["tokens_global"] == mask.shape[0]
            d = p.dit
            per_layer = (4 * d.head_dim * (d.num_heads // sp) * mask.sum()
                         + 4 * d.head_dim * d.num_heads * m["tokens_per_rank"] * p.text.max_length)
            assert m["attn_tflop_per_rank"] * 1e12 == pytest.approx(4 * d.num_layers * per_layer)
            assert m["mask_density"] == pytest.approx(mask.mean())
            # Every rank holds tokens_per_rank tokens of the implementation's layout.
            lay = TeacherForcingLayout(frames, fpb, sp, layout)
            assert all(len(lay.rank_frames(r)) * t == m["tokens_per_rank"] for r in range(sp))


def test_balanced_and_naive_have_equal_dit_cost():
    for frames, sp in [(96, 2), (96, 4), (384, 8)]:
        bal, naive = _run(frames=frames, sp_size=sp, sp_layout="balanced"), _run(frames=frames, sp_size=sp, sp_layout="naive")
        for k in ("tokens_per_rank", "gemm_tflop_per_rank", "attn_tflop_per_rank", "activation_mem_gb",
                  "comm_a2a_bytes_per_rank", "gemm_s", "attn_s"):
            assert bal[k] == naive[k], k


def test_balanced_vae_windows_f96_sp4():
    # Raw windows [0, 93), [0, 189), [76, 285), [172, 381) (impl.parallel.vae_encode.window_table).
    m = _run(frames=96, sp_size=4, sp_layout="balanced", halo=28)
    assert m["vae_raw_frames_max_rank"] == 209
    assert m["vae_raw_frames_total"] == 93 + 189 + 209 + 209
    hw3 = 704 * 1280 * 3
    assert m["comm_data_bytes_root"] == (189 + 209 + 209) * hw3       # uint8 windows of ranks 1..3
    assert m["vae_encode_tflop_max_rank"] * 1e12 == pytest.approx(sc.vae_window_flops("wan22_ti2v_5b", 209))


def test_naive_vae_critical_path_is_the_full_clip():
    for frames, sp in [(96, 4), (384, 8)]:
        m = _run(frames=frames, sp_size=sp, sp_layout="naive")
        full = 1 + 4 * (frames - 1)
        assert m["vae_raw_frames_max_rank"] == m["vae_raw_frames_total"] == full
        assert m["vae_encode_tflop_max_rank"] * 1e12 == pytest.approx(sc.vae_window_flops("wan22_ti2v_5b", full))
        assert m["comm_data_bytes_root"] == (sp - 1) * (2 * frames // sp) * 48 * 44 * 80 * 2
        bal = _run(frames=frames, sp_size=sp, sp_layout="balanced")
        assert bal["vae_encode_tflop_max_rank"] < m["vae_encode_tflop_max_rank"]


def test_vae_flops_are_linear_in_chunks():
    first, chunk = sc.vae_encode_flops("tiny")
    assert 0 < chunk and 0 < first
    # A direct count of a 9-frame encode (first frame + 2 chunks) matches the linear model.
    from torch.utils.flop_counter import FlopCounterMode

    from impl.model.vae import build_vae
    p = get_preset("tiny")
    with torch.device("meta"):
        vae = build_vae(p.vae, dtype=torch.bfloat16, device="meta")
    x = torch.empty(1, 3, 9, p.video.height, p.video.width, device="meta", dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        vae.encode(x)
    assert counter.get_total_flops() == pytest.approx(sc.vae_window_flops("tiny", 9))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        sc.vae_window_flops("tiny", 8)


def test_all_to_all_bytes_scale_with_sp_minus_one_over_sp():
    p = get_preset("wan22_ti2v_5b")
    frames = 192
    for sp in (1, 2, 4, 8):
        m = _run(frames=frames, sp_size=sp, sp_layout="balanced")
        n = 2 * frames * p.tokens_per_frame / sp
        assert m["comm_a2a_bytes_per_rank"] == pytest.approx(3 * 30 * 4 * (sp - 1) / sp * n * 3072 * 2)
        assert m["comm_bytes_per_rank"] == pytest.approx(m["comm_a2a_bytes_per_rank"] + m["comm_data_bytes_root"])
    # Same per-rank tensor (tokens_per_rank fixed): bytes grow exactly as (sp-1)/sp.
    a = _run(frames=96, sp_size=2, sp_layout="balanced")["comm_a2a_bytes_per_rank"]
    b = _run(frames=192, sp_size=4, sp_layout="balanced")["comm_a2a_bytes_per_rank"]
    c = _run(frames=384, sp_size=8, sp_layout="balanced")["comm_a2a_bytes_per_rank"]
    assert (a / (1 / 2), b / (3 / 4), c / (7 / 8)) == pytest.approx((a * 2,) * 3)


def test_sp1_layouts_identical():
    for frames in (24, 96):
        bal, naive = _run(frames=frames, sp_size=1, sp_layout="balanced"), _run(frames=frames, sp_size=1, sp_layout="naive")
        assert bal == naive
        assert bal["comm_bytes_per_rank"] == 0 and bal["vae_raw_frames_max_rank"] == 1 + 4 * (frames - 1)


def test_step_time_and_speedup_vs_naive():
    base = _run(frames=96, sp_size=4, sp_layout="balanced")
    naive = _run(frames=96, sp_size=4, sp_layout="naive")
    assert base["est_step_s"] == pytest.approx(base["gemm_s"] + base["attn_s"] + base["comm_s"] + base["vae_s"])
    assert base["est_tokens_per_s"] == pytest.approx(base["tokens_global"] / base["est_step_s"])
    # the VAE term: the busiest rank's encode FLOPs at the assumed rate; the naive root encodes
    # the whole 381-frame clip, a balanced rank at most its 209-frame window
    assert base["vae_s"] == pytest.approx(base["vae_encode_tflop_max_rank"] / 322.0)
    assert (base["vae_raw_frames_max_rank"], naive["vae_raw_frames_max_rank"]) == (209, 381)
    assert naive["vae_s"] > 1.7 * base["vae_s"] > 0
    first, chunk = sc.vae_encode_flops("wan22_ti2v_5b")
    assert base["vae_encode_ms_per_frame"] == pytest.approx(chunk / 4 / 322e12 * 1e3)
    # the DiT part is the same in both layouts, so the pair differs by the VAE critical path
    # (and the layout data the root sends)
    assert naive["gemm_s"] + naive["attn_s"] == pytest.approx(base["gemm_s"] + base["attn_s"])
    assert base["est_speedup_vs_naive"] == pytest.approx(naive["est_step_s"] / base["est_step_s"])
    assert base["est_speedup_vs_naive"] > 1.1
    # a faster encoder shrinks the gap: at 100x the rate the layouts are within 1%
    fast = _run(frames=96, sp_size=4, sp_layout="balanced", measure={"vae_encode_tflops": 32200.0})
    assert fast["vae_s"] == pytest.approx(base["vae_s"] / 100)
    assert 1.0 < fast["est_speedup_vs_naive"] < 1.01 < base["est_speedup_vs_naive"]
    assert _run(frames=96, sp_size=4, sp_layout="naive")["est_speedup_vs_naive"] == 1.0
    assert _run(frames=96, sp_size=3, sp_layout="balanced")["est_speedup_vs_naive"] is None


@pytest.mark.parametrize("kw, match", [
    ({"frames": 96, "sp_size": 8}, "frames: must be a positive multiple of sp_size \\* frames_per_block"),
    ({"frames": 100, "sp_size": 1}, "frames: must be a positive multiple"),
    ({"frames": 96, "sp_size": 3, "sp_layout": "naive"}, "sp_size must be 1 or even"),
    ({"frames": 160, "sp_size": 5}, "sp_size must divide 24"),
])
def test_invalid_variants_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        sc.check_variant(_variant(**kw))
    with pytest.raises(ValueError, match=match):
        _run(**kw)


def test_layer_activation_accounting_matches_saved_tensors():
    """The per-token byte accounting equals what autograd saves for one CausalWanBlock
    (BF16, flash-style attention core keeping q, k, v, o and the log-sum-exp)."""
    from impl.model.attention import FullSequence
    from impl.model.dit import CausalWanDiT

    class _FlashLike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            lse = torch.zeros(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, grad):  # never called
            return None, None, None

    for d, f, heads in [(128, 512, 4), (128, 1024, 2), (256, 512, 4)]:
        cfg = DiTConfig(num_layers=1, dim=d, num_heads=heads, ffn_dim=f, in_channels=16, out_channels=16,
                        text_dim=128, freq_dim=64)
        torch.manual_seed(0)
        model = CausalWanDiT(cfg, dtype=torch.bfloat16)
        frames, per_frame = 8, 64
        s = frames * per_frame
        x = torch.randn(1, s, d, dtype=torch.bfloat16, requires_grad=True)
        temb6 = torch.randn(1, frames, 6, d, dtype=torch.bfloat16)
        kv = tuple(t.detach() for t in model.encode_text(torch.randn(1, 16, 128)).kv[0])
        cos, sin = model.rope.tables(torch.arange(frames), (8, 8), torch.float32, "cpu")
        skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), x, temb6, *kv, cos, sin)}
        saved: dict[int, int] = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in skip:
                saved[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.blocks[0](x, temb6, kv, cos, sin, call=FullSequence(_FlashLike.apply), layer=0)
        per_token = (4 * sc.ACT_FP32_D + 2 * sc.ACT_BF16_D) * d + sc.ACT_FFN_BYTES * f \
            + sc.ACT_LSE_BYTES_PER_HEAD * heads + sc.ACT_STATS_BYTES
        expect = s * per_token + frames * sc.ACT_FRAME_BYTES_D * d + sc.ACT_LAYER_BYTES_D * d
        assert sum(saved.values()) == expect, (d, f, heads)


def test_spec_expands_and_runs_fast():
    spec = load_spec(SPEC)
    variants = spec.expand("cpu")
    assert len(variants) == 28 and spec.expand("cuda") == variants
    assert spec.baseline_variant("cpu").values["sp_layout"] == "naive"
    sc.vae_encode_flops("wan22_ti2v_5b")          # the one-off FLOP count is cached
    t0 = time.perf_counter()
    for v in variants:
        sc.run_sp_training_cost(dict(v.values), spec.measure_for("cpu"), CPU)
    assert time.perf_counter() - t0 < 2.0
