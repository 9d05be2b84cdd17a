"""umT5 text encoder wrapper: shapes, Wan zero-padding, memoisation, offline tokenizer, loading."""

from __future__ import annotations

import pytest
import torch

from impl.config import get_preset
from impl.model.text_encoder import (
    EOS_ID,
    PAD_ID,
    TextEncoder,
    build_offline_tokenizer,
    build_text_encoder,
    load_text_encoder,
    load_tokenizer,
)

CFG = get_preset("tiny").text
SHORT, LONG = "a red car", "the dog runs fast across the green field at night"


@pytest.fixture(scope="module")
def enc64():
    # float64 without a cache: comparisons across batch compositions are then meaningful.
    return TextEncoder.from_preset(CFG, dtype=torch.float64, seed=0, cache_size=0)


def _true_len(te: TextEncoder, prompt: str) -> int:
    _, mask = te.tokenize([prompt])
    return int(mask.sum())


def test_build_text_encoder_config():
    model = build_text_encoder(CFG, seed=0)
    c = model.config
    assert (c.d_model, c.num_layers, c.num_heads, c.d_kv, c.d_ff, c.vocab_size) == (
        CFG.d_model, CFG.num_layers, CFG.num_heads, CFG.d_kv, CFG.d_ff, CFG.vocab_size)
    assert c.is_gated_act and c.dense_act_fn == "gelu_new" and not c.is_encoder_decoder
    state = torch.get_rng_state()
    again = build_text_encoder(CFG, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_output_shape_and_zero_rows_past_length(enc64):
    out = enc64.encode([SHORT, LONG])
    assert out.shape == (2, CFG.max_length, CFG.d_model) and out.dtype == torch.float64
    n = _true_len(enc64, SHORT)
    assert 1 < n < CFG.max_length
    assert torch.all(out[0, n:] == 0)
    assert torch.all(out[0, :n].abs().sum(-1) > 0)
    # Over-long prompts are truncated to max_length and end with </s>.
    ids, mask = enc64.tokenize([LONG * 3])
    assert ids.shape == (1, CFG.max_length) and int(mask.sum()) == CFG.max_length
    assert ids[0, -1].item() == EOS_ID


def test_padding_invariance_and_prompts_differ(enc64):
    alone = enc64.encode([SHORT])
    batched = enc64.encode([LONG, SHORT])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-12, rtol=0)
    assert not torch.allclose(batched[0], batched[1])
    assert not torch.allclose(enc64.encode(["a blue car"]), alone)


def test_whitespace_cleaning(enc64):
    assert torch.equal(enc64.encode(["  a   red\ncar "]), enc64.encode([SHORT]))


def test_deterministic_across_builds():
    a = TextEncoder.from_preset(CFG, seed=0).encode([SHORT, LONG])
    b = TextEncoder.from_preset(CFG, seed=0).encode([SHORT, LONG])
    assert torch.equal(a, b)
    c = TextEncoder.from_preset(CFG, seed=1).encode([SHORT, LONG])
    assert not torch.allclose(a, c)


def test_offline_tokenizer_deterministic():
    t1 = build_offline_tokenizer(CFG.vocab_size, CFG.max_length)
    t2 = build_offline_tokenizer(CFG.vocab_size, CFG.max_length)
    assert t1.get_vocab() == t2.get_vocab() and len(t1) == CFG.vocab_size
    assert (t1.pad_token_id, t1.eos_token_id, t1.unk_token_id) == (PAD_ID, EOS_ID, 2)
    text = "A Man walks, slowly; über café zzq 42!"
    assert t1(text).input_ids == t2(text).input_ids
    assert t1(text).input_ids[-1] == EOS_ID
    assert t1("A man").input_ids == t1("a MAN").input_ids  # lower-cased
    assert max(t1(LONG * 5).input_ids) < CFG.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        build_offline_tokenizer(50, 16)


def test_memoisation():
    te = TextEncoder.from_preset(CFG, seed=0, cache_size=2)
    first = te.encode([SHORT])
    calls = []
    original = te._encode_uncached
    te._encode_uncached = lambda prompts: calls.append(list(prompts)) or original(prompts)
    second = te.encode([SHORT, SHORT])
    assert calls == []  # served from the cache
    assert torch.equal(second[0], first[0]) and torch.equal(second[1], first[0])
    second.add_(1.0)  # the returned tensor is a copy; the cache is untouched
    assert torch.equal(te.encode([SHORT]), first)
    te.encode(["p1", "p2"])  # evicts SHORT (LRU, size 2)
    te.encode([SHORT])
    assert calls == [["p1", "p2"], [SHORT]]
    te.clear_cache()
    te.encode([SHORT])
    assert calls[-1] == [SHORT]


def test_encode_rejects_bad_input(enc64):
    with pytest.raises(TypeError, match="list of str"):
        enc64.encode(SHORT)
    with pytest.raises(ValueError, match="empty"):
        enc64.encode([])


def test_load_missing_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_text_encoder"):
        load_text_encoder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="load_tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_save_and_from_pretrained_round_trip(tmp_path):
    te = TextEncoder.from_preset(CFG, seed=0)
    te.model.save_pretrained(tmp_path / "text_encoder")
    te.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = TextEncoder.from_pretrained(tmp_path, max_length=CFG.max_length)
    prompts = [SHORT, LONG, "Über café, 42 birds!"]
    assert torch.equal(loaded.encode(prompts), te.encode(prompts))
    # The component folders can also be given directly.
    direct = TextEncoder.from_pretrained(tmp_path / "text_encoder", max_length=CFG.max_length,
                                         tokenizer_path=tmp_path / "tokenizer")
    assert torch.equal(direct.encode(prompts), te.encode(prompts))
