"""Command line: ``python -m repro {run,report,hardware,specs,generate,profile,serve}``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from impl.errors import VideoWriteError
from impl.io import run_command
from repro.errors import BenchmarkError, HarnessError, RunError, SpecError
from repro.records import REPO_ROOT

EXPERIMENTS_DIR = REPO_ROOT / "experiments"


def resolve_spec(arg: str) -> Path:
    """Accept a path, or a bare experiment name looked up in experiments/<name>.yaml.

    Raises SpecError naming what was looked for (and how to list the specs) when neither exists."""
    p = Path(arg)
    if p.exists():
        return p
    if p.suffix in (".yaml", ".yml") or "/" in arg:
        raise SpecError(f"spec {arg}: no such file; list the experiment specs with `python -m repro specs`")
    named = EXPERIMENTS_DIR / f"{arg}.yaml"
    if not named.exists():
        raise SpecError(f"spec {arg!r} does not exist (no file {arg}, no {spec_display(named)}); "
                        f"list the experiment specs with `python -m repro specs`")
    return named


def spec_display(path: Path) -> str:
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def parse_pairs(items: list[str], flag: str = "--only") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from repro.runner import run_spec

    paths = run_spec(resolve_spec(args.spec), results_dir=args.results, device=args.device,
                     only=parse_pairs(args.only or []), exclude=parse_pairs(args.exclude or [], "--exclude"),
                     progress=not args.no_progress,
                     commit=args.commit, measure=parse_pairs(args.measure or [], "--measure"),
                     profile=args.profile)
    for p in paths:
        print(p)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from repro.generate import run

    print(run(args))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from repro.profile import run

    run(args)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from repro.serve import run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from repro.report import build_report

    for p in build_report(args.results):
        print(p)
    return 0


def cmd_hardware(args: argparse.Namespace) -> int:
    from repro.hardware import detect_hardware, hardware_tag

    hw = detect_hardware()
    print(json.dumps({**hw, "tag": hardware_tag(hw)}, indent=2))
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    import yaml

    folder = Path(args.dir)
    if not folder.is_dir():
        raise HarnessError(f"--dir {folder}: no such folder")
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not files:
        raise HarnessError(f"--dir {folder}: no *.yaml specs in this folder")
    width = max(len(f.stem) for f in files)
    for f in files:
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            desc = str(data.get("description", "")).strip() if isinstance(data, dict) else "(not a mapping)"
            bench = data.get("benchmark", "?") if isinstance(data, dict) else "?"
        except (OSError, yaml.YAMLError) as exc:
            desc, bench = f"(unreadable: {type(exc).__name__})", "?"
        print(f"{f.stem:<{width}}  [{bench}]  {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m repro",
                                 description="LongLive-2.0 reproduction harness: run experiment specs, "
                                             "write result records, build tables and plots.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run every variant of an experiment spec on this machine")
    run.add_argument("spec", help="spec file (experiments/NAME.yaml) or just the experiment NAME "
                                  "(list them with `python -m repro specs`)")
    run.add_argument("--results", default="results", metavar="DIR",
                     help="results folder; records go to DIR/<experiment>/<hardware>/ (default: results)")
    run.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="device class to run on: cpu or cuda (default: cuda if available, else cpu)")
    run.add_argument("--only", action="append", metavar="KEY=VALUE",
                     help="run only variants whose KEY equals VALUE (repeatable, all must hold; KEY is a variant "
                          "key of the spec's benchmark, a value no variant has is an error listing those that "
                          "exist); the baseline always runs too (default: every variant)")
    run.add_argument("--exclude", action="append", metavar="KEY=VALUE",
                     help="skip variants whose KEY equals VALUE (repeatable; applied after --only); the baseline "
                          "still runs (default: skip none)")
    run.add_argument("--measure", action="append", metavar="KEY=VALUE",
                     help="override one of the spec's measure settings for this run (repeatable; KEY is a measure "
                          "key of the spec's benchmark, typed and validated; records carry the settings used) "
                          "(default: the spec's settings)")
    run.add_argument("--profile", choices=["cpu", "cuda"], default=None,
                     help="use the spec's profile for this device class, cpu or cuda, instead of the one of "
                          "--device (e.g. evaluate the cuda-sized settings on a CPU); records name the real "
                          "hardware (default: the profile of --device)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    run.add_argument("--commit", default=None, metavar="SHA",
                     help="commit to record when the tree has no git metadata (a copy on a remote GPU) "
                          "(default: the checkout's HEAD)")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="build Markdown/CSV tables and PNG plots from records")
    rep.add_argument("--results", default="results", metavar="DIR",
                     help="results folder to read records from; tables go to DIR/tables, plots to DIR/plots "
                          "(default: results)")
    rep.set_defaults(func=cmd_report)

    hw = sub.add_parser("hardware", help="print the detected hardware as JSON")
    hw.set_defaults(func=cmd_hardware)

    specs = sub.add_parser("specs", help="list experiment specs with their descriptions")
    specs.add_argument("--dir", default=str(EXPERIMENTS_DIR), metavar="DIR",
                       help="folder of *.yaml specs (default: experiments/)")
    specs.set_defaults(func=cmd_specs)

    gen = sub.add_parser("generate", help="stream a (multi-shot) video to mp4 with the causal DiT")
    from repro.generate import add_arguments
    add_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser("profile", help="profile one steady-state AR block: time per phase and top kernels")
    from repro.profile import add_arguments as add_profile_arguments
    add_profile_arguments(prof)
    prof.set_defaults(func=cmd_profile)

    serve = sub.add_parser("serve", help="live page on 127.0.0.1: stream frames to a browser, switch prompts as it runs")
    from repro.serve import add_arguments as add_serve_arguments
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors are one line on stderr (no traceback) and an exit code:
    1 a run with failed variants or an I/O failure, 2 a bad spec/option/path, 130 Ctrl-C,
    143 SIGTERM (cleaned up as Ctrl-C)."""
    def command() -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run_command(command, EXIT_CODES)


# Tried in order. VideoWriteError: the disk filled up while writing --out; ValueError covers
# benchmark config errors (e.g. impl.config.ConfigError); OSError e.g. a full disk under a record.
EXIT_CODES = (((RunError, VideoWriteError), 1), ((SpecError, BenchmarkError, HarnessError, ValueError), 2), (OSError, 1))
