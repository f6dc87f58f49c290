"""What step s draws: the step-indexed sampler that both batch sources use, and the DataLoader over it.

A step's global batch is a function of (seed, step) alone: epoch e = s // steps_per_epoch
takes the permutation seeded by (seed, e), and batch b = s % steps_per_epoch its slice
[b*B, (b+1)*B) (drop-last), of which process r takes rows [r*B/W, (r+1)*B/W). Each sample's
augmentation is seeded by (seed, step, position in the global batch). So a resumed run sees
exactly the batches it would have seen, whatever the number of workers or processes, and
the reference and the fast loader see the same images at the same step.
"""
from __future__ import annotations

import signal
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of one sample's augmentation: a fixed hash of (seed, step, position), < 2**63."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(position)]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 1 << 31], dtype=np.uint64)))


class StepBatches:
    """This process's share of every step's global batch (see the module docstring).

    ``device``: where the epoch's permutation is kept; the fast path keeps it on the GPU, so a
    step's indices are a slice of it (one host-to-device copy per epoch, not per step)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")):
        if global_batch > n:
            raise DataError(f"batch_size {global_batch} is larger than the dataset ({n} images); "
                            f"use --batch_size {n} or smaller")
        if global_batch % world:
            raise DataError(f"batch_size {global_batch} is not divisible by the number of processes {world}")
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.local = global_batch // world
        self.steps_per_epoch = n // global_batch
        self.device = torch.device(device)
        self._perm_epoch, self._perm = -1, None

    def index_tensor(self, step: int) -> torch.Tensor:
        """(B/W,) dataset indices of step ``step`` for this process, on ``device``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, epoch).to(self.device), epoch
        lo = b * self.batch + self.rank * self.local
        return self._perm[lo:lo + self.local]

    def indices(self, step: int) -> list:
        return self.index_tensor(step).tolist()

    def seeded(self, step: int) -> list:
        """(dataset index, augmentation seed) of each of this process's samples of step ``step``."""
        base = self.rank * self.local
        return [(i, sample_seed(self.seed, step, base + j)) for j, i in enumerate(self.indices(step))]

    def sampler(self, start: int, end: int, seeds: bool = True) -> "StepRange":
        """A DataLoader batch sampler over steps [start, end): ``seeded`` batches, or plain indices."""
        return StepRange(self.seeded if seeds else self.indices, start, end)


class StepRange:
    """Re-iterable batch sampler yielding ``batch_of(s)`` for steps [start, end), computed as the
    DataLoader asks for them (a long run's steps are never all held in memory)."""

    def __init__(self, batch_of: Callable[[int], list], start: int, end: int):
        self.batch_of, self.start, self.end = batch_of, start, end

    def __iter__(self):
        return map(self.batch_of, range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM (and Ctrl-C in a terminal) signal every process of the job;
    a worker killed by that SIGTERM would make the main process raise mid-step instead of finishing
    the step and saving. Workers ignore the signal; the main process decides and shuts them down."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def step_loader(dataset: Dataset, steps: StepRange, workers: int, pin_memory: bool = False,
                collate_fn=None) -> DataLoader:
    """The DataLoader both batch sources read steps through: one batch per step, workers that
    leave stop signals to the main process."""
    return DataLoader(dataset, batch_sampler=steps, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if workers else None,
                      worker_init_fn=ignore_stop_signals)
