"""``python -m repro generate``: stream a (multi-shot) video to mp4 with the causal DiT.

Weights: ``--weights DIR`` is a diffusers-format Wan2.2-TI2V-5B folder (transformer/, vae/,
text_encoder/, tokenizer/); ``--dit`` overrides the DiT with any checkpoint our loader reads
(diffusers or original Wan/LongLive layout). Without weights every part is randomly
initialised at the preset's size (useful for smoke tests and timing, not for looking at).
Every inference knob is a flag of :class:`impl.inference.config.InferenceConfig`. ``--image``
makes it image-to-video (the first frame, encoded by the Wan2.2 VAE).

A client of :class:`impl.session.StreamingSession`, like ``StreamingPipeline.generate``. The
shots, the image and the --out path are checked before any model is built.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Torch-free: the CLI builds this parser for every command, and `report` must stay light.
from impl.inference.config import add_arguments as add_inference_arguments
from impl.inference.config import config_from_args
from impl.modes import DecoderLatents, LightVAEFirstChunk, choices


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shot", action="append", required=True, metavar="PROMPT[::BLOCKS]",
                    help="one shot: its prompt and how many AR blocks it lasts (repeat for multi-shot)")
    ap.add_argument("--out", required=True, help="output .mp4 path")
    ap.add_argument("--image", default=None, metavar="FILE",
                    help="image-to-video: the first frame (any image Pillow reads, at the preset's video size); "
                         "encoded with the Wan2.2 VAE, so it needs --decoder wan")
    add_inference_arguments(ap, skip=("sp_size", "kv_comm"), defaults={"dtype": None})
    ap.add_argument("--weights", default=None, help="diffusers-format Wan2.2-TI2V-5B folder")
    ap.add_argument("--dit", default=None, help="DiT checkpoint (file or folder) overriding --weights")
    ap.add_argument("--lora", default=None, help="few-step LoRA file (impl.model.lora_files), merged into the DiT "
                    "before any --precision quantization")
    ap.add_argument("--lora-skip-base-check", action="store_true",   # = impl.model.lora_files.SKIP_BASE_CHECK_FLAG
                    help="merge --lora even if it was trained on other base weights than the ones loaded "
                         "(its file records a fingerprint of its base; by default a mismatch is an error)")
    ap.add_argument("--decoder-weights", default=None, metavar="FILE",
                    help="weights of a light --decoder: an MG-LightVAE .pth (lightvae_p50 / lightvae_p75) or a "
                         "taew2_2 .pth / .safetensors (tae); nothing is downloaded")
    ap.add_argument("--decoder-latents", default="normalized", choices=list(choices(DecoderLatents)),
                    help="latent space a tae file was trained on: the DiT's normalised latents as they are (the "
                         "published taew2_2 files) or the VAE's raw ones (default: normalized)")
    ap.add_argument("--lightvae-first-chunk", default="skip_time_conv", choices=list(choices(LightVAEFirstChunk)),
                    help="a lightvae decoder's temporal upsamplers at the first latent frame: skip the time conv "
                         "(LightX2V, official Wan2.2, diffusers) or run it and drop its first frame (the "
                         "Matrix-Game-3 release) (default: skip_time_conv)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and of random weights (default: 0)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")


# Most AR blocks one run may generate (all --shot flags together), checked before the per-block
# prompt list is built: "a::1000000000" would otherwise allocate a billion-item list.
MAX_BLOCKS = 10_000


def block_prompts(shots: list[str], scene_cut_prefix: str, frames_per_block: int | None = None) -> list[str]:
    """Per-block prompts of the ``--shot`` flags; an empty prompt or more than
    :data:`MAX_BLOCKS` blocks in all is an error naming the flag."""
    from impl.pipeline import parse_shot, shot_prompts
    from impl.session_inputs import check_prompt
    parsed = [parse_shot(s) for s in shots]
    for text, (prompt, _) in zip(shots, parsed):
        check_prompt(prompt, scene_cut_prefix, f"--shot {text!r}")
    total = sum(blocks for _, blocks in parsed)
    if total > MAX_BLOCKS:
        frames = f" ({total * frames_per_block} latent frames)" if frames_per_block else ""
        raise ValueError(f"--shot: {total} AR blocks in all{frames}; one run generates at most {MAX_BLOCKS} blocks")
    return shot_prompts(parsed, scene_cut_prefix)


def check_device(name: str | None) -> Any:
    """The ``--device`` as a torch.device (default: cuda if available, else cpu); a name torch
    does not know, or a GPU that is not there, is a ValueError naming the flag."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is visible here; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: only {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def check_input_paths(args: argparse.Namespace) -> None:
    """--weights / --dit / --lora name something that exists (ValueError naming the flag)."""
    for flag, value, want_file in (("--weights", args.weights, False), ("--dit", args.dit, False),
                                   ("--lora", args.lora, True)):
        if value is None:
            continue
        p = Path(value)
        if not p.exists():
            raise ValueError(f"{flag} {value}: no such {'file' if want_file else 'file or folder'}")
        if want_file and not p.is_file():
            raise ValueError(f"{flag} {value}: a folder; pass the LoRA file itself")


