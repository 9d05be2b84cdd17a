"""``--help`` of every command line entry point exits 0 (issue 25 item 6: a bare ``%`` in a help
text made argparse fail with "unsupported format character" and exit 2).

In-process through each ``main(argv)`` (fast); entry points are found by grepping the sources for
``argparse.ArgumentParser(``, so a new CLI without a line here fails the coverage test."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module (or repo-relative script) -> argv lists whose --help must exit 0
ENTRY_POINTS = {
    "repro.cli": [["--help"]] + [[cmd, "--help"] for cmd in
                                 ("run", "report", "hardware", "specs", "generate", "profile", "serve")],
    "impl.train.__main__": [["--help"]],
    "impl.train.distill": [["--help"]],
    "impl.train.checkpoint": [["--help"], ["export", "--help"]],
    "impl.inference.sp": [["--help"]],
    "impl.parallel.vae_encode": [["--help"]],
    "impl.quant.nvfp4_theory": [["--help"]],
    "repro.quality.proxy": [["--help"]],
    "repro.quality.vbench_adapter": [["--help"]],
    "repro.reproduce_check": [["--help"]],
    "paper_tables.py": [["--help"]],
    "scripts/nvfp4_kernel_bench.py": [["--help"]],
}
# Modules whose argparse parsers are built by another entry point's main (not a CLI of their own).
PARSER_HELPERS = {"impl.inference.config", "repro.generate", "repro.profile", "repro.serve"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] in ("impl", "repro"):
        return ".".join(rel.with_suffix("").parts)
    return rel.as_posix()


def test_every_argparse_entry_point_is_covered():
    found = set()
    for folder in ("impl", "repro", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if "argparse.ArgumentParser(" in path.read_text(encoding="utf-8"):
                found.add(_module_name(path))
    for path in ROOT.glob("*.py"):
        if "argparse.ArgumentParser(" in path.read_text(encoding="utf-8"):
            found.add(_module_name(path))
    missing = found - set(ENTRY_POINTS) - PARSER_HELPERS
    assert not missing, f"CLI entry points without a --help test: {sorted(missing)}"


def _main_of(name: str):
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_cli_help_{Path(name).stem}", ROOT / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(name)
    return getattr(module, "main", None) or getattr(module, "_main")


CASES = [(name, argv) for name, argvs in ENTRY_POINTS.items() for argv in argvs]


@pytest.mark.parametrize("name,argv", CASES, ids=[f"{n}:{' '.join(a)}" for n, a in CASES])
def test_help_exits_0(name, argv, monkeypatch, capsys):
    if name == "scripts/nvfp4_kernel_bench.py":
        pytest.importorskip("triton")
    main = _main_of(name)
    monkeypatch.setattr(sys, "argv", [name] + argv)   # for the mains that read sys.argv themselves
    with pytest.raises(SystemExit) as exc:
        try:
            main(argv)
        except TypeError as err:                         # main() takes no argv
            if "positional argument" not in str(err):
                raise
            main()
    out, err = capsys.readouterr()
    assert exc.value.code in (0, None), err
    assert "usage:" in out


def test_percent_in_help_is_shown_once(capsys):
    from repro.cli import main
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "50% / 75%" in out and "%%" not in out
