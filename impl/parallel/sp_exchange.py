"""The Ulysses exchange of sequence-parallel (SP) streaming inference, and its byte count.

Each of the ``sp`` ranks of an SP group holds a contiguous 1/sp shard of the current block's
tokens (all heads) for every non-attention layer. Self-attention needs every token of the
block for a subset of heads, so per layer:

1. q, k, v [B, H, S/sp, D] -> all-to-all sequence-to-heads -> [B, H/sp, S, D];
2. the rank's head-split KV cache (H/sp heads of every token of the window) is written and
   read, and SDPA runs on those heads;
3. o [B, H/sp, S, D] -> all-to-all heads-to-sequence -> [B, H, S/sp, D].
After the last layer the head output (proj_out) of every shard is all-gathered, so every rank
has the whole prediction and runs the same sampler step.

K and V cross the first all-to-all in one of two forms (``kv_comm``):
- ``plain``: in the model dtype, together with q (one all-to-all of [3B, H, S/sp, D]);
- ``nvfp4``: quantized on the sending side with the NVFP4 cache's format
  (:func:`impl.model.kv_cache.quantize_kv`: 16-element groups per (token, head) along head_dim,
  E4M3 scales, packed E2M1 values) under a tensor scale taken from the max |K|, |V| over the
  whole SP group (one tiny all-reduce), so the codes are exactly those one GPU would store.
  Packed values and scales travel as bytes next to q (still in the model dtype) in one uint8
  all-to-all; the receiver stores them in its NVFP4 cache as they are (committing pass) and
  decodes them for this pass's attention. So under ``nvfp4`` the current block's own K/V
  enter attention NVFP4-rounded on every pass (one GPU uses them unrounded), the only
  numerical difference to one GPU. Per (token, head): D/2 + D/16 bytes instead of 2D (BF16),
  9/32 = 0.28125 of BF16 for K and V.

Bytes are counted per category as what this rank sends to the other ranks of its group:
all-to-all (sp-1)/sp of its buffer, all-gather (sp-1) x its shard, all-reduce its buffer
(the amax is 2B float32 values: negligible, counted anyway). :func:`block_bytes` predicts
them analytically; the tests check measured == predicted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from impl.config import Preset
from impl.model.attention import TextContext
from impl.model.kv_cache import kv_amax, quantize_kv
from impl.parallel.groups import ParallelConfigError
from impl.parallel.ulysses import all_to_all_bytes, heads_to_seq, seq_to_heads
from impl.quant import nvfp4

KV_COMMS = ("plain", "nvfp4")
CATEGORIES = ("q", "kv", "o", "amax", "gather")


def token_range(tokens: int, sp: int, rank: int) -> tuple[int, int]:
    """The contiguous shard [lo, hi) of a block's ``tokens`` that SP rank ``rank`` holds."""
    if tokens % sp:
        raise ParallelConfigError(f"sp_size={sp} does not divide the block's {tokens} tokens")
    n = tokens // sp
    return rank * n, (rank + 1) * n


def shard_context(context: TextContext, tokens: int, sp: int, rank: int) -> TextContext:
    """The prompt groups of a rank's token shard. ``TextContext`` splits the block's queries
    into G equal contiguous groups, so a shard must lie inside one group (G divides sp) or be
    a run of whole groups (sp divides G)."""
    g = context.groups
    lo, hi = token_range(tokens, sp, rank)
    if g == 1:
        return context
    if sp % g == 0:
        first, last = lo * g // tokens, lo * g // tokens + 1
    elif g % sp == 0:
        first, last = lo * g // tokens, hi * g // tokens
    else:
        raise ParallelConfigError(f"sp_size={sp}: the {g} prompt groups of the text context do not align "
                                  f"with the SP token shards (G must divide sp_size or sp_size divide G)")
    return TextContext([(k[:, first:last], v[:, first:last]) for k, v in context.kv])


