"""The one inference builder against the pipeline assembled by hand before it existed.

tests/data/pipeline_reference.pt was written by scripts/capture_pipeline_reference.py at commit
429b24b, when generate, profile, the inference benchmarks and SP inference each assembled
their own pipeline. For every mode combination the specs use, the builder must give the same
latents, bit for bit on a CPU of the capture's kind (AMD EPYC, AVX2; then also the same decoded
frames where a VAE was used) and to two ulps elsewhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from impl.config import ConfigError, get_preset
from impl.inference.build import Weights, build_pipeline, pipeline_for_model, random_text_embedder, torch_dtype
from impl.inference.config import InferenceConfig, add_arguments, config_from_args

REFERENCE = Path(__file__).parent / "data" / "pipeline_reference.pt"


def _reference():
    return torch.load(REFERENCE, weights_only=False)


def _weights(caller: str, dtype_name: str, seed: int) -> Weights:
    """The text source each caller used at 429b24b (an input to the pipeline, not assembly)."""
    if caller == "speed":  # one fixed random embedding for every prompt
        preset = get_preset("tiny")
        g = torch.Generator().manual_seed(seed)
        text = torch.randn(1, preset.text.max_length, preset.dit.text_dim, generator=g).to("cpu", torch_dtype(dtype_name))
        return Weights(text=lambda prompt: text, seed=seed)
    if caller == "generate":  # random umT5 and VAE at the preset's size
        return Weights(text="encoder", seed=seed)
    return Weights(text="embedding", seed=seed)  # SP: the CRC-seeded random embedding per prompt


@pytest.mark.parametrize("name", sorted(_reference()["cases"]))
def test_builder_reproduces_the_hand_assembled_pipelines(name):
    ref = _reference()
    case = ref["cases"][name]
    caller, dtype_name, precision, kv, steps, cfg_scale, sink = case["args"]
    torch.set_num_threads(1)  # the reference's reduction order
    cfg = InferenceConfig(preset="tiny", dtype=dtype_name, precision=precision, kv_cache=kv, steps=steps,
                          guidance_scale=cfg_scale, sink=sink)
    pipe = build_pipeline(cfg, "cpu", _weights(caller, dtype_name, ref["seed"]), decode=caller == "generate")
    res = pipe.generate(ref["prompts"], seed=ref["seed"], decode=caller == "generate")
    if torch.equal(res.latents, case["latents"]):
        if "frames_sha256" in case:
            assert hashlib.sha256(res.frames.contiguous().numpy().tobytes()).hexdigest() == case["frames_sha256"]
        return
    # Another CPU (an AVX-512 Xeon against the AVX2 EPYC that captured the file) takes other MKL /
    # oneDNN kernels, whose reduction order moves results by an ulp: then the latents must agree
    # to two ulps of the compute precision at their magnitude (a wrong assembly -- another step
    # list, sink, guidance or storage -- moves them by orders of magnitude more), and the frames
    # cannot be compared by hash.
    eps = torch.finfo(torch.bfloat16 if dtype_name == "bf16" else torch.float32).eps
    err = float((res.latents.double() - case["latents"].double()).abs().max())
    assert err <= 2 * eps * float(case["latents"].abs().max()), (name, err)


def test_config_validates_every_field_once_and_names_it():
    bad = [({"preset": "huge"}, "preset"), ({"dtype": "fp16"}, "dtype"), ({"precision": "int4"}, "precision"),
           ({"kv_cache": "fp4"}, "kv_cache"), ({"kv_rule": "max"}, "kv_rule"), ({"vae_mode": "async"}, "vae_mode"),
           ({"vae_mode": "device", "vae_device": "gpu1"}, "vae_device"), ({"vae_device": "cpu"}, "vae_device"),
           ({"vae_queue_depth": 0}, "vae_queue_depth"), ({"steps": 0}, "steps"), ({"guidance_scale": 0.5}, "guidance_scale"),
           ({"kv_comm": "nvfp4"}, "kv_comm"), ({"sp_size": 3}, "sp_size"), ({"compile": "yes"}, "compile"),
           ({"frame_format": "png"}, "frame_format"), ({"bf16_attention_steps": "final"}, "bf16_attention_steps"),
           ({"attention": "fp8_emulated", "bf16_attention_steps": "4"}, "bf16_attention_steps"),
           ({"attention": "sdpa", "bf16_attention_steps": "-1"}, "bf16_attention_steps")]
    for kwargs, field in bad:
        with pytest.raises(ConfigError) as err:
            InferenceConfig(**kwargs)
        assert str(err.value).startswith(field), (kwargs, str(err.value))
    with pytest.raises(ConfigError, match="unknown field"):
        InferenceConfig().replace(quant="fp8")


def test_stream_overrides_and_derived_values():
    cfg = InferenceConfig(preset="tiny", steps=2, guidance_scale=3.0, sink=False)
    s = cfg.stream_preset.stream
    assert (s.steps, s.guidance_scale, s.sink_frames) == (2, 3.0, 0)
    assert InferenceConfig().stream_preset.stream == get_preset("tiny").stream
    assert InferenceConfig(kv_cache="nvfp4", sp_size=2).kv_exchange == "nvfp4"
    assert InferenceConfig(kv_cache="nvfp4", sp_size=1).kv_exchange == "plain"
    assert InferenceConfig(kv_cache="nvfp4", sp_size=2, kv_comm="plain").kv_exchange == "plain"


def test_cli_flags_come_from_the_config():
    import argparse
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--precision", "fp8", "--kv-cache", "nvfp4", "--steps", "2", "--no-sink", "--compile"])
    cfg = config_from_args(args)
    assert (cfg.precision, cfg.kv_cache, cfg.steps, cfg.sink, cfg.compile) == ("fp8", "nvfp4", 2, False, True)
    with pytest.raises(SystemExit):
        ap.parse_args(["--precision", "int4"])


def test_pipeline_for_model_checks_that_the_config_describes_the_model():
    cfg = InferenceConfig(dtype="fp32")
    model = build_pipeline(cfg, "cpu", Weights(text="embedding"), decode=False).model
    embed = random_text_embedder(cfg.stream_preset, torch.float32, "cpu")
    with pytest.raises(ConfigError, match="dtype"):
        pipeline_for_model(model, cfg.replace(dtype="bf16"), text_embedder=embed)
    with pytest.raises(ConfigError, match="preset"):
        pipeline_for_model(model, cfg.replace(preset="small"), text_embedder=embed)


def test_vae_stream_mode_needs_cuda_before_any_weight_is_built():
    if torch.cuda.is_available():
        pytest.skip("the machine has CUDA")
    with pytest.raises(ConfigError, match="stream"):
        build_pipeline(InferenceConfig(vae_mode="stream"), "cpu")
