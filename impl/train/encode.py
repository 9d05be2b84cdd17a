"""Raw clips -> what one SP rank trains on: clean latents of its frames and per-block text.

Only the SP root holds the decoded video (:func:`impl.train.sampler.root_only_loader`):
- balanced SP (and sp 1): :func:`impl.parallel.sp_vae_encode.sp_encode_video`: each rank gets its
  own uint8 raw window and encodes only its chunk plus the causal halo;
- naive SP: the root encodes the whole clip and sends each rank the latents of the frames its
  half-sequence holds (the data movement the naive layout needs).
Block prompts are broadcast from the root; each rank runs the text encoder itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from impl.parallel.groups import ParallelGroups
from impl.parallel.layout import TeacherForcingLayout
from impl.parallel.sp_vae_encode import DEFAULT_HALO, encode_video_exact, frames_uint8_to_float, sp_encode_video
from impl.train.samples import VideoClip


class ClipEncoder:
    def __init__(self, vae, text_encoder, halo: int = DEFAULT_HALO):
        self.vae, self.text_encoder, self.halo = vae, text_encoder, halo

    def _broadcast(self, obj, groups: ParallelGroups):
        if groups.sp_group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=groups.sp_root_global_rank, group=groups.sp_group)
        return box[0]

    def encode(self, items: list[VideoClip | None], layout: TeacherForcingLayout,
               groups: ParallelGroups) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """-> (x0 [B, C, n, h, w] of ``frames``, frames, text [B, n_blocks, L, D])."""
        root = groups.is_sp_root
        if root:
            for clip in items:
                if not isinstance(clip, VideoClip):
                    raise TypeError(f"ClipEncoder: expected VideoClip items on the SP root, got {type(clip).__name__}")
                if clip.num_blocks != layout.num_blocks:
                    raise ValueError(f"clip {clip.key!r} has {clip.num_blocks} block prompts, the layout "
                                     f"trains on {layout.num_blocks} blocks")
        prompts = self._broadcast([c.block_prompts for c in items] if root else None, groups)
        video = torch.stack([c.frames for c in items]) if root else None      # uint8 [B, T, H, W, 3]
        frames = layout.needed_frames(groups.sp_rank)
        if layout.kind == "balanced" or groups.sp_group is None:
            x0 = sp_encode_video(self.vae, video, groups, layout.num_frames, self.halo)
            if groups.sp_group is None:
                frames = list(range(layout.num_frames))
        else:
            x0 = self._naive_scatter(video, layout, groups)
        text = torch.stack([self.text_encoder(p) for p in prompts])            # [B, n_blocks, L, D]
        return x0, frames, text

    def _naive_scatter(self, video, layout: TeacherForcingLayout, groups: ParallelGroups) -> torch.Tensor:
        p = next(self.vae.parameters())
        group = groups.sp_group
        if groups.is_sp_root:
            full = encode_video_exact(self.vae, frames_uint8_to_float(video, p.dtype, p.device))
            shape = tuple(full.shape)
        else:
            shape = None
        shape = self._broadcast(shape, groups)
        comm_dev = p.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        if groups.is_sp_root:
            pending = []
            for r in range(1, groups.sp_size):
                part = full[:, :, layout.needed_frames(r)].to(comm_dev).contiguous()
                pending.append((dist.isend(part, dst=dist.get_global_rank(group, r), group=group), part))
            for work, _ in pending:
                work.wait()
            return full[:, :, layout.needed_frames(0)]
        need = layout.needed_frames(groups.sp_rank)
        buf = torch.empty(shape[0], shape[1], len(need), *shape[3:], dtype=p.dtype, device=comm_dev)
        dist.recv(buf, src=groups.sp_root_global_rank, group=group)
        return buf.to(p.device)
