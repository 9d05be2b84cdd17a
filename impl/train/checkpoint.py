"""Training checkpoints, written atomically, in one of two formats (``trainer.json``'s ``format``).

``safetensors`` (sharding none; a checkpoint without ``format`` is one): rank 0 writes
``<out>/checkpoint_<step:06d>/`` with ``model.safetensors`` (full-precision master weights,
parameter names of the model), ``optimizer.safetensors`` (AdamW moments), ``ema.safetensors``
(when the EMA is on) and ``trainer.json`` (step, config, layout).

``dcp`` (sharding fsdp): every rank writes its shards of ``{"model", "optimizer", "ema"}``
through ``torch.distributed.checkpoint`` into ``checkpoint_<step>/dcp/``; the metadata keeps
each tensor's global shape, so a run on another world size or SP size loads it resharded.

Either way the checkpoint is written into a temporary folder and renamed once complete
(``trainer.json`` last), so a crash never leaves a half-written checkpoint that resume would
pick up; only the newest ``max_checkpoints`` are kept. :func:`export_dit_weights` turns
either format into one diffusers-layout safetensors file for inference, in one process
(``python -m impl.train.checkpoint export CKPT OUT.safetensors [--ema] [--dtype bf16]``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from impl.errors import error_summary
from impl.io import save_safetensors
from impl.model.checkpoint import CheckpointError

_NAME = re.compile(r"^checkpoint_(\d{6,})$")
SINGLE_FILE = "safetensors"
SHARDED = "dcp"


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
    save_safetensors(tmp / "model.safetensors", _cpu(state.model), {"step": str(state.step)})
    save_safetensors(tmp / "optimizer.safetensors", _cpu(state.optimizer))
    if state.ema is not None:
        save_safetensors(tmp / "ema.safetensors", _cpu(state.ema))
    (tmp / "trainer.json").write_text(json.dumps({"step": state.step, **state.meta}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(out, max_checkpoints)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


class CorruptCheckpoint(CheckpointError):
    """A file of a checkpoint folder is missing, truncated or corrupt; the message names it."""


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CorruptCheckpoint(f"{file}: missing from the checkpoint")
    try:
        return load_file(file)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise CorruptCheckpoint(f"{file}: truncated or corrupt ({error_summary(e)})") from None


def load_checkpoint(path: str | Path) -> TrainState:
    """Read every file of a (sharding none) checkpoint; nothing is returned half-read."""
    path = Path(path)
    meta = checkpoint_meta(path)
    ema = _read_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return TrainState(int(meta.pop("step")), _read_tensors(path / "model.safetensors"),
                      _read_tensors(path / "optimizer.safetensors"), ema, meta)


# ---------------------------------------------------------------- shared by both formats

def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """``trainer.json`` of a checkpoint folder (step, format, config, world layout)."""
    path = Path(path)
    file = path / "trainer.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder (expected OUT/checkpoint_<step>)")
    if not file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (no trainer.json)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{file}: truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CorruptCheckpoint(f"{file}: not a trainer.json (no integer 'step')")
    return meta


def checkpoint_format(meta: dict[str, Any]) -> str:
    return meta.get("format", SINGLE_FILE)


def _prune(out: Path, max_checkpoints: int) -> None:
    for old in list_checkpoints(out)[:-max_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- sharded (DCP)

def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                            max_checkpoints: int) -> Path:
    """Collective: every rank writes its shards of ``state`` (nested dicts of DTensors and
    tensors) into one temporary folder; rank 0 then adds ``trainer.json`` and renames it."""
    out = Path(out_dir)
    final = out / f"checkpoint_{step:06d}"
    tmp = out / f".tmp_checkpoint_{step:06d}_dcp"      # one name for every rank
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)          # a crashed earlier attempt
    _barrier()
    import torch.distributed.checkpoint as dcp
    dcp.save(state, checkpoint_id=tmp / "dcp")
    _barrier()
    if rank0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "format": SHARDED, **meta}, indent=2,
                                                     sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(out, max_checkpoints)
    _barrier()
    return final


def sharded_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Flattened key (``model.<param>``, ``ema.<param>``, ``optimizer.state.<param>.exp_avg``,
    ...) -> global shape of every tensor in a DCP checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(Path(path) / "dcp")).read_metadata()
    except Exception as e:  # noqa: BLE001 - a missing or truncated .metadata file
        raise CorruptCheckpoint(f"{Path(path) / 'dcp' / '.metadata'}: unreadable ({error_summary(e)})") from None
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _check_shapes(path: Path, want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]],
                  section: str) -> None:
    from impl.model.checkpoint import CheckpointError

    want = {k: v for k, v in want.items() if k.startswith(section + ".")}
    have = {k: v for k, v in have.items() if k.startswith(section + ".")}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape (checkpoint vs model)", wrong)) if items]
        raise CheckpointError(f"checkpoint {path}: its {section} tensors do not match this run's model "
                              f"(another preset or num_layers?): " + "; ".join(parts))


def load_sharded_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Collective: load a DCP checkpoint into ``state`` in place (same structure as saved;
    DTensors are resharded to this run's mesh). The ``model`` and ``ema`` sections are checked
    against the checkpoint's metadata first, so a checkpoint of another model is a clear error."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    have = sharded_shapes(path)
    for section in ("model", "ema"):
        if section in state:   # flat name -> tensor dicts: DCP's flattened keys are section.name
            want = {f"{section}.{k}": tuple(v.shape) for k, v in state[section].items()}
            _check_shapes(path, want, have, section)
    try:
        dcp.load(state, checkpoint_id=path / "dcp")
    except Exception as e:  # noqa: BLE001 - DCP wraps reader errors in its own types
        raise CorruptCheckpoint(f"{path / 'dcp'}: cannot read its shards (truncated or corrupt?): "
                                f"{error_summary(e)}") from None


# ---------------------------------------------------------------- export for inference

class WeightsView:
    """A state dict dressed as a module for impl.model.checkpoint.save_dit_weights."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def read_checkpoint_weights(path: str | Path, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full model (or EMA) tensors of a checkpoint of either format, in one process
    (no process group needed: a DCP checkpoint is read with ``no_dist``)."""
    path = Path(path)
    meta = checkpoint_meta(path)
    name = "ema" if ema else "model"
    if checkpoint_format(meta) == SINGLE_FILE:
        f = path / f"{name}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{path}: no {f.name} (the run had no EMA yet: --ema needs a checkpoint written "
                                  f"after ema_start_step)" if ema else f"{path}: no {f.name}")
        return _read_tensors(f)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    import torch.distributed.checkpoint as dcp

    md = FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
    prefix = name + "."
    shapes = {k[len(prefix):]: v for k, v in md.items()
              if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not shapes:
        raise CheckpointError(f"{path}: the checkpoint has no {name} tensors" + (" (no EMA yet)" if ema else ""))
    state = {name: {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in shapes.items()}}
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=True)
    return state[name]


def export_dit_weights(path: str | Path, out: str | Path, *, ema: bool = False,
                       dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint's weights (or EMA) as one diffusers-layout safetensors file that
    ``impl.model.checkpoint.load_dit_weights`` (and so inference) reads; ``dtype`` casts
    (None keeps the master precision)."""
    from impl.model.checkpoint import save_dit_weights

    tensors = read_checkpoint_weights(path, ema=ema)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    step = checkpoint_meta(path)["step"]
    return save_dit_weights(WeightsView(tensors), out, metadata={"step": step, "ema": ema, "source": str(path)})


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from impl.inference.build import torch_dtype
    from impl.modes import DType, choices

    ap = argparse.ArgumentParser(prog="python -m impl.train.checkpoint",
                                 description="Export a training checkpoint for inference.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="one diffusers-layout safetensors file from a checkpoint of either format")
    ex.add_argument("checkpoint", type=Path, help="a checkpoint_<step> folder")
    ex.add_argument("out", type=Path, help="the .safetensors file to write")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights (default: the trained weights)")
    ex.add_argument("--dtype", choices=choices(DType), help="cast to this dtype (default: keep float32 masters)")
    args = ap.parse_args(argv)
    from impl.io import output_problem
    problem = output_problem(args.out, folder=False)
    if problem is not None:
        print(f"error: out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        out = export_dit_weights(args.checkpoint, args.out, ema=args.ema,
                                 dtype=torch_dtype(args.dtype) if args.dtype else None)
    except CorruptCheckpoint as exc:   # a file of an existing checkpoint is damaged: a runtime failure
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError) as exc:   # no such checkpoint, no EMA in it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(_main())
