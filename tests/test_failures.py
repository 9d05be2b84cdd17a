"""User mistakes and interruptions (issue 19): one-line errors naming the file or field, exit
codes, Ctrl-C stopping a run at once, output paths checked before any model is built, and the
`dirty` flag ignoring the harness's own outputs."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import repro.benchmark as registry
from test_repro_helpers import FAKE, gemm_spec, write_spec
from repro.cli import build_parser, main
from repro.records import git_state, load_records, output_dir_problem
from repro.runner import run_spec


# ---------------------------------------------------------------- Ctrl-C

@pytest.fixture
def interrupting(monkeypatch):
    """The fake benchmark's run function, replaced by one that counts its calls and raises
    ``calls.exc`` (KeyboardInterrupt unless a test sets another)."""
    calls = []

    def run(variant, measure, hw):
        calls.append(variant["mode"])
        raise calls_exc[0]

    calls_exc = [KeyboardInterrupt()]
    bench = registry.get_benchmark(FAKE)
    monkeypatch.setitem(registry._REGISTRY, FAKE, dataclasses.replace(bench, run=run))
    return calls, calls_exc


def test_ctrl_c_stops_run_spec_at_once(tmp_path, interrupting):
    calls, _ = interrupting
    spec = write_spec(tmp_path / "s.yaml", sweep={"mode": ["ok", "other", "boom"]})
    with pytest.raises(KeyboardInterrupt):
        run_spec(spec, results_dir=tmp_path / "r", device="cpu", progress=False)
    assert calls == ["ok"]                         # no further variant ran
    assert load_records(tmp_path / "r") == []


@pytest.mark.parametrize("wrapped", [False, True])
def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, interrupting, wrapped):
    calls, exc = interrupting
    if wrapped:   # library code that turns Ctrl-C into another error still stops the run
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            err = RuntimeError("decode failed")
            err.__cause__ = ki
            exc[0] = err
    spec = write_spec(tmp_path / "s.yaml", sweep={"mode": ["ok", "other", "boom"]})
    assert main(["run", str(spec), "--results", str(tmp_path / "r"), "--device", "cpu", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert len(calls) == 1


def test_train_cli_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    import impl.parallel.groups as groups
    from impl.train.__main__ import main as train_main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(groups, "init_distributed", interrupted)
    assert train_main(["--preset", "tiny", "--data", "synthetic-latents", "--out", str(tmp_path / "o"),
                       "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"


def test_distill_cli_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    import impl.parallel.groups as groups
    from impl.train.distill import main as distill_main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(groups, "init_distributed", interrupted)
    import torch
    from safetensors.torch import save_file
    teacher = tmp_path / "teacher.safetensors"
    save_file({"w": torch.zeros(1)}, str(teacher))   # passes the cheap format check done before Ctrl-C
    assert distill_main(["--teacher", str(teacher), "--out", str(tmp_path / "o"), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# ---------------------------------------------------------------- output paths, checked first

@pytest.fixture
def no_runs(monkeypatch):
    """Fail the test if the fake benchmark (or any model) is run."""
    def run(variant, measure, hw):
        raise AssertionError("a variant ran although the output path is unusable")

    bench = registry.get_benchmark(FAKE)
    monkeypatch.setitem(registry._REGISTRY, FAKE, dataclasses.replace(bench, run=run))


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for p in parts:
        assert p in err, (p, err)
    return err


def test_results_folder_blocked_by_a_file(tmp_path, capsys, no_runs):
    spec = write_spec(tmp_path / "s.yaml")
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    args = ["run", str(spec), "--device", "cpu", "--no-progress", "--results"]
    assert main([*args, str(blocker)]) == 2
    _one_line_error(capsys, "--results", str(blocker), "is not a folder")
    assert main([*args, str(blocker / "sub")]) == 2
    _one_line_error(capsys, "--results", "is a file, not a folder")


def test_results_folder_not_writable(tmp_path, capsys, no_runs, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kw):   # what a read-only folder or mount answers
        if dir is not None and Path(dir) == ro:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["run", str(spec), "--device", "cpu", "--no-progress", "--results", str(ro / "res")]) == 2
    _one_line_error(capsys, "--results", "not writable", "Permission denied")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write read-only folders")
def test_results_folder_read_only_by_mode(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "not writable" in output_dir_problem(ro / "res")
    finally:
        ro.chmod(0o755)


def test_profile_out_checked_before_building(tmp_path, capsys, monkeypatch):
    import impl.inference.build as build

    def never(*a, **k):
        raise AssertionError("the model was built although --out is unusable")

    monkeypatch.setattr(build, "build_pipeline", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["profile", "--preset", "tiny", "--out", str(blocker / "p.json")]) == 2
    _one_line_error(capsys, "--out", "is a file, not a folder")
    (tmp_path / "d.json").mkdir()
    assert main(["profile", "--preset", "tiny", "--out", str(tmp_path / "d.json")]) == 2
    _one_line_error(capsys, "--out", "is a folder, not a file")
    assert main(["profile", "--preset", "tiny", "--top", "0"]) == 2
    _one_line_error(capsys, "--top")


def test_train_and_distill_out_checked_before_building(tmp_path, capsys, monkeypatch):
    import impl.parallel.groups as groups
    from impl.train.__main__ import main as train_main
    from impl.train.distill import main as distill_main

    def never(*args, **kwargs):
        raise AssertionError("distributed set-up / model building started although --out is unusable")

    monkeypatch.setattr(groups, "init_distributed", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        assert train_main(["--preset", "tiny", "--data", "synthetic-latents", "--out", str(out)]) == 2
        _one_line_error(capsys, "--out", str(out))
        assert distill_main(["--teacher", str(blocker), "--out", str(out)]) == 2
        _one_line_error(capsys, "--out", str(out))
    assert train_main(["--preset", "tiny", "--data", "synthetic-latents", "--out", str(tmp_path / "ok"),
                       "--metrics-out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--metrics-out", "is a folder, not a file")


# ---------------------------------------------------------------- specs and filters

def test_missing_spec_name_points_to_the_list(tmp_path, capsys):
    assert main(["run", "nosuchspec", "--results", str(tmp_path / "r"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "'nosuchspec' does not exist", "python -m repro specs")
    assert main(["run", str(tmp_path / "nope.yaml"), "--results", str(tmp_path / "r"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "nope.yaml", "no such file", "python -m repro specs")
    assert main(["specs", "--dir", str(tmp_path / "none")]) == 2
    _one_line_error(capsys, "--dir", "no such folder")


def test_only_value_that_matches_nothing_lists_the_values(tmp_path, capsys):
    spec = gemm_spec(tmp_path / "g.yaml")
    base = ["run", str(spec), "--results", str(tmp_path / "r"), "--device", "cpu", "--no-progress"]
    assert main([*base, "--only", "k=99"]) == 2
    _one_line_error(capsys, "--only k=99", "values of k: 16, 32")
    assert main([*base, "--exclude", "k=7"]) == 2
    _one_line_error(capsys, "--exclude k=7", "values of k: 16, 32")
    assert main([*base, "--only", "nope=1"]) == 2
    _one_line_error(capsys, "--only nope", "unknown variant key")
    assert not (tmp_path / "r").exists()


def _subcommand_actions():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, action


# The subcommands whose flags the harness declares here (repro/cli.py, repro/profile.py with the
# inference flags of impl/inference/config.py); `generate` and `serve` declare their own.
_CHECKED = {"run", "report", "hardware", "specs", "profile"}


def test_every_option_has_help_with_its_default():
    missing = []
    for name, action in _subcommand_actions():
        flag = (action.option_strings or [action.dest])[0]
        if name not in _CHECKED or not action.option_strings:
            continue
        text = action.help or ""
        if not text or not ("default" in text or action.required):
            missing.append(f"{name} {flag}")
        # argparse lists the choices itself ("--device {cpu,cuda}") unless a metavar hides them
        if action.choices and action.metavar and not all(str(c) in text for c in action.choices):
            missing.append(f"{name} {flag}: allowed values")
    assert not missing, missing


# ---------------------------------------------------------------- dirty flag

def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=root,
                   check=True, capture_output=True)


def test_dirty_ignores_harness_outputs(tmp_path):
    root = tmp_path / "repo"
    for rel in ("code.py", "results/exp/cpu/a.json", "results/tables/exp.md", ".cache/quality/x.txt",
                ".benchmarks/b.json", "out/rec.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("v1\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    assert git_state(root) == {"commit": git_state(root)["commit"], "dirty": False}
    # A run rewrites committed records, tables and caches: still clean.
    for rel in ("results/exp/cpu/a.json", "results/tables/exp.md", ".cache/quality/x.txt", ".benchmarks/b.json"):
        (root / rel).write_text("v2\n")
    assert git_state(root)["dirty"] is False
    # A --results folder elsewhere in the tree is excluded when the run names it.
    (root / "out/rec.json").write_text("v2\n")
    assert git_state(root)["dirty"] is True
    assert git_state(root, exclude=(root / "out",))["dirty"] is False
    # A code change is dirty.
    (root / "code.py").write_text("v2\n")
    assert git_state(root, exclude=(root / "out",))["dirty"] is True


def test_later_specs_of_make_reproduce_stay_clean(tmp_path, monkeypatch):
    """`make reproduce` runs several specs; the first rewrites committed records (new timestamps),
    which must not mark the second spec's records dirty."""
    import repro.runner as runner

    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    (root / "code.py").write_text("x\n")
    first = write_spec(root / "a.yaml", sweep={"speed": [1.0, 2.0]})
    second = write_spec(root / "b.yaml", name="fake_exp_b", sweep={"speed": [3.0]})
    for spec in (first, second):
        run_spec(spec, results_dir=root / "results", device="cpu", progress=False)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "records committed")
    monkeypatch.setattr(runner, "git_state", lambda exclude=(): git_state(root, exclude))
    for spec in (first, second):   # what `make reproduce` does
        run_spec(spec, results_dir=root / "results", device="cpu", progress=False)
    recs = load_records(root / "results")
    assert len(recs) == 3 and [r["dirty"] for r in recs] == [False, False, False]


