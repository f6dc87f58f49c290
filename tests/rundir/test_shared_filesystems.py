"""Cluster file systems as passing tests: a file system without flock (Lustre mounted `noflock`: flock fails
with ENOSYS) and NFS, whose flock is a byte-range lock that refuses an exclusive lock on a file opened
read-only. Both are simulated by replacing fcntl.flock; every command must work there."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.folder_runs import cli, knn_args, pretrain_args, tiny_data_setup
from simclr import checkpoint as ckpt_lib
from simclr import locks

_DATA: list = []
_REAL_FLOCK = fcntl.flock


_setup = tiny_data_setup(_DATA)


@pytest.fixture(autouse=True)
def _warn_anew(monkeypatch):
    monkeypatch.setattr(locks, "_WARNED", [])  # the once-per-process warning, once per test


def no_flock(fd, op):
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


def nfs_flock(fd, op):
    """flock as NFS emulates it: an exclusive lock needs a descriptor opened for writing (else EBADF)."""
    if op & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return _REAL_FLOCK(fd, op)


def steps(run: Path) -> list:
    return [int(ckpt_lib.CKPT_RE.search(p.name).group(1)) for p in ckpt_lib.list_checkpoints(run)]


def warnings_about_locks(err: str) -> list:
    """The lines of ``err`` warning about locks (off a terminal each line starts with its time)."""
    lines = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", ln) for ln in err.splitlines()]
    return [ln for ln in lines if ln.startswith("warning:") and "no file locks" in ln]


def test_without_flock_pretraining_runs_resumes_prunes_and_evaluations_read_it(tmp_path, monkeypatch):
    """Observation (Lustre `noflock`): every pretrain said the run folder 'is in use by another process', and
    knn/eval said a run with two checkpoints had 'no valid checkpoint'."""
    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "R"
    rc, out, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", run_dir=run, iters=4, stop_after=2,
                                      keep_last=2))
    assert rc == 0, err
    assert "in use" not in err
    (warning,) = warnings_about_locks(err)  # one warning, naming the situation
    assert "flock" in warning and str(run) in warning
    assert steps(run) == [2, 1]
    monkeypatch.setattr(locks, "_WARNED", [])
    rc, out, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
    assert len(warnings_about_locks(err)) == 1
    assert steps(run) == [4, 3], "resumed to the end, pruned to --keep_last 2 without a lock"
    assert "resumed from" in (run / "log.txt").read_text()
    monkeypatch.setattr(locks, "_WARNED", [])
    rc, out, err = cli(*knn_args(_DATA[0], tmp_path / "logs", run, name="ev"))
    assert rc == 0, err
    assert "no valid checkpoint" not in err and len(warnings_about_locks(err)) == 1
    assert "top-1" in out.lower() or "top1" in out.lower(), out


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL])
def test_without_flock_eval_reads_the_checkpoint(tmp_path, monkeypatch, code):
    """Every answer a file system without locks gives (Lustre noflock: ENOSYS; FUSE: EOPNOTSUPP; NFS without
    its lock manager: ENOLCK; EINVAL) lets eval read the run and pretraining continue it."""
    rc, _, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", run_dir=tmp_path / "R", iters=2, keep_last=2,
                                    stop_after=1))
    assert rc == 0, err

    def refused(fd, op):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fcntl, "flock", refused)
    rc, _, err = cli("pretrain", "--resume", tmp_path / "R")
    assert rc == 0, err
    assert steps(tmp_path / "R") == [2, 1] and len(warnings_about_locks(err)) == 1
    monkeypatch.setattr(locks, "_WARNED", [])
    rc, out, err = cli("eval", "--data", "folder", "--data_path", _DATA[0], "--image_size", 32, "--encoder_ckpt",
                       tmp_path / "R", "--device", "cpu", "--workers", 0, "--root", tmp_path / "logs", "--name", "ev",
                       "--verbose", "false", "--cache_features", "false", "--protocol", "linear", "--iters", 2,
                       "--batch_size", 16)
    assert rc == 0, err
    assert "no valid checkpoint" not in err and len(warnings_about_locks(err)) == 1


def test_on_nfs_keep_last_prunes_and_a_second_writer_is_still_refused(tmp_path, monkeypatch):
    """Observation (NFS): prune's probe opened checkpoints read-only, never got NFS's exclusive lock, and
    nothing was ever pruned: --keep_last was ignored until the disk filled."""
    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    run = tmp_path / "R"
    rc, _, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", run_dir=run, iters=4, keep_last=1))
    assert rc == 0, err
    assert steps(run) == [4]
    assert not warnings_about_locks(err)  # NFS has locks: no warning
    # the lock still works there: a second writer of the folder is refused
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        _REAL_FLOCK(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, _, err = cli("pretrain", "--resume", run, "--iters", 6, "--allow_config_change", "true")
        assert rc == 2 and "is in use by" in err, err
    finally:
        os.close(fd)
    rc, out, err = cli(*knn_args(_DATA[0], tmp_path / "logs", run, name="ev"))
    assert rc == 0, err


def test_on_nfs_a_checkpoint_being_read_is_still_not_pruned(tmp_path, monkeypatch):
    """The reader's pin (a shared lock on a read-only descriptor) still keeps prune away on NFS."""
    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    run = tmp_path / "R"
    rc, _, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", run_dir=run, iters=2, keep_last=2))
    assert rc == 0, err
    old = ckpt_lib.checkpoint_path(run, 1)
    assert ckpt_lib.pin(old)
    try:
        for src, dst in ((ckpt_lib.checkpoint_path(run, 2), ckpt_lib.checkpoint_path(run, 3)),):
            shutil.copy(src, dst)
            shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
        ckpt_lib.prune(run, 1)
        assert steps(run) == [3, 1], "the pinned checkpoint stays, the unpinned one goes"
    finally:
        ckpt_lib.unpin(old)
    ckpt_lib.prune(run, 1)
    assert steps(run) == [3]