def shard_frames(t: torch.Tensor, tokens_per_frame: int, lo: int, hi: int) -> torch.Tensor:
    """Per-frame rows t [B, F, ...] re-gridded for tokens [lo, hi): rows of u = gcd(hi - lo,
    tokens_per_frame) tokens each, so a shard that starts or ends inside a frame still sees
    each of its tokens' own frame vector (the model broadcasts rows over equal token runs)."""
    u = math.gcd(hi - lo, tokens_per_frame)
    return t.repeat_interleave(tokens_per_frame // u, dim=1)[:, lo // u:hi // u]


class SPExchange:
    """One rank's side of the SP exchange (implements impl.model.attention.SequenceParallel).

    ``sent`` counts the bytes this rank sent per category (see the module docstring) and
    ``calls`` the collectives; both only grow (read them before and after a block)."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int, *, kv_comm: str = "plain",
                 kv_rule: str = "mse"):
        if kv_comm not in KV_COMMS:
            raise ParallelConfigError(f"kv_comm: must be one of {KV_COMMS}, got {kv_comm!r}")
        if size > 1 and group is None:
            raise ParallelConfigError(f"sp_size={size} needs an SP process group (impl.parallel.groups.build_groups)")
        self.group, self.size, self.rank = group, size, rank
        self.kv_comm, self.kv_rule = kv_comm, kv_rule
        self.sent: Counter[str] = Counter({c: 0 for c in CATEGORIES})
        self.calls: Counter[str] = Counter()

    # ---- what the model calls ----
    def shard(self, x, temb, temb6, cos, sin, context, tokens_per_frame):
        lo, hi = token_range(x.shape[1], self.size, self.rank)
        return (x[:, lo:hi], shard_frames(temb, tokens_per_frame, lo, hi),
                shard_frames(temb6, tokens_per_frame, lo, hi), cos[lo:hi], sin[lo:hi],
                shard_context(context, x.shape[1], self.size, self.rank))

    def to_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, commit: bool):
        if self.kv_comm == "plain":
            if self.size == 1:
                return q, k, v, None
            qkv = self._all_to_all(torch.cat([q, k, v]), {"q": q.numel() * q.element_size(),
                                                          "kv": 2 * k.numel() * k.element_size()})
            q, k, v = qkv.chunk(3)
            return q, k, v, None
        amax = self.reduce_max(kv_amax(k, v))
        kq, vq = quantize_kv(k, amax[0], self.kv_rule), quantize_kv(v, amax[1], self.kv_rule)
        parts = [q.contiguous().view(torch.uint8)]
        for t in (kq, vq):
            parts += [t.packed, t.scales.view(torch.uint8)]
        widths = [p.shape[-1] for p in parts]
        buf = torch.cat(parts, dim=-1)                                    # [B, H, S/sp, bytes]
        kv_bytes = buf.numel() - parts[0].numel()
        recv = self._all_to_all(buf, {"q": parts[0].numel(), "kv": kv_bytes})
        q_b, kp, ks, vp, vs = recv.split(widths, dim=-1)
        q = q_b.contiguous().view(q.dtype)
        codes = tuple(nvfp4.NVFP4Tensor(p.contiguous(), s.contiguous().view(torch.float8_e4m3fn), t.global_scale,
                                        self.kv_rule) for p, s, t in ((kp, ks, kq), (vp, vs, vq)))
        k, v = (_decode(c, q.dtype) for c in codes)
        return q, k, v, codes if commit else None

    def to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return o
        self.calls["all_to_all"] += 1
        self.sent["o"] += all_to_all_bytes(o.numel(), o.element_size(), self.size)
        return heads_to_seq(o, self.group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self.calls["all_gather"] += 1
        self.sent["gather"] += (self.size - 1) * x.numel() * x.element_size()
        return torch.cat(parts, dim=1)

    def reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        if self.size > 1:
            dist.all_reduce(y, op=dist.ReduceOp.MAX, group=self.group)
            self.calls["all_reduce"] += 1
            self.sent["amax"] += y.numel() * y.element_size()
        return y

    # ---- internals ----
    def _all_to_all(self, x: torch.Tensor, payload: dict[str, int]) -> torch.Tensor:
        if self.size == 1:
            return x
        self.calls["all_to_all"] += 1
        for name, nbytes in payload.items():
            self.sent[name] += all_to_all_bytes(nbytes, 1, self.size)
        return seq_to_heads(x, self.group)

    def total_sent(self) -> int:
        return sum(self.sent.values())


def _decode(codes: nvfp4.NVFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V [B, H, T, D] from its codes, decoded exactly as the NVFP4 cache decodes its
    history (so this block reads the same values now and later)."""
    b, h, t, half = codes.packed.shape
    out = torch.empty(b, h, t, 2 * half, dtype=dtype, device=codes.packed.device)
    nvfp4.dequantize_kv(out, codes.packed, codes.scales, codes.global_scale.reshape(b, 1), t)
    return out


# ------------------------------------------------------------------ analytic byte count


@dataclass(frozen=True)
class BlockBytes:
    """Bytes one SP rank sends per AR block, by category (see the module docstring)."""

    q: int
    kv: int
    o: int
    amax: int
    gather: int

    @property
    def total(self) -> int:
        return self.q + self.kv + self.o + self.amax + self.gather

    def as_dict(self) -> dict[str, int]:
        return {"q": self.q, "kv": self.kv, "o": self.o, "amax": self.amax, "gather": self.gather}


def block_bytes(preset: Preset, sp: int, *, element_bytes: int, kv_cache: str = "bf16",
                kv_comm: str = "plain", batch: int = 1) -> BlockBytes:
    """Bytes one rank sends per block: (steps + 1) forwards of ``batch`` (x2 with CFG) over
    the block's S tokens, N layers, H heads of size D, P = out_channels x patch output
    features, e = ``element_bytes`` (model dtype), n = B H S / sp token-heads per rank:

      per forward and layer  q: n D e (sp-1)/sp      o: the same
                             kv: plain 2 n D e (sp-1)/sp, nvfp4 2 n (D/2 + D/16) (sp-1)/sp
                             amax: 2 B x 4 (nvfp4 exchange: every forward; plain exchange
                                   with NVFP4 storage: only the committing forward)
      per forward            gather: (sp-1) B (S/sp) P e
    """
    if kv_comm not in KV_COMMS:
        raise ParallelConfigError(f"kv_comm: must be one of {KV_COMMS}, got {kv_comm!r}")
    if sp == 1:
        return BlockBytes(0, 0, 0, 0, 0)
    dit, stream = preset.dit, preset.stream
    b = batch * (2 if stream.guidance_scale > 1.0 else 1)
    s, heads, d, layers = preset.tokens_per_block, dit.num_heads, dit.head_dim, dit.num_layers
    forwards = stream.steps + 1
    n_other = b * heads * s // sp * (sp - 1) // sp          # token-heads sent to other ranks
    per_layer_q = n_other * d * element_bytes
    per_layer_kv = 2 * n_other * (d // 2 + d // nvfp4.GROUP if kv_comm == "nvfp4" else d * element_bytes)
    amax_forwards = forwards if kv_comm == "nvfp4" else (1 if kv_cache == "nvfp4" else 0)
    out_features = dit.out_channels * math.prod(dit.patch_size)
    return BlockBytes(
        q=forwards * layers * per_layer_q,
        kv=forwards * layers * per_layer_kv,
        o=forwards * layers * per_layer_q,
        amax=amax_forwards * layers * 2 * b * 4,
        gather=forwards * (sp - 1) * b * (s // sp) * out_features * element_bytes,
    )