# ---------------------------------------------------------------- file modes (issue 25 item 11)

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_every_writer_honours_the_umask(tmp_path, umask_027):
    import torch

    from impl.config import get_preset
    from impl.io import write_json
    from impl.model.checkpoint import save_dit_weights
    from impl.model.dit import CausalWanDiT
    from impl.train.checkpoint import TrainState, save_checkpoint
    from impl.model.lora import LoraSpec, add_lora
    from impl.model.lora_files import save_lora

    model = CausalWanDiT(get_preset("tiny").dit, dtype=torch.float32)
    written = [write_json(tmp_path / "record.json", {"a": 1}),
               save_dit_weights(model, tmp_path / "export.safetensors")]
    ckpt = save_checkpoint(tmp_path / "run", TrainState(3, {"w": torch.zeros(2)}, {"m": torch.zeros(2)},
                                                        {"w": torch.zeros(2)}, {}), max_checkpoints=2)
    written += sorted(ckpt.iterdir())
    written.append(save_lora(tmp_path / "l.safetensors", add_lora(model, LoraSpec(rank=2, alpha=2)), steps=1,
                             base_hash="x"))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(umask_027)}, modes
    assert len(modes) == 7


# ---------------------------------------------------------------- training CLI (issue 25 items 9, 10, 13)

