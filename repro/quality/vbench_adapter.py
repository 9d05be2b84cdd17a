"""Adapter for VBench (https://github.com/Vchitect/VBench, ``pip install vbench``).

When ``vbench``, the packages its dimensions import, and the pretrained weights of the requested
dimensions are all present locally, :func:`evaluate_vbench` scores a folder of MP4s on VBench's
dimensions in ``custom_input`` mode (the prompt of each video is read from its file name).
Otherwise :func:`vbench_status` says exactly what is missing and how to get it, and
:func:`evaluate_vbench` raises :class:`VBenchUnavailable` with that message. This adapter never
downloads anything: VBench would fetch missing checkpoints with ``wget`` on first use, so it is
only started once every file it would fetch is already in place, and always in its "local"
checkpoint mode (``local=True``).

Where VBench looks for weights (``vbench/utils.py``, ``init_submodules``): under its cache folder
``$VBENCH_CACHE_DIR``, default ``~/.cache/vbench``, read once when ``vbench`` is imported.
Pass ``cache_dir`` / ``--cache-dir`` to use another folder. The DINO model of
``subject_consistency`` is built by the DINO repository's ``hubconf.py``, which loads its
checkpoint through ``torch.hub`` (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``).

CLI::

    python -m repro.quality.vbench_adapter --check [--dimensions a,b] [--cache-dir DIR]
    python -m repro.quality.vbench_adapter --videos DIR --out DIR [--dimensions a,b] [--device cuda]

Exit code 2 (with the message on stderr) when VBench cannot run, 1 for unusable video folders.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from impl.io import write_json
from repro.errors import HarnessError

__all__ = [
    "STANDARD_DIMENSIONS",
    "QUALITY_DIMENSIONS",
    "PROMPTS_FILE",
    "VBenchStatus",
    "VBenchUnavailable",
    "default_cache_dir",
    "vbench_status",
    "video_filename",
    "write_videos",
    "read_vbench_results",
    "evaluate_vbench",
    "main",
]

# VBench's "quality" dimensions: they score the video alone, so any prompt works.
QUALITY_DIMENSIONS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)

# Every dimension VBench accepts in mode='custom_input' (VBench.check_dimension_requires_extra_info
# rejects object_class, multiple_objects, scene, appearance_style, color, spatial_relationship,
# which need the auxiliary info of VBench's own prompt suite). The last three compare the video
# with its prompt; human_action reads the action from file names of the form
# "a person is <kinetics action>-<i>.mp4".
STANDARD_DIMENSIONS: tuple[str, ...] = QUALITY_DIMENSIONS + (
    "temporal_style",
    "overall_consistency",
    "human_action",
)

# Dimensions of VBench's standard prompt suite that custom videos cannot be scored on.
_PROMPT_SUITE_ONLY = ("object_class", "multiple_objects", "color", "spatial_relationship",
                      "scene", "appearance_style")

# Written by write_videos next to the MP4s: {file name: full prompt}. File names are shortened
# prompts; VBench gets the full ones through its prompt_list argument.
PROMPTS_FILE = "vbench_prompts.json"

_NAME_PREFIX = "vbench"
_MAX_NAME_BYTES = 180  # file name stem limit: ext4 allows 255 bytes, Mp4Writer's temp name adds ~25

# Python modules imported by ``import vbench`` (vbench/__init__.py -> vbench/utils.py) and by each
# dimension's module, with the pip package that provides them.
_PIP_NAME = {
    "vbench": "vbench", "decord": "decord", "PIL": "Pillow", "torchvision": "torchvision",
    "tqdm": "tqdm", "cv2": "opencv-python", "clip": "openai-clip", "pyiqa": "pyiqa",
    "omegaconf": "omegaconf", "easydict": "easydict", "scipy": "scipy", "timm": "timm",
    "einops": "einops", "ftfy": "ftfy", "regex": "regex",
}
_BASE_MODULES = ("vbench", "decord", "PIL", "torchvision", "tqdm")
_DIMENSION_MODULES: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("cv2",),
    "background_consistency": ("clip",),
    "temporal_flickering": ("cv2",),
    "motion_smoothness": ("cv2", "omegaconf"),
    "dynamic_degree": ("cv2", "easydict", "scipy"),  # RAFT's utils import scipy
    "aesthetic_quality": ("clip",),
    "imaging_quality": ("pyiqa",),
    "temporal_style": ("clip", "timm", "einops", "ftfy", "regex"),  # ViCLIP
    "overall_consistency": ("clip", "timm", "einops", "ftfy", "regex"),
    "human_action": ("clip", "timm"),  # UMT
}


@dataclass(frozen=True)
class _Weight:
    """One file or folder a dimension needs, relative to the VBench cache (or the torch hub dir)."""

    path: str
    source: str  # how to get it: a URL to download, or a command
    root: str = "vbench"  # "vbench": VBench cache dir; "torch_hub": torch.hub.get_dir()
    is_dir: bool = False


_CLIP_B32 = _Weight("clip_model/ViT-B-32.pt",
                    "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
_CLIP_L14 = _Weight("clip_model/ViT-L-14.pt",
                    "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
_VICLIP = (
    _Weight("ViCLIP/ViClip-InternVid-10M-FLT.pth",
            "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth"),
    _Weight("ViCLIP/bpe_simple_vocab_16e6.txt.gz",
            "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz"),
)

# What VBench's init_submodules(local=True) and the dimension modules load, per dimension.
_DIMENSION_WEIGHTS: dict[str, tuple[_Weight, ...]] = {
    "subject_consistency": (
        _Weight("dino_model/facebookresearch_dino_main",
                "git clone https://github.com/facebookresearch/dino", is_dir=True),
        _Weight("dino_model/dino_vitbase16_pretrain.pth", _DINO_URL),
        # hubconf.dino_vitb16 loads its weights with torch.hub.load_state_dict_from_url.
        _Weight("checkpoints/dino_vitbase16_pretrain.pth", _DINO_URL, root="torch_hub"),
    ),
    "background_consistency": (_CLIP_B32,),
    "temporal_flickering": (),
    "motion_smoothness": (_Weight("amt_model/amt-s.pth",
                                  "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),),
    "dynamic_degree": (_Weight("raft_model/models/raft-things.pth",
                               "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip "
                               "(unzip into raft_model/)"),),
    "aesthetic_quality": (
        _CLIP_L14,
        _Weight("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth"),
    ),
    "imaging_quality": (_Weight("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                                "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),),
    "temporal_style": _VICLIP,
    "overall_consistency": _VICLIP,
    "human_action": (_Weight("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                             "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/l16_ptk710_ftk710_ftk400_f16_res224.pth"),),
}


class VBenchUnavailable(HarnessError, RuntimeError):
    """VBench, a package it imports, or a checkpoint it needs is missing; the message says which."""


@dataclass(frozen=True)
class VBenchStatus:
    """Whether VBench can run the requested dimensions here, and if not, what is missing."""

    available: bool
    missing: list[str] = field(default_factory=list)  # one human-readable item per missing thing
    message: str = ""
    cache_dir: Path | None = None
    dimensions: tuple[str, ...] = ()


# --------------------------------------------------------------------------- status


def default_cache_dir() -> Path:
    """VBench's weight folder: ``$VBENCH_CACHE_DIR``, else ``~/.cache/vbench`` (as vbench/utils.py)."""
    env = os.environ.get("VBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vbench"


def _check_dimensions(dimensions: Sequence[str] | str | None) -> tuple[str, ...]:
    if dimensions is None:
        return QUALITY_DIMENSIONS
    if isinstance(dimensions, str):
        dimensions = [d for d in dimensions.split(",") if d.strip()]
    dims = tuple(dict.fromkeys(d.strip() for d in dimensions))  # dedupe, keep order
    if not dims:
        raise ValueError(f"dimensions: give at least one of {', '.join(STANDARD_DIMENSIONS)}")
    for d in dims:
        if d in _PROMPT_SUITE_ONLY:
            raise ValueError(f"dimension {d!r} needs VBench's own prompt suite and is not supported for "
                             f"custom videos; choose from {', '.join(STANDARD_DIMENSIONS)}")
        if d not in STANDARD_DIMENSIONS:
            raise ValueError(f"unknown VBench dimension {d!r}; choose from {', '.join(STANDARD_DIMENSIONS)}")
    return dims


def _module_found(name: str) -> bool:
    """Whether ``name`` is importable, without importing it (find_spec can raise on odd installs)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _torch_hub_dir() -> Path:
    import torch  # imported here: status checks of the package alone should not need it

    return Path(torch.hub.get_dir())


def _weight_path(w: _Weight, cache_dir: Path) -> Path:
    return (_torch_hub_dir() if w.root == "torch_hub" else cache_dir) / w.path


def _import_check(cache_dir: Path, dims: tuple[str, ...], timeout_s: float = 300.0) -> str | None:
    """Import vbench and the dimension modules in a child process; return the error, or None.

    A child process, because importing vbench has lasting effects on this one: it fixes
    CACHE_DIR for the life of the process and configures the root logger.
    """
    code = "import importlib, vbench\nfor d in %r:\n    importlib.import_module('vbench.' + d)\n" % (dims,)
    env = dict(os.environ, VBENCH_CACHE_DIR=str(cache_dir))
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"'import vbench' did not finish within {timeout_s:.0f} s"
    except OSError as exc:
        return f"could not start {sys.executable} to import vbench: {exc}"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return f"importing vbench fails: {lines[-1] if lines else f'exit code {proc.returncode}'}"


def vbench_status(cache_dir: str | Path | None = None,
                  dimensions: Sequence[str] | str | None = None,
                  check_import: bool = True) -> VBenchStatus:
    """Check, without importing vbench into this process, whether VBench can score ``dimensions``.

    Checks that ``vbench`` and the modules it and the dimension modules import are installed,
    and that every checkpoint file or folder the dimensions load (with ``local=True``) exists
    under ``cache_dir`` (default :func:`default_cache_dir`) or the torch hub folder. When all are
    present and ``check_import`` is set, it imports vbench and the dimension modules in a child
    process to catch broken installs. ``dimensions`` defaults to :data:`QUALITY_DIMENSIONS`.
    """
    dims = _check_dimensions(dimensions)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    missing: list[str] = []

    modules = list(_BASE_MODULES)
    for d in dims:
        modules += [m for m in _DIMENSION_MODULES[d] if m not in modules]
    for m in modules:
        if not _module_found(m):
            users = "every dimension" if m in _BASE_MODULES else ", ".join(
                d for d in dims if m in _DIMENSION_MODULES[d])
            missing.append(f"python module '{m}' is not installed (pip install {_PIP_NAME[m]}); "
                           f"needed by {users}")

    seen: set[Path] = set()
    for d in dims:
        for w in _DIMENSION_WEIGHTS[d]:
            path = _weight_path(w, cache)
            if path in seen:
                continue
            seen.add(path)
            ok = path.is_dir() if w.is_dir else path.is_file()
            if not ok:
                kind = "folder" if w.is_dir else "file"
                missing.append(f"{d}: {kind} {path} is missing (get it from: {w.source})")

    if not missing and check_import:
        error = _import_check(cache, dims)
        if error:
            missing.append(error)

    available = not missing
    return VBenchStatus(available=available, missing=missing,
                        message=_status_message(available, missing, cache, dims),
                        cache_dir=cache, dimensions=dims)


def _status_message(available: bool, missing: list[str], cache: Path, dims: tuple[str, ...]) -> str:
    if available:
        return (f"VBench is available for {', '.join(dims)} "
                f"(weights under {cache}, torch hub at {_torch_hub_dir()}).")
    lines = [f"VBench cannot run dimension(s) {', '.join(dims)}; missing:"]
    lines += [f"  - {item}" for item in missing]
    lines += [
        "How to fix:",
        "  - packages: pip install vbench plus the modules above, into this Python environment "
        f"({sys.executable}); check that it keeps your torch build (vbench's requirements pin old "
        "versions, so `pip install --no-deps vbench` and installing the modules listed may be needed)",
        f"  - weights: place the files above under {cache} (VBench's cache folder: set VBENCH_CACHE_DIR "
        "or pass --cache-dir / cache_dir= to use another one); the DINO checkpoint also goes in the "
        "torch hub folder ($TORCH_HOME/hub/checkpoints)",
        "  - this adapter never downloads weights itself; run `python -m repro.quality.vbench_adapter "
        "--check` to re-check",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing videos


def video_filename(prompt: str, index: int = 0) -> str:
    """The MP4 file name VBench's custom_input mode reads ``prompt`` back from: ``<prompt>-<index>.mp4``.

    VBench (``get_prompt_from_filename``) takes the file stem and strips one trailing ``-<digits>``,
    so the index always present here keeps prompts that end in digits intact. Sanitizing: path
    separators and control characters become spaces, whitespace runs collapse, leading dots and
    spaces go (no hidden files), and the stem is cut to 180 UTF-8 bytes; :func:`write_videos`
    records the full prompt in ``vbench_prompts.json``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an integer >= 0, got {index!r}")
    name = re.sub(r"[\x00-\x1f\x7f/\\]", " ", prompt)
    name = " ".join(name.split()).lstrip(". ")
    name = name.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", errors="ignore").rstrip()
    if not name:
        raise ValueError(f"prompt {prompt!r} leaves an empty file name after sanitizing")
    return f"{name}-{index}.mp4"


def _prompt_from_filename(filename: str) -> str:
    """VBench's get_prompt_from_filename: the stem without one trailing ``-<digits>``."""
    return re.sub(r"-\d+$", "", Path(filename).stem)


def write_videos(videos: Mapping[str, object], out_dir: str | Path, fps: int = 24,
                 index: int = 0, quality: float = 10.0) -> dict[str, Path]:
    """Write each ``{prompt: uint8 video [T, H, W, 3]}`` to ``out_dir/<prompt>-<index>.mp4``.

    Files are named by :func:`video_filename` so VBench's custom_input mode reads the prompt from
    the name; ``out_dir/vbench_prompts.json`` (merged with an existing one) maps every file name to
    its full prompt. Writing goes through ``impl.video_io.Mp4Writer`` (H.264, atomic; even H and
    W required) at imageio quality ``quality`` (10 = best, to keep codec loss out of the scores).
    Returns ``{prompt: path}``.
    """
    from impl.video_io import Mp4Writer  # the system package, imported only when writing

    import torch

    if not videos:
        raise ValueError("write_videos: no videos given")
    names: dict[str, str] = {}
    for prompt, video in videos.items():
        if not isinstance(video, torch.Tensor) or video.dtype != torch.uint8 or video.dim() != 4 \
                or video.shape[-1] != 3:
            desc = (f"{video.dtype} {tuple(video.shape)}" if isinstance(video, torch.Tensor)
                    else type(video).__name__)
            raise ValueError(f"write_videos: video for prompt {prompt!r} must be a uint8 tensor "
                             f"[T, H, W, 3] (see metrics.to_uint8_video), got {desc}")
        names[prompt] = video_filename(prompt, index)
    by_name: dict[str, str] = {}
    for prompt, name in names.items():
        if name in by_name:
            raise ValueError(f"write_videos: prompts {by_name[name]!r} and {prompt!r} both map to "
                             f"file name {name!r}; make them differ in their first {_MAX_NAME_BYTES} bytes")
        by_name[name] = prompt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for prompt, video in videos.items():
        path = out / names[prompt]
        with Mp4Writer(path, fps=fps, quality=quality) as writer:
            writer.append_uint8(video.detach().cpu())
        paths[prompt] = path

    prompts_path = out / PROMPTS_FILE
    prompts = _read_prompts(out)
    prompts.update(by_name)
    write_json(prompts_path, prompts)
    return paths


def _read_prompts(video_dir: Path) -> dict[str, str]:
    path = video_dir / PROMPTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ValueError(f"{path}: expected a JSON object {{file name: prompt}}")
    return data


# --------------------------------------------------------------------------- evaluating


def read_vbench_results(path: str | Path, dimensions: Sequence[str] | None = None) -> dict[str, float]:
    """Per-dimension scores from VBench's ``<name>_eval_results.json``.

    VBench saves ``{dimension: [score, [per-video results...]]}`` (the ``(all_results,
    video_results)`` pair each ``compute_<dimension>`` returns). Scores are returned as floats
    (dynamic_degree's and human_action's are fractions of videos).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"VBench wrote no results file {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{dimension: [score, per-video results]}}")
    scores: dict[str, float] = {}
    for dim in (dimensions if dimensions is not None else list(data)):
        if dim not in data:
            raise ValueError(f"{path}: no result for dimension {dim!r} (has {', '.join(data) or 'none'})")
        value = data[dim]
        score = value[0] if isinstance(value, list) and value else value
        if not isinstance(score, (int, float)):
            raise ValueError(f"{path}: result for {dim!r} is not [score, ...] or a number: {value!r:.200}")
        scores[dim] = float(score)
    return scores


def _import_vbench(cache_dir: Path):
    """Import vbench with its CACHE_DIR set to ``cache_dir``; return the module."""
    utils = sys.modules.get("vbench.utils")
    if utils is not None:
        current = Path(getattr(utils, "CACHE_DIR", "")).expanduser()
        if current.resolve() != cache_dir.resolve():
            raise VBenchUnavailable(f"vbench was already imported in this process with cache folder "
                                    f"{current}, not {cache_dir}; VBench reads VBENCH_CACHE_DIR once "
                                    f"at import, so set it before starting Python")
    old = os.environ.get("VBENCH_CACHE_DIR")
    os.environ["VBENCH_CACHE_DIR"] = str(cache_dir)  # vbench/utils.py reads it at import time
    try:
        import vbench
        import vbench.utils
    finally:  # later imports of vbench modules take CACHE_DIR from vbench.utils, not the env
        if old is None:
            os.environ.pop("VBENCH_CACHE_DIR", None)
        else:
            os.environ["VBENCH_CACHE_DIR"] = old
    if not hasattr(vbench.utils, "CACHE_DIR"):
        raise VBenchUnavailable("this vbench release predates VBENCH_CACHE_DIR (weights under "
                                "./pretrained); upgrade it: pip install -U vbench")
    return vbench


def evaluate_vbench(video_dir: str | Path, dimensions: Sequence[str] | str | None,
                    out_dir: str | Path, device: str = "cuda",
                    cache_dir: str | Path | None = None) -> dict[str, float]:
    """Score every MP4 in ``video_dir`` with VBench; return ``{dimension: score}``.

    Runs ``VBench(device, <vbench>/VBench_full_info.json, out_dir).evaluate(videos_path=video_dir,
    name=..., dimension_list=dimensions, mode='custom_input', local=True, prompt_list=...)``, then
    reads ``out_dir/<name>_eval_results.json``. Prompts come from ``video_dir/vbench_prompts.json``
    where :func:`write_videos` left one, else from the file names. ``dimensions`` defaults to
    :data:`QUALITY_DIMENSIONS`. Raises :class:`VBenchUnavailable` (with :func:`vbench_status`'s
    message) when anything VBench needs is missing, before touching VBench.
    """
    dims = _check_dimensions(dimensions)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    status = vbench_status(cache, dims)
    if not status.available:
        raise VBenchUnavailable(status.message)

    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from exc
    videos = Path(video_dir)
    if not videos.is_dir():
        raise FileNotFoundError(f"video_dir: no such folder {videos}")
    # VBench's own filter for custom_input folders; the Mp4Writer's hidden temp files are skipped.
    files = sorted(p.name for p in videos.iterdir()
                   if p.suffix.lower() in (".mp4", ".gif", ".jpg", ".png") and not p.name.startswith("."))
    if not files:
        raise ValueError(f"video_dir: {videos} holds no .mp4 (or .gif/.jpg/.png) files")
    recorded = _read_prompts(videos)
    # VBench asserts that a non-empty prompt_list covers every video: fill in the rest from names.
    prompts = {f: recorded.get(f, _prompt_from_filename(f)) for f in files} if recorded else {}

    vbench = _import_vbench(cache)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_info = Path(vbench.__file__).parent / "VBench_full_info.json"  # read only in standard mode
    runner = vbench.VBench(dev, str(full_info), str(out))
    params = inspect.signature(runner.evaluate).parameters
    if "mode" not in params:
        raise VBenchUnavailable("this vbench release has no mode='custom_input' in VBench.evaluate; "
                                "upgrade it: pip install -U vbench")
    name = f"{_NAME_PREFIX}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    kwargs: dict[str, object] = {"videos_path": str(videos), "name": name,
                                 "dimension_list": list(dims), "mode": "custom_input", "local": True}
    if prompts and "prompt_list" in params:
        kwargs["prompt_list"] = prompts
    runner.evaluate(**kwargs)
    return read_vbench_results(out / f"{name}_eval_results.json", dims)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repro.quality.vbench_adapter",
        description="Score generated videos with VBench (custom_input mode), or check whether VBench, "
                    "the packages it imports and its pretrained weights are installed here. Exits 2 with "
                    "a message saying what is missing when VBench cannot run. Never downloads weights.",
        epilog="dimensions usable on custom videos: " + ", ".join(STANDARD_DIMENSIONS)
               + f". Default: {', '.join(QUALITY_DIMENSIONS)}. Weights are read from $VBENCH_CACHE_DIR "
               "(default ~/.cache/vbench) or --cache-dir.",
    )
    p.add_argument("--check", action="store_true",
                   help="only report whether VBench can run the dimensions (exit 0 if so, 2 if not)")
    p.add_argument("--videos", type=Path, help="folder of .mp4 files named '<prompt>-<i>.mp4'")
    p.add_argument("--out", type=Path, help="folder for VBench's result JSON files")
    p.add_argument("--dimensions", default=",".join(QUALITY_DIMENSIONS),
                   help="comma-separated VBench dimensions (default: the 7 quality dimensions)")
    p.add_argument("--device", default="cuda", help="torch device for VBench's models (default: cuda)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="VBench weight folder (default: $VBENCH_CACHE_DIR or ~/.cache/vbench)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code: 0 ok, 2 VBench unavailable, 1 bad videos/folders.

    Malformed arguments exit 2 through argparse, like any argparse CLI."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        dims = _check_dimensions(args.dimensions)
    except ValueError as exc:
        parser.error(str(exc))
    if args.check:
        status = vbench_status(args.cache_dir, dims)
        print(status.message, file=sys.stdout if status.available else sys.stderr)
        return 0 if status.available else 2
    if args.videos is None or args.out is None:
        parser.error("--videos and --out are required (or use --check)")
    try:
        scores = evaluate_vbench(args.videos, dims, args.out, device=args.device, cache_dir=args.cache_dir)
    except VBenchUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
