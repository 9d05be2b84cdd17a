"""Atomic file writes: a file appears whole, with its final name, or not at all.

Every writer of results, checkpoints, LoRA files, plots and sidecars goes through
:func:`atomic_path`: the content is written to a temporary name in the same folder (so the
final ``os.replace`` is a rename on one filesystem), flushed, given the mode a plain ``open``
would give (0666 less the umask, usually 0644; ``mkstemp`` and safetensors' writer make 0600
files) and renamed into place; on any failure, Ctrl-C included,
the temporary file is removed and the old file (if any) is left untouched.

A SIGTERM is raised as Ctrl-C inside :func:`sigterm_as_interrupt`, so a ``kill`` cleans up the
same way; :func:`run_command` is the one ``main()`` of every command line around it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less this process's umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:   # reads the umask without changing it
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library that ignores the umask the mode the umask asks for."""
    os.chmod(path, file_mode())


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
        honour_umask(tmp_path)
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


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, atomically and with the umask's file mode; returns ``path``."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def weight_file_format(path: str | os.PathLike) -> str | None:
    """What a weight file is, by its structure (not its name or first byte alone):
    ``"safetensors"`` (8-byte little-endian header length, then that many bytes of a JSON
    object), ``"torch_zip"`` (``torch.save``'s zip: the PK magic), ``"torch_pickle"`` (legacy
    ``torch.save``: the pickle PROTO opcode 0x80 and a protocol 2-5), or None. The safetensors
    test comes first: a header length whose low byte is 0x80 makes a safetensors file start
    with the pickle opcode."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            if 2 <= n <= min(size - 8, 100 << 20):
                header = fh.read(n)
                if header[:1] == b"{":
                    try:
                        if isinstance(json.loads(header), dict):
                            return "safetensors"
                    except ValueError:   # not JSON (UnicodeDecodeError is a ValueError too)
                        pass
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch_pickle"
    return None


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


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`impl.errors.Terminated` (a KeyboardInterrupt)
    in the main thread, so a ``kill`` cleans up hidden temp files as Ctrl-C does. Does nothing
    outside the main thread (signal handlers can only be set there)."""
    from impl.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(body: Callable[[], int],
                exit_codes: Sequence[tuple[type[Exception] | tuple[type[Exception], ...], int]] = ()) -> int:
    """A command line's ``main()``: ``body()`` under :func:`sigterm_as_interrupt`, its end made an
    exit code. An exception of a kind in ``exit_codes`` (tried in order; 2 for usage errors, 1 for
    runtime failures) prints ``error: <message>`` as one line on stderr and returns its code;
    Ctrl-C prints "interrupted" and returns 130, SIGTERM "terminated" and 143. Anything else
    propagates: a bug, whose traceback is wanted."""
    from impl.errors import Terminated

    try:
        with sigterm_as_interrupt():   # a kill cleans up temp files as Ctrl-C does
            return body()
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        for kinds, code in exit_codes:
            if isinstance(exc, kinds):
                print(f"error: {exc}", file=sys.stderr)
                return code
        raise
