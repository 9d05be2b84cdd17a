"""The self-attention KV cache: one object for all layers, managed in whole AR blocks.

The cache has ``window_blocks`` slots of ``tokens_per_block`` tokens per layer. Keys are
stored after RoPE at absolute positions, so attention is permutation-invariant over slots:
slot order does not matter, only which blocks are resident. That lets the cache evict by
overwriting a slot in place instead of shifting memory, and lets attention read the
resident slots as one contiguous prefix ``[0, num_valid)`` with no gather or copy.

Residency rules (what block ``b`` attends):
- the first ``sink_blocks`` blocks of the stream (attention sink) are never evicted;
- with ``multi_shot_sink``, the first block of the current shot is pinned; as in the
  reference, the pin moves to a cut block once that block is done (while the cut block is
  generated the previous shot's first block is still held), and the old shot's first block
  then becomes ordinary history;
- the current block (written on every denoising step and on the clean re-cache pass);
- the rest of the window holds the most recent other blocks (evict the oldest).
Calling ``begin_block`` again for the current block reuses its slot (overwrite in place);
asking for an older block or skipping a block is an error. The one way back to older blocks is
:meth:`KVCache.recache_plans` (a prompt switch recomputes every resident block's K/V).

Text K/V for cross-attention is cached per prompt in ``text_contexts``.

Storage is BF16 (or the model dtype) or NVFP4 (``storage="nvfp4"``): each block is quantized
per (token, head) in 16-element groups along head_dim, with one float32 tensor scale per
(layer, batch element, slot) for K and for V: 4.5 bits per element, 0.28x of BF16. Keys are
quantized as they are (no smoothing that would shift attention logits). Attention reads a
BF16 view: the resident history is dequantized into one shared workspace (one layer at a
time), and the current block's own K/V enter it unquantized, as in the release. Only the
committing forward of a block (the clean re-cache pass) quantizes it into storage; the
denoising steps' K/V of the current block are used fresh and never stored.

Sequence-parallel inference (impl/inference/sp.py) gives each rank a cache of
``num_heads / sp`` heads for every token. Two hooks keep its NVFP4 codes bit-identical to the
matching heads of a one-GPU cache: ``amax_reduce`` turns the rank's per-slot amax into the max
over all ranks (the tensor scale one GPU computes over all heads), and :meth:`KVCache.write`
accepts K/V that arrive already quantized (``codes``) and stores them without re-quantizing.

FP8 storage (``storage="fp8"``, :class:`FP8Store`) keeps e4m3 codes that FP8 attention
kernels (FlashAttention-3's FP8 forward) read as they are, so a forward quantizes only its own
block and Q: 0.5x of BF16. Its scale is one float32 per (layer, batch element, head) for K and
for V, shared by every slot (sink, pinned and window slots alike, since one attention call
reads them all under one descale): set from the first block written after :meth:`KVCache.reset`
as 448 / (``FP8_KV_HEADROOM`` x that block's amax), so later blocks may grow that much before
they saturate (clamped at +-448; e4m3 keeps its 3-bit relative precision over the whole range
below). Every forward writes its block (denoising steps too, as BF16 storage does), so the
current block attends itself in FP8 as well; re-cache and prompt switches rewrite slots under
the same scales.

The constructor picks the storage once: a :class:`BF16Store`, :class:`FP8Store` or
:class:`NVFP4Store`, all behind the small :class:`KVStore` interface; :class:`KVCache` itself only does the block
bookkeeping and the text-context memo.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from impl import modes
from impl.config import StreamConfig
from impl.memory import tensor_bytes
from impl.model.fp8_scaling import FP8Heads, fp8_scales, to_fp8_saturating
from impl.quant import nvfp4

# FP8 cache: the first block's amax maps to 448 / FP8_KV_HEADROOM, so later blocks may reach
# this many times its largest |K| or |V| before saturating.
FP8_KV_HEADROOM = 4.0

AmaxReduce = Callable[[torch.Tensor], torch.Tensor]
KVCodes = tuple[nvfp4.NVFP4Tensor, nvfp4.NVFP4Tensor]   # a block's K and V, already quantized


def kv_amax(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per batch element max |K| and max |V| of a block [B, H, T, D]: float32 [2, B]."""
    return torch.stack([x.detach().abs().amax(dim=(1, 2, 3)).float() for x in (k, v)])


