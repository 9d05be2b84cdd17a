"""Detect the machine a run happens on, for result records and profile choice."""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any

import torch


def _cpu_name() -> str:
    # /proc/cpuinfo gives the marketing name on Linux; platform.processor() is often empty.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


CPU_NUMERICS_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_DYNAMIC", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
                     "MKL_NUM_THREADS")


def detect_hardware(device: str | None = None) -> dict[str, Any]:
    """Describe the current machine. ``device`` forces "cpu" or "cuda" (cuda must exist)."""
    cuda_ok = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda_ok else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: must be one of ['cpu', 'cuda'], got {device!r}")
    if device == "cuda" and not cuda_ok:
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")

    hw: dict[str, Any] = {
        "device": device,
        "gpu_name": None,
        "gpu_count": 0,
        "capability": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        # The environment that pins CPU kernels and thread counts (the Makefile's CPU_NUMERICS):
        # CPU records made with and without it take different code paths.
        "cpu_numerics": {k: os.environ[k] for k in CPU_NUMERICS_VARS if k in os.environ},
    }
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        hw["gpu_name"] = torch.cuda.get_device_name(0)
        hw["gpu_count"] = torch.cuda.device_count()
        hw["capability"] = f"{major}.{minor}"
    return hw


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hardware_tag(hw: dict[str, Any]) -> str:
    """Short filesystem-safe tag, e.g. ``nvidia-h100-80gb-hbm3-x1`` or ``cpu``."""
    if hw.get("device") == "cuda" and hw.get("gpu_name"):
        return f"{_slugify(str(hw['gpu_name']))}-x{int(hw.get('gpu_count') or 1)}"
    return "cpu"
