"""Attention backends (impl/model/attention_backends.py) on the CPU: FP8 numerics (emulated),
explicit scaling, clear errors for backends this machine cannot run, pipeline wiring."""

from __future__ import annotations

import pytest
import torch

from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.model.attention_backends import AttentionBackendError, attention_fn, check_backend, fp8_emulated, sdpa, sqnr_db
from impl.model.fp8_scaling import fp8_scales


def _qkv(seed=0, m=32, n=96, d=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, s, d, generator=g) for s in (m, n, n)]


def test_emulated_fp8_accuracy_and_exact_scaling():
    q, k, v = _qkv()
    ref = sdpa(q.double(), k.double(), v.double())
    out = fp8_emulated(q, k, v)
    assert 20 < sqnr_db(ref, out) < sqnr_db(ref, sdpa(q, k, v))
    # amax scaling is per (batch, head) and exact under powers of two: same codes, scaled output
    assert torch.equal(fp8_emulated(q, k, 4 * v), 4 * out)
    v2 = v.clone()
    v2[:, 1] *= 8                              # another head's scale does not touch head 0
    assert torch.equal(fp8_emulated(q, k, v2)[:, 0], out[:, 0])
    assert fp8_scales(torch.zeros(1, 1, 4, 16)).isfinite().all()   # an all-zero head


def test_backends_this_machine_cannot_run_fail_clearly():
    if torch.cuda.is_available():
        pytest.skip("the machine has CUDA")
    for name in ("fp8_triton", "fp8_cudnn"):
        with pytest.raises(AttentionBackendError, match=f"attention='{name}': needs a CUDA GPU"):
            check_backend(name, "cpu")
        with pytest.raises(AttentionBackendError):
            build_pipeline(InferenceConfig(attention=name), "cpu")
    with pytest.raises(AttentionBackendError, match="unknown backend"):
        attention_fn("flash4", "cpu")


def test_pipeline_with_emulated_fp8_attention():
    cfg = InferenceConfig(dtype="fp32", steps=2)
    prompts = ["a red ball"] * 4
    ref = build_pipeline(cfg, "cpu", Weights(text="embedding"), decode=False).generate(prompts).latents
    fp8 = build_pipeline(cfg.replace(attention="fp8_emulated"), "cpu", Weights(text="embedding"),
                         decode=False).generate(prompts).latents
    assert not torch.equal(ref, fp8) and 10 < sqnr_db(ref, fp8)
