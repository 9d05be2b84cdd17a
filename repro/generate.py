"""``python -m repro generate``: stream a (multi-shot) video to mp4 with the causal DiT.

Weights: ``--weights DIR`` is a diffusers-format Wan2.2-TI2V-5B folder (transformer/, vae/,
text_encoder/, tokenizer/); ``--dit`` overrides the DiT with any checkpoint our loader reads
(diffusers or original Wan/LongLive layout). Without weights every part is randomly
initialised at the preset's size (useful for smoke tests and timing, not for looking at).
Every inference knob is a flag of :class:`impl.inference.config.InferenceConfig`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Torch-free: the CLI builds this parser for every command, and `report` must stay light.
from impl.inference.config import add_arguments as add_inference_arguments
from impl.inference.config import config_from_args
from impl.modes import DecoderLatents, choices


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shot", action="append", required=True, metavar="PROMPT[::BLOCKS]",
                    help="one shot: its prompt and how many AR blocks it lasts (repeat for multi-shot)")
    ap.add_argument("--out", required=True, help="output .mp4 path")
    add_inference_arguments(ap, skip=("sp_size", "kv_comm"), defaults={"dtype": None})
    ap.add_argument("--weights", default=None, help="diffusers-format Wan2.2-TI2V-5B folder")
    ap.add_argument("--dit", default=None, help="DiT checkpoint (file or folder) overriding --weights")
    ap.add_argument("--lora", default=None, help="few-step LoRA file (impl.train.lora), merged into the DiT "
                    "before any --precision quantization")
    ap.add_argument("--decoder-weights", default=None, metavar="FILE",
                    help="weights of a light --decoder: an MG-LightVAE .pth (lightvae_p50 / lightvae_p75) or a "
                         "taew2_2 .pth / .safetensors (tae); nothing is downloaded")
    ap.add_argument("--decoder-latents", default="raw", choices=list(choices(DecoderLatents)),
                    help="latent space a tae file was trained on: the VAE's raw latents or the DiT's normalised "
                         "ones (default: raw)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and of random weights (default: 0)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from impl.inference.build import Weights, build_pipeline
    from impl.pipeline import parse_shot, shot_prompts

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = config_from_args(args, dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    prompts = shot_prompts([parse_shot(s) for s in args.shot], cfg.stream_preset.stream.scene_cut_prefix)
    weights = Weights(root=args.weights, dit=args.dit, lora=args.lora, decoder=args.decoder_weights,
                      decoder_latents=args.decoder_latents, seed=args.seed)
    pipe = build_pipeline(cfg, device, weights)
    with tqdm(total=len(prompts), desc="blocks", unit="block") as bar:
        result = pipe.generate(prompts, seed=args.seed, video_path=args.out,
                               on_block=lambda t: (bar.update(1), bar.set_postfix(dit_ms=f"{t.dit_ms:.0f}")))
    return result.video_path
