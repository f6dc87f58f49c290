"""How the project speaks: the standard :mod:`logging` module, one logger per module under ``simclr``
(``log = logging.getLogger(__name__)``; ``log.info`` for a note, ``log.warning`` for what must not go unseen).

Two handlers carry every message of the ``simclr`` logger:

- the terminal (:data:`simclr.progress.TERMINAL`, installed when ``simclr`` is imported): above the bars on a
  terminal, timestamped lines elsewhere; warnings always, notes with ``--verbose`` (or marked ``extra=ALWAYS``);
- the run's ``log.txt`` (:class:`RunLog`), while a job runs (:func:`job`): every note and warning of the main
  process. Those from before the run folder exists (resume notes, data scans) are held and written once it does.

A library user silences or redirects the project like any other library: ``logging.getLogger("simclr")``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .files import append_line
from .progress import TERMINAL, printable

LOGGER = logging.getLogger("simclr")
_JOBS: list = []  # the RunLog of each job under way, innermost last: a message goes to the innermost's log.txt


def install() -> None:
    """The terminal handler on the ``simclr`` logger, once (``import simclr`` calls it)."""
    if TERMINAL not in LOGGER.handlers:
        LOGGER.addHandler(TERMINAL)
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)


class RunLog(logging.Handler):
    """``log.txt`` of one job's run folder: what the job said, held until :meth:`attach` names the folder."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.path: Optional[Path] = None
        self.pending: list = []
        self.main, self._failed = True, False

    def set_main(self, main: bool) -> None:
        """A process other than the main one (known once the process group starts) prints and writes nothing."""
        self.main = main
        TERMINAL.muted = not main

    def attach(self, folder: Path) -> None:
        self.path = Path(folder) / "log.txt"
        pending, self.pending = self.pending, []
        for msg in pending:
            self._write(msg)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.main or not _JOBS or _JOBS[-1] is not self:  # a job inside this one keeps its own log
            return
        msg = record.getMessage()
        if self.path is None:
            self.pending.append(msg)
        else:
            self._write(msg)

    def _write(self, msg: str) -> None:
        try:
            append_line(self.path, msg + "\n")
        except OSError as e:  # a full or vanished disk: the job goes on (its checkpoints say so loudly), once said
            if not self._failed:
                self._failed = True
                TERMINAL.emit(logging.makeLogRecord(
                    {"msg": printable(f"warning: cannot write {self.path} ({e}); messages go to the terminal only"),
                     "levelno": logging.WARNING}))


@contextmanager
def job(verbose: bool = True, main: bool = True) -> Iterator[RunLog]:
    """One command's messages: the terminal shows notes only with ``verbose``, and nothing at all in a process
    other than the ``main`` one (:meth:`RunLog.set_main` once it is known); the main process's messages also go to
    the :class:`RunLog` yielded (attach it to the run folder once it exists). The terminal is as before when the job
    ends."""
    install()
    run_log, saved = RunLog(), (TERMINAL.verbose, TERMINAL.muted)
    TERMINAL.verbose = verbose
    run_log.set_main(main)
    LOGGER.addHandler(run_log)
    _JOBS.append(run_log)
    try:
        yield run_log
    finally:
        _JOBS.remove(run_log)
        LOGGER.removeHandler(run_log)
        TERMINAL.verbose, TERMINAL.muted = saved
