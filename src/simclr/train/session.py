"""One pretraining run's state, shared by its set-up, loop and checkpoints: the :class:`Session` that
:func:`simclr.train.pretraining.setup` leaves for :func:`simclr.train.loop.loop`. (Its messages go through
``logging``: :mod:`simclr.messages`.)"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import distributed
from ..options import PretrainConfig
from ..rundir import RunDir
from .step import Parts


@dataclass
class Session:
    """One pretraining run as the set-up leaves it, ready for the loop: what it was given, what it trains
    with, and what changes as it trains (saved in every checkpoint)."""
    cfg: PretrainConfig
    dist: distributed.DistInfo
    parts: Parts
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