TRAIN = ["--preset", "tiny", "--data", "synthetic-latents", "--data-length", "2", "--no-progress"]


def _train(argv, capsys):
    from impl.train.__main__ import main as train_main
    rc = train_main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra,needle", [
    (["--data", "MISSING"], "--data: "),
    (["--data", "EMPTY"], "--data: VideoFolderDataset.root: no .mp4 files"),
    (["--frames", "3"], "TrainConfig.frames: must be whole AR blocks"),
    (["--config", "LR_FAST"], "TrainConfig.lr: must be a number, got 'fast'"),
])
def test_train_cli_user_mistakes_are_one_line_exit_2(tmp_path, capsys, extra, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "c.yaml").write_text('lr: "fast"\n')
    subst = {"MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty"), "LR_FAST": str(tmp_path / "c.yaml")}
    argv = [*TRAIN, "--out", str(tmp_path / "o"), *[subst.get(a, a) for a in extra]]
    rc, err = _train(argv, capsys)
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_yaml_float_without_a_dot_is_a_number():
    from impl.train.config import TrainConfig
    assert TrainConfig.from_dict({"lr": "1e-5"}).lr == 1e-5     # YAML 1.1 reads 1e-5 as a string


def test_train_cli_summary_resume_line_and_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = _train([*TRAIN, "--steps", "2", "--checkpoint-every", "1", "--out", str(out)], capsys)
    assert rc == 0 and len(err) == 1
    assert err[0].startswith("trained steps 1-2 of 2") and "final loss" in err[0]
    assert err[0].endswith(f"checkpoint {out / 'checkpoint_000002'}")

    rc, err = _train([*TRAIN, "--steps", "3", "--checkpoint-every", "1", "--out", str(out)], capsys)
    assert rc == 0 and err[0] == f"resumed from {out / 'checkpoint_000002'} at step 2"
    assert err[1].startswith("trained steps 3-3 of 3")

    # truncate the newest checkpoint's optimizer file: the run names it and resumes from the one before
    bad = out / "checkpoint_000003" / "optimizer.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    rc, err = _train([*TRAIN, "--steps", "3", "--out", str(out)], capsys)
    assert rc == 0, err
    assert err[0].startswith(f"warning: skipped checkpoint {out / 'checkpoint_000003'}: {bad}: truncated or corrupt")
    assert err[1] == f"resumed from {out / 'checkpoint_000002'} at step 2 (the newest intact checkpoint)"
    assert err[2].startswith("trained steps 3-3 of 3")

    # every checkpoint corrupt (here trainer.json): exit 1, one line naming the file
    for ckpt in out.glob("checkpoint_*"):
        (ckpt / "trainer.json").write_text('{"step": 2, "conf')
    rc, err = _train([*TRAIN, "--steps", "4", "--out", str(out)], capsys)
    assert rc == 1 and len(err) == 1 and "trainer.json: truncated or corrupt" in err[0], err
    assert "no older intact checkpoint" in err[0]


