"""Sequence-parallel streaming inference (impl/inference/sp.py) equals one process.

Real gloo ranks, tiny preset (2 steps) in float64: a two-shot video of 6 blocks (window 4
blocks, sink 1, shot pin moving at the cut, so blocks are evicted) generated with SP 4 and with
SP 2 x DP 2 must give
- BF16 (model-dtype) cache, plain all-to-all: the one-process latents (bitwise here; asserted
  to 1e-12) and each rank's cache = the one-process cache's heads;
- NVFP4 cache, plain all-to-all: the same, and NVFP4 codes + tensor scales bit-identical to
  the corresponding heads of the one-process cache (the amax is max-reduced over the group);
- NVFP4 cache, NVFP4 all-to-all: bitwise what one process gives when its current block's K/V
  go through the same NVFP4 rounding (the exchange with one rank), identical codes; against
  the plain one-process NVFP4 cache the difference is below the NVFP4 cache's own error
  against BF16 storage (the justified tolerance);
- CFG (batch 2) exact; bytes sent per block == the analytic count in every case;
- the VAE only on SP roots; DP groups generating their own videos, each equal to one process.
One 4-rank launch does all of it (process start-up dominates the test time); the torchrun
entry point runs with 2 ranks through the measured benchmark.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from torch import nn

from dist_harness import run_distributed
from impl.config import ConfigError, get_preset
from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig, allowed_sp_sizes, check_sp_size
from impl.model.attention import TextContext
from impl.parallel.groups import ParallelConfigError, build_groups, single_process
from impl.parallel.sp_exchange import SPExchange, block_bytes, shard_context, shard_frames, token_range
from impl.inference.sp import SPInference, dp_shard, main
from impl.pipeline import shot_prompts

# 6 blocks, window 4, sink 1: block 2 opens shot 2 and is pinned, blocks 1 and 3 get evicted.
SHOTS = [("a red fox in the snow", 2), ("a grey owl at night", 4)]
# (kv_cache, kv_comm, guidance_scale)
CONFIGS = [("bf16", "plain", 1.0), ("nvfp4", "plain", 1.0), ("nvfp4", "nvfp4", 1.0), ("bf16", "plain", 2.0)]
SEED = 3
DP_VIDEOS = [[("a cat", 2)], [("a dog", 1), ("a bird", 2)], [("a fish", 3)]]
SPEC = Path(__file__).resolve().parents[1] / "experiments"


def _preset(guidance: float = 1.0):
    return get_preset("tiny").replace(stream={"guidance_scale": guidance, "steps": 2})


def _config(guidance: float = 1.0, **kw) -> InferenceConfig:
    """float64, random weights from seed 0 (Weights' default), 2 steps."""
    return InferenceConfig(preset="tiny", steps=2, guidance_scale=guidance, dtype="fp64", **kw)


# Random weights from seed 0, a fixed CRC-seeded random embedding per prompt.
WEIGHTS = Weights(text="embedding")


def _prompts(preset, shots=SHOTS):
    return shot_prompts(shots, preset.stream.scene_cut_prefix)


def _cache_state(cache) -> dict[str, torch.Tensor]:
    if cache.storage == "bf16":
        return {"k": cache.k.clone(), "v": cache.v.clone()}
    return {f"{n}_{part}": getattr(s, part).clone().view(torch.uint8) if part == "scales" else getattr(s, part).clone()
            for n, s in (("k", cache.k), ("v", cache.v)) for part in ("packed", "scales", "global_scale")}


def _sp_generate(groups, kv_cache, kv_comm, guidance):
    cfg = _config(guidance, kv_cache=kv_cache, kv_comm=kv_comm, sp_size=groups.sp_size)
    sp = SPInference(cfg, groups, weights=WEIGHTS, decode=False)
    res = sp.generate(_prompts(cfg.stream_preset), seed=SEED, decode=False)
    return res.latents, dict(sp.exchange.sent), _cache_state(sp.cache)


def _exchange_ratio(groups):
    """Bytes of K+V through the exchange in BF16 vs NVFP4 for one bf16 block."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 4, 128, generator=g).to(torch.bfloat16) for _ in range(3))
    sent = {}
    for comm in ("plain", "nvfp4"):
        ex = SPExchange(groups.sp_group, groups.sp_size, groups.sp_rank, kv_comm=comm)
        qh, kh, vh, codes = ex.to_heads(q, k, v, commit=True)
        assert qh.shape == (1, 4 // groups.sp_size, 4 * groups.sp_size, 128) and qh.dtype == torch.bfloat16
        assert codes is None if comm == "plain" else codes[0].packed.shape[-1] == 64
        assert torch.equal(ex.to_tokens(qh), q)  # heads -> tokens inverts tokens -> heads
        sent[comm] = ex.sent["kv"]
    return sent


class _StubVAE(nn.Module):
    """Stands in for the VAE where only its placement is checked (no decode is run)."""


def _vae_placement(groups):
    cfg = InferenceConfig(preset="tiny", steps=2, dtype="fp32", sp_size=groups.sp_size)
    sp = SPInference(cfg, groups, weights=Weights(vae=_StubVAE(), text="embedding"))
    has_vae = sp.pipeline.vae is not None
    # Every rank runs the block (the root without decoding: the stub cannot); a non-root rank
    # asked to decode just returns latents.
    res = sp.generate(["one block"], decode=not has_vae, video_path=None if has_vae else "never.mp4")
    assert res.frames is None and res.video_path is None
    return has_vae


def _worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    for sp in (4, 2):   # SP 4; SP 2 x DP 2 (both DP groups run the same configs)
        groups = build_groups(sp)
        out[sp] = [_sp_generate(groups, *c) for c in CONFIGS]
    out["ratio"] = _exchange_ratio(groups)
    out["vae"] = _vae_placement(groups)
    # each DP group generates its own share of the videos
    preset = _preset()
    mine = dp_shard(len(DP_VIDEOS), groups.dp_size, groups.dp_rank)
    spi = SPInference(_config(sp_size=2), groups, weights=WEIGHTS, decode=False)
    out["dp"] = {i: spi.generate(_prompts(preset, DP_VIDEOS[i]), seed=SEED + i, decode=False).latents for i in mine}
    return out


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _reference(kv_cache, guidance, exchange: str | None = None, shots=SHOTS, seed=SEED):
    """One process; ``exchange="nvfp4"`` routes the forward through a one-rank NVFP4 exchange."""
    preset = _preset(guidance)
    sp = None if exchange is None else SPExchange(None, 1, 0, kv_comm=exchange)
    pipe = build_pipeline(_config(guidance, kv_cache=kv_cache), "cpu", WEIGHTS, decode=False, sp=sp)
    with _one_thread():
        res = pipe.generate(_prompts(preset, shots), seed=seed, decode=False)
    return res.latents, _cache_state(pipe._cache)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _heads(state, name, rank, sp):
    h = state[name].shape[2] // sp
    return state[name][:, :, rank * h:(rank + 1) * h] if state[name].dim() == 5 else state[name]


def test_sp_generation_equals_one_process():
    results = run_distributed(_worker, 4)
    refs = {(kv, g): _reference(kv, g) for kv, _, g in CONFIGS}
    emulated = _reference("nvfp4", 1.0, exchange="nvfp4")
    storage_err = _rel(refs[("nvfp4", 1.0)][0], refs[("bf16", 1.0)][0])
    for rank, res in enumerate(results):
        for sp in (4, 2):
            sp_rank = rank % sp
            for (kv, comm, g), (lat, sent, state) in zip(CONFIGS, res[sp]):
                where = (sp, kv, comm, g, rank)
                ref_lat, ref_state = emulated if comm == "nvfp4" else refs[(kv, g)]
                assert (lat - ref_lat).abs().max() <= 1e-12, where
                for name, ref in ref_state.items():   # each rank's cache holds the matching heads
                    mine, theirs = state[name], _heads(ref_state, name, sp_rank, sp)
                    if kv == "bf16":
                        assert (mine - theirs).abs().max() <= 1e-12, (name, *where)
                    else:                             # NVFP4 codes and scales: bit for bit
                        assert torch.equal(mine, theirs), (name, *where)
                # bytes: measured == analytic, per category
                expect = block_bytes(_preset(g), sp, element_bytes=8, kv_cache=kv, kv_comm=comm)
                assert sent == {k: len(_prompts(_preset(g))) * v for k, v in expect.as_dict().items()}, where
            # The NVFP4 exchange rounds the current block's K/V: off the plain NVFP4 cache by
            # less than that cache is off BF16 storage.
            assert 0 < _rel(res[sp][2][0], refs[("nvfp4", 1.0)][0]) < storage_err
        assert res["ratio"]["nvfp4"] * 32 == res["ratio"]["plain"] * 9   # K+V bytes: 0.28125 of BF16 exactly
    assert [r["vae"] for r in results] == [True, False, True, False]    # VAE on each SP root only
    assert sorted(i for r in results[::2] for i in r["dp"]) == list(range(len(DP_VIDEOS)))
    for r in results:
        for i, lat in r["dp"].items():
            assert (lat - _reference("bf16", 1.0, shots=DP_VIDEOS[i], seed=SEED + i)[0]).abs().max() <= 1e-12


def test_bad_sizes_are_clear_errors():
    tiny = get_preset("tiny")
    assert allowed_sp_sizes(tiny) == [1, 2, 4]
    with pytest.raises(ConfigError, match="dit.num_heads=4"):
        check_sp_size(tiny, 3)
    odd = tiny.replace(video={"height": 96, "width": 64},
                       stream={"frames_per_block": 1, "kv_window_frames": 4, "sink_frames": 1})
    with pytest.raises(ConfigError, match="frames_per_block=1"):
        check_sp_size(odd, 4)   # 4 heads split, 6 tokens do not
    with pytest.raises(ConfigError, match="sp_size"):
        InferenceConfig(sp_size=0)
    with pytest.raises(ConfigError, match="kv_comm"):
        InferenceConfig(sp_size=2, kv_cache="bf16", kv_comm="nvfp4")
    with pytest.raises(ParallelConfigError, match="sp_size"):
        build_groups(2)  # no process group
    with pytest.raises(ParallelConfigError, match="sp_size"):
        SPInference(InferenceConfig(sp_size=2), single_process())
    with pytest.raises(ParallelConfigError, match="SP process group"):
        SPExchange(None, 2, 0)


def test_shards_and_prompt_groups():
    assert [token_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # per-frame rows re-gridded for a shard inside a frame (4 tokens per frame, shard 2 tokens)
    t = torch.arange(2.0).reshape(1, 2, 1)                 # two frames
    assert shard_frames(t, 4, 2, 4).flatten().tolist() == [0.0]
    assert shard_frames(t, 4, 4, 8).flatten().tolist() == [1.0]
    assert shard_frames(t, 4, 0, 8).flatten().tolist() == [0.0, 1.0]
    assert shard_frames(t, 4, 3, 6).flatten().tolist() == [0.0, 1.0, 1.0]  # 3 tokens across a frame edge
    kv = torch.arange(4.0).reshape(1, 4, 1, 1, 1)           # G = 4 prompt groups
    ctx = TextContext([(kv, kv)])
    assert shard_context(ctx, 8, 2, 1).kv[0][0].flatten().tolist() == [2.0, 3.0]   # whole groups
    ctx2 = TextContext([(kv[:, :2], kv[:, :2])])
    assert shard_context(ctx2, 8, 4, 3).kv[0][0].flatten().tolist() == [1.0]       # inside a group
    ctx3 = TextContext([(torch.zeros(1, 3, 1, 1, 1),) * 2])
    with pytest.raises(ParallelConfigError, match="prompt groups"):
        shard_context(ctx3, 12, 2, 0)


def test_dp_shard():
    assert dp_shard(5, 2, 0) == [0, 2, 4] and dp_shard(5, 2, 1) == [1, 3]
    assert sorted(dp_shard(7, 3, 0) + dp_shard(7, 3, 1) + dp_shard(7, 3, 2)) == list(range(7))
    with pytest.raises(ParallelConfigError, match="dp_rank"):
        dp_shard(3, 2, 2)


def test_analytic_bytes_5b():
    p = get_preset("wan22_ti2v_5b")
    bf = block_bytes(p, 4, element_bytes=2)
    nv = block_bytes(p, 4, element_bytes=2, kv_cache="nvfp4", kv_comm="nvfp4")
    assert nv.kv / bf.kv == pytest.approx(0.28125, abs=0)
    # code study 8: 4 all-to-alls of a [1760, 3072] BF16 tensor per layer, 3/4 of it leaving
    assert bf.q + bf.kv + bf.o == 5 * 30 * 4 * 1760 * 3072 * 2 * 3 // 4
    assert block_bytes(p, 1, element_bytes=2).total == 0


def test_cli_single_process_and_errors(tmp_path, capsys):
    assert main(["--sp-size", "3", "--out", str(tmp_path)]) == 2
    assert "--sp-size" in capsys.readouterr().err
    assert main(["--kv-comm", "nvfp4", "--out", str(tmp_path)]) == 2
    assert "kv_cache='nvfp4'" in capsys.readouterr().err
    assert main(["--shot", "x::0", "--out", str(tmp_path)]) == 2
    with _one_thread():
        rc = main(["--preset", "tiny", "--dtype", "fp32", "--shot", "a cat::2", "--shot", "a dog", "--no-decode",
                   "--save-latents", "--warmup-blocks", "1", "--out", str(tmp_path / "o"),
                   "--metrics-out", str(tmp_path / "m.json")])
    assert rc == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["sp_size"] == 1 and m["measured_blocks"] == 2 and m["comm_bytes_per_block"] == 0 and m["dit_fps"] > 0
    assert torch.load(tmp_path / "o" / "latents_0000.pt").shape[2] == 6
    assert json.loads((tmp_path / "o" / "timings_0000.json").read_text())["prompts"][2].startswith("The scene")


def test_analytic_benchmark_spec():
    from repro.benchmarks.sp_inference_cost import SP_INFERENCE_COST, run_sp_inference_cost
    from repro.spec import load_spec
    spec = load_spec(SPEC / "sp_inference_cost.yaml")
    rows = {}
    for v in spec.expand("cpu"):
        m = run_sp_inference_cost(v.values, spec.measure_for("cpu"), {"device": "cpu"})
        rows[(v.values["sp_size"], v.values["kv_cache"], v.values["steps"])] = m
    assert len(rows) == 16
    assert rows[(1, "bf16", 4)]["comm_bytes_per_block"] == 0
    assert rows[(1, "bf16", 4)]["kv_mem_gb"] == pytest.approx(10.38, abs=0.01)   # code study 6.5
    assert rows[(1, "nvfp4", 4)]["kv_mem_gb"] == pytest.approx(2.92, abs=0.01)
    for sp in (2, 4, 8):
        assert rows[(sp, "nvfp4", 4)]["kv_comm_ratio"] == 0.28125
        assert rows[(sp, "bf16", 4)]["est_speedup_vs_sp1"] > 1
        assert rows[(sp, "nvfp4", 4)]["nvfp4_breakeven_link_gbps"] > 0
    with pytest.raises(ValueError, match="num_heads"):
        run_sp_inference_cost({**SP_INFERENCE_COST.defaults(), "sp_size": 5}, spec.measure_for("cpu"), {"device": "cpu"})


def test_measured_benchmark_launches_torchrun():
    """The sp_inference benchmark's harness path: torchrun with 2 gloo ranks, tiny preset."""
    from repro.benchmarks.sp_inference import SP_INFERENCE, run_sp_inference
    from repro.spec import load_spec
    load_spec(SPEC / "sp_inference.yaml")
    variant = {**SP_INFERENCE.defaults(), "sp_size": 2, "kv_cache": "nvfp4", "dtype": "fp32"}
    measure = {**SP_INFERENCE.measure_defaults(), "warmup_blocks": 1, "blocks": 1, "decode": False, "timeout_s": 300.0}
    m = run_sp_inference(variant, measure, {"device": "cpu"})
    assert m["kv_comm"] == "nvfp4" and m["comm_bytes_match_analytic"] and m["dit_fps"] > 0
    assert m["comm_bytes_per_block"] == block_bytes(get_preset("tiny"), 2, element_bytes=4, kv_cache="nvfp4",
                                                    kv_comm="nvfp4").total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sp_inference_nccl_two_gpus():
    """NCCL, bf16, NVFP4 exchange (Triton quantize/decode) through the torchrun entry point."""
    from repro.benchmarks.sp_inference import SP_INFERENCE, run_sp_inference
    measure = {**SP_INFERENCE.measure_defaults(), "warmup_blocks": 1, "blocks": 2, "decode": True, "timeout_s": 600.0}
    for kv in ("bf16", "nvfp4"):
        variant = {**SP_INFERENCE.defaults(), "preset": "small", "sp_size": 2, "kv_cache": kv}
        m = run_sp_inference(variant, measure, {"device": "cuda"})
        assert m["comm_bytes_match_analytic"] and m["e2e_fps"] > 0


@pytest.mark.gpu
def test_nvfp4_exchange_on_cuda_matches_the_cache():
    """One rank on CUDA (Triton quantize/decode): the exchange's codes are what the NVFP4 cache
    stores for the same K/V, and its decoded K/V are what the cache reads back."""
    from impl.config import StreamConfig
    from impl.model.kv_cache import KVCache
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 24, 880, 128, generator=g, device="cuda").to(torch.bfloat16) for _ in range(3))
    ex = SPExchange(None, 1, 0, kv_comm="nvfp4")
    _, kx, vx, codes = ex.to_heads(q, k, v, commit=True)
    kw = dict(num_layers=1, batch=1, num_heads=24, head_dim=128, tokens_per_block=880, dtype=torch.bfloat16,
              device="cuda", storage="nvfp4", stream=StreamConfig(frames_per_block=1, kv_window_frames=2, sink_frames=0))
    mine, ref = KVCache(**kw), KVCache(**kw)
    plan = ref.begin_block(0)
    assert mine.begin_block(0) == plan
    ref.write(0, plan, k, v)
    mine.write(0, plan, kx, vx, codes)
    for name in ("k", "v"):
        for part in ("packed", "scales", "global_scale"):
            assert torch.equal(getattr(getattr(mine, name), part).view(torch.uint8) if part == "scales" else
                               getattr(getattr(mine, name), part),
                               getattr(getattr(ref, name), part).view(torch.uint8) if part == "scales" else
                               getattr(getattr(ref, name), part)), (name, part)
    plan2 = ref.begin_block(1)
    mine.begin_block(1)
    ref.write(0, plan2.attention_only(), k, v)
    kr, vr = ref.read(0, plan2)
    assert torch.equal(kr[:, :, :880], kx) and torch.equal(vr[:, :, :880], vx)
