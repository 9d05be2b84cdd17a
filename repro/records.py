"""Result records (see DESIGN.md "Result records"): build, write atomically, load."""

from __future__ import annotations

import json
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from impl.io import output_problem, write_json
from repro.errors import HarnessError
from repro.hardware import hardware_tag

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = ("experiment", "metrics", "variant", "hardware")


# Folders the harness itself writes during a run (records, tables and plots, trained proxy
# pieces, pytest-benchmark output). Changes under them are outputs, not code: a record written
# earlier in the same `make reproduce` must not make the later ones "dirty".
HARNESS_OUTPUTS = ("results", ".cache", ".benchmarks")


def _pathspec_excludes(root: Path, extra: tuple[str | Path, ...]) -> list[str]:
    """``:(exclude)`` pathspecs (relative to ``root``) for the harness outputs and ``extra``
    folders inside ``root``; folders outside the tree cannot make it dirty and are dropped."""
    out = [f":(exclude){d}" for d in HARNESS_OUTPUTS]
    for folder in extra:
        p = Path(folder)
        p = (p if p.is_absolute() else Path.cwd() / p).resolve()
        try:
            rel = p.relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
        if rel not in (".", "") and f":(exclude){rel}" not in out:
            out.append(f":(exclude){rel}")
    return out


def git_state(root: str | Path = REPO_ROOT, exclude: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` for the repo at ``root``.

    ``dirty`` means tracked files differ from HEAD outside the harness's own outputs
    (:data:`HARNESS_OUTPUTS` and the ``exclude`` folders, e.g. a ``--results`` folder), so a
    run that rewrites committed records does not mark its own later records dirty.
    Untracked files (e.g. fresh results) do not change the measured code and are ignored too.
    """
    root = Path(root)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        dirty = bool(git("-C", str(top), "status", "--porcelain", "--untracked-files=no", "--", ".",
                         *_pathspec_excludes(top, (*exclude,))))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": sha, "dirty": dirty}


def output_dir_problem(path: str | Path) -> str | None:
    """Why the folder ``path`` cannot be created or written, or None (``impl.io.output_problem``)."""
    return output_problem(path, folder=True)


def output_file_problem(path: str | Path) -> str | None:
    """Why the file ``path`` cannot be written, or None (``impl.io.output_problem``)."""
    return output_problem(path, folder=False)


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Raise :class:`HarnessError` ``"<flag> <path>: <why>"`` unless ``path`` can be a writable
    folder; call it before building any model, so a bad path fails in a second, not after a run."""
    problem = output_dir_problem(path)
    if problem is not None:
        raise HarnessError(f"{flag} {path}: {problem}")
    return Path(path)


def check_output_file(path: str | Path, flag: str) -> Path:
    """:func:`check_output_dir` for an output file."""
    problem = output_file_problem(path)
    if problem is not None:
        raise HarnessError(f"{flag} {path}: {problem}")
    return Path(path)


def spec_relpath(spec_path: str | Path, root: str | Path = REPO_ROOT) -> str:
    """Spec path relative to the repo root when inside it, else absolute (POSIX style)."""
    p = Path(spec_path).resolve()
    try:
        return p.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(*, experiment: str, benchmark: str, variant: dict[str, Any], slug: str,
                hardware: dict[str, Any], metrics: dict[str, Any], measure: dict[str, Any],
                spec: str, git: dict[str, Any] | None = None) -> dict[str, Any]:
    git = git if git is not None else git_state()
    return {
        "experiment": experiment,
        "benchmark": benchmark,
        "variant": dict(variant),
        "variant_slug": slug,
        "hardware": dict(hardware),
        "metrics": dict(metrics),
        "measure": dict(measure),
        "commit": git["commit"],
        "dirty": git["dirty"],
        **({"commit_source": git["commit_source"]} if "commit_source" in git else {}),
        "created": utc_now(),
        "spec": spec,
    }


def record_path(record: dict[str, Any], results_dir: str | Path) -> Path:
    slug = record.get("variant_slug") or "default"
    return Path(results_dir) / record["experiment"] / hardware_tag(record["hardware"]) / f"{slug}.json"


def write_record(record: dict[str, Any], results_dir: str | Path) -> Path:
    """Write ``results_dir/<experiment>/<hardware_tag>/<variant_slug>.json`` atomically, and
    remove the records it supersedes: those in the same folder with the same variant under an
    older file name (a slug changes when the spec starts to vary another key; the old record
    carries that key in ``migrated_variant_keys``), so one variant has one record."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record is missing keys {missing}")
    path = write_json(record_path(record, results_dir), record)
    for old in path.parent.glob("*.json"):
        if old != path and not old.name.startswith(".") and _same_variant(old, record):
            old.unlink()
    return path


def _same_variant(path: Path, record: dict[str, Any]) -> bool:
    try:
        other = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False   # not a record we can read: left alone (load_records warns about it)
    return (is_record(other) and other.get("experiment") == record["experiment"]
            and other.get("variant") == record.get("variant"))


def is_record(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("experiment"), str)
            and isinstance(data.get("metrics"), dict))


# Folders under results/ that hold other JSON: `repro profile` summaries, raw kernel logs and
# the pytest-benchmark suite's output (`make bench-pytest`).
NON_RECORD_DIRS = {"profiles", "raw", "benchmarks"}


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """All records under ``results_dir`` (recursive, sorted by path); junk is skipped with a warning."""
    root = Path(results_dir)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):  # in-flight temp files of another writer
            continue
        if NON_RECORD_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping {path}: not valid JSON ({exc})", stacklevel=2)
            continue
        if not is_record(data):
            warnings.warn(f"skipping {path}: not a result record (needs 'experiment' and 'metrics')",
                          stacklevel=2)
            continue
        data.setdefault("variant", {})
        data.setdefault("hardware", {})
        data["_path"] = path.as_posix()
        out.append(data)
    return out
