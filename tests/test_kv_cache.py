import random

import pytest
import torch

from impl.config import ConfigError, StreamConfig, get_preset
from impl.model.kv_cache import KVCache


def make_cache(stream: StreamConfig, tokens_per_block=3, device="cpu", layers=2, heads=2, head_dim=4):
    return KVCache(num_layers=layers, batch=1, num_heads=heads, head_dim=head_dim,
                   tokens_per_block=tokens_per_block, stream=stream, dtype=torch.float32, device=device)


def expected_resident(block: int, shot_starts: set[int], stream: StreamConfig) -> set[int]:
    """Independent statement of the residency rule: sink + the pinned first block of the shot
    (pinned once that block is done, as in the reference) + current block + the most recent
    other blocks filling the window."""
    protected = {b for b in range(min(stream.sink_blocks, block + 1))} | {block}
    if stream.multi_shot_sink and stream.sink_blocks > 0 and block > 0:
        protected.add(max(s for s in shot_starts | {0} if s < block))
    others = [b for b in range(block - 1, -1, -1) if b not in protected]
    return protected | set(others[: max(0, stream.window_blocks - len(protected))])


@pytest.mark.parametrize("window,sink,multi", [(4, 1, True), (4, 1, False), (5, 2, True), (3, 0, True), (6, 1, True)])
def test_residency_matches_rule_over_many_blocks(window, sink, multi):
    stream = StreamConfig(frames_per_block=1, kv_window_frames=window, sink_frames=sink, multi_shot_sink=multi)
    rng = random.Random(window * 10 + sink)
    cache = make_cache(stream)
    shot_starts: set[int] = set()
    for block in range(60):
        is_cut = block > 0 and rng.random() < 0.2
        if is_cut:
            shot_starts.add(block)
        plan = cache.begin_block(block, shot_start=block == 0 or is_cut)
        # Repeated calls for the same block (denoising steps, re-cache) reuse its slot.
        for _ in range(3):
            assert cache.begin_block(block) == plan
        assert set(cache.resident_blocks()) == expected_resident(block, shot_starts, stream), block
        assert plan.num_valid == min(block + 1, window)
        assert cache.slot_block[plan.slot] == block
        # Sink blocks are never evicted.
        assert set(range(min(sink, block + 1))) <= set(cache.resident_blocks())


def test_default_5b_window_holds_sink_pin_and_two_recent():
    stream = StreamConfig()  # 32-frame window, 8-frame sink, multi-shot: 4 slots
    cache = make_cache(stream)
    for b in range(6):
        cache.begin_block(b, shot_start=b in (0, 3))
    assert cache.resident_blocks() == [0, 3, 4, 5]
    cache.begin_block(6)
    assert cache.resident_blocks() == [0, 3, 5, 6]
    # A new cut: while block 7 is generated the old pin (3) still holds; then the pin moves
    # to 7 and block 3 becomes ordinary history.
    cache.begin_block(7, shot_start=True)
    assert cache.resident_blocks() == [0, 3, 6, 7]
    cache.begin_block(8)
    assert cache.resident_blocks() == [0, 6, 7, 8]


def test_write_read_and_overwrite_in_place():
    stream = StreamConfig(frames_per_block=1, kv_window_frames=3, sink_frames=1, multi_shot_sink=False)
    cache = make_cache(stream, tokens_per_block=2)
    written = {}
    for b in range(5):
        plan = cache.begin_block(b)
        for step in range(2):  # the second write must replace the first
            k = torch.randn(1, 2, 2, 4)
            cache.write(1, plan, k, -k)
        written[b] = k
        keys, values = cache.read(1, plan)
        assert keys.shape == (1, 2, plan.num_valid * 2, 4)
        assert torch.equal(values, -keys)
        resident = {tuple(keys[0, 0, 2 * s:2 * s + 2, 0].tolist()) for s in range(plan.num_valid)}
        assert resident == {tuple(written[r][0, 0, :, 0].tolist()) for r in cache.resident_blocks()}


def test_out_of_order_blocks_are_rejected_and_reset_restarts():
    cache = make_cache(StreamConfig(frames_per_block=1, kv_window_frames=4, sink_frames=1))
    cache.begin_block(0)
    cache.begin_block(1)
    with pytest.raises(ValueError, match="not the current block"):
        cache.begin_block(3)
    with pytest.raises(ValueError, match="not the current block"):
        cache.begin_block(0)
    cache.text_context("p", lambda: 1)
    cache.reset()
    assert cache.resident_blocks() == [] and cache.text_contexts == {}
    assert cache.begin_block(0).slot == 0


def test_text_context_is_memoised_and_bounded():
    cache = make_cache(StreamConfig())
    calls = []
    for key in ["a", "b", "a", "a", "b"]:
        cache.text_context(key, lambda key=key: calls.append(key) or key.upper())
    assert calls == ["a", "b"]
    for i in range(20):
        cache.text_context(i, lambda: i)
    assert len(cache.text_contexts) == cache.max_text_contexts


def test_5b_cache_memory_matches_the_format_math():
    p = get_preset("wan22_ti2v_5b")
    cache = KVCache(num_layers=30, batch=1, num_heads=24, head_dim=128, tokens_per_block=p.tokens_per_block,
                    stream=p.stream, dtype=torch.bfloat16, device="meta")
    # 30 layers x K,V x 4 slots x 7040 tokens x 24 heads x 128 x 2 bytes (code study 6.5: 10.38 GB).
    assert cache.memory_bytes() == 30 * 2 * 4 * 7040 * 24 * 128 * 2
    assert round(cache.memory_bytes() / 1e9, 2) == 10.38


def test_window_too_small_for_sink_and_pin_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_window_frames"):
        StreamConfig(frames_per_block=8, kv_window_frames=16, sink_frames=8, multi_shot_sink=True)
