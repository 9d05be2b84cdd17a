"""Training checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

``<out>/checkpoint_<step:06d>/`` holds ``model.safetensors`` (full-precision master weights,
parameter names of the model), ``optimizer.safetensors`` (AdamW moments), ``ema.safetensors``
(when the EMA is on) and ``trainer.json`` (step, config, layout). A checkpoint is written to a
temporary folder and renamed, so a crash never leaves a half-written one that resume would
pick up; only the newest ``max_checkpoints`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^checkpoint_(\d{6,})$")


@dataclass
class TrainState:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    meta: dict[str, Any]


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(out_dir: str | Path, state: TrainState, max_checkpoints: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint_{state.step:06d}"
    tmp = out / f".tmp_checkpoint_{state.step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_cpu(state.model), tmp / "model.safetensors", metadata={"step": str(state.step)})
    save_file(_cpu(state.optimizer), tmp / "optimizer.safetensors")
    if state.ema is not None:
        save_file(_cpu(state.ema), tmp / "ema.safetensors")
    (tmp / "trainer.json").write_text(json.dumps({"step": state.step, **state.meta}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-max_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_checkpoint(path: str | Path) -> TrainState:
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer.json)")
    meta = json.loads((path / "trainer.json").read_text())
    ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return TrainState(int(meta.pop("step")), load_file(path / "model.safetensors"),
                      load_file(path / "optimizer.safetensors"), ema, meta)
