"""Small cuts a new user meets: where the example writes, eval's help, messages, the runs table, resume, install."""
from __future__ import annotations

import json
import re
import runpy
import shutil
import sys
import warnings

import pandas as pd
import pytest
from tests.conftest import REPO, run_cli, tiny_args

from simclr.data import get_dataset
from simclr.errors import DataError
from simclr.runs.cli import format_table


def _fake_run(root, rid="r1"):
    run = root / "t" / rid
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: t\narch: resnet18\niters: 30\ntemperature: 0.5\n")
    (run / "status.json").write_text(json.dumps({"status": "finished", "started": 1.0, "updated": 2.0, "step": 30}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 10, "loss": 5.0 - s / 10,
                                                           "images_per_s": 0.4}) + "\n" for s in (10, 20, 30)))
    return run


def test_read_runs_writes_its_figure_next_to_the_runs(tmp_path, monkeypatch):
    root = tmp_path / "logs"
    _fake_run(root)
    cwd = tmp_path / "clone"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["read_runs.py", "--root", str(root)])
    runpy.run_path(str(REPO / "examples" / "read_runs.py"), run_name="__main__")
    assert (root / "runs.png").is_file()
    assert list(cwd.iterdir()) == []  # nothing in the folder it was run from (the repo root, usually)


def test_eval_help_has_no_pretraining_width():
    r = run_cli("eval", "--help")
    assert r.returncode == 0
    assert "--encoder_width" in r.stdout
    assert not re.search(r"^\s*--width(_multiplier)?\b", r.stdout, re.M)


def test_a_missing_folder_split_is_named_plainly(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset("folder", "train", data_path=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "folder split folder" not in msg
    assert msg.startswith(f"the train split of --data_path not found: {tmp_path / 'nowhere' / 'train'}")


def test_the_steps_column_of_a_run_with_unknown_progress():
    df = pd.DataFrame({"step": [float("nan"), 120.0, float("nan")], "iters": [300.0, 300.0, float("nan")]})
    assert format_table(df, ["steps"]).split()[1:] == ["?/300", "120/300"]  # third row: blank


def test_slow_throughput_is_not_zero():
    from simclr.progress import rate
    assert [rate(v) for v in (0.42, 3.14159, 56.78, 1234.4)] == ["0.42", "3.14", "56.8", "1234"]
    df = pd.DataFrame({"images_per_s": [0.4]})
    assert format_table(df, ["images_per_s"]).split()[-1] == "0.4"


def test_the_csv_keeps_the_steps(tmp_path):
    _fake_run(tmp_path / "logs")
    r = run_cli("runs", "--root", tmp_path / "logs", "--format", "csv", "--columns", "id,steps,loss")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.strip().splitlines()
    assert header.split(",") == ["id", "step", "iters", "loss"]
    assert row.split(",")[:3] == ["r1", "30", "30"]


def test_resuming_a_finished_run_does_not_rerun_the_knn(tmp_path, data_root):
    first = run_cli("pretrain", *tiny_args(tmp_path, verbose="true"))
    assert first.returncode == 0, first.stderr
    run = next(ln.split(": ", 1)[1] for ln in first.stdout.splitlines() if ln.startswith("run folder: "))
    knn = next(ln for ln in first.stdout.splitlines() if ln.startswith("kNN top-1 after pretraining"))
    again = run_cli("pretrain", "--resume", run)
    assert again.returncode == 0, again.stderr
    assert "nothing to do: the run is already at step 4 of 4" in again.stderr
    assert "kNN monitor" not in again.stderr  # the result of the checkpoint, not a second pass over the data
    # nothing is announced as if it trained, and nothing is saved again
    assert "pretraining resnet18" not in again.stderr and "saved checkpoint" not in again.stderr
    assert knn in again.stdout


def test_the_build_has_no_license_deprecation(tmp_path, monkeypatch):
    from setuptools import build_meta
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src" / "simclr", tmp_path / "src" / "simclr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist_info = build_meta.prepare_metadata_for_build_wheel(str(tmp_path / "meta"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message)[:200] for w in caught]
    meta = (tmp_path / "meta" / dist_info / "METADATA").read_text()
    assert "License-Expression: MIT" in meta
