"""Run folders `simclr runs` must list without hanging or missing them, replayed through the real CLI: a FIFO where a
run file goes, run names nested a few parts deep (and one nested deeper than the listing looks, refused)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers.folder_runs import cli, one_error, one_run as run_folder_of, pretrain_args, tiny_data_setup

_DATA: list = []


_setup = tiny_data_setup(_DATA)


def one_run(tmp_path: Path, **over) -> Path:
    return run_folder_of(_DATA[0], tmp_path, **over)


# ------------------------------------------------------------------------------------------------
# (a) a FIFO named metrics.jsonl blocked `simclr runs` forever
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["metrics.jsonl", "status.json", "config.yaml", "eval.json"])
def test_a_fifo_in_a_run_folder_is_skipped_with_a_note_not_read(tmp_path, name):
    run = one_run(tmp_path, iters=2)
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    # a real process: blocking forever is the fault; 120 s bounds the test, not asserted
    r = run_cli("runs", "--root", tmp_path / "logs", subprocess=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert run.name in r.stdout, r.stdout
    (note,) = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert f"{name} (a FIFO)" in note and str(run) in note, note


# ------------------------------------------------------------------------------------------------
# (b) --name a/b/c/d made runs that `simclr runs` never listed
# ------------------------------------------------------------------------------------------------
def test_a_nested_run_name_is_listed(tmp_path, capsys):
    run = one_run(tmp_path, iters=1, save_freq=0, name="a/b/c/d")
    assert run.parent == tmp_path / "logs" / "a" / "b" / "c" / "d"
    rc, out, err = cli("runs", "--root", tmp_path / "logs", "--format", "csv", "--columns", "id,name")
    assert rc == 0, err
    assert f"{run.name},a/b/c/d" in out, out


def test_a_run_name_nested_deeper_than_runs_looks_is_refused(tmp_path):
    name = "/".join(f"p{i}" for i in range(16))
    rc, out, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", name=name, iters=1))
    one_error(rc, err, "--name", "16 parts", "simclr runs")
    assert not (tmp_path / "logs").exists()
