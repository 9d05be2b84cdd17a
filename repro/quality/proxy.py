"""The quality proxy system: a small VAE, an AR teacher and LoRA students, all trained here.

:class:`ProxySystem` trains each piece on procedural multi-shot videos with the project's own
trainers, once, and caches it on disk under ``cache_dir/<preset>/<key>`` (the key hashes every
setting the piece depends on, its inputs' keys included), so later runs and other benchmarks
reuse it:

1. VAE (:mod:`impl.train.vae_train`): reconstruction + KL on short clips, then per-channel
   latent statistics.
2. Attribute detector (:mod:`repro.quality.detector`) on real and VAE-round-trip frames.
3. AR teacher (:class:`impl.train.trainer.Trainer`, teacher forcing) on VAE latents of
   procedural clips with per-block multi-shot prompts, in BF16 or emulated NVFP4.
4. Few-step students (:class:`impl.train.dmd.DMDTrainer`): DMD into a standalone LoRA file
   per step count, from the teacher.

The text encoder is the preset's umT5 with seeded random weights (frozen, never trained):
captions still map to distinct, deterministic embeddings the DiT learns to follow.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from impl.config import ConfigError, Preset, _require, get_preset, require_positive, require_positive_ints
from impl.io import save_safetensors, write_json

__all__ = ["ProxyConfig", "ProxySystem", "PROXY_PRESETS", "TRAIN_PRECISIONS", "portable_cpu_kernels"]

PROXY_PRESETS = ("tiny", "proxy")
# Part of every cache key: bump it when a change to the training code or to a piece's
# architecture makes cached pieces stale. 2: CPU pieces train without oneDNN (portable_cpu_kernels).
ARTIFACT_VERSION = 2
TRAIN_PRECISIONS = ("bf16", "nvfp4_emulated")
# The proxy's tiny decoder is distilled on the VAE's raw latents, and cached pieces were made so:
# pinned here, apart from the library default (the published taew2_2 files' normalised latents).
_PROXY_TAE_LATENTS = "raw"


def _knob(default: Any, help: str):
    """A ProxyConfig field with its help text: the quality benchmark's measure fields are
    derived from these (one declaration of each setting)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ProxyConfig:
    """Every setting of the proxy's training; the defaults are the CPU smoke size."""

    preset: str = "tiny"
    seed: int = _knob(0, "seed of every training run and of the evaluation set")
    vae_steps: int = _knob(200, "VAE training steps")
    vae_batch: int = _knob(4, "VAE clips per step")
    vae_lr: float = _knob(2e-3, "VAE learning rate")
    detector_steps: int = _knob(300, "attribute detector training steps")
    detector_clips: int = _knob(300, "one-block procedural clips the detector trains on")
    train_clips: int = _knob(64, "distinct clips of the AR training set")
    clip_blocks: int = _knob(4, "AR blocks per training clip")
    shots_per_clip: int = _knob(2, "shots per training clip")
    ar_steps: int = _knob(200, "AR teacher-forcing steps")
    ar_batch: int = _knob(4, "AR clips per step")
    ar_lr: float = _knob(1e-3, "AR learning rate")
    distill_iters: int = _knob(40, "DMD iterations per student")
    lora_rank: int = _knob(16, "LoRA rank (= alpha)")
    distill_lr: float = _knob(1e-4, "DMD learning rate (student and critic)")
    decoder_steps: int = _knob(200, "distillation steps of each light decoder (LightVAE, TAE) from the VAE")
    decoder_batch: int = _knob(4, "clips per light-decoder distillation step")
    decoder_lr: float = _knob(1e-3, "light-decoder distillation learning rate")

    def __post_init__(self) -> None:
        _require(self.preset in PROXY_PRESETS, "ProxyConfig.preset",
                 f"must be one of {PROXY_PRESETS}, got {self.preset!r}")
        require_positive_ints(self, "vae_steps", "vae_batch", "detector_steps", "detector_clips", "train_clips",
                              "clip_blocks", "shots_per_clip", "ar_steps", "ar_batch", "distill_iters", "lora_rank",
                              "decoder_steps", "decoder_batch")
        _require(self.shots_per_clip <= self.clip_blocks, "ProxyConfig.shots_per_clip",
                 f"must be <= clip_blocks={self.clip_blocks}")
        require_positive(self, "vae_lr", "ar_lr", "distill_lr", "decoder_lr")

    @classmethod
    def from_measure(cls, measure: dict[str, Any], preset: str) -> "ProxyConfig":
        names = {f.name for f in fields(cls)} - {"preset"}
        return cls(preset=preset, **{k: measure[k] for k in names if k in measure})

    @classmethod
    def knobs(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) of every training setting (all fields but ``preset``)."""
        return [(f.name, f.default, f.metadata["help"]) for f in fields(cls) if f.name != "preset"]

    def key(self, *fields: str, parent: str = "") -> str:
        blob = json.dumps({"version": ARTIFACT_VERSION, "parent": parent, "preset": self.preset, "seed": self.seed,
                           **{f: getattr(self, f) for f in fields}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def portable_cpu_kernels(device: torch.device | str):
    """On CPU, train and score the proxy without oneDNN, so that another x86 CPU computes the same
    numbers. oneDNN's gemm-based convolution backward-weights (the VAE's and the detector's) blocks
    its sums by the CPU's cache sizes, so another CPU sums in another order; the proxy's training
    amplifies that ulp into another model (as another seed would). Without it, convolutions run as
    ATen im2col + MKL GEMM: ATen's kernels are pinned by ATEN_CPU_CAPABILITY and the thread count,
    MKL's by MKL_CBWR=COMPATIBLE (the branch MKL honours on Intel and AMD alike; it ignores
    MKL_CBWR=AVX2 on AMD, running CNR:AUTO there), both set by the Makefile's CPU_NUMERICS.
    GPU devices run as they are."""
    if torch.device(device).type != "cpu":
        yield
        return
    import warnings
    with warnings.catch_warnings():
        # flags() also re-sets oneDNN's TF32 switch, which warns that TF32 is for Intel GPUs
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _embedder(text_encoder) -> Callable[[str], torch.Tensor]:
    return lambda prompt: text_encoder([prompt])


class ProxySystem:
    """Trains (or loads from ``cache_dir``) the pieces of the proxy; see the module docstring."""

    def __init__(self, cfg: ProxyConfig, cache_dir: str | Path, device: torch.device | str = "cpu",
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.preset: Preset = get_preset(cfg.preset)
        self.device = torch.device(device)
        self.root = Path(cache_dir) / cfg.preset
        self.progress = progress
        self._memo: dict[str, Any] = {}

    # ---- bookkeeping ------------------------------------------------------------------------
    def _dir(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    def _finish(self, folder: Path, info: dict[str, Any]) -> None:
        """Write ``info.json`` last: a folder without it is an interrupted run and is redone.
        It names the device that trained the piece (a cache can be trained on a GPU and
        evaluated elsewhere)."""
        write_json(folder / "info.json", {**info, "device": _device_name(self.device)}, indent=1)

    def info(self, folder: Path) -> dict[str, Any]:
        return json.loads((folder / "info.json").read_text())

    def _ready(self, folder: Path) -> bool:
        return (folder / "info.json").is_file()

    def training_record(self, train_precision: str | None, lora_steps: int | None,
                        decoder: str = "wan") -> dict[str, float | str]:
        """Training time, device and final loss of the pieces behind one model variant (from
        their ``info.json``, so a cached piece reports the run that trained it); no teacher
        when ``train_precision`` is None (the ground truth through the VAE)."""
        pieces = [("vae", self._dir("vae", self.vae_key())),
                  ("detector", self._dir("detector", self.detector_key()))]
        if train_precision is not None:
            pieces.append(("teacher", self._dir(f"teacher_{train_precision}", self.teacher_key(train_precision))))
        if lora_steps is not None:
            pieces.append(("lora", self._dir(f"lora{lora_steps}_{train_precision}",
                                             self.student_key(lora_steps, train_precision))))
        if decoder != "wan":
            pieces.append(("decoder", self._dir(f"decoder_{decoder}", self.decoder_key(decoder))))
        out: dict[str, float] = {}
        for name, folder in pieces:
            if self._ready(folder):
                info = self.info(folder)
                out[f"train_s_{name}"] = round(info["train_s"], 2)
                out[f"train_device_{name}"] = info.get("device", "unknown")
                for k in ("last_loss", "critic_loss_last"):
                    if k in info:
                        out[f"{name}_{k}"] = info[k]
        return out

    # ---- data -------------------------------------------------------------------------------
    def source(self, *, blocks: int, length: int, seed: int, shots: int):
        from impl.train.procedural import ProceduralVideoSource
        p = self.preset
        fpb = p.stream.frames_per_block
        return ProceduralVideoSource(blocks * fpb, fpb, p.video.height, p.video.width, length=length, seed=seed,
                                     shots_per_clip=shots, temporal_factor=p.vae.temporal_factor,
                                     scene_cut_prefix=p.stream.scene_cut_prefix)

    # ---- 1. VAE -----------------------------------------------------------------------------
    def vae_key(self) -> str:
        return self.cfg.key("vae_steps", "vae_batch", "vae_lr")

    def vae(self):
        if "vae" in self._memo:
            return self._memo["vae"]
        from impl.model.vae import build_vae, load_vae
        from impl.train.procedural import ProceduralVideoSource
        from impl.train.vae_train import VAETrainConfig, calibrate_latent_stats, train_vae
        folder = self._dir("vae", self.vae_key())
        if self._ready(folder):
            vae = load_vae(folder, device=self.device)
        else:
            p, c = self.preset, self.cfg
            t0 = time.perf_counter()
            vae = build_vae(p.vae, seed=c.seed, device=self.device)
            # 3-latent clips (9 raw frames), one shot, cut-free: the causal layers see motion.
            clips = ProceduralVideoSource(3, 1, p.video.height, p.video.width, length=100_000, seed=c.seed + 11)
            log = train_vae(vae, clips, VAETrainConfig(steps=c.vae_steps, batch_size=c.vae_batch, lr=c.vae_lr,
                                                       seed=c.seed), progress=self.progress)
            calibrate_latent_stats(vae, clips, num_clips=32)
            folder.mkdir(parents=True, exist_ok=True)
            # Stored (and from then on used) in BF16: half the bytes to carry between machines.
            torch.nn.Module.to(vae, dtype=torch.bfloat16).save_pretrained(folder, safe_serialization=True)
            self._memo["train_s_vae"] = time.perf_counter() - t0
            self._finish(folder, {"piece": "vae", "train_s": self._memo["train_s_vae"],
                                  "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
                                  "last_l1": sum(e["l1"] for e in log[-20:]) / len(log[-20:])})
            vae = load_vae(folder, device=self.device)   # what later runs will see, bit for bit
        self._memo["vae"] = vae
        return vae

    def text_encoder(self):
        if "text" not in self._memo:
            from impl.model.text_encoder import TextEncoder
            self._memo["text"] = TextEncoder.from_preset(self.preset.text, dtype=torch.float32, device=self.device,
                                                         seed=self.cfg.seed)
        return self._memo["text"]

    def embedder(self) -> Callable[[str], torch.Tensor]:
        return _embedder(self.text_encoder())

    def decoder_key(self, kind: str) -> str:
        return self.cfg.key("decoder_steps", "decoder_batch", "decoder_lr", parent=f"{self.vae_key()}:{kind}")

    def decoder(self, kind: str):
        """The light decoder ``kind`` (``lightvae_p50`` / ``lightvae_p75`` / ``tae``) distilled
        from the proxy's VAE on procedural clips (cached); ``wan`` is the VAE itself."""
        if kind == "wan":
            return self.vae()
        memo = f"decoder:{kind}"
        if memo in self._memo:
            return self._memo[memo]
        import dataclasses

        from impl.model.decoders import build_decoder, load_decoder
        from impl.train.decoder_distill import DecoderDistillConfig, distill_decoder, init_pruned_from
        from impl.train.procedural import ProceduralVideoSource
        teacher = self.vae()
        stats = dataclasses.replace(self.preset.vae, latents_mean=tuple(teacher.config.latents_mean),
                                    latents_std=tuple(teacher.config.latents_std))
        folder = self._dir(f"decoder_{kind}", self.decoder_key(kind))
        path = folder / "decoder.safetensors"
        if not self._ready(folder):
            p, c = self.preset, self.cfg
            t0 = time.perf_counter()
            student = build_decoder(kind, stats, device=self.device, seed=c.seed, latents=_PROXY_TAE_LATENTS)
            if kind != "tae":
                init_pruned_from(student, teacher)
            clips = ProceduralVideoSource(3, 1, p.video.height, p.video.width, length=100_000, seed=c.seed + 13)
            log = distill_decoder(student, teacher, clips, DecoderDistillConfig(
                steps=c.decoder_steps, batch_size=c.decoder_batch, lr=c.decoder_lr, seed=c.seed), progress=self.progress)
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors(path, {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in student.state_dict().items()})
            self._memo[f"train_s_decoder_{kind}"] = time.perf_counter() - t0
            tail = log[-20:]
            self._finish(folder, {"piece": f"decoder_{kind}", "train_s": self._memo[f"train_s_decoder_{kind}"],
                                  "first_loss": log[0]["loss"], "last_loss": sum(e["loss"] for e in tail) / len(tail)})
        # Loaded back through the public loader (the layouts of the published files).
        self._memo[memo] = load_decoder(kind, path, stats, device=self.device, latents=_PROXY_TAE_LATENTS)
        return self._memo[memo]

    def roundtrip(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] through the VAE (posterior mean) and back."""
        from impl.train.vae_train import reconstruct
        return reconstruct(self.vae(), frames)

    # ---- 2. detector ------------------------------------------------------------------------
    def detector_key(self) -> str:
        return self.cfg.key("detector_steps", "detector_clips", parent=self.vae_key())

    def detector(self):
        if "detector" in self._memo:
            return self._memo["detector"]
        from safetensors.torch import load_file
        from repro.quality.detector import (AttributeDetector, DetectorConfig, accuracy, frame_batches,
                                            train_detector)
        c = self.cfg
        dcfg = DetectorConfig(steps=c.detector_steps, seed=c.seed)
        folder = self._dir("detector", self.detector_key())
        if not self._ready(folder):
            self.vae()   # trained first, so the timer below counts the detector alone
            t0 = time.perf_counter()
            # Many short one-block clips: distinct scenes matter more than frames of one scene.
            n, held_n = c.detector_clips, max(8, c.detector_clips // 10)
            src = self.source(blocks=1, length=n + held_n, seed=c.seed + 21, shots=1)
            half = list(range(0, n, 2))
            real_f, real_t = frame_batches(src, range(n))
            rt_f, rt_t = frame_batches(src, half, augment=self.roundtrip)
            frames = torch.cat([real_f, rt_f])
            targets = {k: torch.cat([real_t[k], rt_t[k]]) for k in real_t}
            model, losses = train_detector(frames, targets, dcfg, device=self.device, progress=self.progress)
            held = range(n, n + held_n)
            acc_real = accuracy(model.detect(frame_batches(src, held)[0]), frame_batches(src, held)[1])
            rt = frame_batches(src, held, augment=self.roundtrip)
            acc_rt = accuracy(model.detect(rt[0]), rt[1])
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors(folder / "detector.safetensors",
                             {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
            self._memo["train_s_detector"] = time.perf_counter() - t0
            self._finish(folder, {"piece": "detector", "config": dcfg.to_dict(),
                                  "train_s": self._memo["train_s_detector"], "last_loss": losses[-1],
                                  "heldout_real": acc_real, "heldout_vae_roundtrip": acc_rt})
        model = AttributeDetector(dcfg.feature_dim)
        model.load_state_dict(load_file(str(folder / "detector.safetensors")))
        self._memo["detector"] = model.to(self.device).eval().requires_grad_(False)
        self._memo["detector_info"] = self.info(folder)
        return self._memo["detector"]

    def detector_info(self) -> dict[str, Any]:
        self.detector()
        return self._memo["detector_info"]

    # ---- 3. AR teacher ----------------------------------------------------------------------
    def teacher_key(self, train_precision: str) -> str:
        return self.cfg.key("train_clips", "clip_blocks", "shots_per_clip", "ar_steps", "ar_batch", "ar_lr",
                            parent=f"{self.vae_key()}:{train_precision}")

    def _latent_samples(self):
        """The AR training set, encoded once per process (both teachers train on it)."""
        if "latents" not in self._memo:
            self._memo["latents"] = self._encode_training_set()
        return self._memo["latents"]

    def _encode_training_set(self):
        from tqdm.auto import tqdm

        from impl.model.vae import encode_video
        from impl.parallel.sp_vae_encode import frames_uint8_to_float
        from impl.train.samples import LatentSample
        c = self.cfg
        vae, text = self.vae(), self.text_encoder()
        src = self.source(blocks=c.clip_blocks, length=c.train_clips, seed=c.seed + 31, shots=c.shots_per_clip)
        samples = []
        for i in tqdm(range(len(src)), desc="encode AR clips", disable=not self.progress):
            clip = src[i]
            x0 = encode_video(vae, frames_uint8_to_float(clip.frames.unsqueeze(0), torch.float32, self.device))
            samples.append(LatentSample(x0[0].cpu(), text(clip.block_prompts).float().cpu(), clip.block_prompts,
                                        clip.key))
        return samples

    def teacher_state(self, train_precision: str = "bf16") -> dict[str, torch.Tensor]:
        """Master weights of the AR teacher trained in ``train_precision`` (stored in BF16)."""
        _require(train_precision in TRAIN_PRECISIONS, "train_precision",
                 f"must be one of {TRAIN_PRECISIONS}, got {train_precision!r}")
        memo = f"teacher:{train_precision}"
        if memo in self._memo:
            return self._memo[memo]
        from safetensors.torch import load_file
        folder = self._dir(f"teacher_{train_precision}", self.teacher_key(train_precision))
        if not self._ready(folder):
            from impl.train.config import TrainConfig
            from impl.train.samples import InMemorySource
            from impl.train.trainer import Trainer
            c = self.cfg
            t0 = time.perf_counter()
            source = InMemorySource(self._latent_samples())
            fpb = self.preset.stream.frames_per_block
            tcfg = TrainConfig(preset=c.preset, frames=c.clip_blocks * fpb, precision=train_precision,
                               steps=c.ar_steps, batch_size=c.ar_batch, lr=c.ar_lr, beta1=0.9, ema_start_step=None,
                               gradient_checkpointing=False, checkpoint_every=0, seed=c.seed)
            trainer = Trainer(tcfg, device=self.device)
            stats = trainer.fit(source, progress=self.progress)
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors(folder / "teacher.safetensors",
                             {k: v.to(torch.bfloat16).cpu().contiguous()   # BF16 storage, as the VAE
                              for k, v in trainer.optimizer.master_state().items()})
            self._memo[f"train_s_teacher_{train_precision}"] = time.perf_counter() - t0
            tail = stats[-20:]
            self._finish(folder, {"piece": "teacher", "train_config": tcfg.to_dict(),
                                  "train_s": self._memo[f"train_s_teacher_{train_precision}"],
                                  "first_loss": stats[0].loss, "last_loss": sum(s.loss for s in tail) / len(tail)})
        self._memo[memo] = load_file(str(folder / "teacher.safetensors"))
        return self._memo[memo]

    def model(self, train_precision: str = "bf16", lora_steps: int | None = None, dtype=torch.float32):
        """A fresh DiT with the teacher's weights (and the ``lora_steps`` student merged in)."""
        from impl.model.dit import CausalWanDiT
        model = CausalWanDiT(self.preset.dit, device=self.device, dtype=torch.float32)
        model.load_state_dict({k: v.float() for k, v in self.teacher_state(train_precision).items()})
        if lora_steps is not None:
            from impl.model.lora import merge_and_unload
            from impl.model.lora_files import load_lora
            load_lora(model, self.student_path(lora_steps, train_precision))
            model = merge_and_unload(model)
        return model.to(dtype).requires_grad_(False).eval()

    # ---- 4. LoRA students -------------------------------------------------------------------
    def student_key(self, steps: int, train_precision: str) -> str:
        return self.cfg.key("distill_iters", "lora_rank", "distill_lr",
                            parent=f"{self.teacher_key(train_precision)}:{steps}")

    def student_path(self, steps: int, train_precision: str = "bf16") -> Path:
        """The standalone LoRA file of the ``steps``-step student (distilled if not cached)."""
        folder = self._dir(f"lora{steps}_{train_precision}", self.student_key(steps, train_precision))
        path = folder / "lora.safetensors"
        if self._ready(folder):
            return path
        from impl.train.dmd import DMDConfig, DMDTrainer
        from impl.model.lora import LoraSpec, add_lora, base_fingerprint
        from impl.model.lora_files import save_lora
        c = self.cfg
        t0 = time.perf_counter()
        teacher = self.model(train_precision)
        spec = LoraSpec(rank=c.lora_rank, alpha=c.lora_rank)
        student, critic = add_lora(copy.deepcopy(teacher), spec), add_lora(copy.deepcopy(teacher), spec)
        # No CFG on the teacher's score: the AR teacher is trained without caption dropout, so it
        # has no unconditional mode to guide with.
        dcfg = DMDConfig(steps=steps, lr=c.distill_lr, lr_critic=c.distill_lr, gen_update_every=2,
                         real_guidance_scale=0.0, seed=c.seed)
        trainer = DMDTrainer(teacher, student, critic, self.preset, dcfg, self.embedder(), device=self.device)
        prompts_src = self.source(blocks=c.clip_blocks, length=max(c.distill_iters, 1), seed=c.seed + 41,
                                  shots=c.shots_per_clip)
        from tqdm.auto import tqdm
        log = [trainer.train_step(prompts_src.block_prompts(i))
               for i in tqdm(range(c.distill_iters), desc=f"dmd {steps}-step", disable=not self.progress)]
        folder.mkdir(parents=True, exist_ok=True)
        save_lora(path, student, spec, steps=c.distill_iters, base_hash=base_fingerprint(teacher),
                  extra={"sampling_steps": str(steps), "train_precision": train_precision})
        self._memo[f"train_s_lora{steps}_{train_precision}"] = time.perf_counter() - t0
        crit = [e["critic_loss"] for e in log]
        self._finish(folder, {"piece": "lora", "steps": steps, "dmd_config": asdict(dcfg),
                              "train_s": self._memo[f"train_s_lora{steps}_{train_precision}"],
                              "critic_loss_first": crit[0], "critic_loss_last": crit[-1]})
        return path


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


