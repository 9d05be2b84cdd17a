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
