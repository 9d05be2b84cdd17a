"""The one attention module, used for self-attention (``attn1``) and cross-attention (``attn2``).

Parameter names match diffusers' ``WanAttention``: to_q, to_k, to_v, to_out.0, norm_q, norm_k
(RMSNorm over the full width, before the head split). Self-attention either reads/writes the
block-slotted :class:`~impl.model.kv_cache.KVCache` (streaming inference) or attends a whole
sequence through an attention core (training, reference forward). Under sequence-parallel
inference a :class:`SequenceParallel` exchange wraps the KV-cache path: q, k, v go from
token-split to head-split before the cache and SDPA, and the output comes back.

Which of these paths a forward takes is its per-call object (:data:`ForwardCall`):
:class:`CachedBlock` (KV cache, block plan, optional SP exchange) or :class:`FullSequence`
(an attention core). Each holds exactly what its path needs, so a bad combination (a mask
with a cache, SP without one) cannot be built, and :meth:`Attention.attend` only dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from impl.model.attention_backends import DEFAULT_ATTENTION
from impl.model.fp8_scaling import FP8Heads
from impl.model.kv_cache import BlockPlan, KVCache
from impl.model.rope import apply_rope
from impl.quant.nvfp4 import NVFP4Tensor


@dataclass
class TextContext:
    """Per-layer cross-attention K/V of one prompt set: k, v are [B, G, H, L, D].

    G groups split the query tokens into G equal contiguous parts, each attending its own
    prompt (multi-shot prompts inside one forward); G = 1 for a single prompt.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def groups(self) -> int:
        return self.kv[0][0].shape[1]


