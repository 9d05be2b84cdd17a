"""The official release's artifacts load through the existing --dit / --lora paths.

Each test writes a small file in the release's own layout (tiny preset; code study sections
5.1, 5.2, 5.8, 9.2): the standalone LoRA ``.pt``, the merged BF16 generator and the
pre-quantized NVFP4 generator ``model_4o6.pt`` (swizzled E4M3 scales, padded codes, amax).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from impl.config import get_preset
from impl.model.checkpoint import CheckpointError, diffusers_to_original, load_dit_weights
from impl.model.dit import CausalWanDiT
from impl.quant import nvfp4
from impl.quant import release_nvfp4 as rel
from impl.quant.apply import block_linear_names, quantize_model
from impl.quant.config import QuantConfig
from impl.quant.linear import NVFP4EmulatedLinear, NVFP4WeightOnlyLinear
from impl.model.lora import LoraError, LoraSpec, add_lora, lora_state_dict, merge_and_unload
from impl.model.lora_files import load_lora, lora_sampling_steps

CFG = get_preset("tiny").dit
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return CausalWanDiT(CFG, dtype=dtype)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_channels, 2, 4, 4, generator=g).to(dtype)
    t = (torch.rand(1, 2, generator=g) * 1000).to(dtype)
    text = torch.randn(1, 5, CFG.text_dim, generator=g).to(dtype)
    return x, t, text


def one_line_error(err, path):
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def recorded(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w]


# ----------------------------------------------------------------------------- the swizzle

def formula_offset(r, c, cols):
    """The Blackwell block-scaled layout, written out independently of the module."""
    col_tiles = -(-cols // 4)
    return ((r // 128) * col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)


@pytest.mark.parametrize("rows,cols", [(128, 4), (256, 12), (200, 6), (1, 1), (130, 5)])
def test_swizzle_follows_the_128x4_tile_32x16_layout_and_inverts(rows, cols):
    g = torch.Generator().manual_seed(rows * 31 + cols)
    scales = torch.randint(1, 0x7F, (rows, cols), generator=g, dtype=torch.uint8)
    flat = rel.swizzle_scales(scales)
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert flat.shape == (rp * cp,)
    want = torch.zeros(rp * cp, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            want[formula_offset(r, c, cols)] = scales[r, c]
            assert rel.swizzled_offset(r, c, cols) == formula_offset(r, c, cols)
    assert torch.equal(flat, want)                     # padding entries are zero
    back = rel.unswizzle_scales(flat, rows, cols)
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), scales)
    e4m3 = scales.view(torch.float8_e4m3fn)
    assert torch.equal(rel.unswizzle_scales(rel.swizzle_scales(e4m3), rows, cols).view(torch.uint8), scales)
    with pytest.raises(rel.ReleaseNVFP4Error, match="entries"):
        rel.unswizzle_scales(flat[:-1], rows, cols)


# ----------------------------------------------------------------------------- one linear

@pytest.mark.parametrize("rule", ["mse", "static_6", "static_4"])
def test_a_linear_written_with_our_swizzle_loads_to_the_codes_we_quantized(rule):
    w = torch.randn(96, 48, generator=torch.Generator().manual_seed(3))   # pads to 128 x 64
    ours = nvfp4.quantize(w, rule)
    buf = rel.quantize_to_release(w, rule)
    assert buf["quantized_weight_values"].dtype == torch.uint8
    assert buf["quantized_weight_values"].shape == (128, 32)
    assert buf["quantized_weight_scale_factors"].shape == (128 * 4,)
    assert buf["quantized_weight_metadata"].tolist() == [96, 48, 128, 64]
    assert buf["quantized_weight_amax"].shape == (1,) and buf["quantized_weight_amax"].dtype == torch.float32
    back = rel.from_release_buffers(buf, rule)
    assert torch.equal(back.packed, ours.packed)
    assert torch.equal(back.scales.view(torch.uint8), ours.scales.view(torch.uint8))
    assert torch.equal(back.global_scale, ours.global_scale)
    assert torch.equal(nvfp4.dequantize(back), nvfp4.dequantize(ours))


def test_hand_built_release_buffers_decode_as_code_times_scale_times_amax_over_qm():
    """Codes, scales and amax made up directly in the release's layout (not by our quantizer)."""
    g = torch.Generator().manual_seed(7)
    rows, cols = 48, 32
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    scale_bytes = torch.randint(0, 0x7F, (rows, cols // 16), generator=g, dtype=torch.uint8)
    amax = torch.tensor([3.7], dtype=torch.float32)
    values = torch.zeros(128, 32, dtype=torch.uint8)
    for r in range(rows):
        for c in range(0, cols, 2):    # even element low nibble, odd element high nibble
            values[r, c // 2] = int(codes[r, c]) | (int(codes[r, c + 1]) << 4)
    flat = torch.zeros(128 * 4, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols // 16):
            flat[formula_offset(r, c, 4)] = scale_bytes[r, c]
    buf = {"quantized_weight_values": values, "quantized_weight_scale_factors": flat.view(torch.float8_e4m3fn),
           "quantized_weight_amax": amax,
           "quantized_weight_metadata": torch.tensor([rows, cols, 128, 64], dtype=torch.int32)}
    t = rel.from_release_buffers(buf, "mse")
    assert torch.equal(t.codes(), codes)
    assert torch.equal(t.scales.view(torch.uint8), scale_bytes)
    assert torch.equal(t.global_scale, (amax / (6.0 * 256.0)).reshape(()))    # fp32(amax / (Q * M))
    mag = E2M1[(codes & 7).long()] * torch.where(codes >= 8, -1.0, 1.0).double()
    s = scale_bytes.view(torch.float8_e4m3fn).double().repeat_interleave(16, dim=1)
    release_decode = mag * s * (amax.double() / 1536.0)
    torch.testing.assert_close(nvfp4.dequantize(t, torch.float64), release_decode, rtol=2 ** -23, atol=0)


# ----------------------------------------------------------------------------- model_4o6.pt

def write_model_4o6(src, path, rule="mse", prefix="", drop=None, extra=None, fmt="longlive_generator_nvfp4"):
    """The release's save_merged_nvfp4_generator.py --backend fouroversix layout."""
    names = set(block_linear_names(src))
    sd = {}
    for key, value in src.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in names and leaf == "weight":
            for k, v in rel.quantize_to_release(value, rule).items():
                sd[f"{module}.{k}"] = v
                sd[f"{module}.quantized_weight_transposed_{k[len('quantized_weight_'):]}"] = v   # dropped on load
        else:
            sd[key] = value.to(torch.bfloat16)
    sd = {prefix + k: v for k, v in diffusers_to_original(sd).items() if k != drop}
    torch.save({"generator": sd, "checkpoint_format": fmt, "checkpoint_version": 1,
                "source": {"generator_ckpt": "/ckpt/longlive.pt", "lora_ckpt": "/ckpt/lora.pt"}, "merged_lora": True,
                "quantization": {"backend": "fouroversix", "weight_scale_rule": rule, "activation_scale_rule": "mse",
                                 "matched_modules": sorted(names)}, **(extra or {})}, path)
    return path


def quantized_reference(src, mode):
    ref = model(dtype=torch.bfloat16)
    ref.load_state_dict(src.state_dict())
    quantize_model(ref, QuantConfig.for_inference(mode))
    return ref


def test_model_4o6_loads_bit_exact_into_weight_only_linears(tmp_path):
    src = model(dtype=torch.bfloat16)
    path = write_model_4o6(src, tmp_path / "model_4o6.pt", prefix="model.")
    dst = model(seed=5, dtype=torch.bfloat16)
    info, warned = recorded(lambda: load_dit_weights(dst, path))
    assert info.format == "longlive_generator_nvfp4"
    assert any("--precision nvfp4_weight_only" in w for w in warned)
    ref = quantized_reference(src, "nvfp4_weight_only")
    for name in block_linear_names(dst):
        a, b = ref.get_submodule(name), dst.get_submodule(name)
        assert type(b) is NVFP4WeightOnlyLinear
        assert torch.equal(a.weight_packed, b.weight_packed), name
        assert torch.equal(a.weight_scales.view(torch.uint8), b.weight_scales.view(torch.uint8)), name
        assert torch.equal(a.weight_global_scale, b.weight_global_scale), name
    x, t, text = inputs(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(dst(x, t, text), ref(x, t, text))
    # the builder then quantizes to the run's precision: weight-only keeps the layers as they are
    quantize_model(dst, QuantConfig.for_inference("nvfp4_weight_only"))
    assert all(type(dst.get_submodule(n)) is NVFP4WeightOnlyLinear for n in block_linear_names(dst))
    with pytest.raises(ValueError, match="pre-quantized NVFP4.*nvfp4_weight_only or nvfp4_emulated"):
        quantize_model(dst, QuantConfig.for_inference("fp8"))


def test_model_4o6_runs_w4a4_with_the_same_codes(tmp_path):
    src = model(dtype=torch.bfloat16)
    path = write_model_4o6(src, tmp_path / "model_4o6.pt")
    dst = model(seed=5, dtype=torch.bfloat16)
    load_dit_weights(dst, path, precision="nvfp4_emulated")
    assert all(type(dst.get_submodule(n)) is NVFP4EmulatedLinear for n in block_linear_names(dst))
    ref = quantized_reference(src, "nvfp4_emulated")
    x, t, text = inputs(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(dst(x, t, text), ref(x, t, text))
    # weight-only layers loaded by default move bit for bit into emulated ones when asked
    other = model(seed=6, dtype=torch.bfloat16)
    recorded(lambda: load_dit_weights(other, path))
    quantize_model(other, QuantConfig.for_inference("nvfp4_emulated"))
    with torch.no_grad():
        assert torch.equal(other(x, t, text), ref(x, t, text))


def test_model_4o6_scale_rule_comes_from_the_metadata(tmp_path):
    src = model(dtype=torch.bfloat16)
    path = write_model_4o6(src, tmp_path / "s6.pt", rule="static_6")
    dst = model(seed=5, dtype=torch.bfloat16)
    load_dit_weights(dst, path, precision="nvfp4_weight_only")
    ref = quantized_reference(src, "nvfp4_weight_only")   # mse: another tensor factor
    w = src.blocks[0].attn1.to_q.weight
    assert torch.equal(dst.blocks[0].attn1.to_q.weight_global_scale, w.abs().amax().float() / (6.0 * 448.0))
    assert not torch.equal(dst.blocks[0].attn1.to_q.weight_global_scale, ref.blocks[0].attn1.to_q.weight_global_scale)
    assert rel.weight_rule_from_metadata({"rules": {"weight": "ScaleRule.mae", "activation": "mse"}}) == "mae"
    assert rel.weight_rule_from_metadata({"weight_quant": {"scale_rule": "static_4"}, "act": {"scale_rule": "mse"}}) \
        == "static_4"
    assert rel.weight_rule_from_metadata({"scale_rule": "mse"}) == "mse"
    assert rel.weight_rule_from_metadata({"backend": "fouroversix"}) is None
    # no rule recorded: 4-over-6 assumed, with a warning
    obj = torch.load(path, weights_only=True)
    obj["quantization"] = {"backend": "fouroversix"}
    torch.save(obj, tmp_path / "norule.pt")
    _, warned = recorded(lambda: load_dit_weights(model(dtype=torch.bfloat16), tmp_path / "norule.pt",
                                                  precision="nvfp4_weight_only"))
    assert any("records no weight scale rule; assuming 'mse'" in w for w in warned)


def test_model_4o6_wrong_truncated_and_foreign_files_fail_in_one_line(tmp_path):
    src = model(dtype=torch.bfloat16)
    good = write_model_4o6(src, tmp_path / "model_4o6.pt")
    data = good.read_bytes()
    cases = {}
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    cases["cut.pt"] = "cannot read as a PyTorch checkpoint"
    write_model_4o6(src, tmp_path / "noamax.pt", drop="blocks.1.cross_attn.k.quantized_weight_amax")
    cases["noamax.pt"] = "blocks.1.attn2.to_k: missing quantized_weight_amax"
    write_model_4o6(src, tmp_path / "nobias.pt", drop="blocks.0.ffn.0.bias")
    cases["nobias.pt"] = "blocks.0.ffn.net.0.proj: bias missing"
    write_model_4o6(src, tmp_path / "nonorm.pt", drop="blocks.0.cross_attn.norm_q.weight")
    cases["nonorm.pt"] = "missing keys: blocks.0.attn2.norm_q.weight"
    write_model_4o6(src, tmp_path / "te.pt", fmt="longlive_generator_te_nvfp4")
    cases["te.pt"] = "Transformer Engine module state dict"
    wide = CausalWanDiT(get_preset("tiny").replace(dit={"dim": 32}).dit, dtype=torch.bfloat16)
    write_model_4o6(wide, tmp_path / "wide.pt")
    cases["wide.pt"] = r"quantized weight is \[32, 32\], the model needs \[64, 64\]"
    obj = torch.load(good, weights_only=True)
    obj["generator"]["blocks.0.self_attn.v.quantized_weight_values"] = torch.zeros(64, 16, dtype=torch.uint8)
    torch.save(obj, tmp_path / "shape.pt")
    cases["shape.pt"] = r"blocks.0.attn1.to_v: quantized_weight_values must be uint8 \[128, 32\]"
    obj = torch.load(good, weights_only=True)
    obj["generator"] = {k: v for k, v in obj["generator"].items() if "quantized_weight" not in k}
    torch.save(obj, tmp_path / "plain.pt")
    cases["plain.pt"] = "declares checkpoint_format 'longlive_generator_nvfp4' but holds no quantized_weight"
    for name, pattern in cases.items():
        dst = model(seed=5, dtype=torch.bfloat16)
        before = {k: v.clone() for k, v in dst.state_dict().items()}
        with pytest.raises(CheckpointError, match=pattern) as err:
            recorded(lambda: load_dit_weights(dst, tmp_path / name, precision="nvfp4_weight_only"))
        one_line_error(err, tmp_path / name)
        after = dst.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before), name
    with pytest.raises(CheckpointError, match="--precision nvfp4_weight_only or nvfp4_emulated, not 'bf16'") as err:
        load_dit_weights(model(dtype=torch.bfloat16), good, precision="bf16")
    one_line_error(err, good)


def test_lora_cannot_be_merged_into_a_prequantized_base(tmp_path):
    src = model(dtype=torch.bfloat16)
    path = write_model_4o6(src, tmp_path / "model_4o6.pt")
    dst = model(dtype=torch.bfloat16)
    load_dit_weights(dst, path, precision="nvfp4_weight_only")
    lora = write_release_lora(lora_source(), tmp_path / "lora.pt")
    with pytest.raises(LoraError, match="pre-quantized NVFP4") as err:
        load_lora(dst, lora)
    one_line_error(err, lora)


# ----------------------------------------------------------------------------- merged BF16 generator

@pytest.mark.parametrize("fmt", ["longlive_generator_merged_lora", "longlive_generator_merged_bf16"])
def test_merged_bf16_generator_loads_as_a_dit_checkpoint(tmp_path, fmt):
    src = model(dtype=torch.bfloat16)
    sd = {f"model.{k}": v for k, v in diffusers_to_original(src.state_dict()).items()}
    torch.save({"generator": sd, "checkpoint_format": fmt, "checkpoint_version": 1, "merged_lora": True,
                "adapter": {"rank": 128, "alpha": 128}, "source": {"generator_ckpt": "/ckpt/x.pt"}}, tmp_path / "m.pt")
    dst = model(seed=3, dtype=torch.bfloat16)
    info = load_dit_weights(dst, tmp_path / "m.pt")
    assert info.format == fmt and info.meta["merged_lora"] is True
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


# ----------------------------------------------------------------------------- standalone LoRA .pt

RANK = 8


def lora_source():
    m = add_lora(model(dtype=torch.float64), LoraSpec(rank=RANK, alpha=128))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_state_dict(m).values():
            p.copy_((torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02).to(torch.bfloat16).double())
    return m


def original_module(name):
    return next(iter(diffusers_to_original({f"{name}.weight": None}))).rsplit(".", 1)[0]


SPELLINGS = {  # (module prefix, adapter segment, module names)
    "peft_original": ("base_model.model.", "", "original"),
    "wrapper_default_adapter": ("base_model.model.model.", ".default", "original"),
    "fsdp_wrapped": ("_fsdp_wrapped_module.base_model.model.", "", "original"),
    "diffusers_names": ("base_model.model.", ".default", "diffusers"),
}


def write_release_lora(m, path, spelling="peft_original", extra=None):
    prefix, adapter, names = SPELLINGS[spelling]
    sd = {}
    for key, value in lora_state_dict(m).items():
        module, ab, _ = key.rsplit(".", 2)
        module = original_module(module) if names == "original" else module
        sd[f"{prefix}{module}.{ab}{adapter}.weight"] = value.to(torch.bfloat16)
    torch.save({"generator_lora": sd, "critic_lora": {k: torch.zeros_like(v) for k, v in sd.items()}, "step": 600,
                **(extra or {})}, path)
    return path


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_release_lora_pt_loads_and_merges_like_ours(tmp_path, spelling):
    src = lora_source()
    path = write_release_lora(src, tmp_path / "lora.pt", spelling)
    dst = model(dtype=torch.float64)
    spec, warned = recorded(lambda: load_lora(dst, path))
    assert (spec.rank, spec.alpha) == (RANK, 128.0)
    assert set(spec.targets) == set(block_linear_names(model())) and len(spec.targets) == 10 * CFG.num_layers
    assert any(w.startswith(f"--lora {path}:") and "records no fingerprint" in w and "alpha 128" in w for w in warned)
    ours = lora_state_dict(src)
    got = lora_state_dict(dst)
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)
    x, t, text = inputs(torch.float64)
    with torch.no_grad():
        want = merge_and_unload(src)(x, t, text)
        assert torch.equal(merge_and_unload(dst)(x, t, text), want)
    assert lora_sampling_steps(path) is None     # the release's file does not record it


def test_release_lora_alpha_and_the_builder_path(tmp_path):
    from impl.inference.build import Weights, build_dit
    from impl.inference.config import InferenceConfig
    src = lora_source()
    path = write_release_lora(src, tmp_path / "lora.pt")
    spec, _ = recorded(lambda: load_lora(model(dtype=torch.float64), path, alpha=RANK))
    assert spec.alpha == RANK
    base = model(dtype=torch.float32)
    torch.save({"generator": diffusers_to_original(base.state_dict())}, tmp_path / "base.pt")
    cfg = InferenceConfig(preset="tiny", dtype="fp32")
    dit, warned = recorded(lambda: build_dit(cfg, "cpu", Weights(dit=tmp_path / "base.pt", lora=path)))
    assert any("--lora" in w for w in warned)
    want = model(dtype=torch.float32)
    load_lora(want, path, check_base=False)
    merge_and_unload(want)
    for k, v in want.state_dict().items():
        assert torch.equal(dit.state_dict()[k], v), k


def test_bad_release_lora_files_fail_in_one_line(tmp_path):
    src = lora_source()
    good = write_release_lora(src, tmp_path / "lora.pt")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    torch.save({"critic": {"x": torch.zeros(2)}, "step": 3}, tmp_path / "foreign.pt")
    obj = torch.load(good, weights_only=True)
    obj["generator_lora"]["base_model.model.blocks.0.self_attn.q.lora_magnitude_vector"] = torch.zeros(64)
    torch.save(obj, tmp_path / "dora.pt")
    obj = torch.load(good, weights_only=True)
    obj["generator_lora"] = {k: v for k, v in obj["generator_lora"].items() if "blocks.1.ffn.2.lora_B" not in k}
    torch.save(obj, tmp_path / "half.pt")
    obj = torch.load(good, weights_only=True)
    obj["generator_lora"] = {k.replace("blocks.1.", "blocks.7."): v for k, v in obj["generator_lora"].items()}
    torch.save(obj, tmp_path / "deep.pt")
    cases = {"cut.pt": "cannot read as a PyTorch checkpoint", "foreign.pt": "not a LoRA file.*generator_lora",
             "dora.pt": "not peft LoRA A/B matrices", "half.pt": "lora_A without lora_B",
             "deep.pt": "missing in the model"}
    for name, pattern in cases.items():
        with pytest.raises(LoraError, match=pattern) as err:
            load_lora(model(dtype=torch.float64), tmp_path / name)
        one_line_error(err, tmp_path / name)
    # a LoRA file given as the DiT checkpoint says where it belongs
    with pytest.raises(CheckpointError, match="pass it with --lora") as err:
        load_dit_weights(model(), good)
    one_line_error(err, good)


def test_bare_peft_state_dicts_load_too(tmp_path):
    """peft's own adapter_model.safetensors, and a .pt holding the peft dict without the wrapper."""
    from safetensors.torch import save_file
    src = lora_source()
    peft = {f"base_model.model.{k}": v.to(torch.bfloat16).contiguous() for k, v in lora_state_dict(src).items()}
    save_file(peft, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    torch.save(peft, tmp_path / "bare.pt")
    for name in ("adapter_model.safetensors", "bare.pt"):
        dst = model(dtype=torch.float64)
        spec, warned = recorded(lambda: load_lora(dst, tmp_path / name))
        assert spec.rank == RANK and any("records no fingerprint" in w for w in warned), name
        got, want = lora_state_dict(dst), lora_state_dict(src)
        assert all(torch.equal(got[k], want[k]) for k in want), name