def test_distill_cli_rejects_3_steps_and_a_corrupt_teacher(tmp_path, capsys, monkeypatch):
    from impl.train.distill import main as distill_main
    with pytest.raises(SystemExit) as exc:
        distill_main(["--teacher", str(tmp_path), "--sampling-steps", "3", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--sampling-steps" in capsys.readouterr().err
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    import impl.parallel.groups as groups

    def no_model(*a, **k):
        raise AssertionError("got as far as building models")

    with monkeypatch.context() as m:
        m.setattr(groups, "init_distributed", no_model)
        rc = distill_main(["--teacher", str(teacher), "--iters", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --teacher: {teacher}"), err
    # a header that parses but tensors cut short: found when loading, still one line
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1000)}, str(teacher))
    teacher.write_bytes(teacher.read_bytes()[:-100])
    rc = distill_main(["--teacher", str(teacher), "--iters", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --teacher: {teacher}"), err


def test_checkpoint_export_errors_are_one_line(tmp_path, capsys):
    import torch

    from impl.train.checkpoint import TrainState, _main as export_main, save_checkpoint
    out = str(tmp_path / "w.safetensors")
    assert export_main(["export", str(tmp_path / "missing"), out]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    ckpt = save_checkpoint(tmp_path / "run", TrainState(1, {"w": torch.zeros(2)}, {"m": torch.zeros(2)}, None, {}), 2)
    assert export_main(["export", str(ckpt), out, "--ema"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ema.safetensors" in err[0] and "ema_start_step" in err[0]
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 4)
    assert export_main(["export", str(ckpt), out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ckpt / 'model.safetensors'}: truncated or corrupt" in err[0]
    assert not os.path.exists(out)


def test_dit_flag_accepts_a_training_checkpoint_folder(tmp_path):
    import torch

    from impl.model.checkpoint import read_checkpoint
    from impl.train.checkpoint import TrainState, save_checkpoint
    ckpt = save_checkpoint(tmp_path / "run", TrainState(1, {"w": torch.ones(2)}, {"exp_avg.w": torch.zeros(2)},
                                                        None, {}), 2)
    sd, info = read_checkpoint(ckpt)
    assert list(sd) == ["w"] and info.path == str(ckpt / "model.safetensors")   # not the optimizer's keys


# ---------------------------------------------------------------- generate (issue 25 item 10)

@pytest.mark.parametrize("extra,needle", [
    (["--device", "banana"], "--device banana: not a device"),
    (["--precision", "nvfp4_te"], "--precision nvfp4_te: Transformer Engine NVFP4 cannot run here"),
    (["--lora", "MISSING"], "--lora MISSING: no such file"),
    (["--dit", "MISSING"], "--dit MISSING: no such file or folder"),
    (["--shot", "a::1000000000"], "one run generates at most"),
])
def test_generate_user_mistakes_are_one_line_exit_2(tmp_path, capsys, monkeypatch, extra, needle):
    import impl.inference.build as build
    import impl.quant.te_linear as te

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(build, "build_pipeline", no_model)
    monkeypatch.setattr(te, "te_nvfp4_status", lambda device=None: (False, "no Blackwell GPU"))
    missing = str(tmp_path / "nope.safetensors")
    argv = ["generate", "--preset", "tiny", "--shot", "a cat", "--out", str(tmp_path / "v.mp4"), "--device", "cpu",
            *[missing if a == "MISSING" else a for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle.replace("MISSING", missing) in err[0], err


# ---------------------------------------------------------------- mp4 output (issue 25 item 8)

def test_full_disk_while_writing_the_mp4_leaves_nothing(tmp_path):
    """A real short write: ffmpeg under a file-size limit (EFBIG, as a full disk gives ENOSPC)
    leaves an mp4 without its moov atom, which imageio does not report; the writer must."""
    script = tmp_path / "fsz.py"
    script.write_text(
        "import resource, sys, numpy as np\n"
        "from impl.video_io import Mp4Writer, VideoWriteError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "frames = np.random.default_rng(0).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)\n"
        "try:\n"
        "    with Mp4Writer(sys.argv[1]) as w:\n"
        "        w.append_uint8(frames)\n"
        "except VideoWriteError as e:\n"
        "    print(e); sys.exit(1)\n")
    out = tmp_path / "v" / "a.mp4"
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 1, proc.stderr
    assert "no moov atom" in proc.stdout and str(out) in proc.stdout
    assert list(out.parent.iterdir()) == []


def test_generate_enospc_exits_1_with_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    import errno

    import imageio.v2 as iio

    real_get_writer = iio.get_writer

    class FullDisk:
        def __init__(self, *a, **k):
            self.real = real_get_writer(*a, **k)

        def append_data(self, frame):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.real.close()

    monkeypatch.setattr(iio, "get_writer", FullDisk)
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--preset", "tiny", "--shot", "a cat", "--out", str(out), "--device", "cpu"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("blocks")]
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_generate_removes_the_hidden_temp_file(tmp_path):
    import signal
    import time

    out = tmp_path / "v.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "repro", "generate", "--preset", "tiny", "--shot", "a cat::200",
                             "--out", str(out), "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".v.*.tmp.mp4")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".v.*.tmp.mp4")), "the writer never opened its temp file"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated"
    assert list(tmp_path.iterdir()) == []
