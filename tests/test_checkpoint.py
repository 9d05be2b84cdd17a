import pytest
import torch
from safetensors.torch import load_file

from impl.config import get_preset
from impl.model.checkpoint import (CheckpointError, diffusers_to_original, is_original_layout, load_dit_weights,
                                   original_to_diffusers, save_dit_weights)
from impl.model.dit import CausalWanDiT


def fresh(seed):
    torch.manual_seed(seed)
    return CausalWanDiT(get_preset("tiny").dit)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_round_trip_in_both_layouts(tmp_path, layout):
    src, dst = fresh(0), fresh(1)
    path = save_dit_weights(src, tmp_path / "dit.safetensors", layout=layout, metadata={"preset": "tiny"})
    keys = load_file(str(path)).keys()
    assert any("self_attn.q." in k for k in keys) == (layout == "original")
    assert any("attn1.to_q." in k for k in keys) == (layout == "diffusers")
    load_dit_weights(dst, path)
    assert_same_weights(src, dst)
    assert not list(tmp_path.glob("*.tmp"))


def test_original_mapping_covers_every_parameter_and_inverts():
    sd = fresh(0).state_dict()
    orig = diffusers_to_original(sd)
    assert is_original_layout(orig) and not is_original_layout(sd)
    expected = {"blocks.0.self_attn.o.weight", "blocks.1.cross_attn.norm_k.weight", "blocks.0.norm3.bias",
                "blocks.0.ffn.0.weight", "blocks.0.modulation", "head.head.weight", "head.modulation",
                "time_projection.1.weight", "text_embedding.2.bias", "time_embedding.0.weight"}
    assert expected <= orig.keys()
    assert original_to_diffusers(orig).keys() == sd.keys()


def test_longlive_training_checkpoint_with_wrappers_loads(tmp_path):
    src, dst = fresh(0), fresh(1)
    wrapped = {f"model._fsdp_wrapped_module.{k}": v for k, v in diffusers_to_original(src.state_dict()).items()}
    torch.save({"generator": wrapped, "step": 7}, tmp_path / "model.pt")
    load_dit_weights(dst, tmp_path / "model.pt")
    assert_same_weights(src, dst)


def test_diffusers_folder_loads_into_our_model_and_theirs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    src, dst = fresh(0), fresh(1)
    c = get_preset("tiny").dit
    ref = diffusers.WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True, eps=c.eps)
    ref.load_state_dict(src.state_dict())
    ref.save_pretrained(tmp_path / "pipe" / "transformer")  # the diffusers-format layout on disk
    load_dit_weights(dst, tmp_path / "pipe")
    assert_same_weights(src, dst)


def test_mismatches_name_the_keys(tmp_path):
    model = fresh(0)
    sd = dict(model.state_dict())
    del sd["blocks.1.attn2.to_v.bias"]
    sd["blocks.9.attn1.to_q.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_dit_weights(model, sd)
    assert "missing keys: blocks.1.attn2.to_v.bias" in str(err.value)
    assert "unexpected keys: blocks.9.attn1.to_q.weight" in str(err.value)
    sd = dict(model.state_dict())
    sd["proj_out.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        load_dit_weights(model, sd)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit_weights(model, tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="unsupported"):
        (tmp_path / "w.ckpt").write_text("x")
        load_dit_weights(model, tmp_path / "w.ckpt")


def _one_line(err, path):
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_truncated_files_name_the_file_in_one_line(tmp_path):
    src = fresh(0)
    pt = tmp_path / "model.pt"
    torch.save({"generator": diffusers_to_original(src.state_dict())}, pt)
    st = save_dit_weights(src, tmp_path / "dit.safetensors")
    for path, pattern in ((pt, "cannot read as a PyTorch checkpoint"), (st, "cannot read as safetensors")):
        data = path.read_bytes()
        cut = path.with_name("cut" + path.suffix)
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_dit_weights(fresh(1), cut)
        _one_line(err, cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint" * 4)
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a torch.save file") as err:
        load_dit_weights(fresh(1), junk)
    _one_line(err, junk)


def test_foreign_checkpoints_name_the_file_and_what_was_expected(tmp_path):
    vae = tmp_path / "vae.pt"
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.zeros(3, 3), "encoder.conv_in.bias": torch.zeros(3)}}, vae)
    with pytest.raises(CheckpointError, match="not a checkpoint of this DiT.*blocks.0.attn1.to_q.weight.*decoder.conv_in") as err:
        load_dit_weights(fresh(0), vae)
    _one_line(err, vae)
    other = tmp_path / "notdict.pt"
    torch.save([torch.zeros(2)], other)
    with pytest.raises(CheckpointError, match="not a state dict of tensors.*expected a Wan2.2-TI2V DiT state dict") as err:
        load_dit_weights(fresh(0), other)
    _one_line(err, other)
    shallow = tmp_path / "shallow.safetensors"
    sd = {k: v for k, v in fresh(0).state_dict().items() if not k.startswith("blocks.1.")}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(shallow))
    with pytest.raises(CheckpointError, match="missing keys: blocks.1.") as err:
        load_dit_weights(fresh(0), shallow)
    _one_line(err, shallow)
    te = tmp_path / "model_te.pt"
    torch.save({"generator": diffusers_to_original(fresh(0).state_dict()), "checkpoint_format": "longlive_generator_te_nvfp4"}, te)
    with pytest.raises(CheckpointError, match="Transformer Engine module state dict") as err:
        load_dit_weights(fresh(0), te)
    _one_line(err, te)


def test_lora_files_given_as_dit_checkpoints_point_to_lora(tmp_path):
    from impl.model.lora import LoraSpec, add_lora
    from impl.model.lora_files import save_lora
    model = add_lora(fresh(0), LoraSpec(rank=4, alpha=4))
    path = save_lora(tmp_path / "lora.safetensors", model, steps=1, base_hash="x")
    with pytest.raises(CheckpointError, match="LoRA tensors.*--lora") as err:
        load_dit_weights(fresh(0), path)
    _one_line(err, path)
