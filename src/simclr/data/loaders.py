"""The one data interface the training loop sees, and its reference implementation.

A *batch source* is any object with
    ``batches(start_step, end_step)`` -> iterator over ``(x, y)``, one pair per optimizer step,
        x: (m*B, 3, S, S) float in [0, 1] on the training device, ordered [view 1 of the B images;
        view 2; ...], y: (B,) labels;
    ``steps_per_epoch``: int.
Everything that feeds the loop — this reference path (PIL transforms in DataLoader
workers, the spec's way) or the fast tensor path — implements it. What step s draws is a
function of (seed, s) alone: the epoch's permutation is seeded by the epoch, and every
sample's augmentation by (seed, step, position in the global batch). So a resumed run
sees exactly the batches it would have seen, whatever the number of workers or processes.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .datasets import LabeledImages


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM (and Ctrl-C in a terminal) signal every process of the job;
    a worker killed by that SIGTERM would make the main process raise mid-step instead of finishing
    the step and saving. Workers ignore the signal; the main process decides and shuts them down."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of one sample's augmentation: a fixed hash of (seed, step, position), < 2**63."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(position)]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 1 << 31], dtype=np.uint64)))


class StepBatches:
    """Global batch of step s: images ``perm_e[b*B:(b+1)*B]`` (e = s // spe, b = s % spe, drop-last),
    of which this process takes rows ``[rank*B/W, (rank+1)*B/W)``."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch > n:
            raise DataError(f"batch_size {global_batch} is larger than the dataset ({n} images); "
                            f"use --batch_size {n} or smaller")
        if global_batch % world:
            raise DataError(f"batch_size {global_batch} is not divisible by the number of processes {world}")
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.local = global_batch // world
        self.steps_per_epoch = n // global_batch
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> list:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
        lo = b * self.batch + self.rank * self.local
        return self._perm[lo:lo + self.local].tolist()

    def sampler(self, start: int, end: int) -> Iterator[list]:
        """Batches of (dataset index, augmentation seed) for steps [start, end)."""
        for s in range(start, end):
            base = self.rank * self.local
            yield [(i, sample_seed(self.seed, s, base + j)) for j, i in enumerate(self.indices(s))]


class MultiViewDataset(Dataset):
    """Item (index, seed) -> (m views (m, 3, S, S), label), every view drawn independently from
    an RNG seeded by ``seed`` (torchvision's transforms draw from torch's global RNG, which is
    forked so the caller's RNG state is untouched)."""

    def __init__(self, images: LabeledImages, transform, multiplier: int):
        self.images, self.transform, self.m = images, transform, multiplier

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        img = self.images.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = torch.stack([self.transform(img) for _ in range(self.m)])
        return views, self.images.targets[index]


def views_first(x: torch.Tensor) -> torch.Tensor:
    """(B, m, C, H, W) -> (m*B, C, H, W) ordered [view 1 of all images; view 2; ...]."""
    b, m = x.shape[:2]
    return x.transpose(0, 1).reshape(m * b, *x.shape[2:])


class ReferenceLoader:
    """PIL/torchvision augmentations in DataLoader worker processes (the spec's way)."""

    def __init__(self, images: LabeledImages, transform, multiplier: int, global_batch: int, seed: int,
                 workers: int = 2, device: torch.device = torch.device("cpu"), rank: int = 0, world: int = 1):
        self.dataset = MultiViewDataset(images, transform, multiplier)
        self.steps = StepBatches(len(images), global_batch, seed, rank, world)
        self.steps_per_epoch = self.steps.steps_per_epoch
        self.workers, self.device = workers, device

    def batches(self, start: int, end: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_sampler=list(self.steps.sampler(start, end))
                            if end - start < 64 else _Lazy(self.steps, start, end),
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if self.workers else None,
                            worker_init_fn=ignore_stop_signals)
        for x, y in loader:
            yield (views_first(x).to(self.device, non_blocking=True),
                   torch.as_tensor(y).to(self.device, non_blocking=True))


class _Lazy:
    """A re-iterable batch sampler over steps [start, end) that does not materialise them all."""

    def __init__(self, steps: StepBatches, start: int, end: int):
        self.steps, self.start, self.end = steps, start, end

    def __iter__(self):
        return self.steps.sampler(self.start, self.end)

    def __len__(self) -> int:
        return self.end - self.start


def build_loader(cfg, images: LabeledImages, device: torch.device, rank: int = 0, world: int = 1):
    """The batch source for a pretraining config: ``fast`` (batched tensor augmentation) or
    ``reference`` (PIL transforms in workers). ``auto`` takes the fast path on CUDA."""
    from .transforms import eval_transform, simclr_transform
    kind = cfg.loader
    if kind == "auto":
        kind = "fast" if device.type == "cuda" else "reference"
    if kind == "fast":
        from .fast import FastLoader
        return FastLoader(cfg, images, device, rank, world)
    size = images.image_size
    if cfg.aug:
        transform = simclr_transform(size, cfg.color_dist_s, cfg.scale_lower, cfg.blur)
    else:
        native = getattr(images, "images", None)
        transform = eval_transform(size, native.shape[1] if native is not None else -1)
    return ReferenceLoader(images, transform, cfg.multiplier, cfg.batch_size, cfg.seed, cfg.workers, device,
                           rank, world)
