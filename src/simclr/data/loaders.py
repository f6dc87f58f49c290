"""The one data interface the training loop sees, and its reference implementation.

A *batch source* is any object with
    ``batches(start_step, end_step)`` -> iterator over ``(x, y)``, one pair per optimizer step,
        x: (m*B, 3, S, S) float in [0, 1] on the training device, ordered [view 1 of the B images;
        view 2; ...], y: (B,) labels;
    ``steps_per_epoch``: int.
Everything that feeds the loop — this reference path (PIL transforms in DataLoader
workers, the spec's way) or the fast tensor path — implements it. Both draw through the
step-indexed sampler of :mod:`.sampler`, so what step s draws is a function of (seed, s) alone.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import Dataset, default_collate

from ..runtime import fast_compute
from .datasets import LabeledImages
from .fast import FastLoader
from .sampler import StepBatches, step_loader
from .augment import AugSpec
from .transforms import eval_transform


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


def views_first_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Items (views (m, 3, S, S), label) -> (x (m*B, 3, S, S) views first, y (B,)), stacked in that order
    by the worker. The batch the DataLoader pins is then the one copied to the device: reordering a pinned
    (B, m, ...) batch on the main side gave a new, pageable tensor, whose copy is synchronous."""
    views = [item[0] for item in batch]
    m = views[0].shape[0]
    x = default_collate([v[j] for j in range(m) for v in views])  # in a worker: stacked into shared memory
    return x, default_collate([item[1] for item in batch])


class ReferenceLoader:
    """PIL/torchvision augmentations in DataLoader worker processes (the spec's way)."""

    def __init__(self, images: LabeledImages, transform, multiplier: int, global_batch: int, seed: int,
                 workers: int = 2, device: torch.device = torch.device("cpu"), rank: int = 0, world: int = 1,
                 pin_memory: Optional[bool] = None):
        """``pin_memory``: page-lock batches so their copy to the device overlaps compute (default: on CUDA)."""
        self.dataset = MultiViewDataset(images, transform, multiplier)
        self.steps = StepBatches(len(images), global_batch, seed, rank, world)
        self.steps_per_epoch = self.steps.steps_per_epoch
        self.workers, self.device = workers, torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory

    def batches(self, start: int, end: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = step_loader(self.dataset, self.steps.sampler(start, end), self.workers, pin_memory=self.pin_memory,
                             collate_fn=views_first_collate)
        for x, y in loader:  # x is already views first: the pinned tensor itself is copied, asynchronously
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build_loader(cfg, images: LabeledImages, device: torch.device, rank: int = 0, world: int = 1):
    """The batch source for a pretraining config: ``fast`` (batched tensor augmentation) or
    ``reference`` (PIL transforms in workers). ``auto`` takes the fast path on CUDA, and on a CPU that computes
    bf16 natively (:func:`~simclr.runtime.fast_compute`) for a dataset held in memory (CIFAR, STL-10: a background
    thread augments the next step's batch while the step runs). Image folders on a CPU stay with PIL in workers,
    which decode in parallel instead of in the training process; a CPU without native bf16 keeps the spec's way."""
    kind = cfg.loader
    if kind == "auto":
        in_memory = getattr(images, "images", None) is not None
        kind = "fast" if device.type == "cuda" or (in_memory and fast_compute(device)) else "reference"
    if kind == "fast":
        return FastLoader(cfg, images, device, rank, world)
    size = images.image_size
    if cfg.aug:
        transform = AugSpec.from_config(cfg, size).reference()
    else:
        native = getattr(images, "images", None)
        transform = eval_transform(size, native.shape[1] if native is not None else -1)
    return ReferenceLoader(images, transform, cfg.multiplier, cfg.batch_size, cfg.seed, cfg.workers, device,
                           rank, world)
