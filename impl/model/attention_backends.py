"""Self-attention kernels for the KV-cached (streaming) forward: (q, k, v) [B, H, S, D] -> o.

One registry (:data:`BACKENDS`): each entry declares its name (from :data:`impl.modes.
AttentionBackend`), what it needs of the machine, whether it takes FP8 K/V from an FP8 KV cache
as they are, and how to build its function. Nothing else in the tree lists backends.

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` in the model dtype (cuDNN /
  FlashAttention-2 on GPUs, the math kernel on CPUs). The default, and the reference.
- ``fa3``: FlashAttention-3's BF16 forward (Hopper; the ``fa3-fwd`` wheel or an upstream
  ``flash_attn_interface`` build).
- ``fa3_fp8``: FlashAttention-3's FP8 e4m3 forward. Q is quantized per (batch, head) on each
  call; K and V come from an FP8 KV cache as stored (``kv_cache="fp8"``: quantized once when a
  block is written), or are quantized per call from a BF16 cache.
- ``fp8_triton``: our Triton FlashAttention-style forward on Hopper's FP8 tensor cores
  (:mod:`impl.model.fp8_attention`).
- ``fp8_cudnn``: cuDNN's FP8 SDPA forward through the cuDNN frontend (``nvidia-cudnn-frontend``).
- ``fp8_emulated``: the FP8 numerics in plain PyTorch (any device): the same quantization of
  Q, K, V and P, exact float32 arithmetic otherwise. For accuracy studies and CPU tests; it
  takes FP8 K/V from an FP8 cache too, so the cache's numerics run on the CPU.

FP8 scaling (explicit, amax-based, one scale per tensor and (batch, head) for the Triton,
FA3 and emulated paths, one per tensor for cuDNN, whose API takes scalar descales): X8 =
e4m3(X * 448 / amax|X|); the probabilities P = exp(S - rowmax) in [0, 1] are quantized as
e4m3(448 P) (emulation, Triton); the output is rescaled by the inverse scales in float32.

K and V reach a backend either as tensors in the model dtype or, from an FP8 cache, as
:class:`~impl.model.fp8_scaling.FP8Heads`; :func:`attention_fn` hands a backend that does not
take FP8 K/V their dequantized values (so any backend runs over any cache).

A backend that this machine or its packages cannot run raises :class:`AttentionBackendError`
naming what is missing, before any model is built: there is no silent fallback that would
change a record's numbers.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

from impl.errors import ConfigError
from impl.model.fp8_scaling import FP8_MAX, FP8Heads

KV = Union[torch.Tensor, FP8Heads]
AttentionFn = Callable[[torch.Tensor, KV, KV], torch.Tensor]

# FlashAttention-3's Python modules: the forward-only PyPI wheel, then an upstream build.
FA3_MODULES = ("fa3_fwd_interface", "flash_attn_interface")
FA3_INSTALL = "pip install fa3-fwd==0.0.3 (forward-only FlashAttention-3 wheel, CUDA 13, Hopper)"
FA3_HEAD_DIMS = (64, 256)       # head dims the FA3 kernels are built for (multiples of 8)


class AttentionBackendError(ConfigError):
    """The chosen attention backend cannot run here; the message says what is missing."""


# ---- kernels ----

def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def fp8_emulated(q: torch.Tensor, k: KV, v: KV) -> torch.Tensor:
    """FP8 attention numerics in PyTorch: quantized Q, K, V and P, float32 elsewhere. K and V
    may arrive already quantized (:class:`FP8Heads`, from an FP8 KV cache)."""
    q8, k8, v8 = (FP8Heads.of(x) for x in (q, k, v))
    sq, sk, sv = q8.scale, k8.scale, v8.scale
    s = (q8.codes.float() @ k8.codes.float().transpose(-1, -2)) / (sq * sk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
    o = (p8 @ v8.codes.float()) / (FP8_MAX * sv) / p.sum(dim=-1, keepdim=True)
    return o.to(q.dtype)


def _fa3_module():
    """The first FlashAttention-3 interface module that imports, or an error naming the wheel."""
    problems = []
    for name in FA3_MODULES:
        try:
            return importlib.import_module(name)
        except Exception as exc:   # ImportError, or a library that fails to load against this torch
            problems.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
    raise AttentionBackendError(f"FlashAttention-3 is not installed ({FA3_INSTALL}); " + "; ".join(problems))


class FA3Attention:
    """FlashAttention-3 forward on [B, H, S, D] operands (it takes [B, S, H, D] views: no copy).

    ``fp8``: Q is quantized per (batch, head) here; K / V are used as given when they are
    :class:`FP8Heads` (an FP8 KV cache), else quantized here too. The output is BF16."""

    def __init__(self, fp8: bool) -> None:
        self.fp8 = fp8
        self._func = _fa3_module().flash_attn_func

    def __call__(self, q: torch.Tensor, k: KV, v: KV) -> torch.Tensor:
        if not self.fp8:
            out = self._func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        q8, k8, v8 = (FP8Heads.of(x) for x in (q, k, v))
        out = self._func(q8.codes.transpose(1, 2), k8.codes.transpose(1, 2), v8.codes.transpose(1, 2),
                         softmax_scale=q.shape[-1] ** -0.5,
                         q_descale=q8.descale, k_descale=k8.descale, v_descale=v8.descale)
        return out.transpose(1, 2)   # BF16, FA3's FP8 output type


# ---- requirements ----

def _need_cuda(name: str, device: torch.device, capability: tuple[int, int], what: str,
               exact_major: bool = False) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise AttentionBackendError(f"attention={name!r}: needs a CUDA GPU (device is {device})")
    cap = torch.cuda.get_device_capability(device)
    ok = cap[0] == capability[0] if exact_major else cap >= capability
    if not ok:
        raise AttentionBackendError(f"attention={name!r}: needs {what}; this GPU has compute capability "
                                    f"{cap[0]}.{cap[1]}")


def _fp8_gpu(name: str, device: torch.device, head_dim: int | None) -> None:
    _need_cuda(name, device, (8, 9), "FP8 tensor cores (compute capability >= 8.9, Ada / Hopper / Blackwell)")


def _needs_triton(name: str, device: torch.device, head_dim: int | None) -> None:
    _fp8_gpu(name, device, head_dim)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise AttentionBackendError(f"attention={name!r}: needs the triton package (pip install -e '.[gpu]')") from None


def _needs_cudnn(name: str, device: torch.device, head_dim: int | None) -> None:
    _fp8_gpu(name, device, head_dim)
    try:
        import cudnn  # noqa: F401
    except Exception as exc:  # ImportError, or a missing libcudnn at import
        raise AttentionBackendError(f"attention={name!r}: needs the cuDNN frontend "
                                    f"(pip install nvidia-cudnn-frontend): {type(exc).__name__}: {exc}") from None


def _needs_fa3(name: str, device: torch.device, head_dim: int | None) -> None:
    lo, hi = FA3_HEAD_DIMS
    if head_dim is not None and not (lo <= head_dim <= hi and head_dim % 8 == 0):
        raise AttentionBackendError(f"attention={name!r}: head dim {head_dim} is not supported by FlashAttention-3 "
                                    f"(multiples of 8 from {lo} to {hi})")
    _need_cuda(name, device, (9, 0), "a Hopper GPU (sm_90: H100 / H200); FlashAttention-3 is built for it",
               exact_major=True)
    try:
        _fa3_module()
    except AttentionBackendError as exc:
        raise AttentionBackendError(f"attention={name!r}: {exc}") from None


def _anywhere(name: str, device: torch.device, head_dim: int | None) -> None:
    return None


# ---- the registry ----

@dataclass(frozen=True)
class Backend:
    """One attention backend: its requirements, whether it takes FP8 K/V as stored, its builder."""

    name: str
    check: Callable[[str, torch.device, int | None], None]   # raises AttentionBackendError
    build: Callable[[], AttentionFn]
    takes_fp8_kv: bool = False    # consumes FP8Heads K/V from an FP8 cache without dequantizing
    precise: str = "sdpa"         # the BF16 backend of the same family (bf16_attention_steps)


def _triton() -> AttentionFn:
    from impl.model.fp8_attention import fp8_attention
    return fp8_attention


def _cudnn() -> AttentionFn:
    from impl.model.fp8_cudnn import CudnnFP8Attention
    return CudnnFP8Attention()


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("sdpa", _anywhere, lambda: sdpa),
    Backend("fa3", _needs_fa3, lambda: FA3Attention(fp8=False), precise="fa3"),
    Backend("fa3_fp8", _needs_fa3, lambda: FA3Attention(fp8=True), takes_fp8_kv=True, precise="fa3"),
    Backend("fp8_triton", _needs_triton, _triton),
    Backend("fp8_cudnn", _needs_cudnn, _cudnn),
    Backend("fp8_emulated", _anywhere, lambda: fp8_emulated, takes_fp8_kv=True),
)}


def backend(name: str) -> Backend:
    """The registry entry of ``name``; unknown names list the allowed ones."""
    if name not in BACKENDS:
        raise AttentionBackendError(f"attention: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def check_backend(name: str, device: torch.device | str, head_dim: int | None = None) -> None:
    """Raise :class:`AttentionBackendError` unless ``name`` can run on ``device`` here (with
    ``head_dim``, also that its kernels support that head dimension)."""
    entry = backend(name)
    entry.check(name, torch.device(device), head_dim)


def _dequantizing(fn: AttentionFn) -> AttentionFn:
    """``fn`` for K/V that may come from an FP8 cache: FP8Heads are dequantized first."""
    def call(q: torch.Tensor, k: KV, v: KV) -> torch.Tensor:
        if isinstance(k, FP8Heads):
            k, v = k.dequantize(q.dtype), v.dequantize(q.dtype)
        return fn(q, k, v)
    call.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return call


# What every layer runs until CausalWanDiT.set_attention_backend says otherwise.
DEFAULT_ATTENTION: AttentionFn = _dequantizing(sdpa)


def attention_fn(name: str, device: torch.device | str, head_dim: int | None = None) -> AttentionFn:
    """The attention function of backend ``name`` for ``device`` (checked first). Whatever the
    backend, it accepts K/V as tensors or as :class:`FP8Heads` from an FP8 KV cache."""
    check_backend(name, device, head_dim)
    entry = BACKENDS[name]
    fn = entry.build()
    return fn if entry.takes_fp8_kv else _dequantizing(fn)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2) in float64 (inf when equal)."""
    ref64, err = ref.double(), (ref.double() - test.double())
    noise = float(err.pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref64.pow(2).sum()) / noise)

