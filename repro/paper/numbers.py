"""The paper's published numbers (abstract, the release's model table and project page, users'
measurements of the release) and, for each, which of our configurations or measured twins
stand beside it. Facts only: choosing records is :mod:`repro.paper.choose`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NVFP4_PRECISIONS = ["nvfp4_te", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4"]
FAST_PRECISIONS = ["fp8", *NVFP4_PRECISIONS]
PRESET_5B = "wan22_ti2v_5b"
# Experiments measuring streaming speed at 5B size, in order of preference: `realtime` holds the
# fast paths (one run per commit on one GPU), `inference_speed` the older one-factor sweep.
SPEED_EXPERIMENTS = ("realtime", "inference_speed")
# Values of inference_speed variant keys that records written before the key existed ran with.
VARIANT_DEFAULTS = {"dtype": "bf16", "kv_cache": "bf16", "decoder": "wan", "vae_channels_last": False,
                    "vae_compile": False, "attention": "sdpa", "compile": False, "cuda_graphs": False,
                    "guidance_scale": 1.0, "vae_mode": "sync"}


@dataclass(frozen=True)
class PaperNumber:
    key: str
    description: str
    value: float
    unit: str
    setting: str
    gpu: str = "not stated"
    note: str = ""

    def display(self) -> str:
        prefix = "up to " if self.unit == "x" else ""
        return f"{prefix}{self.value:g}{'x' if self.unit == 'x' else ' ' + self.unit}"


_5B = "LongLive-2.0-5B (Wan2.2-TI2V-5B), 1280x704"
_VBENCH_NOTE = ("VBench needs its networks and the real 5B weights; repro.quality.vbench_adapter runs it where "
                "installed; weight-free proxy comparison: results/tables/quality.md")

PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("bf16_fps", "LongLive-2.0-5B BF16 inference FPS", 24.8, "FPS",
                f"{_5B}, BF16, 4 steps (release model table)"),
    PaperNumber("nvfp4_4step_fps", "LongLive-2.0-5B NVFP4 4-step inference FPS", 29.7, "FPS",
                f"{_5B}, NVFP4, 4 steps (release model table)"),
    PaperNumber("nvfp4_2step_fps", "LongLive-2.0-5B NVFP4 2-step inference FPS", 45.7, "FPS",
                f"{_5B}, NVFP4, 2 steps (abstract, release model table)", gpu="GB200 (project page)"),
    PaperNumber("inference_speedup", "Inference speedup", 1.84, "x",
                "NVFP4 W4A4 + NVFP4 KV cache + async VAE vs BF16 (abstract); 45.7 / 24.8 = 1.84, i.e. "
                "NVFP4 2-step vs BF16 4-step"),
    PaperNumber("training_speedup", "Training speedup", 2.15, "x",
                "Balanced SP + NVFP4 vs baseline (abstract; exact baseline in the paper's tables)",
                gpu="Blackwell (model not stated)"),
    PaperNumber("longlive1_fps", "LongLive 1.0 (1.3B) inference FPS", 20.7, "FPS",
                "LongLive-1.3B, Wan2.1-T2V base, 832x480 (arXiv 2509.22622)", gpu="H100",
                note="different model; not measured by this harness"),
    PaperNumber("vbench_bf16", "VBench total, LongLive-2.0-5B BF16", 85.06, "VBench",
                f"{_5B}, BF16 (release model table)", note=_VBENCH_NOTE),
    PaperNumber("vbench_nvfp4_4step", "VBench total, LongLive-2.0-5B NVFP4 4-step", 84.51, "VBench",
                f"{_5B}, NVFP4, 4 steps (release model table)", note=_VBENCH_NOTE),
    PaperNumber("vbench_nvfp4_2step", "VBench total, LongLive-2.0-5B NVFP4 2-step", 83.14, "VBench",
                f"{_5B}, NVFP4, 2 steps (release model table)", note=_VBENCH_NOTE),
)
BY_KEY = {p.key: p for p in PAPER_NUMBERS}


@dataclass(frozen=True)
class Twin:
    """A measured figure of the same kind as a paper number, shown for every hardware with a
    record: records of ``experiment`` matching ``variant``. With ``ratio`` = (key, fast, base),
    the figure is ``metric`` of the ``fast`` record over the ``base`` record whose variants differ
    only in ``key`` (inverted where ``lower_is_better``), the best such pair per hardware; else
    ``metric`` itself with its ``<metric>_ci95``, from the newest matching record."""

    label: str
    experiment: str
    metric: str
    variant: dict[str, Any] = field(default_factory=dict)
    ratio: tuple[str, Any, Any] | None = None
    lower_is_better: bool = False


_QUALITY_BASE = {"train_precision": "bf16", "sink": True, "attention": "sdpa", "decoder": "wan", "switch": "cut"}
_PROXY = "quality proxy's prompt adherence (not VBench: a weight-free proxy, results/tables/quality.md)"
TWINS: dict[str, tuple[Twin, ...]] = {
    "training_speedup": (
        Twin("FP8 vs BF16 training step on one GPU, same clip and depth", "train_step", "step_s",
             ratio=("precision", "fp8", "bf16"), lower_is_better=True),
        Twin("NVFP4 (emulated) vs BF16 training step on one GPU", "train_step", "step_s",
             ratio=("precision", "nvfp4_emulated", "bf16"), lower_is_better=True),
        Twin("Balanced vs naive sequence parallelism, tokens/s (gloo processes)", "sp_training", "tokens_per_s",
             ratio=("sp_layout", "balanced", "naive")),
    ),
    "vbench_bf16": (
        Twin(f"BF16 8-step teacher, {_PROXY}", "quality", "q_adherence",
             {**_QUALITY_BASE, "model": "teacher", "precision": "bf16", "kv_cache": "bf16", "steps": 8}),),
    "vbench_nvfp4_4step": (
        Twin(f"NVFP4 (emulated) 4-step LoRA student with the NVFP4 KV cache, {_PROXY}", "quality", "q_adherence",
             {**_QUALITY_BASE, "model": "lora", "precision": "nvfp4_emulated", "kv_cache": "nvfp4", "steps": 4}),),
    "vbench_nvfp4_2step": (
        Twin(f"NVFP4 (emulated) 2-step LoRA student with the NVFP4 KV cache, {_PROXY}", "quality", "q_adherence",
             {**_QUALITY_BASE, "model": "lora", "precision": "nvfp4_emulated", "kv_cache": "nvfp4", "steps": 2}),),
}

METHOD_NOTES = (
    "The release's README model table gives 24.8 FPS (BF16), 29.7 (NVFP4 4-step) and 45.7 (NVFP4 2-step) "
    "but names no GPU, no VAE and no timing method.",
    "The release's project page states 45.7 FPS on GB200 with 2 steps; the BF16 and 4-step rows' GPU is not "
    "stated. Blackwell has FP4 tensor cores; Hopper (our H100/H200) does not.",
    "The release has no FPS harness: an environment switch times each AR block with CUDA events and reports "
    "FPS = 32 frames / block time, so a synchronous VAE decode falls inside the block and an asynchronous one "
    "(side stream or another GPU) does not. The release ships three VAEs (wan, mg_lightvae, mg_lightvae_v2) "
    "and the table does not say which it used.",
    "So the paper's figure may be DiT-only or end to end: below, each of our paths shows both, DiT-only "
    "(denoising + KV re-cache, decode excluded) and end to end (every frame decoded and delivered), from one "
    "record, i.e. one commit on one named GPU. Our runs use random 5B weights at 1280x704, 8-latent blocks "
    "(speed does not depend on weight values).",
)


@dataclass(frozen=True)
class OurPath:
    """One of our configurations to set beside a paper row: records whose variant matches
    ``variant`` (lists mean any-of; keys a record lacks take :data:`VARIANT_DEFAULTS`); the one
    with the highest ``select`` metric is shown."""

    label: str
    variant: dict[str, Any]
    select: str = "e2e_fps"
    gpu: str | None = None   # substring the GPU name must contain (e.g. "H100"), None = any


@dataclass(frozen=True)
class FpsRow:
    paper: str                       # PAPER_NUMBERS key
    paths: tuple[OurPath, ...] = field(default_factory=tuple)


FPS_ROWS: tuple[FpsRow, ...] = (
    FpsRow("bf16_fps", (
        OurPath("the decoder setting of today's path",
                {"precision": "bf16", "steps": 4, "kv_cache": "bf16", "decoder": "wan", "vae_mode": "sync"},
                select="dit_fps"),
        OurPath("our fastest BF16 4-step end to end", {"precision": "bf16", "steps": 4, "kv_cache": "bf16"}),
    )),
    FpsRow("nvfp4_4step_fps", (
        OurPath("NVFP4 on Hopper: weight-only or emulated W4A4, no FP4 tensor cores",
                {"precision": NVFP4_PRECISIONS, "steps": 4}),
        OurPath("FP8, our Hopper stand-in for NVFP4; fastest end to end",
                {"precision": "fp8", "steps": 4}),
    )),
    FpsRow("nvfp4_2step_fps", (
        OurPath("NVFP4 on Hopper: weight-only or emulated W4A4", {"precision": NVFP4_PRECISIONS, "steps": 2}),
        OurPath("today's path: the realtime spec's baseline",
                {"precision": "fp8", "steps": 2, "compile": True, "decoder": "wan", "vae_mode": "sync",
                 "attention": "sdpa", "cuda_graphs": False, "vae_compile": False, "vae_channels_last": False},
                select="dit_fps"),
        OurPath("our fastest 2-step end to end", {"precision": "fp8", "steps": 2}),
    )),
)


@dataclass(frozen=True)
class UserReport:
    """Users' measurements of the official release (public issue #103 of NVlabs/LongLive)."""

    gpu: str
    setting: str
    denoise_fps: float
    e2e_fps: float
    ours: OurPath | None = None


ISSUE_103 = "public issue #103 of the official repository (NVlabs/LongLive): users' runs of the release"
USER_REPORTS: tuple[UserReport, ...] = (
    UserReport("H100", "BF16", 18.6, 14.1,
               OurPath("ours on H100",
                       {"precision": "bf16", "steps": 4, "compile": False, "kv_cache": "bf16", "vae_mode": "sync",
                        "decoder": "wan"}, select="dit_fps", gpu="H100")),
    UserReport("H100", "FP8 W8A8 + compile", 15.5, 12.3,
               OurPath("ours on H100",
                       {"precision": "fp8", "steps": 4, "compile": True, "vae_mode": "sync", "decoder": "wan"},
                       select="dit_fps", gpu="H100")),
    UserReport("B200", "NVFP4 4-step", 20.4, 16.4),
    UserReport("B200", "NVFP4 2-step", 33.8, 24.1),
)
