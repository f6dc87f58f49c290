"""The fast input pipeline: data on the device, augmentation as batched tensor ops.

Small datasets (CIFAR-10/100, STL-10: an in-memory uint8 array) are moved to the training
device once, as a uint8 (N, 3, H, W) tensor. Each step's images are picked with the same
step-indexed permutation as the reference loader (so both loaders see the same images at
the same step) and augmented in one batch: every view gets its own random parameters, all
drawn with one call from a ``torch.Generator`` seeded by (seed, step, rank). A step's batch
is therefore a function of (seed, step, rank) alone, and a resumed run sees exactly the
batches of the uninterrupted one.

Large datasets (ImageNet, image folders) are read by CPU DataLoader workers as raw file
bytes only; the JPEGs are decoded in one batched ``torchvision.io.decode_jpeg`` call on the
device (on the CPU when there is no GPU) and augmented there.

The augmentation itself (its recipe, and its two documented differences from the reference)
is declared in :mod:`.augment`; its batched kernels are in :mod:`.batch_aug`.
"""
from __future__ import annotations

import io
import warnings
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..runtime import cpu_threads
from .augment import AugSpec, BatchAugment
from .batch_aug import center_view
from .datasets import bad_image_fix
from .images import jpeg_orientation, open_rgb
from .sampler import StepBatches, sample_seed, step_loader

# --------------------------------------------------------------------------------------------
# file datasets: bytes in CPU workers, decoding on the device
# --------------------------------------------------------------------------------------------
def _file_list(images):
    """The images' files as a :class:`~.scan.PathList` (None for in-memory data): workers index it."""
    files = getattr(images, "files", None)
    if files is not None:
        return files
    base = getattr(images, "base", None)
    if base is not None and getattr(base, "files", None) is not None:
        return base.files.take(images.indices)
    return None


