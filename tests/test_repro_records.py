from __future__ import annotations

import json
import os
from datetime import datetime

import pytest

from repro.records import is_record, load_records, make_record, write_record

HW = {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "torch": "2.13",
      "cuda": "13.0", "capability": "9.0"}


def _rec(**kw):
    base = dict(experiment="exp", benchmark="b", variant={"steps": 4}, slug="steps-4", hardware=HW,
                metrics={"e2e_fps": 1.5}, measure={"blocks": 8}, spec="experiments/exp.yaml",
                git={"commit": "abc123", "dirty": False})
    base.update(kw)
    return make_record(**base)


def test_record_contract_fields():
    r = _rec()
    for key in ("experiment", "variant", "hardware", "metrics", "measure", "commit", "dirty",
                "created", "spec", "benchmark"):
        assert key in r
    created = datetime.fromisoformat(r["created"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0


def test_write_path_and_roundtrip(tmp_path):
    p = write_record(_rec(), tmp_path)
    assert p == tmp_path / "exp" / "nvidia-h100-80gb-hbm3-x1" / "steps-4.json"
    assert json.loads(p.read_text())["metrics"] == {"e2e_fps": 1.5}
    assert [f.name for f in p.parent.iterdir()] == ["steps-4.json"]  # no temp files left
    # Overwrite is atomic replace, still one file.
    write_record(_rec(metrics={"e2e_fps": 2.0}), tmp_path)
    assert json.loads(p.read_text())["metrics"]["e2e_fps"] == 2.0
    assert len(list(p.parent.iterdir())) == 1


def test_a_record_supersedes_its_variant_under_an_older_file_name(tmp_path):
    """When a spec starts to vary a key the slug of its rows changes; the rewritten row replaces
    the record of the same variant written under the old name (one record per variant)."""
    variant = {"steps": 4, "attention": "sdpa"}   # "attention" filled in by migration in the old record
    old = write_record(_rec(variant=variant, slug="steps-4"), tmp_path)
    other = write_record(_rec(variant={"steps": 2, "attention": "sdpa"}, slug="steps-2"), tmp_path)
    (old.parent / "notes.json").write_text("[1, 2]")   # not a record: left alone
    new = write_record(_rec(variant=variant, slug="attention-sdpa__steps-4", metrics={"e2e_fps": 3.0}), tmp_path)
    assert sorted(f.name for f in new.parent.iterdir()) == sorted([new.name, other.name, "notes.json"])
    assert not old.exists() and json.loads(new.read_text())["metrics"]["e2e_fps"] == 3.0


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    bad = _rec(metrics={"x": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        write_record(bad, tmp_path)
    assert not any(f.is_file() for f in tmp_path.rglob("*"))
    # A failure at the rename step must remove the temp file and keep the old record intact.
    p = write_record(_rec(), tmp_path)
    old = p.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_record(_rec(metrics={"e2e_fps": 9.0}), tmp_path)
    assert p.read_text() == old
    assert [f.name for f in p.parent.iterdir()] == ["steps-4.json"]


def test_load_records_skips_junk(tmp_path):
    write_record(_rec(), tmp_path)
    write_record(_rec(slug="steps-2", variant={"steps": 2}), tmp_path / "sub")
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning) as w:
        recs = load_records(tmp_path)
    assert len(w) == 3
    assert sorted(r["variant"]["steps"] for r in recs) == [2, 4]
    assert all(is_record(r) for r in recs)
    assert load_records(tmp_path / "does-not-exist") == []


def test_write_record_requires_contract_keys(tmp_path):
    with pytest.raises(ValueError, match="missing keys"):
        write_record({"experiment": "x"}, tmp_path)
