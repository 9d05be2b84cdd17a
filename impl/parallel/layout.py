"""Where the tokens of a teacher-forcing sequence live under sequence parallelism.

Teacher forcing trains on the sequence [clean copy of frames 0..F-1 ; noisy copy of the same
frames]. A layout says which (copy, frame) pairs each SP rank holds, in its local token order.
After the Ulysses exchange every rank attends the concatenation of all ranks' local lists
(rank-major), so the attention mask is written over that order:

- ``balanced`` (LongLive-2.0's Balanced SP): rank r holds the clean AND the noisy copy of the
  same contiguous chunk of F/sp frames. Every rank does identical work, encodes only its
  own frames with the VAE and keeps its own loss frames; the mask decodes the interleaved
  order [r0 clean, r0 noisy, r1 clean, ...] directly (the "natural" mask).
- ``naive``: the [clean ; noisy] sequence is cut into sp contiguous parts, so the first ranks
  hold clean tokens only and the last ranks noisy tokens only; latents and targets must be
  shipped to the rank that holds their copy.

With sp = 1 both are the plain [clean ; noisy] layout. The visibility rule is the same in
every layout, evaluated on each token's (copy, block): a clean query in block b sees clean
keys of blocks <= b; a noisy query in block b sees clean keys of blocks < b and noisy keys
of block b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impl.modes import SPLayout, choices
from impl.parallel.groups import ParallelConfigError

CLEAN, NOISY = 0, 1


@dataclass(frozen=True)
class TeacherForcingLayout:
    num_frames: int          # latent frames F of the clip
    frames_per_block: int    # latent frames per AR block
    sp_size: int = 1
    kind: SPLayout = "balanced"

    def __post_init__(self) -> None:
        f, fpb, sp = self.num_frames, self.frames_per_block, self.sp_size
        if self.kind not in choices(SPLayout):   # a ParallelConfigError, like the size checks below
            raise ParallelConfigError(f"sp_layout: must be one of {list(choices(SPLayout))}, got {self.kind!r}")
        for name, v in (("num_frames", f), ("frames_per_block", fpb), ("sp_size", sp)):
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name}: must be a positive integer, got {v!r}")
        if f % fpb:
            raise ParallelConfigError(f"frames: {f} latent frames are not whole blocks of {fpb}")
        if self.kind == "balanced" and f % (sp * fpb):
            raise ParallelConfigError(
                f"frames: balanced SP needs the {f} latent frames to split into {sp} chunks of whole "
                f"{fpb}-frame blocks (frames % (sp_size * frames_per_block) == 0)")
        if self.kind == "naive" and (2 * f) % (sp * fpb):
            raise ParallelConfigError(
                f"frames: naive SP needs the 2 x {f} teacher-forcing frames to split into {sp} parts "
                f"of whole {fpb}-frame blocks ((2 * frames) % (sp_size * frames_per_block) == 0)")

    @property
    def num_blocks(self) -> int:
        return self.num_frames // self.frames_per_block

    @property
    def local_len(self) -> int:
        """Frames (of either copy) per rank."""
        return 2 * self.num_frames // self.sp_size

    def rank_frames(self, rank: int) -> list[tuple[int, int]]:
        """(copy, frame) of each local frame of ``rank``, in local token order."""
        if not 0 <= rank < self.sp_size:
            raise ValueError(f"rank must be in [0, {self.sp_size}), got {rank}")
        if self.kind == "balanced":
            n = self.num_frames // self.sp_size
            chunk = range(rank * n, (rank + 1) * n)
            return [(CLEAN, f) for f in chunk] + [(NOISY, f) for f in chunk]
        seq = [(CLEAN, f) for f in range(self.num_frames)] + [(NOISY, f) for f in range(self.num_frames)]
        n = self.local_len
        return seq[rank * n:(rank + 1) * n]

    def needed_frames(self, rank: int) -> list[int]:
        """Sorted frames whose clean latents ``rank`` needs (as input or for its loss targets)."""
        return sorted({f for _, f in self.rank_frames(rank)})

    def global_frames(self) -> list[tuple[int, int]]:
        """(copy, frame) in the token order every rank attends after the Ulysses exchange."""
        return [cf for r in range(self.sp_size) for cf in self.rank_frames(r)]

    def frame_tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(copy, block) of every frame of :meth:`global_frames`, as int tensors [2F]."""
        frames = self.global_frames()
        copy = torch.tensor([c for c, _ in frames], dtype=torch.int32, device=device)
        block = torch.tensor([f // self.frames_per_block for _, f in frames], dtype=torch.int32, device=device)
        return copy, block


def visible(q_copy, q_block, k_copy, k_block):
    """The teacher-forcing rule on (copy, block) of a query and a key (tensors broadcast)."""
    clean_k = k_copy == CLEAN
    return ((q_copy == CLEAN) & clean_k & (k_block <= q_block)) | \
           ((q_copy == NOISY) & ((clean_k & (k_block < q_block)) | (~clean_k & (k_block == q_block))))


def dense_mask(layout: TeacherForcingLayout, tokens_per_frame: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [S, S] mask (True = attend) over the global token order, S = 2 F tokens_per_frame."""
    copy, block = layout.frame_tables(device)
    m = visible(copy[:, None], block[:, None], copy[None, :], block[None, :])
    return m.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def mask_mod(layout: TeacherForcingLayout, tokens_per_frame: int, device: torch.device | str):
    """A FlexAttention ``mask_mod`` for the same rule (per-frame lookup tables on ``device``)."""
    copy, block = layout.frame_tables(device)

    def mod(b, h, q_idx, kv_idx):
        qf, kf = q_idx // tokens_per_frame, kv_idx // tokens_per_frame
        return visible(copy[qf], block[qf], copy[kf], block[kf])

    return mod


def attention_density(layout: TeacherForcingLayout) -> float:
    """Fraction of the dense (2L)^2 score matrix the mask keeps: (1 + 1/n_blocks) / 4."""
    n = layout.num_blocks
    return (1 + 1 / n) / 4
