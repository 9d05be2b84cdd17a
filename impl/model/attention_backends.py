"""Self-attention kernels for the KV-cached (streaming) forward: (q, k, v) [B, H, S, D] -> o.

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` in the model dtype (cuDNN /
  FlashAttention on GPUs, the math kernel on CPUs). The default, and the reference.
- ``fp8_triton``: our Triton FlashAttention-style forward on Hopper's FP8 tensor cores
  (:mod:`impl.model.fp8_attention`).
- ``fp8_cudnn``: cuDNN's FP8 SDPA forward through the cuDNN frontend (``nvidia-cudnn-frontend``).
- ``fp8_emulated``: the FP8 numerics in plain PyTorch (any device): the same quantization of
  Q, K, V and P, exact float32 arithmetic otherwise. For accuracy studies and CPU tests.

FP8 scaling (explicit, amax-based, one scale per tensor and (batch, head) for the Triton and
emulated paths, one per tensor for cuDNN, whose API takes scalar descales): X8 = e4m3(X * 448 /
amax|X|); the probabilities P = exp(S - rowmax) in [0, 1] are quantized as e4m3(448 P); the
output is rescaled by the inverse scales in float32 and returned in the input dtype.

A backend that this machine or its packages cannot run raises :class:`AttentionBackendError`
naming what is missing: there is no silent fallback that would change a record's numbers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from impl.errors import ConfigError
from impl.model.fp8_scaling import FP8_MAX, fp8_scales, to_fp8

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackendError(ConfigError):
    """The chosen attention backend cannot run here; the message says what is missing."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def fp8_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FP8 attention numerics in PyTorch: quantized Q, K, V and P, float32 elsewhere."""
    sq, sk, sv = fp8_scales(q), fp8_scales(k), fp8_scales(v)
    q8, k8, v8 = (to_fp8(x, s).float() for x, s in ((q, sq), (k, sk), (v, sv)))
    s = (q8 @ k8.transpose(-1, -2)) / (sq * sk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
    o = (p8 @ v8) / (FP8_MAX * sv) / p.sum(dim=-1, keepdim=True)
    return o.to(q.dtype)


def _need_cuda(name: str, device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise AttentionBackendError(f"attention={name!r}: needs a CUDA GPU (device is {device})")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise AttentionBackendError(f"attention={name!r}: needs FP8 tensor cores (compute capability >= 8.9, "
                                    f"Ada / Hopper / Blackwell); this GPU is {major}.{minor}")


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise :class:`AttentionBackendError` unless ``name`` can run on ``device`` here."""
    device = torch.device(device)
    if name in ("sdpa", "fp8_emulated"):
        return
    if name == "fp8_triton":
        _need_cuda(name, device)
        try:
            import triton  # noqa: F401
        except ImportError:
            raise AttentionBackendError("attention='fp8_triton': needs the triton package "
                                        "(pip install -e '.[gpu]')") from None
        return
    if name == "fp8_cudnn":
        _need_cuda(name, device)
        try:
            import cudnn  # noqa: F401
        except Exception as exc:  # ImportError, or a missing libcudnn at import
            raise AttentionBackendError(f"attention='fp8_cudnn': needs the cuDNN frontend "
                                        f"(pip install nvidia-cudnn-frontend): {type(exc).__name__}: {exc}") from None
        return
    raise AttentionBackendError(f"attention: unknown backend {name!r}; allowed: sdpa, fp8_triton, fp8_cudnn, "
                                "fp8_emulated")


def attention_fn(name: str, device: torch.device | str) -> AttentionFn:
    """The attention function of backend ``name`` for ``device`` (checked first)."""
    check_backend(name, device)
    if name == "sdpa":
        return sdpa
    if name == "fp8_emulated":
        return fp8_emulated
    if name == "fp8_triton":
        from impl.model.fp8_attention import fp8_attention
        return fp8_attention
    from impl.model.fp8_cudnn import CudnnFP8Attention
    return CudnnFP8Attention()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2) in float64 (inf when equal)."""
    ref64, err = ref.double(), (ref.double() - test.double())
    noise = float(err.pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref64.pow(2).sum()) / noise)
