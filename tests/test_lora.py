import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from impl.config import get_preset
from impl.model.dit import CausalWanDiT
from impl.quant.apply import block_linear_names
from impl.model.lora import LoraError, LoraSpec, add_lora, base_fingerprint, lora_state_dict, merge_and_unload
from impl.model.lora_files import FORMAT, load_lora, save_lora

DT = torch.float64
RANK = 8


def make_model(cfg=None, seed=0, dtype=DT):
    torch.manual_seed(seed)
    return CausalWanDiT(cfg or get_preset("tiny").dit, dtype=dtype)


def inputs(cfg, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g, dtype=dtype)
    t = torch.rand(1, 2, generator=g, dtype=dtype) * 1000
    text = torch.randn(1, 5, cfg.text_dim, generator=g, dtype=dtype)
    return x, t, text


def perturb(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny").dit


def test_spec_validation():
    assert LoraSpec() == LoraSpec(rank=128, alpha=128, dropout=0.0, targets=None)
    with pytest.raises(LoraError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(LoraError, match="alpha"):
        LoraSpec(alpha=0)
    with pytest.raises(LoraError, match="dropout"):
        LoraSpec(dropout=1.0)


def test_starts_as_identity_and_only_lora_trains(cfg):
    model = make_model(cfg)
    x, t, text = inputs(cfg)
    with torch.no_grad():
        base_out = model(x, t, text)
    names = block_linear_names(model)
    assert len(names) == 10 * cfg.num_layers
    h0 = base_fingerprint(model)
    add_lora(model, LoraSpec(rank=RANK, alpha=16))
    assert base_fingerprint(model) == h0  # computed on the base weights
    with torch.no_grad():
        assert torch.equal(model(x, t, text), base_out)
    sd = lora_state_dict(model)
    assert set(sd) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == len(sd)
    assert all(p.dtype == DT for p in sd.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_other_dtypes(cfg, dtype):
    model = make_model(cfg, dtype=dtype)
    x, t, text = inputs(cfg, dtype=dtype)
    with torch.no_grad():
        ref = model(x, t, text)
        add_lora(model, LoraSpec(rank=4, alpha=4))
        assert torch.equal(model(x, t, text), ref)
        perturb(model)
    out = model(x, t, text)
    out.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert not torch.equal(out.detach(), ref)


def test_merge_matches_unmerged(cfg):
    model = make_model(cfg)
    x, t, text = inputs(cfg)
    add_lora(model, LoraSpec(rank=RANK, alpha=16))
    perturb(model)
    with torch.no_grad():
        unmerged = model(x, t, text)
    h_before = base_fingerprint(model)
    assert merge_and_unload(model) is model
    assert not any("lora_" in n or "base_layer" in n for n in model.state_dict())
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in block_linear_names(model))
    assert base_fingerprint(model) != h_before
    with torch.no_grad():
        merged = model(x, t, text)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-10)


def test_save_load_roundtrip(cfg, tmp_path):
    model = make_model(cfg)
    base_hash = base_fingerprint(model)
    spec = LoraSpec(rank=RANK, alpha=16)
    add_lora(model, spec)
    perturb(model)
    x, t, text = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, text)
    path = save_lora(tmp_path / "lora.safetensors", model, spec, steps=50, base_hash=base_hash,
                     extra={"note": "test", "lr": 1e-5})
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["rank"] == str(RANK) and meta["training_steps"] == "50"
    assert meta["base_model_hash"] == base_hash and json.loads(meta["lr"]) == 1e-5
    assert json.loads(meta["target_modules"]) == block_linear_names(make_model(cfg))

    fresh = make_model(cfg)  # same seed -> same base weights
    loaded = load_lora(fresh, path)
    assert loaded.rank == RANK and loaded.alpha == 16
    with torch.no_grad():
        assert torch.equal(fresh(x, t, text), ref)
    # loading again into the model that already has the LoRA works (spec matches)
    load_lora(fresh, path)
    with pytest.raises(LoraError, match="differs"):
        other = make_model(cfg)
        add_lora(other, LoraSpec(rank=4, alpha=16))
        load_lora(other, path)