class _RawItems(Dataset):
    """Item i -> (file bytes as a uint8 1-d tensor, or an already decoded (3, H, W) uint8 tensor
    for datasets without files, label)."""

    def __init__(self, images, files: Optional[list]):
        self.images, self.files = images, files

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        if self.files is not None:
            try:
                data = torch.from_numpy(np.fromfile(self.files[i], dtype=np.uint8))
            except OSError as e:
                raise DataError(f"cannot read image {self.files[i]}: {e}") from None
            return data, i
        arr = np.asarray(self.images.load(i).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i


def _collate(batch) -> tuple:
    """Worker side: a batch of raw items as ONE uint8 byte tensor plus offsets and shapes.

    A DataLoader worker sends every tensor of a batch through its own shared-memory file descriptor;
    a list of one tensor per image (batch 512, 16 workers, prefetch 4: ~30k descriptors in flight) ran
    out of descriptors (``OSError: Too many open files``). Here a batch is four tensors, whatever its size:
    ``data`` (all items' bytes, concatenated), ``offsets`` (B+1,) int64 (item k is ``data[offsets[k]:
    offsets[k+1]]``), ``shapes`` (B, 3) int64 ((3, H, W) of an already decoded item, (0, 0, 0) for file
    bytes) and ``indices`` (B,) int64. :func:`split_items` undoes it on the main side."""
    flat = [t.reshape(-1) for t, _ in batch]
    offsets = torch.zeros(len(flat) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([t.numel() for t in flat], dtype=torch.int64).cumsum(0)
    shapes = torch.tensor([list(t.shape) if t.dim() == 3 else [0, 0, 0] for t, _ in batch], dtype=torch.int64)
    indices = torch.tensor([i for _, i in batch], dtype=torch.int64)
    return torch.cat(flat), offsets, shapes, indices


def split_items(data: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor) -> list:
    """Main side of :func:`_collate`: the batch's items, as views of ``data`` (no copy)."""
    bounds, dims = offsets.tolist(), shapes.tolist()
    items = [data[bounds[k]:bounds[k + 1]] for k in range(len(dims))]
    return [t.view(*d) if d[0] else t for t, d in zip(items, dims)]


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def decode_batch(items: list, device: torch.device, files: Optional[list] = None, indices: Optional[list] = None,
                 skip_bad: Optional[bool] = None, bad: Optional[list] = None) -> list:
    """Raw items -> list of (3, H, W) uint8 on ``device``. JPEGs are decoded in one batched
    ``decode_jpeg`` call on the device (nvJPEG on CUDA); anything else, or a batch the device
    decoder rejects, is decoded image by image on the CPU by the package's one decoder (:mod:`.images`)."""
    with warnings.catch_warnings():  # torchvision 0.29 announces (at every call) a move to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_batch(items, device, files, indices, skip_bad, bad)


_fallback_warned = False  # the one-time warning of a rejected batched decode (per process)


def _warn_fallback(device: torch.device, n: int, error: Exception) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    warnings.warn(f"batched JPEG decoding on {device} (torchvision.io.decode_jpeg) failed for a batch of {n} "
                  f"images: {cause}. Those batches are decoded image by image, and the images the decoder still "
                  f"rejects by PIL on the CPU in the main process: that can cost seconds per step. Usual causes: "
                  f"CMYK, progressive or corrupt JPEGs in the data (re-encode them), or a torchvision without "
                  f"GPU decoding. (Warned once.)", RuntimeWarning, stacklevel=3)


_HEADER = 1 << 17  # a JPEG's EXIF segment lies in its first 64 KiB after APP0


def _upright(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded (3, H, W) image turned as EXIF ``orientation`` says (PIL's ``ImageOps.exif_transpose``)."""
    if orientation in (5, 6, 7, 8):
        t = t.transpose(-1, -2)
    if orientation in (2, 3, 6, 7):
        t = t.flip(-1)
    if orientation in (3, 4, 7, 8):
        t = t.flip(-2)
    return t.contiguous() if orientation != 1 else t


def _decode_batch(items, device, files, indices, skip_bad, bad) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg
    out: list = [None] * len(items)
    jpeg = [k for k, t in enumerate(items) if t.dim() == 1 and _is_jpeg(t)]
    if jpeg:
        try:
            dec = decode_jpeg([items[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            for k, t in zip(jpeg, dec):
                out[k] = t
        except RuntimeError as e:  # e.g. a CMYK or broken JPEG in the batch, or no GPU decoder
            _warn_fallback(device, len(jpeg), e)
            for k in jpeg:  # one image the device decoder rejects costs only itself
                try:
                    out[k] = decode_jpeg(items[k], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass  # decoded by PIL below
    for k in jpeg:  # the device decoder ignores the EXIF orientation; PIL's path (open_rgb) applies it
        if out[k] is not None:
            out[k] = _upright(out[k], jpeg_orientation(items[k][:_HEADER].numpy().tobytes()))
    for k, t in enumerate(items):
        if out[k] is not None:
            continue
        if t.dim() == 3:
            out[k] = t.to(device, non_blocking=True)
            continue
        try:  # the package's one decoder (16-bit, palette, CMYK ... to 8-bit RGB); torchvision's
            # decode_image gave 16-bit PNGs as uint16 tensors
            rgb = np.asarray(open_rgb(io.BytesIO(t.numpy().tobytes())), dtype=np.uint8)
            out[k] = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device, non_blocking=True)
        except Exception as e:  # PIL raises many types for broken files
            name = files[indices[k]] if files is not None and indices is not None else f"item {k}"
            if not skip_bad:
                why = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"cannot decode image {name}: {why}. {bad_image_fix(skip_bad)}") from None
            if bad is not None:
                bad.append(str(name))
    good = [t for t in out if t is not None]
    if not good:
        raise DataError("no decodable image in a batch")
    # a skipped image is replaced by another image of the same batch, so the batch keeps its size
    return [t if t is not None else good[k % len(good)] for k, t in enumerate(out)]


# --------------------------------------------------------------------------------------------
# the batch source
# --------------------------------------------------------------------------------------------
def _prefetched(it: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator ``it`` in a background thread, ``depth`` items ahead (torch ops release the GIL,
    so on a CPU the augmentation of the next step overlaps the current step's compute). The items and
    their order are exactly those of ``it``; an exception in the thread is re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        torch.set_num_threads(1)  # per-thread setting (OpenMP): the training thread keeps its own
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    # the training thread's own count, read before the producer sets 1: a thread that has not asked yet takes
    # the last count set by any thread (measured), and would train single-threaded
    torch.get_num_threads()
    t = threading.Thread(target=produce, daemon=True, name="simclr-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


class FastLoader:
    """Batch source (see :mod:`.loaders`) with batched tensor augmentation on ``device``."""

    def __init__(self, cfg, images, device: torch.device, rank: int = 0, world: int = 1,
                 interpolation: str = "auto"):
        self.device, self.rank, self.seed, self.m = torch.device(device), rank, int(cfg.seed), cfg.multiplier
        self.size = images.image_size
        self.aug_enabled = bool(cfg.aug)
        self.augment = BatchAugment(AugSpec.from_config(cfg, self.size, interpolation), cfg.multiplier)
        self.workers = cfg.workers
        self.images = images
        self.targets = torch.as_tensor(np.asarray(images.targets, dtype=np.int64)).to(self.device)
        arr = getattr(images, "images", None)
        self.data = None
        if arr is not None:  # the whole dataset on the device, uint8 (N, 3, H, W)
            self.data = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.files = None if arr is not None else _file_list(images)
        # indices into the on-device array are sliced on the device; file indices go to CPU workers
        self.steps = StepBatches(len(images), cfg.batch_size, cfg.seed, rank, world,
                                 self.device if self.data is not None else torch.device("cpu"))
        self.steps_per_epoch = self.steps.steps_per_epoch
        self.generator = torch.Generator(device=self.device)
        # on a CPU, build step s+1's views in a background thread while step s trains (benchmarks/cpu_threads.py
        # measures the split of the cores between it and the step's OpenMP threads)
        self.prefetch = self.device.type == "cpu"

    def step_generator(self, step: int) -> torch.Generator:
        """The generator of step ``step`` on this rank: seeded by (seed, step, rank)."""
        return self.generator.manual_seed(sample_seed(self.seed, step, self.rank))

    def _views(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if not self.aug_enabled:
            return center_view(x, self.size).repeat(self.m, 1, 1, 1)
        with cpu_threads(self.device, 1):
            return self.augment(x, self.step_generator(step))

    def batches(self, start: int, end: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.data is not None:
            if self.prefetch:
                yield from _prefetched(self._array_batches(start, end), depth=2)
            else:  # on a GPU the augmentation kernels are simply queued ahead of the step
                yield from self._array_batches(start, end)
            return
        yield from self._file_batches(start, end)

    def _array_batches(self, start: int, end: int):
        for s in range(start, end):
            idx = self.steps.index_tensor(s)
            x = self.data[idx].float().div_(255)
            yield self._views(x, s), self.targets[idx]

    def _file_batches(self, start: int, end: int):
        loader = step_loader(_RawItems(self.images, self.files), self.steps.sampler(start, end, seeds=False),
                             self.workers, collate_fn=_collate)
        skip = getattr(self.images, "skip_bad_images", None)
        bad = getattr(self.images, "bad_images", None)
        for s, (data, offsets, shapes, idx) in zip(range(start, end), loader):
            dec = decode_batch(split_items(data, offsets, shapes), self.device, self.files, idx.tolist(), skip, bad)
            y = self.targets[idx.to(self.device)]
            if not self.aug_enabled:
                yield torch.cat([center_view(t.unsqueeze(0).float().div_(255), self.size)
                                 for t in dec]).repeat(self.m, 1, 1, 1), y
                continue
            with cpu_threads(self.device, 1):
                x = self.augment.from_list(dec, self.step_generator(s))
            yield x, y
