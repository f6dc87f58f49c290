"""simclr.messages: the project speaks through `logging`; a job's messages reach the terminal by --verbose and its
run folder's log.txt, those from before the folder exists included; a library user silences it as any library."""
from __future__ import annotations

import logging

import pytest

from tests.conftest import run_cli, tiny_args
from simclr import messages
from simclr.errors import UserError
from simclr.progress import ALWAYS

log = logging.getLogger("simclr.test")


def _lines(path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def test_messages_from_before_the_folder_exists_are_written_once_it_does(tmp_path, capsys):
    with messages.job(verbose=True) as run_log:
        log.info("note: resumed from X")
        log.warning("warning: skipping Y")
        assert not (tmp_path / "log.txt").exists()
        run_log.attach(tmp_path)
        log.info("step 1/2")
    log.info("after the job")  # the job is over: its log.txt is closed to others
    assert _lines(tmp_path / "log.txt") == ["note: resumed from X", "warning: skipping Y", "step 1/2"]
    err = capsys.readouterr().err
    assert "note: resumed from X" in err and "after the job" in err


def test_without_verbose_the_terminal_shows_warnings_and_announced_phases_only(tmp_path, capsys):
    with messages.job(verbose=False) as run_log:
        run_log.attach(tmp_path)
        log.info("step 1/2 loss 3.2")
        log.info("decoding 50000 images once", extra=ALWAYS)
        log.warning("warning: skipped 2 unreadable images")
    err = capsys.readouterr().err
    assert "step 1/2" not in err
    assert "decoding 50000 images once" in err and "warning: skipped 2 unreadable images" in err
    assert len(_lines(tmp_path / "log.txt")) == 3  # the file has everything
    log.info("a note after the job")  # the terminal's verbosity is put back
    assert "a note after the job" in capsys.readouterr().err


def test_a_process_other_than_the_main_one_says_nothing(tmp_path, capsys):
    with messages.job(verbose=True) as run_log:
        run_log.set_main(False)  # rank 1, known once the process group starts
        log.warning("warning: from rank 1")
        run_log.attach(tmp_path)
    assert capsys.readouterr().err == "" and not (tmp_path / "log.txt").exists()
    log.warning("warning: back in a single process")
    assert "back in a single process" in capsys.readouterr().err


def test_a_job_inside_a_job_keeps_its_own_log(tmp_path):
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    outer.mkdir(), inner.mkdir()
    with messages.job() as a:
        a.attach(outer)
        log.info("outer 1")
        with messages.job() as b:
            b.attach(inner)
            log.info("inner")
        log.info("outer 2")
    assert _lines(outer / "log.txt") == ["outer 1", "outer 2"] and _lines(inner / "log.txt") == ["inner"]


def test_an_unwritable_log_is_one_warning_and_the_job_goes_on(tmp_path, capsys, monkeypatch):
    import errno
    import os

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(messages, "append_line", full)
    with messages.job() as run_log:
        run_log.attach(tmp_path)
        log.info("one")
        log.info("two")
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left" in err and "one" in err and "two" in err


def test_a_log_txt_that_is_not_the_runs_own_is_refused_not_written_through(tmp_path):
    (tmp_path / "elsewhere.txt").write_text("someone else's file\n")
    (tmp_path / "log.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(UserError, match="symlink"):
        with messages.job() as run_log:
            run_log.attach(tmp_path)
            log.info("one")
    assert (tmp_path / "elsewhere.txt").read_text() == "someone else's file\n"


def test_a_library_user_silences_the_notes_as_for_any_library(tmp_path, data_root, capsys):
    logger = logging.getLogger("simclr")
    logger.setLevel(logging.WARNING)
    try:
        r = run_cli("pretrain", *tiny_args(tmp_path, iters=2, verbose="true"))
    finally:
        logger.setLevel(logging.INFO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 2/2" not in r.stderr and "pretraining " not in r.stderr


@pytest.mark.parametrize("verbose", ["true", "false"])
def test_pretraining_writes_every_note_into_log_txt_and_the_terminal_by_verbose(tmp_path, data_root, verbose):
    r = run_cli("pretrain", *tiny_args(tmp_path, iters=2, log_freq=1, verbose=verbose))
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = [p.parent for p in (tmp_path / "logs").glob("t/*/status.json")]
    text = (run / "log.txt").read_text()
    assert "pretraining resnet18" in text and "step 1/2" in text and "step 2/2" in text and "saved checkpoint" in text
    assert ("step 2/2" in r.stderr) == (verbose == "true")