# An attention core maps rotated q, k, v [B, H, S, D] to o [B, H, S, D]: how a full-sequence
# forward attends. Plain or masked SDPA, a FlexAttention block mask, or the Ulysses SP exchange
# around one (impl.parallel.attention).
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MaskedSDPA:
    """The attention core of a dense boolean mask [S, S] (True = may attend): exact, any
    device, memory O(S^2)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class SequenceParallel(Protocol):
    """Ulysses SP for KV-cached (streaming) forwards, as the model sees it (implemented by
    impl.parallel.sp_exchange.SPExchange). Each rank runs every non-attention layer on a
    contiguous shard of the block's tokens with all heads; self-attention runs on H/sp heads
    of every token of the block against the rank's head-split KV cache."""

    size: int

    def shard(self, x: torch.Tensor, temb: torch.Tensor, temb6: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, context: TextContext, tokens_per_frame: int) -> tuple:
        """The rank's shard of a block's tokens x [B, S, C], per-frame embeddings (re-gridded so
        each row covers equal runs of the shard's tokens), RoPE tables and prompt groups."""
        ...

    def to_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, commit: bool) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, tuple[NVFP4Tensor, NVFP4Tensor] | None]:
        """[B, H, S/sp, D] -> [B, H/sp, S, D]; plus K/V as NVFP4 codes to store when they
        crossed quantized on a committing pass (else None)."""
        ...

    def to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_heads` for the attention output."""
        ...

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S/sp, C] on each rank -> [B, S, C] on every rank."""
        ...

    def reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the SP group (the NVFP4 cache's tensor-scale amax)."""
        ...


@dataclass(frozen=True)
class CachedBlock:
    """Per-call inputs of a streaming forward of one AR block: the KV cache, where the block
    sits in it (``plan``, from :meth:`KVCache.begin_block`), and under sequence-parallel
    inference this rank's exchange (None on one GPU)."""

    cache: KVCache
    plan: BlockPlan
    sp: SequenceParallel | None = None


@dataclass(frozen=True)
class FullSequence:
    """Per-call inputs of a forward over a whole sequence: the attention core that attends its
    rotated q, k, v (default: unmasked SDPA; :meth:`masked` for a dense mask)."""

    core: AttentionCore = F.scaled_dot_product_attention

    @classmethod
    def masked(cls, mask: torch.Tensor) -> "FullSequence":
        """Under a boolean mask [S, S] (True = attend), e.g. :func:`impl.model.masks.block_visibility_mask`."""
        return cls(MaskedSDPA(mask))


# What a forward's self-attention runs over; one object per forward, the same for every layer.
ForwardCall = Union[CachedBlock, FullSequence]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim, **fk)
        self.to_k = nn.Linear(dim, dim, **fk)
        self.to_v = nn.Linear(dim, dim, **fk)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, **fk), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, **fk)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, **fk)
        # The kernel of KV-cached self-attention (impl.model.attention_backends); set for the
        # whole model by CausalWanDiT.set_attention_backend.
        # K/V reach it as tensors, or as FP8Heads from an FP8 cache (every backend takes both).
        self.cached_attention: Callable[..., torch.Tensor] = DEFAULT_ATTENTION

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        # o: [B, H, S, D] -> [B, S, H*D]
        return self.to_out[0](o.transpose(1, 2).flatten(2))

    def project_self(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, dim] -> q, k, v [B, H, S, D] (q, k normalised and rotated). Pure: compilable."""
        q = apply_rope(self._heads(self.norm_q(self.to_q(x))), cos, sin).transpose(1, 2)
        k = apply_rope(self._heads(self.norm_k(self.to_k(x))), cos, sin).transpose(1, 2)
        v = self._heads(self.to_v(x)).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: ForwardCall,
               layer: int) -> torch.Tensor:
        """Self-attention of rotated q, k, v [B, H, S, D] -> o [B, H, S, D], the one dispatch
        point: a full sequence through its core, or a block through layer ``layer`` of the KV
        cache (write, read, the cached-attention kernel), inside the SP exchange if any."""
        match call:
            case FullSequence(core=core):
                return core(q, k, v)
            case CachedBlock(sp=None):
                return self._attend_cached(q, k, v, call.cache, layer, call.plan)
            case CachedBlock(sp=sp):
                q, k, v, codes = sp.to_heads(q, k, v, commit=call.plan.commit)
                return sp.to_tokens(self._attend_cached(q, k, v, call.cache, layer, call.plan, codes))
        raise TypeError(f"Attention.attend: call must be a CachedBlock or FullSequence, got {type(call).__name__}")

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                       plan: BlockPlan, codes: tuple[NVFP4Tensor, NVFP4Tensor] | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            # A differentiable forward (DMD rollout exit steps): the cache stores detached
            # K/V and never joins the graph; the history is read without gradient and the
            # current block's live K/V are spliced in (a new tensor, so later in-place
            # cache writes cannot invalidate what backward saved).
            cache.write(layer, plan, k.detach(), v.detach(), codes)
            kc, vc = cache.read(layer, plan)
            if isinstance(kc, FP8Heads):   # an FP8 cache: the history in the compute dtype
                kc, vc = kc.dequantize(k.dtype), vc.dequantize(v.dtype)
            lo, hi = plan.write_range
            k = torch.cat([kc[:, :, :lo], k, kc[:, :, hi:]], dim=2)
            v = torch.cat([vc[:, :, :lo], v, vc[:, :, hi:]], dim=2)
            return F.scaled_dot_product_attention(q, k, v)   # differentiable: the reference kernel
        cache.write(layer, plan, k, v, codes)
        k, v = cache.read(layer, plan)
        return self.cached_attention(q, k, v)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context: [B, G, L, dim] (already text-embedded) -> k, v [B, G, H, L, D]."""
        k = self._heads(self.norm_k(self.to_k(context))).transpose(2, 3)
        v = self._heads(self.to_v(context)).transpose(2, 3)
        return k, v

    def forward_cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k, v = kv
        b, s, _ = x.shape
        g = k.shape[1]
        if s % g:
            raise ValueError(f"cross-attention: {s} query tokens do not split into {g} prompt groups")
        q = self._heads(self.norm_q(self.to_q(x)))                     # [B, S, H, D]
        q = q.unflatten(1, (g, s // g)).transpose(2, 3)                # [B, G, H, S/G, D]
        # Fold groups into the batch: SDPA's fused kernels take 4-D inputs.
        o = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
        o = o.unflatten(0, (b, g)).transpose(2, 3).flatten(1, 2).transpose(1, 2)  # [B, H, S, D]
        return self._out(o)
