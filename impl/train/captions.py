"""Multi-shot captions: the sidecar files next to a video, and one prompt per AR block.

Every video has exactly one caption sidecar of the same stem::

    clip_a.txt    # whole file = one caption for the whole video
    clip_b.json   # {"caption": "..."}
    clip_c.json   # {"shots": [{"start_frame": 0, "caption": "..."},
                  #            {"start_frame": 57, "caption": "..."}]}

``start_frame`` is a raw frame index of the source video; the first shot starts at 0 and the
starts increase strictly. A scene cut changes the caption, so every AR block gets its own
prompt: the caption of the shot that contains the block's *first* raw frame
(:func:`block_prompts_for_shots`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from impl.config import ConfigError
from impl.train.clip_geometry import latent_to_raw_frame
from impl.train.data_util import DatasetError

__all__ = ["Shot", "check_shots", "parse_caption_sidecar", "video_sidecar_shots", "write_caption_sidecar",
           "block_prompts_for_shots", "shots_from_block_prompts"]


@dataclass(frozen=True)
class Shot:
    """One shot of a multi-shot caption: from raw frame ``start_frame`` to the next shot."""

    start_frame: int
    caption: str


def check_shots(shots: Sequence[Shot], where: str) -> None:
    """DatasetError (prefixed ``where``) unless the shots are non-empty, captioned, start at 0
    and increase strictly."""
    if len(shots) == 0:
        raise DatasetError(f"{where}: needs at least one shot")
    for k, shot in enumerate(shots):
        if not isinstance(shot.caption, str) or not shot.caption.strip():
            raise DatasetError(f"{where}: shot {k} has an empty caption")
        if (not isinstance(shot.start_frame, (int, np.integer)) or isinstance(shot.start_frame, bool)
                or shot.start_frame < 0):
            raise DatasetError(f"{where}: shot {k} start_frame must be a non-negative integer, "
                               f"got {shot.start_frame!r}")
    if shots[0].start_frame != 0:
        raise DatasetError(f"{where}: the first shot must start at frame 0, got {shots[0].start_frame}")
    for k in range(1, len(shots)):
        if shots[k].start_frame <= shots[k - 1].start_frame:
            raise DatasetError(f"{where}: shot start_frame values must increase strictly, got "
                               f"{shots[k - 1].start_frame} then {shots[k].start_frame} (shot {k})")


def parse_caption_sidecar(path: str | Path) -> list[Shot]:
    """Read a ``.txt`` (one caption) or ``.json`` (``caption`` or ``shots``) sidecar as shots."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read caption sidecar: {exc}") from exc
    if path.suffix == ".txt":
        if not text.strip():
            raise DatasetError(f"{path}: empty caption")
        return [Shot(0, text.strip())]
    if path.suffix != ".json":
        raise DatasetError(f"{path}: caption sidecar must be .txt or .json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'caption' or 'shots', "
                           f"got {type(data).__name__}")
    has_caption, has_shots = "caption" in data, "shots" in data
    if has_caption == has_shots:
        raise DatasetError(f"{path}: needs exactly one of the keys 'caption' (one caption) or 'shots' "
                           f"(list of {{'start_frame', 'caption'}}), got keys {sorted(data)}")
    if has_caption:
        caption = data["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetError(f"{path}: 'caption' must be a non-empty string, got {caption!r}")
        return [Shot(0, caption.strip())]
    raw_shots = data["shots"]
    if not isinstance(raw_shots, list) or not raw_shots:
        raise DatasetError(f"{path}: 'shots' must be a non-empty list, got {raw_shots!r}")
    shots = []
    for k, item in enumerate(raw_shots):
        if not isinstance(item, dict) or "start_frame" not in item or "caption" not in item:
            raise DatasetError(f"{path}: shots[{k}] must be an object with 'start_frame' and 'caption', "
                               f"got {item!r}")
        start, caption = item["start_frame"], item["caption"]
        if not isinstance(start, int) or isinstance(start, bool):
            raise DatasetError(f"{path}: shots[{k}].start_frame must be an integer raw frame index, "
                               f"got {start!r}")
        if not isinstance(caption, str):
            raise DatasetError(f"{path}: shots[{k}].caption must be a string, got {caption!r}")
        shots.append(Shot(start, caption.strip()))
    check_shots(shots, str(path))
    return shots


def video_sidecar_shots(video: Path) -> list[Shot]:
    """The shots of ``video``'s one sidecar (``<stem>.txt`` or ``<stem>.json``, not both)."""
    txt, js = video.with_suffix(".txt"), video.with_suffix(".json")
    if txt.is_file() and js.is_file():
        raise DatasetError(f"{video}: has both {txt.name} and {js.name}; keep one caption sidecar")
    if not txt.is_file() and not js.is_file():
        raise DatasetError(f"{video}: missing caption sidecar {txt.name} or {js.name}")
    return parse_caption_sidecar(js if js.is_file() else txt)


def write_caption_sidecar(root: Path, key: str, shots: Sequence[Shot]) -> Path:
    """Write ``root/<key>.json`` atomically: ``{"caption": ...}`` for one shot, else
    ``{"shots": [...]}``."""
    if len(shots) == 1:
        meta: dict[str, Any] = {"caption": shots[0].caption}
    else:
        meta = {"shots": [{"start_frame": int(s.start_frame), "caption": s.caption} for s in shots]}
    sidecar = root / f"{key}.json"
    tmp = sidecar.with_name(f".{key}.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(sidecar)
    return sidecar


def block_prompts_for_shots(shots: Sequence[Shot], num_latent_frames: int, frames_per_block: int,
                            clip_start: int = 0, temporal_factor: int = 4) -> list[str]:
    """Per-block prompts of a clip starting at raw frame ``clip_start`` of a shot-annotated video.

    Block ``j``'s prompt is the caption of the shot containing raw frame
    ``clip_start + latent_to_raw_frame(j * frames_per_block)`` (the block's first raw frame).
    """
    check_shots(shots, "shots")
    if num_latent_frames % frames_per_block:
        raise ConfigError(f"num_latent_frames: must be a multiple of frames_per_block="
                          f"{frames_per_block}, got {num_latent_frames}")
    starts = [s.start_frame for s in shots]
    prompts = []
    for j in range(num_latent_frames // frames_per_block):
        raw = clip_start + latent_to_raw_frame(j * frames_per_block, temporal_factor)
        k = int(np.searchsorted(starts, raw, side="right")) - 1
        prompts.append(shots[k].caption)
    return prompts


def shots_from_block_prompts(prompts: Sequence[str], frames_per_block: int,
                             temporal_factor: int) -> list[Shot]:
    """Inverse of :func:`block_prompts_for_shots` for a clip starting at 0: a new shot at each
    block whose prompt differs from the previous block's."""
    shots: list[Shot] = []
    for j, prompt in enumerate(prompts):
        if not shots or shots[-1].caption != prompt:
            shots.append(Shot(latent_to_raw_frame(j * frames_per_block, temporal_factor), prompt))
    return shots
