"""Names of the precision modes and the dtype the DiT computes in for each."""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(precision: str) -> torch.dtype:
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision: unknown precision {precision!r}; allowed: {sorted(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[precision]
