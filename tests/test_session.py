"""The streaming session (impl/session.py): generate is its client, switches, re-cache, I2V,
video continuation, misuse, and the same session under SP (2 gloo ranks).

Tiny preset, random weights, the CRC-seeded random embedding per prompt; window 4 blocks with
a 1-block sink, so five blocks already evict one.
"""

from __future__ import annotations

import threading

import pytest
import torch

from dist_harness import run_distributed
from impl.errors import ConfigError
from impl.inference.build import Weights, build_pipeline
from impl.inference.config import InferenceConfig
from impl.model.attention import CachedBlock
from impl.model.kv_cache import KVCache
from impl.model.vae import StreamingDecoder, encode_video
from impl.pipeline import shot_prompts
from impl.session import SessionError, StreamingSession

WEIGHTS = Weights(text="embedding")
PREFIX = "The scene transitions. "


def _pipe(decode: bool = True, **cfg) -> object:
    return build_pipeline(InferenceConfig(preset="tiny", dtype="fp32", **cfg), "cpu", WEIGHTS, decode=decode)


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


@pytest.fixture(scope="module")
def dit_only():
    return _pipe(decode=False)


def _kv(cache: KVCache, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``block`` in every layer: [L, B, H, tpb, D] (BF16 / model-dtype storage)."""
    slot = cache.slot_block.index(block)
    lo, hi = slot * cache.tokens_per_block, (slot + 1) * cache.tokens_per_block
    return cache.k[:, :, :, lo:hi].clone(), cache.v[:, :, :, lo:hi].clone()


def _nvfp4_slot(cache: KVCache, block: int) -> list[torch.Tensor]:
    slot = cache.slot_block.index(block)
    lo, hi = slot * cache.tokens_per_block, (slot + 1) * cache.tokens_per_block
    return [t for s in (cache.k, cache.v) for t in (s.packed[:, :, :, lo:hi].clone(),
                                                    s.scales[:, :, :, lo:hi].view(torch.uint8).clone(),
                                                    s.global_scale[:, :, slot].clone())]


def _slot_state(cache: KVCache, block: int) -> list[torch.Tensor]:
    return list(_kv(cache, block)) if cache.storage == "bf16" else _nvfp4_slot(cache, block)


# ---- generate is a session client ----

def test_session_without_switch_equals_generate_bit_for_bit(pipe):
    ref = pipe.generate(["a red fox in the snow"] * 3, seed=4)
    with pipe.session("a red fox in the snow", seed=4, max_blocks=3) as session:
        blocks = list(session)
    assert [b.index for b in blocks] == [0, 1, 2] and all(b.switch is None for b in blocks)
    assert torch.equal(torch.cat([b.latents for b in blocks], 2), ref.latents)
    assert torch.equal(torch.cat([b.frames for b in blocks], 2), ref.frames)
    assert [b.timing.frames for b in blocks] == [t.frames for t in ref.timings]


def test_cut_and_direct_switches_follow_the_multi_shot_path(dit_only):
    prompts = shot_prompts([("a red fox", 2), ("a grey owl", 2)], PREFIX) + ["a grey owl at dawn"]
    ref = dit_only.generate(prompts, seed=2).latents
    with dit_only.session(prompts[0], seed=2, max_blocks=5) as session:
        out = [next(session), next(session)]
        session.switch("a grey owl", "cut")            # the prefix is added
        out.append(next(session))
        session.switch("a grey owl", "direct")
        out.append(next(session))
        before = _kv(session.cache, 2)
        session.switch("a grey owl at dawn", "direct")  # text K/V only: the cache is untouched
        assert all(torch.equal(a, b) for a, b in zip(before, _kv(session.cache, 2)))
        out.append(next(session))
        assert session.cache.pinned_block == 2
    assert [b.prompt for b in out] == prompts
    assert [b.shot for b in out] == [0, 0, 1, 1, 1]
    assert [b.switch for b in out] == [None, None, "cut", "direct", "direct"]
    assert torch.equal(torch.cat([b.latents for b in out], 2), ref)


@pytest.mark.parametrize("mode", ["recache", "direct"])
def test_generate_can_reach_a_new_shot_by_a_continuous_switch(dit_only, mode):
    """shot_switch (the quality proxy's `switch` rows): a prefixed prompt becomes a continuous
    switch to the prompt without its prefix, exactly as a live session driven by hand."""
    prompts = shot_prompts([("a red fox", 2), ("a grey owl", 2)], PREFIX)
    res = dit_only.generate(prompts, seed=3, shot_switch=mode)
    with dit_only.session(prompts[0], seed=3, max_blocks=4) as session:
        out = [next(session), next(session)]
        session.switch("a grey owl", mode)
        out += [next(session), next(session)]
    assert [b.shot for b in out] == [0, 0, 0, 0] and out[2].switch == mode
    assert torch.equal(torch.cat([b.latents for b in out], 2), res.latents)
    assert not torch.equal(res.latents, dit_only.generate(prompts, seed=3).latents)   # differs from the cut
    with pytest.raises(ValueError, match="shot_switch"):
        dit_only.generate(prompts, seed=3, shot_switch="fade")


# ---- KV re-cache ----

def _reference_recache(pipe, resident: dict, prompt: str, storage: str, guidance: float) -> dict:
    """A fresh cache filled by clean forwards (t = 0) of the resident blocks' latents under
    ``prompt``, oldest first, at their own RoPE positions: what the re-cache must leave."""
    s, dit = pipe.stream, pipe.model.cfg
    batch = 2 if guidance > 1.0 else 1
    ref = KVCache(num_layers=dit.num_layers, batch=batch, num_heads=dit.num_heads, head_dim=dit.head_dim,
                  tokens_per_block=pipe.preset.tokens_per_block, stream=s, dtype=pipe.model.dtype,
                  device="cpu", storage=storage)
    emb = pipe.embed_text(prompt)
    if guidance > 1.0:
        emb = torch.cat([emb, pipe.embed_text("")])
    ctx = pipe.model.encode_text(emb)
    out = {}
    for i, block in enumerate(sorted(resident)):
        x, pos = resident[block]
        plan = ref.begin_block(i)
        inp = torch.cat([x, x]) if guidance > 1.0 else x
        pipe.model(inp, torch.zeros(inp.shape[0], x.shape[2]), ctx, frame_positions=pos,
                   call=CachedBlock(ref, plan))
        out[block] = _slot_state(ref, i)
    return out


@pytest.mark.parametrize("storage,guidance", [("bf16", 1.0), ("nvfp4", 1.0), ("bf16", 2.0)])
def test_recache_recomputes_the_window_and_keeps_the_bookkeeping(storage, guidance):
    pipe = _pipe(decode=False, kv_cache=storage, guidance_scale=guidance, steps=2)
    with pipe.session("a red fox", seed=1) as session:
        next(session), next(session)
        session.switch("a grey owl", "cut")
        for _ in range(3):
            next(session)            # blocks 2 (pinned) .. 4; block 1 is evicted
        cache = session.cache
        book = (cache.resident_blocks(), cache.pinned_block, cache.current_block)
        assert book == ([0, 2, 3, 4], 2, 4)
        old = {b: _slot_state(cache, b) for b in book[0]}
        resident = session.resident()
        assert sorted(resident) == book[0]
        session.switch("a grey owl flies over the snow", "recache")
        assert (cache.resident_blocks(), cache.pinned_block, cache.current_block) == book
        ref = _reference_recache(pipe, resident, "a grey owl flies over the snow", storage, guidance)
        for b in book[0]:
            new = _slot_state(cache, b)
            assert all(torch.equal(x, y) for x, y in zip(new, ref[b])), (storage, guidance, b)
            assert not all(torch.equal(x, y) for x, y in zip(new, old[b])), b
        # the next block runs on: evicts the oldest unpinned block as without the re-cache
        blk = next(session)
        assert blk.switch == "recache" and blk.switch_ms > 0 and blk.shot == 1
        assert (cache.resident_blocks(), cache.pinned_block) == ([0, 2, 4, 5], 2)


def test_recache_before_any_block_only_sets_the_prompt(dit_only):
    with dit_only.session("a cat", seed=0, max_blocks=1) as session:
        session.switch("a dog", "recache")
        (blk,) = list(session)
    assert blk.prompt == "a dog"
    assert torch.equal(blk.latents, dit_only.generate(["a dog"], seed=0).latents)


# ---- image-to-video and continuation ----

def test_image_to_video_holds_frame_zero_clean(pipe, dit_only):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = encode_video(pipe.vae, image[:, :, None])
    seen = []
    forward = pipe.model.forward

    def spy(x, ts, *args, **kwargs):
        if kwargs["call"].plan.block == 0:
            seen.append((ts.clone(), x[:, :, 0].clone()))
        return forward(x, ts, *args, **kwargs)

    pipe.model.forward = spy
    try:
        with pipe.session("a red fox", image=image, seed=3, max_blocks=2) as session:
            blocks = list(session)
    finally:
        del pipe.model.forward
    # every denoising step of block 0: frame 0 at t = 0 with the image latent, the rest at t > 0
    steps = seen[:-1]
    assert len(steps) == pipe.stream.steps
    assert all(ts[:, 0].eq(0).all() and ts[:, 1:].gt(0).all() and torch.equal(x0, z[:, :, 0]) for ts, x0 in steps)
    assert seen[-1][0].eq(0).all()                       # the clean pass
    assert torch.equal(blocks[0].latents[:, :, :1], z)
    round_trip = StreamingDecoder(pipe.vae).decode_block(z)
    assert torch.equal(blocks[0].frames[:, :, :1], round_trip)
    text_only = dit_only.generate(["a red fox"] * 2, seed=3).latents   # the same DiT weights, no decode
    assert not torch.equal(blocks[1].latents, text_only[:, :, 2:])      # the image conditions later blocks


def test_image_input_is_checked_and_needs_an_encoder(pipe):
    from PIL import Image
    with pytest.raises(ValueError, match="expected 64x64 pixels"):
        pipe.session("a cat", image=torch.zeros(1, 3, 32, 48))
    with pytest.raises(ValueError, match="tensor"):
        pipe.session("a cat", image="cat.png")
    light = _pipe(decoder="tae")
    with pytest.raises(ConfigError, match="encoder="):
        light.session("a cat", image=torch.zeros(3, 64, 64))
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    with light.session("a cat", image=img, encoder=pipe.vae, max_blocks=1) as session:
        (blk,) = list(session)
    assert blk.frames.shape[2] == 1 + 4 * (pipe.stream.frames_per_block - 1)


def test_continuation_prefills_and_goes_on_exactly(pipe):
    fpb = pipe.stream.frames_per_block
    noise = pipe.noise(4, seed=5)
    ref = pipe.generate(["a red fox"] * 4, noise=noise)
    given = ref.latents[:, :, :2 * fpb]
    with pipe.session("a red fox", latents=given, noise=noise[:, :, 2 * fpb:]) as session:
        blocks = list(session)
    assert [(b.index, b.prefill) for b in blocks] == [(0, True), (1, True), (2, False), (3, False)]
    assert torch.equal(torch.cat([b.latents for b in blocks], 2), ref.latents)
    assert torch.equal(torch.cat([b.frames for b in blocks], 2), ref.frames)   # the decoder runs on
    with pytest.raises(ValueError, match="whole blocks"):
        pipe.session("a red fox", video=torch.zeros(1, 3, 7, 64, 64))
    with pipe.session("a red fox", video=ref.frames[:, :, :1 + 4 * (fpb - 1)], seed=1, max_blocks=1) as session:
        assert [b.prefill for b in session] == [True, False]


# ---- misuse and clean stops ----

def test_prompts_and_modes_are_checked(dit_only):
    for bad in ("", "   ", PREFIX):
        with pytest.raises(ValueError, match="empty prompt"):
            dit_only.session(bad)
    with pytest.raises(ValueError, match="empty prompt"):
        dit_only.generate(["a cat", ""])
    with dit_only.session("a cat", max_blocks=1) as session:
        with pytest.raises(ValueError, match="empty prompt"):
            session.switch(" ")
        with pytest.raises(ValueError, match="mode"):
            session.switch("a dog", "smooth")
        with pytest.raises(ValueError, match="scene-cut prefix"):
            session.switch(PREFIX + "a dog", "recache")
        next(session)
        with pytest.raises(SessionError, match="max_blocks"):
            session.step()
        assert list(session) == []
    with pytest.raises(SessionError, match="closed"):
        session.switch("a dog")


def test_switch_only_between_pulls(dit_only):
    errors: list[BaseException] = []
    with dit_only.session("a cat", on_block=lambda t: _try(lambda: session.switch("a dog"), errors)) as session:
        next(session)
    assert len(errors) == 1 and "between pulls" in str(errors[0])

    # another thread while a block is being computed
    inside, release = threading.Event(), threading.Event()
    forward = dit_only.model.forward

    def slow(*args, **kwargs):
        inside.set()
        release.wait(10)
        return forward(*args, **kwargs)

    dit_only.model.forward = slow
    try:
        with dit_only.session("a cat") as session:
            puller = threading.Thread(target=lambda: next(session))
            puller.start()
            assert inside.wait(10)
            with pytest.raises(SessionError, match="between pulls"):
                session.switch("a dog")
            release.set()
            puller.join(10)
            session.switch("a dog")       # between pulls: fine
    finally:
        del dit_only.model.forward


def _try(fn, errors):
    try:
        fn()
    except SessionError as exc:
        errors.append(exc)


def test_one_session_per_pipeline_and_nothing_leaks():
    pipe = _pipe(vae_mode="device")        # a decode worker thread (on the CPU)
    base = set(threading.enumerate())
    session = pipe.session("a cat")
    with pytest.raises(SessionError, match="already open"):
        pipe.session("a dog")
    with pytest.raises(SessionError, match="already open"):
        pipe.generate(["a dog"])
    next(session)
    assert any(t.name.startswith("vae-decode") for t in threading.enumerate())
    session.abort()                        # a client gone mid-stream
    assert set(threading.enumerate()) <= base and pipe._session is None
    assert session.closed and session.resident() == {}

    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    session = pipe.session("a cat")
    pipe.model.forward = boom
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            next(session)
    finally:
        del pipe.model.forward
    assert session.closed and pipe._session is None and set(threading.enumerate()) <= base
    with pipe.session("a dog", max_blocks=1) as again:   # the pipeline is usable again
        assert len(list(again)) == 1


# ---- the same session under SP ----

def _image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1


def _sp_session(rank, world):
    from impl.parallel.groups import build_groups
    from impl.inference.sp import SPInference
    torch.set_num_threads(1)
    cfg = InferenceConfig(preset="tiny", steps=2, dtype="fp64", sp_size=2)
    sp = SPInference(cfg, build_groups(2), weights=WEIGHTS)    # the VAE on the SP root only
    scripted = _scripted(sp.session("a red fox", seed=7, max_blocks=6, decode=False))
    with sp.session("a red fox", image=_image(), seed=7, max_blocks=2, decode=False) as session:   # root encodes
        i2v = torch.cat([b.latents for b in session], 2)
    return scripted, i2v, sp.pipeline.vae is not None


def _scripted(session: StreamingSession) -> torch.Tensor:
    with session:
        out = [next(session), next(session)]
        session.switch("a grey owl", "cut")
        out += [next(session), next(session)]
        session.switch("a grey owl in the rain", "recache")
        out += list(session)
    return torch.cat([b.latents for b in out], 2)


def test_session_under_sp_equals_one_process():
    results = run_distributed(_sp_session, 2)
    pipe = build_pipeline(InferenceConfig(preset="tiny", steps=2, dtype="fp64"), "cpu", WEIGHTS)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _scripted(pipe.session("a red fox", seed=7, max_blocks=6, decode=False))
        with pipe.session("a red fox", image=_image(), seed=7, max_blocks=2, decode=False) as session:
            ref_i2v = torch.cat([b.latents for b in session], 2)
    finally:
        torch.set_num_threads(n)
    assert [has_vae for *_, has_vae in results] == [True, False]
    for scripted, i2v, _ in results:
        assert (scripted - ref).abs().max() <= 1e-12 and (i2v - ref_i2v).abs().max() <= 1e-12


# ---- the generate command: a session client that checks its input first ----

def test_generate_command_checks_its_input_before_building(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import impl.inference.build as build
    from repro.cli import main
    from impl.video_io import read_video

    (tmp_path / "file").write_text("")
    small, ok = tmp_path / "small.png", tmp_path / "ok.png"
    Image.new("RGB", (32, 32)).save(small)
    Image.new("RGB", (64, 64), (30, 120, 200)).save(ok)
    out = str(tmp_path / "v.mp4")
    real = build.build_pipeline
    monkeypatch.setattr(build, "build_pipeline", lambda *a, **k: pytest.fail("a model was built"))
    for argv, why in [(["--shot", " ", "--out", out], "empty prompt"),
                      (["--shot", "a cat", "--out", str(tmp_path / "file" / "v.mp4")], "not a folder"),
                      (["--shot", "a cat", "--out", str(tmp_path / "v.avi")], ".mp4"),
                      (["--shot", "a cat", "--out", out, "--image", str(tmp_path / "none.png")], "cannot read"),
                      (["--shot", "a cat", "--out", out, "--image", str(small)], "32x32 pixels"),
                      (["--shot", "a cat", "--out", out, "--image", str(ok), "--decoder", "tae"], "--decoder wan"),
                      (["--shot", "a cat", "--out", out, "--lora-skip-base-check"], "no --lora")]:
        assert main(["generate", *argv, "--device", "cpu"]) == 2, argv
        assert why in capsys.readouterr().err, argv
    from impl.model.lora_files import SKIP_BASE_CHECK_FLAG
    seen = []
    lora = tmp_path / "x.safetensors"   # it must exist: a missing --lora is refused before the build
    lora.write_bytes(b"")
    monkeypatch.setattr(build, "build_pipeline", lambda cfg, dev, weights, **k: seen.append(weights) or 1 / 0)
    for flags in ([], [SKIP_BASE_CHECK_FLAG]):   # the flag the LoRA loader's error names
        with pytest.raises(ZeroDivisionError):
            main(["generate", "--shot", "a cat", "--out", out, "--device", "cpu", "--lora", str(lora), *flags])
    assert [w.lora_check_base for w in seen] == [True, False]
    monkeypatch.setattr(build, "build_pipeline", real)
    assert main(["generate", "--shot", "a cat::2", "--image", str(ok), "--out", out, "--device", "cpu"]) == 0
    assert read_video(out).shape[0] == 1 + 4 * (2 * 2 - 1)


def test_interactive_benchmark_reports_switch_latency():
    from repro.benchmark import get_benchmark
    bench = get_benchmark("interactive")
    variant = {**bench.defaults(), "dtype": "fp32", "decoder": "tae", "vae_mode": "device"}
    m = bench.run(variant, {"warmup_blocks": 1, "switches": 2, "blocks_per_switch": 1, "seed": 0}, {"device": "cpu"})
    assert m["switches"] == 2 and m["recache_ms_p50"] > 0 and m["switching_fps"] > 0
    assert 0 < m["ttff_ms"] and m["switch_latency_ms_p50"] <= m["switch_latency_ms_max"]
