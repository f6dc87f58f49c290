"""The run folder's lock is taken before a resume reads anything (issue 27, item 14): a second `simclr pretrain
--resume` of a folder in use is refused at once, before it scans the images or reads a checkpoint the first
process is about to supersede (it used to scan, read an older checkpoint, and only then meet the lock)."""
from __future__ import annotations

import fcntl
import json
import os

from tests.conftest import run_cli
from simclr import checkpoint as ckpt_lib
from simclr.errors import DataError
from simclr.train import pretraining


def test_a_resume_of_a_run_in_use_is_refused_before_the_data_scan_and_the_checkpoint_read(interrupted_run,
                                                                                          monkeypatch):
    run = interrupted_run
    touched = []
    latest_valid = ckpt_lib.latest_valid
    monkeypatch.setattr(pretraining, "get_dataset", lambda *a, **k: touched.append("data scan"))
    monkeypatch.setattr(ckpt_lib, "latest_valid", lambda *a, **k: touched.append("checkpoint read"))
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the folder's writer, another process
        r = run_cli("pretrain", "--resume", run)
    finally:
        os.close(fd)
    assert r.returncode == 2 and "is in use by" in r.stderr, r.stderr[-2000:]
    assert touched == []
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"  # the holder's, untouched

    # a set-up that fails once the lock is held lets go of it: the next resume takes it and finishes the run
    def scan_fails(*a, **k):
        raise DataError("the images are gone")

    monkeypatch.setattr(pretraining, "get_dataset", scan_fails)
    monkeypatch.setattr(ckpt_lib, "latest_valid", latest_valid)
    r = run_cli("pretrain", "--resume", run)
    assert r.returncode == 2 and "the images are gone" in r.stderr
    monkeypatch.undo()
    r = run_cli("pretrain", "--resume", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "status: finished at step 4" in r.stdout
