"""Video quality benchmark: metrics that need no downloaded weights, and a VBench adapter.

``metrics`` holds pure-torch pixel and feature metrics (VBench-style temporal flickering and
motion smoothness, PSNR/SSIM fidelity against a reference, Fréchet and kernel distances between
feature sets); ``vbench_adapter`` runs the real VBench when it and its weights are installed
locally and otherwise says exactly what is missing. ``proxy`` and ``evaluate`` train and run the
system, so they import ``impl``; ``metrics`` and ``vbench_adapter`` need only torch (and
impl.io's atomic writes).
"""

from __future__ import annotations

__all__ = ["metrics", "vbench_adapter"]
