"""Causal (block-autoregressive) Wan2.2-TI2V DiT.

Same computation and parameter names as diffusers' ``WanTransformer3DModel`` (so a
diffusers-format Wan2.2-TI2V-5B state dict loads as is), with:
- per-frame timesteps ``[B, F]`` and per-frame adaLN modulation;
- explicit temporal RoPE positions (absolute frame index + multi-shot offset);
- self-attention either over a streaming :class:`KVCache` block or over a full sequence
  through an attention core (a block-causal or teacher-forcing mask, ...), as the forward's
  per-call object says (:class:`CachedBlock` or :class:`FullSequence`);
- cross-attention K/V computed once per prompt (:meth:`CausalWanDiT.encode_text`).
Norms and modulation run in float32 like diffusers' FP32LayerNorm path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from impl.config import DiTConfig
from impl.model.attention_backends import DEFAULT_ATTENTION
from impl.model.attention import Attention, CachedBlock, ForwardCall, FullSequence, TextContext
from impl.model.rope import Rope3D


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32: low-precision tensors go up to float32, float64 stays float64 (so the
    float64 exactness tests never round through float32)."""
    return x if x.dtype == torch.float64 else x.float()


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) float32 whatever the parameter dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _f32(self.weight) if self.weight is not None else None
        b = _f32(self.bias) if self.bias is not None else None
        return F.layer_norm(_f32(x), self.normalized_shape, w, b, self.eps)


class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, **fk):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate") layout: net.0.proj, net.2."""

    def __init__(self, dim: int, inner: int, **fk):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, inner, **fk), nn.Dropout(0.0), nn.Linear(inner, dim, **fk)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection names)."""

    def __init__(self, dim_in: int, dim: int, activation, **fk):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim, **fk)
        self.linear_2 = nn.Linear(dim, dim, **fk)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig, **fk):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = _TwoLayerMLP(cfg.freq_dim, cfg.dim, F.silu, **fk)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim, **fk)
        self.text_embedder = _TwoLayerMLP(cfg.text_dim, cfg.dim, _gelu_tanh, **fk)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """[..., freq_dim] = [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half); float64."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        ang = t.to(torch.float64)[..., None] * freqs
        return torch.cat([ang.cos(), ang.sin()], dim=-1)

    def time(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps [B, F] -> temb [B, F, dim], temb6 [B, F, 6, dim]."""
        w = self.time_embedder.linear_1.weight
        temb = self.time_embedder(self.sinusoid(timesteps).to(w.dtype))
        temb6 = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))
        return temb, temb6


def _per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, S, C] -> [B, F, S/F, C] so per-frame vectors broadcast over a frame's tokens."""
    return x.unflatten(1, (frames, -1))


class CausalWanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, **fk):
        super().__init__()
        d = cfg.dim
        self.norm1 = FP32LayerNorm(d, cfg.eps, elementwise_affine=False, **fk)
        self.attn1 = Attention(d, cfg.num_heads, cfg.eps, **fk)
        self.attn2 = Attention(d, cfg.num_heads, cfg.eps, **fk)
        self.norm2 = FP32LayerNorm(d, cfg.eps, elementwise_affine=True, **fk)
        self.ffn = FeedForward(d, cfg.ffn_dim, **fk)
        self.norm3 = FP32LayerNorm(d, cfg.eps, elementwise_affine=False, **fk)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d, **fk) / d**0.5)

    def forward(self, x: torch.Tensor, temb6: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
                cos: torch.Tensor, sin: torch.Tensor, *, call: ForwardCall, layer: int) -> torch.Tensor:
        # Two pure, fixed-shape halves around the attention core: the halves are what
        # compile_hot_path() compiles; the KV-cache bookkeeping and SDPA stay eager.
        q, k, v, mod = self.pre_attention(x, temb6, cos, sin)
        o = self.attn1.attend(q, k, v, call, layer)
        return self.post_attention(x, o, mod, text_kv)

    def pre_attention(self, x, temb6, cos, sin):
        """adaLN-modulated norm1 and the self-attention projections (q, k rotated)."""
        mod = (_f32(self.scale_shift_table)[None] + _f32(temb6))[:, :, :, None]  # [B, F, 6, 1, C]
        shift1, scale1 = mod[:, :, 0], mod[:, :, 1]
        h = (_per_frame(self.norm1(x), temb6.shape[1]) * (1 + scale1) + shift1).flatten(1, 2).type_as(x)
        q, k, v = self.attn1.project_self(h, cos, sin)
        return q, k, v, mod

    def post_attention(self, x, o, mod, text_kv):
        """Self-attention output projection and gate, cross-attention, modulated FFN."""
        frames = mod.shape[1]
        gate1, shift2, scale2, gate2 = mod[:, :, 2], mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]
        a = self.attn1._out(o)
        x = (_f32(x) + (_per_frame(a, frames) * gate1).flatten(1, 2)).type_as(x)
        x = x + self.attn2.forward_cross(self.norm2(x).type_as(x), text_kv)
        h = (_per_frame(self.norm3(x), frames) * (1 + scale2) + shift2).flatten(1, 2).type_as(x)
        f = self.ffn(h)
        return (_f32(x) + (_per_frame(_f32(f), frames) * gate2).flatten(1, 2)).type_as(x)


class CausalWanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig, *, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, **fk)
        self.condition_embedder = ConditionEmbedder(cfg, **fk)
        self.blocks = nn.ModuleList([CausalWanBlock(cfg, **fk) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False, **fk)
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size), **fk)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, cfg.dim, **fk) / cfg.dim**0.5)
        self.rope = Rope3D(cfg)
        self.gradient_checkpointing = False
        self._cuda_graphs = False
        self.attention_backend = DEFAULT_ATTENTION   # see set_attention_backend

    def compile_hot_path(self, *, cuda_graphs: bool = False) -> None:
        """``torch.compile`` each block's two pure halves (norms, modulation, projections, RoPE,
        gates, cross-attention, FFN). Shapes are fixed per block, so they compile once and
        are reused by every layer and block; the KV-cache writes/reads and the attention
        kernel between them stay eager, so block positions and cache slots never cause
        recompiles or re-captures. ``cuda_graphs`` compiles with ``mode="reduce-overhead"``:
        each half is captured once as a CUDA graph (inputs copied into static buffers) and
        replayed, one launch instead of dozens of kernels."""
        kwargs = {"mode": "reduce-overhead"} if cuda_graphs else {}
        for blk in self.blocks:
            blk.pre_attention = torch.compile(blk.pre_attention, **kwargs)
            blk.post_attention = torch.compile(blk.post_attention, **kwargs)
        self._cuda_graphs = cuda_graphs

    def set_attention_backend(self, fn) -> None:
        """Use ``fn`` (q, k, v -> o; impl.model.attention_backends) for every layer's KV-cached
        self-attention. Cross-attention (512 text keys) and masked training forwards keep SDPA."""
        for blk in self.blocks:
            blk.attn1.cached_attention = fn
        self.attention_backend = fn

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def encode_text(self, text: torch.Tensor) -> TextContext:
        """Text-encoder states [B, L, text_dim] or per-group [B, G, L, text_dim] -> cached K/V."""
        if text.dim() == 3:
            text = text[:, None]
        if text.dim() != 4 or text.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"encode_text: expected [B, L, {self.cfg.text_dim}] or [B, G, L, "
                             f"{self.cfg.text_dim}], got {tuple(text.shape)}")
        e = self.condition_embedder.text_embedder(text.to(self.dtype))
        return TextContext([blk.attn2.project_context(e) for blk in self.blocks])

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: TextContext | torch.Tensor, *,
                frame_positions: torch.Tensor | None = None, call: ForwardCall = FullSequence()) -> torch.Tensor:
        """Flow prediction for ``latents`` [B, C, F, h, w] at per-frame ``timesteps`` [B, F], whose
        frames sit at temporal RoPE positions ``frame_positions`` [F] (default 0..F-1).

        ``call`` says what self-attention runs over. Streaming: ``CachedBlock(cache, plan)``,
        one whole block against the KV cache; with its ``sp`` exchange (sequence-parallel
        inference) every rank passes the whole block, runs the layers on its token shard against
        its head-split cache, and gets the whole prediction back. Full sequence (the default,
        unmasked): ``FullSequence(core)`` with an attention core (FlexAttention, Ulysses SP) or
        ``FullSequence.masked(mask)`` with a boolean mask [S, S] (True = attend).
        """
        b, c, f, lh, lw = latents.shape
        pt, ph, pw = self.cfg.patch_size
        gh, gw = lh // ph, lw // pw
        if c != self.cfg.in_channels or lh % ph or lw % pw:
            raise ValueError(f"latents: expected [B, {self.cfg.in_channels}, F, h, w] with h, w divisible by "
                             f"the patch, got {tuple(latents.shape)}")
        if timesteps.shape != (b, f):
            raise ValueError(f"timesteps: expected shape {(b, f)} (one per latent frame), got {tuple(timesteps.shape)}")
        sp = call.sp if isinstance(call, CachedBlock) else None
        if isinstance(call, CachedBlock) and f * gh * gw != call.cache.tokens_per_block:
            raise ValueError(f"KV-cache forward takes one whole block of {call.cache.tokens_per_block} tokens, "
                             f"got {f * gh * gw}")
        if frame_positions is None:
            frame_positions = torch.arange(f)
        if not isinstance(context, TextContext):
            context = self.encode_text(context)

        if self._cuda_graphs:
            # A new forward: outputs of the previous replays are dead (cudagraph trees may reuse them).
            torch.compiler.cudagraph_mark_step_begin()
        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2)   # [B, S, C]
        temb, temb6 = self.condition_embedder.time(timesteps)
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.rope.tables(frame_positions, (gh, gw), table_dtype, x.device)
        if sp is not None:  # the patch embedding is cheap: every rank embeds the block, keeps its shard
            x, temb, temb6, cos, sin, context = sp.shard(x, temb, temb6, cos, sin, context, gh * gw)

        for i, block in enumerate(self.blocks):
            args = (x, temb6, context.kv[i], cos, sin)
            kwargs = dict(call=call, layer=i)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False, **kwargs)
            else:
                x = block(*args, **kwargs)

        shift, scale = (_f32(self.scale_shift_table)[None] + _f32(temb)[:, :, None]).unbind(2)  # [B, F, C]
        x = (_per_frame(self.norm_out(x), temb.shape[1]) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)
        x = self.proj_out(x.to(self.dtype))
        if sp is not None:
            x = sp.gather(x)
        x = x.reshape(b, f, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
