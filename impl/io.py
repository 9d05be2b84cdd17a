"""Atomic file writes: a file appears whole, with its final name, or not at all.

Every writer of results, checkpoints, LoRA files, plots and sidecars goes through
:func:`atomic_path`: the content is written to a temporary name in the same folder (so the
final ``os.replace`` is a rename on one filesystem), flushed, given mode 0644 (readable by
others, unlike ``mkstemp``'s 0600) and renamed into place; on any failure, Ctrl-C included,
the temporary file is removed and the old file (if any) is left untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it becomes ``path``.

    ``suffix`` is appended to the temporary name for writers that pick the format from the
    extension (matplotlib's ``savefig``: pass ``".png"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically; returns the final path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Path:
    """Serialise first (an unserialisable value fails before the disk is touched), then write
    atomically; returns the final path."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def output_problem(path: str | os.PathLike, *, folder: bool = True) -> str | None:
    """Why ``path`` (a folder, or a file when ``folder`` is False) cannot be written, or None.

    Creates nothing: the nearest existing ancestor must be a folder this process may write
    (probed with a temporary file, so read-only mounts and permissions both show up). Every
    output check (``--out``, ``--results``) goes through here, before any model is built."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    if not folder and path.is_dir():
        return f"{path} is a folder, not a file"
    probe = path if folder else path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot create {path}: {probe} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
    except OSError as exc:
        return f"cannot write {path}: {probe} is not writable ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(tmp)
    return None
