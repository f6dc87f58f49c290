"""One pretraining run's state, shared by its set-up, loop and checkpoints: the :class:`Session` that
:func:`simclr.train.pretraining.setup` leaves for :func:`simclr.train.loop.loop`, and its :class:`Log`."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from .. import distributed
from ..options import PretrainConfig
from ..progress import say
from ..rundir import RunDir
from .step import Parts


class Log:
    """Messages of the main process: the terminal (with --verbose) and the run's log.txt. Messages from before
    the run folder exists (resume notes) go into log.txt once it does."""

    def __init__(self, main: bool, verbose: bool):
        self.main, self.verbose, self.run, self._pending = main, verbose, None, []

    def attach(self, run: RunDir) -> None:
        self.run = run
        for msg in self._pending:
            run.log(msg)
        self._pending = []

    def __call__(self, msg: str) -> None:
        if not self.main:
            return
        if self.verbose:  # a bar on a terminal, timestamped lines in a log file (SLURM, a pipe)
            say(msg)
        if self.run is not None:
            self.run.log(msg)
        else:
            self._pending.append(msg)

    def warn(self, msg: str) -> None:
        """Also on stderr with --verbose false: a skipped corrupt checkpoint must not go unseen."""
        if self.main and not self.verbose:
            print(msg, file=sys.stderr, flush=True)
        self(msg)


@dataclass
class Session:
    """One pretraining run as the set-up leaves it, ready for the loop: what it was given, what it trains
    with, and what changes as it trains (saved in every checkpoint)."""
    cfg: PretrainConfig
    dist: distributed.DistInfo
    parts: Parts
    log: Log
    images: object                # the pretraining images (after --train_subset)
    bad_images: list              # unreadable files skipped with --skip_bad_images
    run: Optional[RunDir] = None  # the run folder (main process only)
    knn_sets: tuple = ()          # the kNN monitor's (train, test) images
    step: int = 0
    nan_skips: int = 0
    saved_step: int = -1          # the step whose checkpoint is on disk already (never rewritten in place)
    data_fingerprint: str = ""    # the pretraining split's files_identity: its content (checkpoints' data_content) ...
    data_listing: str = ""        # ... and its names and sizes only
    metrics: dict = field(default_factory=dict)
