"""Quantized linears, model quantization, LoRA merge, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from impl.config import ConfigError, DiTConfig, get_preset
from impl.model.dit import CausalWanDiT
from impl.quant import nvfp4
from impl.quant.apply import block_linear_names, merge_lora, quantize_model, resolve_mode
from impl.quant.config import QuantConfig
from impl.quant.fp8 import quantize_rowwise
from impl.quant.linear import Fp8Linear, NVFP4EmulatedLinear, NVFP4WeightOnlyLinear, nvfp4_matmul


def linear(n_in=64, n_out=48, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(dtype)


def test_nvfp4_emulated_forward_is_the_w4a4_product():
    lin = linear()
    x = torch.randn(3, 5, 64)
    layer = NVFP4EmulatedLinear(lin, QuantConfig(mode="nvfp4_emulated", weight_rule="static_6"))
    xq = nvfp4.quantize(x.reshape(-1, 64), "mse")
    wq = nvfp4.quantize(lin.weight.detach(), "static_6")
    expect = (nvfp4.dequantize(xq).double() @ nvfp4.dequantize(wq).double().T + lin.bias.double()).reshape(3, 5, 48)
    torch.testing.assert_close(layer(x).double(), expect, rtol=1e-6, atol=1e-6)
    assert not hasattr(layer, "weight") or layer.weight is None   # master weight freed


def test_weight_only_and_fp8_forward_match_their_definitions():
    lin = linear(seed=1)
    x = torch.randn(7, 64)
    wo = NVFP4WeightOnlyLinear(lin, QuantConfig(mode="nvfp4_weight_only"))
    w_hat = nvfp4.dequantize(nvfp4.quantize(lin.weight.detach(), "mse"))
    torch.testing.assert_close(wo(x), x @ w_hat.T + lin.bias, rtol=1e-5, atol=1e-5)
    f8 = Fp8Linear(lin, QuantConfig(mode="fp8"))
    xq, xs = quantize_rowwise(x)
    wq, ws = quantize_rowwise(lin.weight)
    torch.testing.assert_close(f8(x), (xq.float() * xs) @ (wq.float() * ws).T + lin.bias, rtol=1e-5, atol=1e-5)
    assert (f8(x) - lin(x)).norm() / lin(x).norm() < 0.05


def test_fp8_rowwise_roundtrip_error_bound():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    q, s = quantize_rowwise(x)
    rel = ((q.float() * s - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel <= 2 ** -4 * 0.5 * 448 / 256 + 1e-6     # half an E4M3 ulp at the top binade


@pytest.mark.parametrize("mode", ["nvfp4_emulated", "fp8"])
def test_straight_through_gradients_flow(mode):
    lin = linear(seed=2)
    cfg = dataclasses.replace(QuantConfig.for_training(mode), quantize_grads=False)
    layer = (NVFP4EmulatedLinear if mode == "nvfp4_emulated" else Fp8Linear)(lin, cfg)
    x = torch.randn(32, 64, requires_grad=True)
    gy = torch.randn(32, 48)
    layer(x).backward(gy)
    assert layer.weight.grad is not None and layer.bias.grad is not None and x.grad is not None
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))
    if mode == "nvfp4_emulated":
        w_hat = nvfp4.dequantize(nvfp4.quantize(lin.weight.detach(), "static_6", tile_2d=True))
        x_hat = nvfp4.dequantize(nvfp4.quantize(x.detach(), "mse"))
        torch.testing.assert_close(x.grad, gy @ w_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad, gy.T @ x_hat, rtol=1e-5, atol=1e-5)


def test_quantized_gradient_gemms_approximate_the_exact_gradient():
    lin = linear(n_in=64, n_out=64, seed=3)
    layer = NVFP4EmulatedLinear(lin, QuantConfig.for_training("nvfp4_emulated"))
    x = torch.randn(40, 64, requires_grad=True)   # 40 tokens: padded to 48 for the wgrad GEMM
    gy = torch.randn(40, 64)
    torch.manual_seed(0)
    layer(x).backward(gy)
    w_hat = nvfp4.dequantize(nvfp4.quantize(lin.weight.detach(), "static_6", tile_2d=True))
    x_hat = nvfp4.dequantize(nvfp4.quantize(x.detach(), "mse"))
    rel = lambda a, b: float((a - b).norm() / b.norm())
    assert rel(x.grad, gy @ w_hat) < 0.2
    assert rel(layer.weight.grad, gy.T @ x_hat) < 0.2
    # Stochastic rounding: averaging many backward passes converges to the exact gradient.
    grads = []
    for i in range(64):
        x.grad = None
        layer(x).backward(gy)
        grads.append(x.grad.clone())
    assert rel(torch.stack(grads).mean(0), gy @ w_hat) < rel(grads[0], gy @ w_hat) / 3


def tiny_model(layers: int | None = None):
    p = get_preset("tiny")
    cfg = p.dit if layers is None else dataclasses.replace(p.dit, num_layers=layers)
    torch.manual_seed(0)
    return CausalWanDiT(cfg, device="cpu", dtype=torch.float32)


def test_quantize_model_swaps_exactly_the_block_linears():
    model = tiny_model(layers=30)                      # the 5B layer structure, narrow
    assert len(block_linear_names(model)) == 300
    report = quantize_model(model, QuantConfig.for_inference("nvfp4_emulated"))
    assert (report.quantized, report.kept) == (300, 6)
    assert report.weight_bytes_after < report.weight_bytes_before / 3
    assert isinstance(model.blocks[0].attn1.to_q, NVFP4EmulatedLinear)
    assert isinstance(model.proj_out, nn.Linear)
    assert isinstance(model.condition_embedder.text_embedder.linear_1, nn.Linear)


@pytest.mark.parametrize("mode", ["fp8", "nvfp4_emulated", "nvfp4_weight_only"])
def test_quantized_model_output_stays_close(mode):
    ref_model = tiny_model()
    model = tiny_model()
    quantize_model(model, QuantConfig.for_inference(mode))
    x, t = torch.randn(1, 8, 2, 8, 8), torch.full((1, 2), 500.0)
    ctx = torch.randn(1, 16, 32)
    with torch.no_grad():
        ref = ref_model(x, t, ref_model.encode_text(ctx), frame_positions=torch.arange(2))
        out = model(x, t, model.encode_text(ctx), frame_positions=torch.arange(2))
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel


def test_lora_is_merged_before_quantization():
    peft = pytest.importorskip("peft")
    base = tiny_model()
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    model = peft.inject_adapter_in_model(lora_cfg, tiny_model())
    merged_ref = tiny_model()
    with torch.no_grad():                              # the merged weights, computed by hand
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                delta = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
                merged_ref.get_submodule(name).weight += delta
    with pytest.warns(UserWarning, match="merged LoRA"):
        report = quantize_model(model, QuantConfig.for_inference("nvfp4_emulated"))
    assert report.quantized == 20
    quantize_model(merged_ref, QuantConfig.for_inference("nvfp4_emulated"))
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), merged_ref.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)
    assert merge_lora(base) == 0


def test_quant_config_validation():
    with pytest.raises(ConfigError, match="QuantConfig.mode"):
        QuantConfig(mode="int4")
    with pytest.raises(ConfigError, match="QuantConfig.weight_rule"):
        QuantConfig(mode="nvfp4_emulated", weight_rule="static_5")
    with pytest.raises(ConfigError, match="inference-only"):
        QuantConfig.for_training("nvfp4_weight_only")


def test_non_multiple_of_16_layer_is_rejected():
    with pytest.raises(nvfp4.QuantFormatError, match="multiple of 16"):
        NVFP4EmulatedLinear(nn.Linear(20, 32), QuantConfig(mode="nvfp4_emulated"))


def test_nvfp4_auto_mode_falls_back_with_a_message_and_te_mode_explains():
    with pytest.warns(UserWarning, match="using nvfp4_emulated"):
        assert resolve_mode("nvfp4", torch.device("cpu")) == "nvfp4_emulated"
    model = tiny_model()
    with pytest.raises(RuntimeError, match="nvfp4_te cannot run here"):
        quantize_model(model, QuantConfig.for_inference("nvfp4_te"))


def test_nvfp4_matmul_applies_global_scales_once():
    a, b = torch.randn(16, 32), torch.randn(8, 32)
    qa, qb = nvfp4.quantize(a), nvfp4.quantize(b)
    torch.testing.assert_close(nvfp4_matmul(qa, qb), nvfp4.dequantize(qa) @ nvfp4.dequantize(qb).T, rtol=1e-5, atol=1e-6)


def test_five_b_weight_memory_matches_the_format():
    """The 300 block linears of the 5B model: 9.82 GB in BF16 -> 2.76 GB in NVFP4 (biases BF16)."""
    cfg = DiTConfig()
    shapes = [(cfg.dim, cfg.dim)] * 8 + [(cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)]
    bias_bytes = cfg.num_layers * sum(n * 2 for n, _ in shapes)
    assert round((cfg.num_layers * sum(n * k * 2 for n, k in shapes) + bias_bytes) / 1e9, 2) == 9.82
    nvfp4_bytes = cfg.num_layers * sum(n * k // 2 + n * k // 16 + 4 for n, k in shapes) + bias_bytes
    assert round(nvfp4_bytes / 1e9, 2) == 2.76
    # and a real layer holds exactly that much (plus its BF16 bias)
    layer = NVFP4EmulatedLinear(nn.Linear(256, 128).to(torch.bfloat16), QuantConfig(mode="nvfp4_emulated"))
    assert layer.weight_bytes() == 128 * 256 // 2 + 128 * 256 // 16 + 4 + 128 * 2