def quantize_kv(x: torch.Tensor, amax: torch.Tensor, rule: str) -> nvfp4.NVFP4Tensor:
    """NVFP4 of a block [B, H, T, D] under per batch element ``amax`` [B]: 16-element groups
    per (token, head) along head_dim, one tensor scale per batch element. Each group depends
    only on its own values and the tensor scale, so any token or head subset quantizes to the
    same codes as the whole block under the same amax."""
    return nvfp4.quantize(x, rule, amax=amax.reshape(-1, 1, 1, 1))


@dataclass(frozen=True)
class BlockPlan:
    """Where the block being computed writes, and how many slots attention reads."""

    block: int
    slot: int
    num_valid: int
    tokens_per_block: int
    commit: bool = True    # store this forward's K/V for later blocks (False: attention only)

    def attention_only(self) -> "BlockPlan":
        """The same plan for a forward whose K/V later blocks never see (a denoising step)."""
        return replace(self, commit=False)

    @property
    def write_range(self) -> tuple[int, int]:
        return self.slot * self.tokens_per_block, (self.slot + 1) * self.tokens_per_block

    @property
    def attend_len(self) -> int:
        return self.num_valid * self.tokens_per_block


# ---- storage ----

class KVStore(Protocol):
    """K/V of every layer in ``num_slots`` block slots: shape [L, B, H, slots * tpb, D]."""

    k: torch.Tensor | NVFP4Slots   # stored keys (the storage's own layout)
    v: torch.Tensor | NVFP4Slots

    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor,
              codes: KVCodes | None = None) -> None:
        """Take a block's K/V [B, H, tpb, D] for ``layer``; the next :meth:`read` sees them. Later
        blocks see them only if ``plan.commit`` (BF16 keeps every write, which is equivalent:
        a block's last forward is the committing one)."""

    def read(self, layer: int, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Every resident block's K/V for ``layer``: [B, H, plan.attend_len, D]."""

    def reset(self) -> None:
        """A new video starts (the FP8 store forgets its scales)."""

    @property
    def nbytes(self) -> int:
        """Bytes of persistent K/V storage."""

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of transient buffers that reads go through."""

    @property
    def slot_bytes(self) -> int:
        """Bytes of one block slot of K (or V) in one layer for one batch element."""


class BF16Store:
    """Plain tensors in the model dtype; reads are views (no copy)."""

    def __init__(self, shape: tuple[int, ...], tokens_per_block: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens_per_block = tokens_per_block

    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor,
              codes: KVCodes | None = None) -> None:
        # Every write lands in the slot, committing or not: the next read sees this block's K/V.
        if codes is not None:
            raise ValueError("KVCache.write: pre-quantized K/V (codes) need storage='nvfp4'")
        lo, hi = plan.write_range
        self.k[layer, :, :, lo:hi] = k
        self.v[layer, :, :, lo:hi] = v

    def read(self, layer: int, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        n = plan.attend_len
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def reset(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.k, self.v))

    @property
    def workspace_nbytes(self) -> int:
        return 0

    @property
    def slot_bytes(self) -> int:
        return self.tokens_per_block * self.k.shape[2] * self.k.shape[4] * self.k.element_size()


class FP8Store:
    """e4m3 codes [L, B, H, S, D] for K and V, one scale per (layer, batch element, head);
    reads are :class:`FP8Heads` views (no copy, no dequantization)."""

    def __init__(self, shape: tuple[int, ...], tokens_per_block: int, device: torch.device | str):
        L, B, H = shape[:3]
        self.k = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
        self.v = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
        # Quantization scales 448 / (headroom amax), [L, 2 (K, V), B, H, 1, 1].
        self.scales = torch.ones((L, 2, B, H, 1, 1), dtype=torch.float32, device=device)
        self.tokens_per_block = tokens_per_block
        self._scaled = [False] * L     # host-side: has this layer's scale been set since reset()

    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor,
              codes: KVCodes | None = None) -> None:
        if codes is not None:
            raise ValueError("KVCache.write: pre-quantized K/V (codes) need storage='nvfp4'")
        if not self._scaled[layer]:
            for i, x in enumerate((k, v)):   # 448 / (headroom x amax); the division by 4 is exact
                self.scales[layer, i] = fp8_scales(x) / FP8_KV_HEADROOM
            self._scaled[layer] = True
        lo, hi = plan.write_range
        self.k[layer, :, :, lo:hi] = to_fp8_saturating(k, self.scales[layer, 0])
        self.v[layer, :, :, lo:hi] = to_fp8_saturating(v, self.scales[layer, 1])

    def read(self, layer: int, plan: BlockPlan) -> tuple[FP8Heads, FP8Heads]:
        n = plan.attend_len
        return (FP8Heads(self.k[layer, :, :, :n], self.scales[layer, 0]),
                FP8Heads(self.v[layer, :, :, :n], self.scales[layer, 1]))

    def reset(self) -> None:
        self._scaled = [False] * len(self._scaled)

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.k, self.v, self.scales))

    @property
    def workspace_nbytes(self) -> int:
        return 0

    @property
    def slot_bytes(self) -> int:
        return self.tokens_per_block * self.k.shape[2] * self.k.shape[4]


class NVFP4Slots:
    """NVFP4 storage of K or V for all layers: packed values, E4M3 scales, per-slot fp32 scale."""

    def __init__(self, shape: tuple[int, ...], num_slots: int, device: torch.device | str):
        L, B, H, S, D = shape
        if D % nvfp4.GROUP:
            raise nvfp4.QuantFormatError(f"KVCache: NVFP4 storage needs head_dim divisible by {nvfp4.GROUP}, got {D}")
        self.packed = torch.zeros((L, B, H, S, D // 2), dtype=torch.uint8, device=device)
        self.scales = torch.zeros((L, B, H, S, D // nvfp4.GROUP), dtype=torch.float8_e4m3fn, device=device)
        self.global_scale = torch.zeros((L, B, num_slots), dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.packed, self.scales, self.global_scale))

    def put(self, layer: int, slot: int, lo: int, hi: int, q: nvfp4.NVFP4Tensor) -> None:
        """Copy a quantized block (per batch element tensor scale) into its slot."""
        self.packed[layer, :, :, lo:hi] = q.packed
        self.scales[layer, :, :, lo:hi] = q.scales
        self.global_scale[layer, :, slot] = q.global_scale.reshape(-1)

    def load(self, layer: int, n: int, tokens_per_block: int, out: torch.Tensor) -> None:
        """Dequantize tokens [0, n) of ``layer`` into ``out`` [B, H, n, D]."""
        nvfp4.dequantize_kv(out, self.packed[layer, :, :, :n], self.scales[layer, :, :, :n],
                            self.global_scale[layer], tokens_per_block)


class NVFP4Store:
    """NVFP4 history (``k``, ``v``: :class:`NVFP4Slots`) read through one shared BF16 workspace.

    Only a committing write quantizes (under the per-slot amax, reduced over the SP group by
    ``amax_reduce`` if given); every write keeps the block's fresh K/V, which the next read puts
    unquantized into the workspace over the block's own slot."""

    def __init__(self, shape: tuple[int, ...], num_slots: int, tokens_per_block: int, dtype: torch.dtype,
                 device: torch.device | str, rule: str, amax_reduce: AmaxReduce | None = None):
        self.k = NVFP4Slots(shape, num_slots, device)
        self.v = NVFP4Slots(shape, num_slots, device)
        self.tokens_per_block, self.rule, self.amax_reduce = tokens_per_block, rule, amax_reduce
        # One layer's dequantized window, shared by all layers (transient by design).
        self._work = {name: torch.zeros(shape[1:], dtype=dtype, device=device) for name in ("k", "v")}
        self._fresh: dict[str, torch.Tensor] = {}

    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor,
              codes: KVCodes | None = None) -> None:
        self._fresh = {"k": k, "v": v}
        if not plan.commit:
            return
        if codes is None:
            amax = kv_amax(k, v)
            if self.amax_reduce is not None:
                amax = self.amax_reduce(amax)
            codes = (quantize_kv(k, amax[0], self.rule), quantize_kv(v, amax[1], self.rule))
        lo, hi = plan.write_range
        self.k.put(layer, plan.slot, lo, hi, codes[0])
        self.v.put(layer, plan.slot, lo, hi, codes[1])

    def reset(self) -> None:
        self._fresh = {}

    def read(self, layer: int, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._fresh:
            raise RuntimeError("KVCache.read: NVFP4 storage needs write() of the current block first")
        n = plan.attend_len
        lo, hi = plan.write_range
        out = []
        for name, slots in (("k", self.k), ("v", self.v)):
            work = self._work[name][:, :, :n]
            slots.load(layer, n, self.tokens_per_block, work)
            work[:, :, lo:hi] = self._fresh[name]
            out.append(work)
        self._fresh = {}
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def workspace_nbytes(self) -> int:
        return tensor_bytes(self._work.values())

    @property
    def slot_bytes(self) -> int:
        _, _, heads, _, half_d = self.k.packed.shape
        return self.tokens_per_block * heads * (half_d + self.k.scales.shape[4]) + 4


# ---- the cache ----

class KVCache:
    """Block-slotted K/V storage for every layer, plus a per-prompt text-K/V memo."""

    def __init__(self, *, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 tokens_per_block: int, stream: StreamConfig, dtype: torch.dtype,
                 device: torch.device | str, max_text_contexts: int = 8,
                 storage: str = "bf16", kv_rule: str = "mse", amax_reduce: AmaxReduce | None = None):
        modes.check_choice(storage, modes.KVStorage, "kv_cache")
        modes.check_choice(kv_rule, modes.ScaleRule, "kv_rule")
        self.storage, self.kv_rule = storage, kv_rule
        self.batch, self.dtype = batch, dtype
        self.num_slots = stream.window_blocks
        self.tokens_per_block = tokens_per_block
        self.sink_blocks = stream.sink_blocks
        # Pinning needs a non-empty sink: the pin length is the sink length (reference semantics).
        self.pin_shots = stream.multi_shot_sink and stream.sink_blocks > 0
        shape = (num_layers, batch, num_heads, self.num_slots * tokens_per_block, head_dim)
        self.store: KVStore
        if storage == "bf16":
            self.store = BF16Store(shape, tokens_per_block, dtype, device)
        elif storage == "fp8":
            self.store = FP8Store(shape, tokens_per_block, device)
        else:   # amax_reduce: amax [2, B] -> the SP group's max (NVFP4 only)
            self.store = NVFP4Store(shape, self.num_slots, tokens_per_block, dtype, device, kv_rule, amax_reduce)
        self.text_contexts: OrderedDict[object, object] = OrderedDict()
        self.max_text_contexts = max_text_contexts
        self.reset()

    @property
    def k(self) -> torch.Tensor | NVFP4Slots:
        """Stored keys of every layer: a tensor (BF16 storage) or :class:`NVFP4Slots`."""
        return self.store.k

    @property
    def v(self) -> torch.Tensor | NVFP4Slots:
        """Stored values of every layer, as :attr:`k`."""
        return self.store.v

    def reset(self) -> None:
        """Start a new video: forget resident blocks, pins and text contexts (no reallocation)."""
        self.slot_block: list[int] = [-1] * self.num_slots
        self.current_block = -1
        self.pinned_block: int | None = None
        self.text_contexts.clear()
        self.store.reset()

    # ---- block bookkeeping (host-side ints: no device syncs) ----
    @property
    def num_valid(self) -> int:
        return sum(b >= 0 for b in self.slot_block)

    def resident_blocks(self) -> list[int]:
        return sorted(b for b in self.slot_block if b >= 0)

    def begin_block(self, block: int, *, shot_start: bool = False) -> BlockPlan:
        """Plan a forward over ``block``: a new block takes a slot, the current one reuses it."""
        if block == self.current_block:
            slot = self.slot_block.index(block)
        elif block == self.current_block + 1:
            slot = self._free_or_evict()
            self.slot_block[slot] = block
            self.current_block = block
            if shot_start and self.pin_shots and block >= self.sink_blocks:
                self.pinned_block = block
        else:
            raise ValueError(f"KVCache.begin_block: block {block} is not the current block "
                             f"({self.current_block}) or the next one; call reset() for a new video")
        return BlockPlan(block, slot, self.num_valid, self.tokens_per_block)

    def recache_plans(self) -> list[BlockPlan]:
        """Plans that recompute every resident block's K/V, oldest first (the KV re-cache of a
        prompt switch, impl/session.py).

        The i-th oldest resident block is moved to slot i and its plan reads slots [0, i]: the
        blocks re-cached before it and itself (block-causal over the window). No data moves:
        attention does not depend on slot order, and the caller must rewrite every returned
        slot before anything reads the cache again. Resident blocks, the current block and the
        shot pin are unchanged."""
        blocks = self.resident_blocks()
        self.slot_block = blocks + [-1] * (self.num_slots - len(blocks))
        return [BlockPlan(b, i, i + 1, self.tokens_per_block) for i, b in enumerate(blocks)]

    def _free_or_evict(self) -> int:
        if -1 in self.slot_block:
            return self.slot_block.index(-1)
        protected = set(range(self.sink_blocks)) | {self.current_block}
        if self.pinned_block is not None:
            protected.add(self.pinned_block)
        candidates = [(b, s) for s, b in enumerate(self.slot_block) if b not in protected]
        # Config validation guarantees a candidate: window >= sink + pin + current + 1.
        return min(candidates)[1]

    # ---- data path ----
    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor,
              codes: KVCodes | None = None) -> None:
        """Store a block's K/V ([B, H, tokens_per_block, D]) into its slot for ``layer``.

        ``codes`` (NVFP4 storage only): the same K/V already quantized by :func:`quantize_kv`
        (the SP exchange sends them packed); a committing write stores them as they are."""
        self.store.write(layer, plan, k, v, codes)

    def read(self, layer: int, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor] | tuple[FP8Heads, FP8Heads]:
        """Every resident block's K/V for ``layer``: [B, H, num_valid*tpb, D].

        BF16 storage returns views (no copy); FP8 storage returns :class:`FP8Heads` views of its
        codes with their scales (the attention backend dequantizes if it must); NVFP4 storage dequantizes the history into the
        shared workspace and puts the current block's fresh K/V (from :meth:`write`) in place.
        """
        return self.store.read(layer, plan)

    def text_context(self, key: object, build: Callable[[], object]) -> object:
        """Memoised cross-attention K/V for a prompt; ``build`` runs once per key."""
        if key in self.text_contexts:
            self.text_contexts.move_to_end(key)
            return self.text_contexts[key]
        ctx = build()
        self.text_contexts[key] = ctx
        if len(self.text_contexts) > self.max_text_contexts:
            self.text_contexts.popitem(last=False)
        return ctx

    def memory_bytes(self) -> int:
        """Bytes of persistent K/V storage (NVFP4: packed values, block scales, tensor scales)."""
        return self.store.nbytes

    def workspace_bytes(self) -> int:
        """Bytes of the transient dequantization workspace (0 for BF16 storage)."""
        return self.store.workspace_nbytes

    def slot_bytes(self) -> int:
        """Bytes of one block slot of K (or V) in one layer for one batch element."""
        return self.store.slot_bytes