def _reader_until(path: Path, written: Path) -> threading.Thread:
    """A reader that holds ``path``'s pin until ``written`` exists (the run's last checkpoint), then half a second
    more: it still reads when the last save prunes."""
    def read():
        deadline = time.monotonic() + 300
        while not written.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        ckpt_lib.unpin(path)
    assert ckpt_lib.pin(path)
    t = threading.Thread(target=read)
    t.start()
    return t


def _resume_while_reading(tmp_path: Path) -> tuple:
    """A 2-step run (keep_last 2) resumed to step 4 with --keep_last 1 while a reader holds checkpoint 1 until the
    last checkpoint exists: (run folder, the resume's stderr)."""
    run = tmp_path / "R"
    rc, _, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", run_dir=run, iters=2, keep_last=2))
    assert rc == 0, err
    t = _reader_until(ckpt_lib.checkpoint_path(run, 1), ckpt_lib.checkpoint_path(run, 4))
    try:
        rc, _, err = cli("pretrain", "--resume", run, "--iters", "4", "--keep_last", "1",
                         "--allow_config_change", "true")
    finally:
        t.join()
    assert rc == 0, err
    return run, err


def test_a_checkpoint_read_during_the_last_save_is_pruned_once_the_reader_is_done(tmp_path):
    """The last save has no next save to prune after it: it waits for the reader (readers pin only while they
    read), then keeps --keep_last."""
    run, err = _resume_while_reading(tmp_path)
    assert steps(run) == [4] and "beyond --keep_last" not in err


def test_a_reader_that_outlasts_the_wait_keeps_its_checkpoint_with_one_warning(tmp_path, monkeypatch):
    from simclr.train import resume
    monkeypatch.setattr(resume, "FINAL_PRUNE_WAIT_S", 0.0)
    run, err = _resume_while_reading(tmp_path)
    assert steps(run) == [4, 1]  # never deleted under a reader
    (line,) = [ln for ln in err.splitlines() if "beyond --keep_last 1" in ln]
    assert "checkpoint-00000001.pt" in line and "delete them by hand" in line