DECODER_PIECES = ("lightvae_p50", "lightvae_p75", "tae")
PIECES = ("vae", "detector", "teacher", "lora4", "lora2", "teacher_nvfp4_emulated") + DECODER_PIECES


def train_pieces(system: ProxySystem, pieces: Sequence[str]) -> list[dict[str, Any]]:
    """Train (or find cached) each named piece in order; print and return a summary of each
    (from its ``info.json``: folder, training seconds, device, final losses)."""
    out = []
    for name in pieces:
        if name == "vae":
            system.vae()
            folder = system._dir("vae", system.vae_key())
        elif name == "detector":
            system.detector()
            folder = system._dir("detector", system.detector_key())
        elif name in DECODER_PIECES:
            system.decoder(name)
            folder = system._dir(f"decoder_{name}", system.decoder_key(name))
        elif name.startswith("teacher"):
            precision = name[len("teacher_"):] or "bf16"
            system.teacher_state(precision)
            folder = system._dir(f"teacher_{precision}", system.teacher_key(precision))
        else:
            folder = system.student_path(int(name[len("lora"):])).parent
        info = system.info(folder)
        out.append({"piece": name, "folder": str(folder), **{k: info[k] for k in ("train_s", "device")},
                    **{k: info[k] for k in ("last_loss", "critic_loss_last", "heldout_real") if k in info}})
        print(json.dumps(out[-1], default=str), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repro.quality.proxy``: train the proxy pieces a ``quality`` run would use."""
    import argparse
    import sys

    from repro.errors import HarnessError
    ap = argparse.ArgumentParser(
        prog="python -m repro.quality.proxy",
        description="Train (or find in the cache) the quality proxy's pieces with the settings a "
                    "`python -m repro run quality` run would use: the spec's measure settings for --profile, "
                    "with --measure overrides. A later run with the same settings (and --profile, on another "
                    "machine too, given the cache folder) reuses them; records name the device that trained each.",
        epilog=f"Pieces, in training order: {', '.join(PIECES)}.")
    ap.add_argument("--spec", default="quality", help="spec file or experiment name (default: quality)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="device to train on (default: cuda if available, else cpu)")
    ap.add_argument("--profile", choices=["cpu", "cuda"], default=None,
                    help="the spec profile whose settings to use (default: the device's)")
    ap.add_argument("--measure", action="append", default=[], metavar="KEY=VALUE",
                    help="override one measure setting (repeatable), as `repro run --measure`")
    ap.add_argument("--pieces", nargs="+", choices=PIECES, default=list(PIECES), help="pieces to train, in order")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = ap.parse_args(argv)
    from repro.cli import parse_pairs, resolve_spec
    from repro.runner import parse_measure
    from repro.spec import load_spec
    try:
        spec = load_spec(resolve_spec(args.spec))
        if spec.benchmark != "quality":
            raise ConfigError(f"--spec: {spec.path} runs benchmark {spec.benchmark!r}, not 'quality'")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        profile = args.profile or device
        measure = {**spec.measure_for(profile), **parse_measure(spec, parse_pairs(args.measure, "--measure"))}
        presets = sorted({v.values["preset"] for v in spec.expand(profile)})
        if len(presets) != 1:
            raise ConfigError(f"--spec: the {profile} profile sweeps presets {presets}; train one at a time")
        system = ProxySystem(ProxyConfig.from_measure(measure, presets[0]), measure["cache_dir"], device,
                             progress=not args.no_progress)
    except (ConfigError, HarnessError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with portable_cpu_kernels(device):
        train_pieces(system, args.pieces)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