def test_wrong_base_hash(cfg, tmp_path):
    model = add_lora(make_model(cfg), LoraSpec(rank=RANK, alpha=RANK))
    path = save_lora(tmp_path / "l.safetensors", model, steps=1, base_hash=base_fingerprint(model))
    other = make_model(cfg, seed=5)
    with pytest.raises(LoraError, match="base model hash mismatch.*--lora-skip-base-check") as err:
        load_lora(other, path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not any("lora_" in n for n in other.state_dict())  # nothing injected on failure
    load_lora(other, path, check_base=False)
    assert lora_state_dict(other)


def test_lora_for_other_width(cfg, tmp_path):
    narrow = get_preset("tiny").replace(dit={"dim": 32}).dit
    model = add_lora(make_model(narrow), LoraSpec(rank=RANK, alpha=RANK))
    path = save_lora(tmp_path / "n.safetensors", model, steps=1, base_hash=base_fingerprint(model))
    with pytest.raises(LoraError, match="wrong shape.*another model width"):
        load_lora(make_model(cfg), path)
    deeper = get_preset("tiny").replace(dit={"num_layers": 3}).dit
    model = add_lora(make_model(deeper), LoraSpec(rank=RANK, alpha=RANK))
    path = save_lora(tmp_path / "d.safetensors", model, steps=1, base_hash="x")
    with pytest.raises(LoraError, match="missing in the model"):
        load_lora(make_model(cfg), path)


def test_not_a_lora_file(cfg, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(LoraError, match="not a LoRA file"):
        load_lora(make_model(cfg), plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(LoraError, match="not a safetensors file"):
        load_lora(make_model(cfg), junk)


def test_fingerprint_is_the_same_across_float_dtypes():
    """A checkpoint loaded in float32 (distillation) and bfloat16 (GPU inference) matches."""
    from impl.config import get_preset
    from impl.model.dit import CausalWanDiT
    from impl.model.lora import base_fingerprint

    torch.manual_seed(0)
    m32 = CausalWanDiT(get_preset("tiny").dit, dtype=torch.float32)
    m16 = CausalWanDiT(get_preset("tiny").dit, dtype=torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    assert base_fingerprint(m32) == base_fingerprint(m16)
    with torch.no_grad():
        next(m16.parameters()).add_(1.0)
    assert base_fingerprint(m32) != base_fingerprint(m16)


def test_sampling_steps_of_a_lora_file(cfg, tmp_path):
    from impl.model.lora_files import lora_sampling_steps, sampling_steps_warning
    model = add_lora(make_model(cfg), LoraSpec(rank=RANK, alpha=RANK))
    two = save_lora(tmp_path / "s2.safetensors", model, steps=1, base_hash="x", extra={"sampling_steps": 2})
    unknown = save_lora(tmp_path / "plain.safetensors", model, steps=1, base_hash="x")
    assert lora_sampling_steps(two) == 2
    assert lora_sampling_steps(unknown) is None
    msg = sampling_steps_warning(two, 4)
    assert msg.startswith(f"--lora {two}:") and "distilled for 2 sampling steps" in msg and "runs 4" in msg
    assert sampling_steps_warning(two, 2) is None and sampling_steps_warning(unknown, 4) is None
    with pytest.raises(FileNotFoundError):
        lora_sampling_steps(tmp_path / "nope.safetensors")


def _lora_starting_with_0x80(model, path, trained_alpha):
    """Our LoRA file, its metadata padded until the safetensors header length's low byte is
    0x80: the file then starts with the pickle protocol byte (issue 25 item 7)."""
    for pad in range(0, 256 * 8, 1):
        save_lora(path, model, steps=7, base_hash=base_fingerprint(model), extra={"pad": "x" * pad})
        head = path.read_bytes()[:8]
        if head[0] == 0x80:
            assert int.from_bytes(head, "little") % 256 == 0x80
            return path
    raise AssertionError("no padding gave a header length ending in 0x80")


def test_safetensors_lora_whose_header_length_ends_in_0x80(cfg, tmp_path):
    from impl.io import weight_file_format
    model = add_lora(make_model(cfg), LoraSpec(rank=RANK, alpha=4))
    path = _lora_starting_with_0x80(model, tmp_path / "l.safetensors", 4)
    assert weight_file_format(path) == "safetensors"
    spec = load_lora(make_model(cfg), path)
    assert spec.alpha == 4 and spec.rank == RANK          # the file's metadata, not the release's 128
    with pytest.raises(LoraError, match="base model hash mismatch"):   # the base check still runs
        load_lora(make_model(cfg, seed=5), path)


def test_weight_file_format_by_structure(tmp_path):
    from impl.io import weight_file_format
    zipped, legacy, st, junk = (tmp_path / n for n in ("z.pt", "l.pt", "s.safetensors", "j.bin"))
    torch.save({"a": torch.zeros(2)}, zipped)
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    save_file({"a": torch.zeros(2)}, str(st))
    junk.write_bytes(b"\x80\x09 not a pickle protocol")
    assert [weight_file_format(p) for p in (zipped, legacy, st, junk)] == ["torch_zip", "torch_pickle",
                                                                            "safetensors", None]
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(st.read_bytes()[:12])           # header length says more than the file holds
    assert weight_file_format(truncated) is None
