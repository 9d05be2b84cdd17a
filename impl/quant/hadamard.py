"""The 16x16 random Hadamard transform (RHT) used on weight-gradient GEMM operands.

``H = D @ S16 / 4``: the Sylvester Hadamard matrix scaled to be orthonormal, with a fixed
+-1 sign diagonal ``D`` on the left. Applied to consecutive groups of 16 along the
reduction dimension of both operands, it leaves the product unchanged (``H H^T = I``) while
spreading outliers across each group before quantization.
"""

from __future__ import annotations

import functools

import torch

# A fixed sign pattern (any +-1 diagonal keeps H orthogonal); fixed so runs are reproducible.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, 1, -1, 1, 1, 1, -1, -1, 1, -1)


def sylvester_hadamard(n: int = 16) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rht_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    signs = torch.tensor(RHT_SIGNS, dtype=torch.float64)
    return (signs[:, None] * sylvester_hadamard(16) / 4).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _rht_cached(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built once per (dtype, device): moving a fresh matrix to the GPU on every call would be a
    # blocking copy (a synchronisation) in every weight-gradient GEMM.
    return rht_matrix(dtype, device)


def apply_rht(x: torch.Tensor) -> torch.Tensor:
    """Transform groups of 16 along the last dim: ``x_g -> x_g @ H^T`` (orthogonal)."""
    if x.shape[-1] % 16:
        raise ValueError(f"RHT: the last dimension must be a multiple of 16, got {tuple(x.shape)}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32   # never below fp32
    return (x.to(ct).unflatten(-1, (-1, 16)) @ _rht_cached(ct, x.device).T).flatten(-2).to(x.dtype)
