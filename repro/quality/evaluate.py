"""Generate evaluation videos with a proxy model variant and score them without downloaded weights.

The evaluation set is a fixed list of procedural multi-shot prompt sequences (one prompt per AR
block, scene cuts included) with their attributes, the procedural ground-truth video of each,
and one noise seed per video, so every variant sees the same prompts and the same noise.

Scores (all "higher is better" except the distances ``q_fd``/``q_kid``):
- prompt adherence per block, read by the harness-trained detector: object colour, shape and
  background colour (the block's mean class probabilities against the prompt), and motion (the
  detected centre's least-squares velocity over the block lies along the prompt's axis and
  exceeds ``MIN_SPEED``; in the first block of a shot it must also point the prompt's way, as
  later blocks may have bounced);
- temporal flickering and motion smoothness (pixel-space, VBench-style) per block;
- distribution distance: Frechet and kernel (KID) distances between per-block features of the
  generated videos and of real procedural videos, on the detector's embedding (block feature =
  mean frame embedding plus mean absolute change of the embedding between frames);
- multi-shot: consistency (the detected colour and shape stay the same from block to block
  inside a shot), adherence on the blocks that open a new shot (``q_cut_adherence``) and on the
  first two blocks of each new shot (``q_switch_adherence``: how soon a prompt switch takes
  effect), and continuity across a shot boundary (``q_switch_continuity``: PSNR between the
  last frame before it and the first after; a hard cut is low, a continuous switch high);
- fidelity to a reference variant from the same noise: PSNR and SSIM;
- drift: the per-block curves of these scores (``series``) and the change of adherence from
  the first to the last third of the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from impl.train.clip_geometry import latent_to_raw_frame
from impl.train.procedural import BACKGROUND_COLORS, DIRECTIONS, OBJECT_COLORS, SHAPES, caption_attributes
from repro.quality import metrics as M

__all__ = ["EvalSet", "make_eval_set", "block_frame_ranges", "generate_videos", "score_videos", "MIN_SPEED"]

# Frame fractions per raw frame; a third of the slowest procedural object.
MIN_SPEED = 0.004


@dataclass
class EvalSet:
    prompts: list[list[str]]                 # [video][block]
    attributes: list[list[dict[str, str]]]   # [video][block]
    shot: list[list[int]]                    # [video][block] shot index
    real: list[torch.Tensor]                 # [video] uint8 [T, H, W, 3] procedural ground truth
    seeds: list[int]                         # [video] noise seed
    frames_per_block: int
    temporal_factor: int

    @property
    def num_blocks(self) -> int:
        return len(self.prompts[0])


def make_eval_set(source, seed_base: int = 1000) -> EvalSet:
    """Every item of a :class:`~impl.train.procedural.ProceduralVideoSource` as an evaluation video."""
    prompts, attrs, shots, real = [], [], [], []
    for i in range(len(source)):
        p = source.block_prompts(i)
        prompts.append(p)
        attrs.append([caption_attributes(x) for x in p])
        s, k = [], -1
        for b, x in enumerate(p):
            k += 1 if b == 0 or x.startswith(source.scene_cut_prefix) else 0
            s.append(k)
        shots.append(s)
        real.append(source[i].frames)
    return EvalSet(prompts, attrs, shots, real, [seed_base + i for i in range(len(source))],
                   source.frames_per_block, source.temporal_factor)


def block_frame_ranges(num_blocks: int, frames_per_block: int, temporal_factor: int) -> list[tuple[int, int]]:
    """Raw frame range [a, b) that each AR block decodes to (block 0 is shorter: causal VAE)."""
    return [(latent_to_raw_frame(j * frames_per_block, temporal_factor),
             latent_to_raw_frame((j + 1) * frames_per_block, temporal_factor)) for j in range(num_blocks)]


@torch.no_grad()
def generate_videos(pipe, evalset: EvalSet, shot_switch: str = "cut") -> tuple[list[torch.Tensor], list[float]]:
    """Decoded uint8 videos [T, H, W, 3] of every prompt sequence, and the DiT ms of every block.
    ``shot_switch``: how a block opening a new shot switches prompts (``impl.modes.SwitchMode``)."""
    videos, dit_ms = [], []
    for prompts, seed in zip(evalset.prompts, evalset.seeds):
        res = pipe.generate(prompts, seed=seed, decode=True, shot_switch=shot_switch)
        videos.append(M.to_uint8_video(res.frames))
        dit_ms += [t.dit_ms for t in res.timings]
    return videos, dit_ms


def _slope(t: torch.Tensor, y: torch.Tensor) -> float:
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / tc.pow(2).sum().clamp_min(1e-12))


def _block_feature(f: torch.Tensor) -> torch.Tensor:
    motion = (f[1:] - f[:-1]).abs().mean(0) if f.shape[0] > 1 else torch.zeros_like(f[0])
    return torch.cat([f.mean(0), motion])


@dataclass
class BlockScores:
    color: list[float] = field(default_factory=list)
    shape: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)
    motion: list[float] = field(default_factory=list)
    flicker: list[float] = field(default_factory=list)
    smooth: list[float] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    ident: list[tuple[int, int]] = field(default_factory=list)    # detected (colour, shape)


def _score_video(video: torch.Tensor, attrs: Sequence[dict[str, str]], shots: Sequence[int],
                 ranges: Sequence[tuple[int, int]], detector) -> BlockScores:
    det = detector.detect(video)
    out = BlockScores()
    colors, bgs = list(OBJECT_COLORS), list(BACKGROUND_COLORS)
    for j, (a, b) in enumerate(ranges):
        want = attrs[j]
        c = det.color[a:b].mean(0).argmax().item()
        s = det.shape[a:b].mean(0).argmax().item()
        out.color.append(float(c == colors.index(want["color"])))
        out.shape.append(float(s == SHAPES.index(want["shape"])))
        out.background.append(float(det.background[a:b].mean(0).argmax().item() == bgs.index(want["background"])))
        t = torch.arange(a, b, dtype=torch.float32)
        vx, vy = _slope(t, det.center[a:b, 0]), _slope(t, det.center[a:b, 1])
        dx, dy = DIRECTIONS[want["direction"]]
        along, across = (vx, vy) if dx else (vy, vx)
        ok = abs(along) >= MIN_SPEED and abs(along) > abs(across)
        if j == 0 or shots[j] != shots[j - 1]:
            ok = ok and along * (dx + dy) > 0
        out.motion.append(float(ok))
        clip = video[a:b]
        out.flicker.append(M.temporal_flickering(clip))
        out.smooth.append(M.motion_smoothness(clip) if clip.shape[0] >= 3 else float("nan"))
        out.features.append(_block_feature(det.features[a:b]))
        out.ident.append((c, s))
    return out


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def real_block_features(videos: Sequence[torch.Tensor], ranges, detector) -> torch.Tensor:
    feats = []
    for v in videos:
        f = detector.detect(v).features
        feats += [_block_feature(f[a:b]) for a, b in ranges]
    return torch.stack(feats)


def score_videos(videos: Sequence[torch.Tensor], evalset: EvalSet, detector, real_features: torch.Tensor,
                 reference: Sequence[torch.Tensor] | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(scalar metrics, per-block series) of ``videos`` generated for ``evalset``'s prompts."""
    n_blocks = evalset.num_blocks
    ranges = block_frame_ranges(n_blocks, evalset.frames_per_block, evalset.temporal_factor)
    expect = ranges[-1][1]
    for k, v in enumerate(videos):
        if v.shape[0] != expect:
            raise ValueError(f"video {k}: {v.shape[0]} frames, the evaluation set's {n_blocks} blocks decode to {expect}")
    per = [_score_video(v, evalset.attributes[k], evalset.shot[k], ranges, detector) for k, v in enumerate(videos)]

    def column(name: str) -> list[list[float]]:
        return [getattr(p, name) for p in per]

    def by_block(name: str) -> list[float]:
        return [_mean([row[j] for row in column(name)]) for j in range(n_blocks)]

    adherence = [[(p.color[j] + p.shape[j] + p.background[j] + p.motion[j]) / 4 for j in range(n_blocks)] for p in per]
    series = {name: by_block(name) for name in ("color", "shape", "background", "motion", "flicker", "smooth")}
    series["adherence"] = [_mean([row[j] for row in adherence]) for j in range(n_blocks)]
    flat = lambda rows: [x for row in rows for x in row]   # noqa: E731
    feats = torch.stack([f for p in per for f in p.features])
    third = max(1, n_blocks // 3)
    early = [x for row in adherence for x in row[:third]]
    late = [x for row in adherence for x in row[-third:]]
    consistent, cut_adh, switch_adh, continuity = [], [], [], []
    for k, p in enumerate(per):
        shots = evalset.shot[k]
        for j in range(1, n_blocks):
            if shots[j] == shots[j - 1]:
                consistent.append(float(p.ident[j] == p.ident[j - 1]))
                continue
            cut_adh.append(adherence[k][j])
            switch_adh += [adherence[k][i] for i in range(j, min(j + 2, n_blocks)) if shots[i] == shots[j]]
            last, first = ranges[j - 1][1] - 1, ranges[j][0]
            continuity.append(M.psnr(videos[k][last:last + 1], videos[k][first:first + 1]))
    out = {
        "q_adherence": _mean(flat(adherence)),
        "q_adh_color": _mean(flat(column("color"))),
        "q_adh_shape": _mean(flat(column("shape"))),
        "q_adh_background": _mean(flat(column("background"))),
        "q_adh_motion": _mean(flat(column("motion"))),
        "q_flicker": _mean(flat(column("flicker"))),
        "q_smoothness": _mean(flat(column("smooth"))),
        "q_fd": M.frechet_distance(feats, real_features),
        "q_kid": M.kernel_distance(feats, real_features),
        "q_shot_consistency": _mean(consistent),
        "q_cut_adherence": _mean(cut_adh),
        "q_switch_adherence": _mean(switch_adh),
        "q_switch_continuity": _mean([min(c, 100.0) for c in continuity]),   # identical frames: inf -> 100 dB
        "q_drift_adherence": _mean(late) - _mean(early),
    }
    if reference is not None:
        out["q_psnr_vs_ref"] = _mean([M.psnr(v, r) for v, r in zip(videos, reference)])
        out["q_ssim_vs_ref"] = _mean([M.ssim(v, r) for v, r in zip(videos, reference)])
        series["psnr_vs_ref"] = [_mean([M.psnr(v[a:b], r[a:b]) for v, r in zip(videos, reference)])
                                 for a, b in ranges]
    return out, series


def scores_vs_truth(evalset: EvalSet, detector) -> dict[str, Any]:
    """The detector's own error on the evaluation set's ground-truth videos (the metric's ceiling)."""
    real_features = real_block_features(evalset.real, block_frame_ranges(
        evalset.num_blocks, evalset.frames_per_block, evalset.temporal_factor), detector)
    return score_videos(evalset.real, evalset, detector, real_features)[0]
