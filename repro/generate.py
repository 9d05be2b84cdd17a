"""``python -m repro generate``: stream a (multi-shot) video to mp4 with the causal DiT.

Weights: ``--weights DIR`` is a diffusers-format Wan2.2-TI2V-5B folder (transformer/, vae/,
text_encoder/, tokenizer/); ``--dit`` overrides the DiT with any checkpoint our loader reads
(diffusers or original Wan/LongLive layout). Without weights every part is randomly
initialised at the preset's size (useful for smoke tests and timing, not for looking at).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from impl.config import PRESETS

# Model code (torch, diffusers, transformers) is imported inside run(): the CLI builds this
# command's parser for every command, and `report` must stay light. impl.precision imports
# torch, so its names are repeated here; compute_dtype() checks them again.
PRECISIONS = ["bf16", "fp32"]
# Repeated from impl.quant.config for the same reason; QuantConfig validates them again.
LINEAR_MODES = ["bf16", "fp8", "nvfp4", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4_te"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shot", action="append", required=True, metavar="PROMPT[::BLOCKS]",
                    help="one shot: its prompt and how many AR blocks it lasts (repeat for multi-shot)")
    ap.add_argument("--out", required=True, help="output .mp4 path")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--weights", default=None, help="diffusers-format Wan2.2-TI2V-5B folder")
    ap.add_argument("--dit", default=None, help="DiT checkpoint (file or folder) overriding --weights")
    ap.add_argument("--lora", default=None, help="few-step LoRA file (impl.train.lora) applied to the DiT; "
                    "merged into the base weights before any --quant")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: preset's)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG scale; 1.0 disables CFG")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default=None, choices=PRECISIONS, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--quant", default="bf16", choices=LINEAR_MODES,
                    help="format of the 300 block linears (impl.quant; docs/nvfp4.md)")
    ap.add_argument("--kv-cache", default="bf16", choices=["bf16", "nvfp4"], help="KV-cache storage")
    ap.add_argument("--vae-mode", default=None, choices=["sync", "stream", "device"],
                    help="VAE decoding: in the loop, a side CUDA stream, or --vae-device")
    ap.add_argument("--vae-device", default=None, help="device of the VAE in --vae-mode device (default: cpu)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from impl.config import get_preset
    from impl.model.checkpoint import load_dit_weights
    from impl.model.dit import CausalWanDiT
    from impl.model.text_encoder import TextEncoder
    from impl.model.vae import build_vae, load_vae
    from impl.pipeline import StreamingPipeline, parse_shot, shot_prompts
    from impl.precision import compute_dtype
    from impl.quant.apply import quantize_model
    from impl.quant.config import QuantConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype(args.precision or ("bf16" if device.type == "cuda" else "fp32"))
    stream = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                ("vae_mode", args.vae_mode), ("vae_device", args.vae_device)) if v is not None}
    preset = get_preset(args.preset).replace(stream=stream)
    torch.manual_seed(args.seed)
    model = CausalWanDiT(preset.dit, device=device, dtype=dtype).eval()
    dit_source = args.dit or args.weights
    if dit_source:
        load_dit_weights(model, dit_source)
    if args.lora:
        from impl.train.lora import load_lora, merge_and_unload
        load_lora(model, args.lora)        # checks the base-model hash
        if args.quant != "bf16":
            merge_and_unload(model)        # quantize the merged weights, never the base alone
    if args.quant != "bf16":
        quantize_model(model, QuantConfig.for_inference(args.quant))  # after loading: merged weights
    if args.weights:
        vae = load_vae(args.weights, dtype=dtype, device=device)
        text = TextEncoder.from_pretrained(args.weights, dtype=dtype, device=device,
                                           max_length=preset.text.max_length)
    else:
        vae = build_vae(preset.vae, dtype=dtype, device=device, seed=args.seed)
        text = TextEncoder.from_preset(preset.text, dtype=dtype, device=device, seed=args.seed)
    pipe = StreamingPipeline(model, preset, text_embedder=lambda p: text.encode([p]), vae=vae, device=device,
                             kv_cache=args.kv_cache)
    prompts = shot_prompts([parse_shot(s) for s in args.shot], preset.stream.scene_cut_prefix)

    with tqdm(total=len(prompts), desc="blocks", unit="block") as bar:
        result = pipe.generate(prompts, seed=args.seed, video_path=args.out,
                               on_block=lambda t: (bar.update(1), bar.set_postfix(dit_ms=f"{t.dit_ms:.0f}")))
    return result.video_path