def load_image(path: str, preset: Any) -> Any:
    """The ``--image`` file as an RGB PIL image of the preset's size (checked, not resized)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"--image {path}: cannot read it as an image ({exc})") from None
    want = (preset.video.width, preset.video.height)
    if image.size != want:
        raise ValueError(f"--image {path}: {image.size[1]}x{image.size[0]} pixels, preset {preset.name!r} needs "
                         f"{want[1]}x{want[0]} (height x width); resize or crop it first")
    return image


def run(args: argparse.Namespace) -> Path:
    from repro.records import check_output_file

    # Everything that can fail on the user's input, before a model is built.
    if not str(args.out).lower().endswith(".mp4"):
        raise ValueError(f"--out {args.out}: must end in .mp4")
    out = check_output_file(args.out, "--out")
    cfg = config_from_args(args, dtype=args.dtype or "fp32")   # validated here; the dtype default comes below
    stream = cfg.stream_preset.stream
    prompts = block_prompts(args.shot, stream.scene_cut_prefix, stream.frames_per_block)
    check_input_paths(args)
    image = load_image(args.image, cfg.stream_preset) if args.image else None
    if image is not None and cfg.decoder != "wan":
        raise ValueError(f"--image: image-to-video encodes with the full Wan2.2 VAE; --decoder {cfg.decoder} only "
                         "decodes (use --decoder wan)")

    if args.lora_skip_base_check and not args.lora:
        raise ValueError("--lora-skip-base-check: there is no --lora to merge")

    import torch
    from tqdm import tqdm

    from impl.inference.build import Weights, build_pipeline
    from impl.session import follow_prompts

    device = check_device(args.device)
    if cfg.precision == "nvfp4_te":
        from impl.quant.te_linear import te_nvfp4_status
        ok, reason = te_nvfp4_status(device)
        if not ok:
            raise ValueError(f"--precision nvfp4_te: Transformer Engine NVFP4 cannot run here ({reason}); use "
                             f"nvfp4_emulated (exact NVFP4 numerics anywhere) or nvfp4_weight_only")
    cfg = cfg.replace(dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    weights = Weights(root=args.weights, dit=args.dit, lora=args.lora, lora_check_base=not args.lora_skip_base_check,
                      decoder=args.decoder_weights, decoder_latents=args.decoder_latents,
                      lightvae_first_chunk=args.lightvae_first_chunk, seed=args.seed)
    pipe = build_pipeline(cfg, device, weights)
    with tqdm(total=len(prompts), desc="blocks", unit="block") as bar, \
            pipe.session(prompts[0], seed=args.seed, max_blocks=len(prompts), image=image, video_path=out) as session:
        for block in follow_prompts(session, prompts):
            bar.update(1)
            bar.set_postfix(dit_ms=f"{block.timing.dit_ms:.0f}")
    return out
