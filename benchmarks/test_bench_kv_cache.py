"""KV cache: one block's write (the committing re-cache pass) and read, every layer, both storages."""

import pytest
import torch

from _bench import TARGETS, check, run_benchmark
from impl.config import StreamConfig, get_preset
from impl.model.kv_cache import KVCache
from impl.quant import nvfp4


def _cache(target, storage):
    if target.gpu:   # 5B: 24 heads x 128, 7040 tokens per block, 4 slots (32-frame window, 8-frame sink)
        p = get_preset("wan22_ti2v_5b")
        heads, dim, tpb, stream, layers = p.dit.num_heads, p.dit.head_dim, p.tokens_per_block, p.stream, 2
    else:
        heads, dim, tpb, layers = 4, 64, 256, 2
        stream = StreamConfig(frames_per_block=1, kv_window_frames=4, sink_frames=1)
    cache = KVCache(num_layers=layers, batch=1, num_heads=heads, head_dim=dim, tokens_per_block=tpb, stream=stream,
                    dtype=target.dtype, device=target.device, storage=storage)
    return cache, layers, (1, heads, tpb, dim)


@pytest.mark.parametrize("storage", ["bf16", "nvfp4"])
@pytest.mark.parametrize("target", TARGETS)
def test_kv_cache_write_read(benchmark, target, storage):
    cache, layers, shape = _cache(target, storage)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(shape, generator=g).to(target.device, target.dtype) for _ in range(2))
    block = [-1]

    def step():
        block[0] += 1                      # a new block each call: fills the window, then evicts
        plan = cache.begin_block(block[0])
        for layer in range(layers):
            cache.write(layer, plan, k, v)
            kr, vr = cache.read(layer, plan)
        return kr, vr, plan

    for _ in range(cache.num_slots):        # start from a full window
        step()
    kr, vr, plan = run_benchmark(benchmark, target, step, group="kv-cache", storage=storage, layers=layers,
                           block_shape=shape, slots=cache.num_slots)
    b, h, t, d = shape
    check(kr, (b, h, cache.num_slots * t, d), what="keys")
    check(vr, (b, h, cache.num_slots * t, d), what="values")
    # every block wrote the same K: the current one enters attention as it is, the history reads
    # back exactly from BF16 storage and to 4-bit precision from NVFP4
    lo, hi = plan.write_range
    assert torch.equal(kr[:, :, lo:hi], k)
    history = torch.cat([kr[:, :, :lo], kr[:, :, hi:]], dim=2).float()
    want = k.float().repeat(1, 1, cache.num_slots - 1, 1)
    if storage == "bf16":
        assert torch.equal(history, want)
    else:
        assert nvfp4.sqnr_db(want, history) > 15.0
