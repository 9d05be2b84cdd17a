"""Capture reference latents of the streaming pipeline for every mode combination the specs use.

The committed tests/data/pipeline_reference.pt was written by this script at commit 429b24b,
before the inference builder existed; tests/test_inference_builder.py compares the one builder
against it, bit for bit on a CPU of the capture's kind. Each case assembles the pipeline by hand,
the way the caller it stands for did at that commit (inference_speed / profile: random DiT from
``torch.manual_seed(seed)``, one fixed random text embedding; generate: random umT5 and VAE from
the preset; SP inference at sp_size 1: the CRC-seeded random embedding per prompt), and wraps the
model with :func:`impl.inference.build.pipeline_for_model` (the pipeline takes its settings from
an :class:`InferenceConfig` now). Write to another path and compare; do not overwrite the
committed file, whose capture is the point of the test:

    python scripts/capture_pipeline_reference.py /tmp/pipeline_reference.pt
"""

from __future__ import annotations

import hashlib
import sys

import torch

from impl.inference.build import pipeline_for_model, random_text_embedder
from impl.inference.config import InferenceConfig
from impl.model.dit import CausalWanDiT
from impl.model.text_encoder import TextEncoder
from impl.model.vae import build_vae
from impl.quant.apply import quantize_model
from impl.quant.config import QuantConfig

# Six blocks over two shots: the 4-block window of the tiny preset evicts, the sink and the shot
# pin matter, and the scene cut bumps the RoPE offset.
PROMPTS = ["a red ball rolls left"] * 3 + ["The scene transitions. a blue cube slides up"] * 3
SEED = 3

# (name, caller, dtype, linear mode, kv storage, steps, guidance scale, sink)
CASES = [
    ("speed_bf16_4", "speed", "bf16", "bf16", "bf16", 4, 1.0, True),
    ("speed_bf16_2", "speed", "bf16", "bf16", "bf16", 2, 1.0, True),
    ("speed_fp8_4", "speed", "bf16", "fp8", "bf16", 4, 1.0, True),
    ("speed_fp8_2", "speed", "bf16", "fp8", "bf16", 2, 1.0, True),
    ("speed_wo_4", "speed", "bf16", "nvfp4_weight_only", "bf16", 4, 1.0, True),
    ("speed_emu_2", "speed", "bf16", "nvfp4_emulated", "bf16", 2, 1.0, True),
    ("speed_bf16_kvfp4", "speed", "bf16", "bf16", "nvfp4", 4, 1.0, True),
    ("speed_wo_kvfp4", "speed", "bf16", "nvfp4_weight_only", "nvfp4", 4, 1.0, True),
    ("speed_fp32", "speed", "fp32", "bf16", "bf16", 4, 1.0, True),
    ("speed_fp32_cfg", "speed", "fp32", "bf16", "bf16", 2, 3.0, True),
    ("speed_nosink", "speed", "fp32", "bf16", "bf16", 8, 1.0, False),
    ("generate_fp32", "generate", "fp32", "bf16", "bf16", 4, 1.0, True),
    ("generate_fp32_emu_kvfp4", "generate", "fp32", "nvfp4_emulated", "nvfp4", 2, 1.0, True),
    ("sp1_fp64_kvfp4", "sp", "fp64", "bf16", "nvfp4", 4, 1.0, True),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def run_case(caller, dtype_name, mode, kv, steps, guidance, sink) -> dict[str, torch.Tensor]:
    dtype = DTYPES[dtype_name]
    cfg = InferenceConfig(preset="tiny", dtype=dtype_name, precision=mode, kv_cache=kv, steps=steps,
                          guidance_scale=guidance, sink=sink)
    preset = cfg.stream_preset
    torch.manual_seed(SEED)
    model = CausalWanDiT(preset.dit, device="cpu", dtype=dtype).eval()
    if mode != "bf16":
        quantize_model(model, QuantConfig.for_inference(mode))
    vae = None
    if caller == "speed":
        g = torch.Generator().manual_seed(SEED)
        text = torch.randn(1, preset.text.max_length, preset.dit.text_dim, generator=g).to("cpu", dtype)
        embed = lambda p: text  # noqa: E731
    elif caller == "generate":
        vae = build_vae(preset.vae, dtype=dtype, device="cpu", seed=SEED)
        enc = TextEncoder.from_preset(preset.text, dtype=dtype, device="cpu", seed=SEED)
        embed = lambda p: enc.encode([p])  # noqa: E731
    else:
        embed = random_text_embedder(preset, dtype, "cpu", seed=SEED)
    pipe = pipeline_for_model(model, cfg, "cpu", text_embedder=embed, vae=vae)
    res = pipe.generate(PROMPTS, seed=SEED, decode=vae is not None)
    out = {"latents": res.latents}
    if res.frames is not None:  # frames are large: keep their exact bytes' digest
        out["frames_sha256"] = hashlib.sha256(res.frames.contiguous().numpy().tobytes()).hexdigest()
    return out


def main(path: str) -> None:
    torch.set_num_threads(1)  # fixed reduction order
    ref = {"prompts": PROMPTS, "seed": SEED, "cases": {}}
    for name, *args in CASES:
        ref["cases"][name] = {"args": args, **run_case(*args)}
        print(name, ref["cases"][name]["latents"].abs().mean().item())
    torch.save(ref, path)


if __name__ == "__main__":
    main(sys.argv[1])
